"""Command-line options generated from the pydantic config models.

A command names the dotted config keys it exposes and the flag of each:

    @config_flags(Stage1File, {**MODEL_FLAGS, "self_instruct.similarity_threshold": "--threshold"},
                  config_help="YAML with model: and stage-1 sections.")
    def self_instruct(cfg: Stage1File, out_dir: ...) -> None: ...

Each option's type comes from the field's annotation and its help from the field's
`Field(description=...)` plus the default the command would use, so a setting is described once,
where it is declared. The command receives `cfg`, built by `selfalign.config.build_config`:
the --config YAML, then --set overrides, then the flags given.

One vocabulary across commands: every command is a `Command` (every group a `Group`), which
shows plain metavars (MODEL, PATH, N, TEXT, FLOAT; none on a flag) and accepts the spellings of
`RENAMED` as hidden aliases of the current ones, with a one-line note on stderr.
Reads and writes nothing.
"""

from __future__ import annotations

import functools
import inspect
import re
import types
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal, Union, get_args, get_origin

import typer
from pydantic import BaseModel
from pydantic.fields import FieldInfo
from pydantic_core import PydanticUndefined
from rich.markup import escape
from typer.core import TyperArgument, TyperCommand, TyperGroup

from selfalign.config import build_config
from selfalign.errors import UserError


def keys(section: str, *fields: str, **renamed: str) -> dict[str, str]:
    """{"section.field": "--field"} for each field (underscores become dashes), and
    {"section.field": flag} for each `field=flag` whose flag is named otherwise."""
    prefix = f"{section}." if section else ""
    names = {f"{prefix}{f}": "--" + f.replace("_", "-") for f in fields}
    return names | {f"{prefix}{f}": flag for f, flag in renamed.items()}


# the `model:` section (a BackendConfig) of the commands that generate
MODEL_FLAGS = keys("model", "model", "batch_size", "device", "dtype")
# the released assistant (text.constitution.Identity), over the constitution's or the model's
IDENTITY_FLAGS = keys("", "name", "developer", "knowledge_cutoff")
NO_MODEL = "no model given: pass --model PATH_OR_HUB_ID (or model.model in --config)"

SetOpt = Annotated[
    list[str] | None,
    typer.Option(
        "--set",
        metavar="KEY=VALUE",
        help="Set any config key: --set dotted.key=value, the value read as YAML (repeatable). "
        "Flags win over --set, --set over --config.",
    ),
]
OutputOpt = Annotated[
    Path, typer.Option("--output", metavar="PATH", help="Folder for this stage's files (resumes).")
]
ShardOpt = Annotated[str | None, typer.Option("--shard", help="I/N: run slice I (0-based) of N.")]


# the chat settings `chat` and `answer` share (chat.ChatSettings)
CHAT_FLAGS = keys("", "system", "temperature", "seed", top_p="--top-p",
                  max_new_tokens="--max-tokens")  # fmt: skip


def sampling_flags(section: str) -> dict[str, str]:
    """--temperature, --top-p, --max-tokens for the SamplingParams at `section`."""
    return keys(section, "temperature", "max_tokens", top_p="--top-p")


def parse_pairs(values: list[str], option: str) -> dict[int, float]:
    """`["5=-100", "7=2.5"]` -> {5: -100.0, 7: 2.5}; a bad pair is a UserError naming it."""
    pairs = {}
    for text in values:
        key, sep, value = text.partition("=")
        try:
            if not sep:
                raise ValueError
            pairs[int(key.strip())] = float(value)
        except ValueError:
            raise UserError(
                f"{option} {text!r}: expected KEY=NUMBER, e.g. {option} 13=-100"
            ) from None
    return pairs


def require_model(section: Any) -> Any:
    """A command's `model:` section (a BackendConfig), which must name a model."""
    if section is None or not section.model:
        raise UserError(NO_MODEL)
    return section


# -- generating options ----------------------------------------------------------------------


@dataclass(frozen=True)
class Flag:
    """One generated option: the config `key` it sets, as parameter `param` of the command."""

    key: str
    param: str
    annotation: Any  # Annotated[T | None, typer.Option(...)]
    parse: Callable[[Any], Any]


