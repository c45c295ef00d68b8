"""Command-line options generated from the pydantic config models.

A command names the dotted config keys it exposes and the flag of each:

    @config_flags(Stage1File, {**MODEL_FLAGS, "self_instruct.similarity_threshold": "--threshold"},
                  config_help="YAML with model: and stage-1 sections.")
    def self_instruct(cfg: Stage1File, out_dir: ...) -> None: ...

Each option's type comes from the field's annotation and its help from the field's
`Field(description=...)` plus the default the command would use, so a setting is described once,
where it is declared. The command receives `cfg`, built by `selfalign.config.build_config`:
the --config YAML, then --set overrides, then the flags given. Reads and writes nothing.
"""

from __future__ import annotations

import functools
import inspect
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
OutDirOpt = Annotated[Path, typer.Option("--out-dir", help="Folder for this stage's files.")]
ShardOpt = Annotated[str | None, typer.Option("--shard", help="I/N: run slice I (0-based) of N.")]


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


def make_flags(
    model: type[BaseModel], names: Mapping[str, str], into: str, show_defaults: bool = True
) -> list[Flag]:
    """One `Flag` per `dotted key -> --flag` of `names`, for the command parameter `into`; its
    help is the field's description (and the default a config of `model` gets, if
    `show_defaults`)."""
    out = []
    for key, flag in names.items():
        field, default = field_at(model, key)
        if not field.description:
            raise TypeError(f"{model.__name__}.{key} needs a Field(description=...) for {flag}")
        kind, parse, extra = _option_type(field.annotation, flag)
        decls = (f"{flag}/--no-{flag[2:]}",) if kind is bool else (flag,)
        shown = _show(default) if show_defaults else None
        # rich would take "[...]" in a description for markup
        help = escape(field.description + (f" [default: {shown}]" if shown else ""))
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
    names: Mapping[str, str],
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