def field_at(model: type[BaseModel], key: str) -> tuple[FieldInfo, Any]:
    """The field at dotted `key` of `model` and the default a config gets there: a section's own
    default wins (stage 1's self_instruct.sampling.top_p is 0.98, SamplingParams' is 1.0)."""
    node: Any = None  # the default value of the section walked so far, if it has one
    owner: Any = model
    for part in key.split("."):
        if not (isinstance(owner, type) and part in owner.model_fields):
            raise KeyError(f"{model.__name__} has no config key {key!r}")
        field = owner.model_fields[part]
        node = getattr(node, part) if node is not None else _default(field)
        owner = _section_model(field.annotation)
    return field, node


def _default(field: FieldInfo) -> Any:
    value = field.get_default(call_default_factory=True)
    return None if value is PydanticUndefined else value


def _section_model(annotation: Any) -> type[BaseModel] | None:
    """The model class of a section annotated `Model` or `Model | None`; None for a leaf."""
    for kind in (annotation, *_non_none(annotation)):
        if isinstance(kind, type) and issubclass(kind, BaseModel):
            return kind
    return None


def _non_none(annotation: Any) -> tuple[Any, ...]:
    if get_origin(annotation) in (Union, types.UnionType):
        return tuple(a for a in get_args(annotation) if a is not type(None))
    return ()


def _option_type(annotation: Any, flag: str) -> tuple[Any, Callable[[Any], Any], dict[str, Any]]:
    """(type typer parses, how to turn its value into the field's, extra typer.Option arguments)."""
    inner = _non_none(annotation)
    if len(inner) == 1:
        return _option_type(inner[0], flag)
    origin, args = get_origin(annotation), get_args(annotation)
    if annotation in (int, float, str, bool) or origin is Literal:
        return annotation, _same, {}
    if origin is list and args == (str,):
        return list[str], list, {"metavar": "TEXT"}
    if origin is dict and args == (int, float):  # token ids or n-gram orders -> weights
        return list[str], functools.partial(parse_pairs, option=flag), {"metavar": "N=X"}
    words = [w for a in inner if get_origin(a) is Literal for w in get_args(a)]
    if words and len(inner) == 2:  # a number or a word (processes: 4 | auto): the model parses it
        return str, _same, {"metavar": "|".join(["N", *words])}
    raise TypeError(f"{flag}: no command-line form for a {annotation!r} field")


def _same(value: Any) -> Any:
    return value


def _show(value: Any) -> str | None:
    """How help shows a default; None for nothing to show."""
    if value is None or value == [] or value == {}:
        return None
    if isinstance(value, dict):
        return " ".join(f"{k}={v}" for k, v in value.items())
    if isinstance(value, list):
        return " ".join(map(str, value))
    return str(value).lower() if isinstance(value, bool) else str(value)


@dataclass(frozen=True)
class Custom:
    """A flag whose command-line form differs from its field's: typer parses a `kind`, `parse`
    turns that into the field's value (or raises a UserError naming the flag)."""

    flag: str
    kind: Any
    parse: Callable[[Any], Any]
    metavar: str
    help: str | None = None  # instead of the field's description


# metavars of str fields by name: what the value is, not its Python type
METAVARS = {"model": "MODEL", "tokenizer": "MODEL", "seed_tasks": "PATH", "meta_prompt": "PATH",
            "seed_questions": "PATH", "prompt": "PATH", "topics": "PATH", "constitution": "PATH",
            "identity_conversations": "PATH", "device": "DEVICE"}  # fmt: skip


def make_flags(
    model: type[BaseModel], names: Mapping[str, str | Custom], into: str, show_defaults: bool = True
) -> list[Flag]:
    """One `Flag` per `dotted key -> --flag` (or `Custom`) of `names`, for the command parameter
    `into`; its help is the field's description (and the default a config of `model` gets, if
    `show_defaults`)."""
    out = []
    for key, spec in names.items():
        field, default = field_at(model, key)
        if not field.description:
            raise TypeError(f"{model.__name__}.{key} needs a Field(description=...) for {spec}")
        if isinstance(spec, Custom):
            flag, kind, parse, extra = spec.flag, spec.kind, spec.parse, {"metavar": spec.metavar}
        else:
            flag, (kind, parse, extra) = spec, _option_type(field.annotation, spec)
            if kind is str and "metavar" not in extra:
                extra["metavar"] = METAVARS.get(key.split(".")[-1], "TEXT")
        decls = (f"{flag}/--no-{flag[2:]}",) if kind is bool else (flag,)
        shown = _show(default) if show_defaults else None
        text = (spec.help if isinstance(spec, Custom) else None) or field.description
        # rich would take "[...]" in a description for markup
        help = escape(text + (f" [default: {shown}]" if shown else ""))
        option = typer.Option(*decls, help=help, show_default=False, **extra)
        param = f"{into}__{key.replace('.', '__')}"  # cfg__self_instruct__seed: no clash
        out.append(Flag(key, param, Annotated[kind | None, option], parse))
    return out


def _given(flags: list[Flag], values: dict[str, Any]) -> dict[str, Any]:
    """{dotted key: value} of the flags the user gave (typer passes None for the others)."""
    return {f.key: f.parse(values[f.param]) for f in flags if values[f.param] is not None}


def _with_params(fn: Callable, into: str, params: list[inspect.Parameter], make: Callable):
    """`fn` as typer sees it: its parameter `into` replaced by `params`; when called, `make`
    turns the values of `params` into the argument `into`."""
    signature = inspect.signature(fn, eval_str=True)
    if into not in signature.parameters:
        raise TypeError(f"{fn.__name__} has no parameter {into!r} for its generated options")
    own = [p.name for p in params]
    # keyword-only: typer passes everything by name, and the order of the help stays the code's
    listed = []
    for p in signature.parameters.values():
        listed += params if p.name == into else [p.replace(kind=inspect.Parameter.KEYWORD_ONLY)]

    def command(**values):  # unannotated: typer reads the signature below, not hints
        mine = {name: values.pop(name) for name in own}
        return fn(**values, **{into: make(mine)})

    functools.update_wrapper(command, fn, assigned=("__module__", "__name__", "__doc__"))
    command.__signature__ = signature.replace(parameters=listed)
    return command


def _parameter(name: str, annotation: Any) -> inspect.Parameter:
    return inspect.Parameter(
        name, inspect.Parameter.KEYWORD_ONLY, default=None, annotation=annotation
    )


def config_flags(
    model: type[BaseModel],
    names: Mapping[str, str | Custom],
    *,
    config_help: str | None = None,
    prepare: Callable[[dict[str, Any]], dict[str, Any]] | None = None,
) -> Callable[[Callable], Callable]:
    """Decorator: the command's parameter `cfg` becomes one option per `dotted key -> --flag`
    of `names` (plus --config and --set when `config_help` says what the YAML holds), and the
    command gets `cfg = build_config(model, --config, --set, flags given, prepare=prepare)`."""
    flags = make_flags(model, names, "cfg")
    params = [_parameter(f.param, f.annotation) for f in flags]
    if config_help is not None:
        path_opt = Annotated[Path | None, typer.Option("--config", help=config_help)]
        params += [_parameter("config", path_opt), _parameter("set_", SetOpt)]

    def make(values: dict[str, Any]) -> BaseModel:
        path, overrides = values.pop("config", None), values.pop("set_", None)
        return build_config(model, path, overrides or (), _given(flags, values), prepare=prepare)

    return lambda fn: _with_params(fn, "cfg", params, make)


def field_flags(
    model: type[BaseModel], names: Mapping[str, str], *, into: str, show_defaults: bool = True
) -> Callable[[Callable], Callable]:
    """Decorator: the command's parameter `into` becomes one option per `key -> --flag` of
    `names`; the command gets {key: value} of the ones given, to lay over what it builds
    (`show_defaults=False` where that, not `model`, decides the default)."""
    flags = make_flags(model, names, into, show_defaults)
    params = [_parameter(f.param, f.annotation) for f in flags]
    return lambda fn: _with_params(fn, into, params, functools.partial(_given, flags))


# -- training placement in the generating commands' words ---------------------------------------

_PRECISIONS = {"auto": "auto", "bfloat16": "bf16", "float16": "fp16", "float32": "fp32"}


def precision_of(dtype: str) -> str:
    """--dtype for training (TrainConfig.precision): the generating commands' words (bfloat16),
    or the precision's own (bf16, as --precision took)."""
    if dtype in _PRECISIONS.values():
        return dtype
    if dtype not in _PRECISIONS:
        raise UserError(f"--dtype {dtype!r}: choose {', '.join(_PRECISIONS)}")
    return _PRECISIONS[dtype]


def train_device(device: str) -> str:
    """--device for training (TrainConfig.device): auto, cpu, cuda, or cuda:N, which trains on
    GPU N alone by narrowing CUDA_VISIBLE_DEVICES for this process and the ones it launches
    (before torch first looks at CUDA), as the generating commands' cuda:N picks one GPU."""
    import os

    kind, _, index = device.partition(":")
    if device in ("auto", "cpu", "cuda"):
        return device
    if kind != "cuda" or not index.isdigit():
        raise UserError(f"--device {device!r}: choose auto, cpu, cuda or cuda:N")
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    gpus = visible.split(",") if visible else None
    if gpus is not None and int(index) >= len(gpus):
        raise UserError(f"--device {device}: CUDA_VISIBLE_DEVICES={visible} shows {len(gpus)} GPUs")
    os.environ["CUDA_VISIBLE_DEVICES"] = gpus[int(index)] if gpus else index
    return "cuda"


# engrave's --device and --dtype, spelled as the generating commands spell them
TRAIN_PLACEMENT = {
    "device": Custom("--device", str, train_device, "DEVICE",
                     "auto (CUDA if present, else CPU), cpu, cuda, or cuda:N (GPU N alone)."),
    "precision": Custom("--dtype", str, precision_of, "auto|bfloat16|float16|float32",
                        "auto: bfloat16 (or float16) on CUDA, float32 on CPU."),
}  # fmt: skip


# -- one vocabulary: metavars and renamed flags ------------------------------------------------

# old spelling -> current one; a command that has the current flag accepts the old one too
RENAMED = {
    "--out-dir": "--output",
    "--out": "--output",
    "--max-new-tokens": "--max-tokens",
    "--precision": "--dtype",
    "--identity-data": "--identity-conversations",
}
# how typer names a type -> the metavar users see
_TYPE_METAVARS = {"str": "TEXT", "int": "N", "float": "FLOAT", "path": "PATH", "file": "PATH",
                  "directory": "PATH"}  # fmt: skip


def metavar(param: Any) -> str:
    """The plain metavar of a typer parameter: none for a flag, MODEL for an argument named
    model, `a|b` for choices, N / FLOAT / TEXT / PATH by type."""
    if getattr(param, "is_flag", False) or getattr(param, "count", False):
        return ""
    if isinstance(param, TyperArgument):
        return param.name.upper()
    shown = param.display_type(None).strip("<>")
    if shown.startswith("list[") and shown.endswith("]"):  # repeatable: its item's metavar
        shown = shown[5:-1]
    return _TYPE_METAVARS.get(shown, shown)


def renamed_args(args: list[str], have: set[str], warn: Callable[[str], None]) -> list[str]:
    """`args` with each old spelling of `RENAMED` (`--out DIR`, `--out=DIR`) replaced by the
    current flag, where the command has that flag and not the old one; `warn` hears each once."""
    out, told = [], set()
    for i, arg in enumerate(args):
        if arg == "--":  # what follows is positional, whatever it looks like
            return out + args[i:]
        old, sep, value = arg.partition("=")
        new = RENAMED.get(old)
        if new in have and old not in have:
            if old not in told:
                warn(f"note: {old} is now {new} (the old spelling still works)")
                told.add(old)
            arg = new + sep + value
        out.append(arg)
    return out


class _Plain:
    """Help with plain metavars: MODEL not {model}, N not <int>, nothing after a flag."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        for param in self.params:
            if param.metavar is None:
                param.metavar = metavar(param)
            if isinstance(param, TyperArgument):
                # the metavar names an argument (MODEL); typer would add its type (<str>)
                param.display_type_rich = _no_type

    def get_help_option(self, ctx: Any) -> Any:
        option = super().get_help_option(ctx)
        if option is not None:
            option.metavar = ""
        return option

    def collect_usage_pieces(self, ctx: Any) -> list[str]:
        # typer writes a required argument {NAME}; click's convention is NAME ([NAME] optional)
        pieces = super().collect_usage_pieces(ctx)
        return [re.sub(r"^\{(.*)\}((?:\.\.\.)?)$", r"\1\2", piece) for piece in pieces]


class Command(_Plain, TyperCommand):
    """Every selfalign command: plain help, and the old spellings of `RENAMED` accepted."""

    def parse_args(self, ctx: Any, args: list[str]) -> list[str]:
        have = {o for p in self.params for o in (*p.opts, *p.secondary_opts)}
        return super().parse_args(ctx, renamed_args(args, have, _warn))


class Group(_Plain, TyperGroup):
    """The `selfalign` group and its sub-groups (`constitution`, `configs`, `config`)."""


def _no_type(ctx: Any) -> None:
    return None


def _warn(text: str) -> None:
    typer.echo(text, err=True)
