"""Options generated from the pydantic config fields (`selfalign.cli.options`): every command
hands each of its flags to its config, the flags users' scripts use still exist, and help text
comes from the fields' descriptions with the defaults of the command's own section."""

from __future__ import annotations

import inspect
import os
import re
import types
from pathlib import Path
from typing import Annotated, Any, Literal, Union, get_args, get_origin

import pytest
import typer
from cli_run import run_cli
from pydantic import BaseModel, ConfigDict, Field

from selfalign.cli import app, options
from selfalign.cli.options import config_flags, field_at, field_flags, keys

# The flags each command had before they were generated (users' scripts call them; a renamed one
# still works as a hidden alias, `options.RENAMED`).
FLAGS_BEFORE = {
    "generate": "batch-size config device dtype input logit-bias max-tokens model ngram-penalty output seed set stop temperature top-p truncate-prompt",
    "self-instruct": "batch-size config device dtype max-rounds max-tokens meta-prompt model num-instructions num-prompt-instructions out-dir prompts-per-round seed seed-tasks set shard temperature threshold top-p",
    "topics": "batch-size config device dtype epochs max-prompts-per-type max-tokens model num-examples out-dir prompt seed seed-questions set temperature top-p",
    "questions": "batch-size config device dtype hints-per-prompt max-tokens max-topic-epoch max-topics-per-type model num-examples out-dir prompt seed seed-questions set shard temperature top-p topics",
    "merge-instructions": "config out-dir seed set threshold",
    "self-align": "batch-size config constitution developer device dtype finalize identity-conversations instructions knowledge-cutoff max-instructions max-tokens model name ngram-penalty out-dir seed set shard temperature top-p truncated",
    "engrave": "config constitution data developer device effective-batch-size epochs knowledge-cutoff learning-rate max-length max-steps method micro-batch-size model name out precision seed set",
    "verbose-clone": "base batch-size config constitution data developer device dtype generate-only identity-data knowledge-cutoff max-length max-tokens model name out seed set temperature top-p",
    "chat": "device dtype max-new-tokens seed system temperature top-p",
    "answer": "batch-size device dtype input max-tokens output seed system temperature top-p",
}  # fmt: skip


def click_commands() -> dict[str, Any]:
    root = typer.main.get_command(app)
    return {name: root.commands[name] for name in FLAGS_BEFORE}


def config_commands() -> dict[str, tuple[type[BaseModel], Any]]:
    """name -> (the config model of its `cfg`, its click command), for every command with one."""
    found, clicks = {}, click_commands()
    for info in app.registered_commands:
        original = inspect.unwrap(info.callback)
        cfg = inspect.signature(original, eval_str=True).parameters.get("cfg")
        name = info.name or original.__name__.replace("_", "-")
        if cfg is not None:
            found[name] = (cfg.annotation, clicks[name])
    return found


def _flags(command) -> set[str]:
    return {o for p in command.params for o in [*p.opts, *p.secondary_opts]}


def test_every_flag_users_had_still_exists():
    for name, command in click_commands().items():
        have = _flags(command)
        old = {f"--{f}" for f in FLAGS_BEFORE[name].split()}
        missing = {f for f in old - have if options.RENAMED.get(f) not in have}
        assert not missing, f"{name} lost {sorted(missing)}"


def test_every_option_has_help():
    for name, command in click_commands().items():
        for p in command.params:
            if p.opts[0].startswith("--"):
                assert p.help and len(p.help) > 10, f"{name} {p.opts[0]}"


def test_every_key_a_command_config_takes_is_described():
    """--set reaches every field, and help is generated from descriptions."""
    seen = set()

    def walk(model: type[BaseModel], prefix: str) -> None:
        for name, field in model.model_fields.items():
            assert field.description, f"{model.__name__}.{name} ({prefix}{name})"
            for kind in (field.annotation, *get_args(field.annotation)):
                if isinstance(kind, type) and issubclass(kind, BaseModel) and kind not in seen:
                    seen.add(kind)
                    walk(kind, f"{prefix}{name}.")

    for model, _ in config_commands().values():
        walk(model, "")


# -- each command passes every flag to its config ---------------------------------------------


class Built(Exception):
    """Raised by the spy once the command's config is built: no model is loaded."""


def _sample(annotation: Any, default: Any, flag: str) -> tuple[list[str], Any]:
    """Command-line words for a flag, and the value the config should then hold."""
    inner = [a for a in get_args(annotation) if a is not type(None)]
    if get_origin(annotation) in (Union, types.UnionType) and len(inner) == 1:
        return _sample(inner[0], default, flag)
    if annotation is bool:
        return ([f"--no-{flag[2:]}"] if default else [flag]), not default
    if get_origin(annotation) is Literal:
        choice = next(c for c in get_args(annotation) if c != default)
        return [flag, choice], choice
    if get_origin(annotation) is dict:
        return [flag, "1=2", flag, "2=-3.5"], {1: 2.0, 2: -3.5}
    if get_origin(annotation) is list:
        return [flag, "a", flag, "b"], ["a", "b"]
    words = [w for a in inner if get_origin(a) is Literal for w in get_args(a)]
    if words:  # a number or a word (processes: N | auto)
        return [flag, words[0]], words[0]
    if annotation is int:
        sample = 11 if default is None else default + 2
    elif annotation is float:
        sample = default / 2 if default else 0.5  # within every 0..1 bound
    else:
        sample = {str: "x9"}[annotation]
    return [flag, str(sample)], sample


def _value_at(cfg: BaseModel, key: str) -> Any:
    for part in key.split("."):
        cfg = getattr(cfg, part)
    return cfg


# a flag names its field, except these; and a stage-1/2 command sets only its own section
RENAMED = {"--threshold": "similarity_threshold", "--ngram-penalty": "ngram_penalties",
           "--base": "model", ("answer", "--max-tokens"): "max_new_tokens",
           ("chat", "--max-tokens"): "max_new_tokens", ("engrave", "--dtype"): "precision"}  # fmt: skip
SECTIONS = {"self-instruct": "self_instruct", "topics": "topics", "questions": "questions",
            "merge-instructions": "merge", "self-align": "self_align"}  # fmt: skip


def _check_names(command: str, flag: str, key: str) -> None:
    leaf = RENAMED.get((command, flag)) or RENAMED.get(flag) or flag[2:].replace("-", "_")
    assert key.split(".")[-1] == leaf, (command, flag, key)
    if command in SECTIONS:
        assert key.split(".")[0] in ("model", SECTIONS[command]), (command, flag, key)


@pytest.mark.parametrize("name", sorted(config_commands()))
def test_the_command_hands_every_flag_to_its_config(name, monkeypatch):
    model, command = config_commands()[name]
    built = {}

    def spy(*args, **kwargs):
        built["flags"] = kwargs.get("flags", args[3] if len(args) > 3 else None)
        built["cfg"] = build_config(*args, **kwargs)
        raise Built

    build_config = options.build_config
    monkeypatch.setattr(options, "build_config", spy)
    argv, expected = [], {}
    for p in command.params:
        if p.name.startswith("cfg__"):
            key = p.name.removeprefix("cfg__").replace("__", ".")
            _check_names(name, p.opts[0], key)
            field, default = field_at(model, key)
            words, expected[key] = _sample(field.annotation, default, p.opts[0])
            argv += words
        elif p.required:  # the command's own inputs: any value, they are not read yet
            argv += ["x"] if not p.opts[0].startswith("--") else [p.opts[0], "x"]
    with pytest.raises(Built):
        command.main(argv, prog_name="selfalign", standalone_mode=False)
    assert built["flags"] == expected
    assert {key: _value_at(built["cfg"], key) for key in expected} == expected


# -- the generating machinery, on a toy model ---------------------------------------------------


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid")
    top_p: float = Field(1.0, gt=0, le=1, description="Nucleus [mass].")
    mode: Literal["drop", "cut"] = Field("drop", description="What to do.")
    bias: dict[int, float] = Field(default_factory=dict, description="Token id -> bias.")
    keep: bool = Field(True, description="Keep it.")


class Toy(BaseModel):
    model_config = ConfigDict(extra="forbid")
    section: Section = Field(default_factory=lambda: Section(top_p=0.25), description="A part.")
    name: str = Field("n", description="A name.")


def toy_app(seen: dict) -> typer.Typer:
    toy = typer.Typer()

    @toy.command()
    @config_flags(
        Toy,
        {**keys("section", "mode", "keep", top_p="--top-p", bias="--bias")},
        config_help="YAML with Toy keys.",
    )
    @field_flags(Toy, {"name": "--name"}, into="given", show_defaults=False)
    def go(path: Annotated[str, typer.Option(help="An input of the command's own.")],
           cfg: Toy, given: dict) -> None:  # fmt: skip
        seen.update(path=path, cfg=cfg, given=given)

    @toy.command()
    def other() -> None:
        pass

    return toy


def run_toy(*args: str) -> tuple[int, str, dict]:
    """(exit code, output and the error raised, what the command saw)."""
    from typer.testing import CliRunner

    seen: dict = {}
    result = CliRunner().invoke(toy_app(seen), list(args), env={"COLUMNS": "200"})
    error = result.exception
    raised = "" if error is None or isinstance(error, SystemExit) else str(error)
    return result.exit_code, result.output + raised, seen


def test_values_are_parsed_by_the_field_type_and_reach_the_config(tmp_path):
    code, out, seen = run_toy("go", "--path", "p", "--top-p", "0.5", "--mode", "cut",
                              "--bias", "7=-100", "--no-keep", "--name", "Kestrel")  # fmt: skip
    assert code == 0, out
    assert seen["cfg"].section == Section(top_p=0.5, mode="cut", bias={7: -100.0}, keep=False)
    assert seen["given"] == {"name": "Kestrel"} and seen["path"] == "p"
    code, out, seen = run_toy("go", "--path", "p")
    assert seen["cfg"] == Toy() and seen["given"] == {}  # nothing given: the model's defaults


def test_config_and_set_reach_the_config_under_the_flags(tmp_path):
    path = tmp_path / "toy.yaml"
    path.write_text("name: from-file\nsection:\n  mode: cut\n  top_p: 0.3\n")
    code, out, seen = run_toy("go", "--path", "p", "--config", str(path),
                              "--set", "section.top_p=0.4", "--top-p", "0.6")  # fmt: skip
    assert code == 0, out
    assert seen["cfg"].name == "from-file" and seen["cfg"].section.mode == "cut"
    assert seen["cfg"].section.top_p == 0.6


@pytest.mark.parametrize(
    "args, expected",
    [
        (["--top-p", "high"], "Invalid value"),  # typed by the annotation: a float
        (["--mode", "keep"], "Invalid value"),  # a Literal: one of its values
        (["--bias", "7"], "--bias '7': expected KEY=NUMBER"),
        (["--top-p", "2"], "command line: section.top_p: Input should be less than or equal to 1"),
    ],
)
def test_bad_values_are_refused(args, expected):
    code, out, seen = run_toy("go", "--path", "p", *args)
    assert code != 0 and expected in out and "cfg" not in seen, out


def test_help_is_the_field_description_with_the_section_default():
    code, out, _ = run_toy("go", "--help")
    assert code == 0
    assert "Nucleus [mass]. [default: 0.25]" in out  # Section's own default is 1.0
    assert "What to do. [default: drop]" in out and "<drop|cut>" in out
    assert "--keep" in out and "--no-keep" in out and "[default: true]" in out
    assert "A name." in out and "[default: n]" not in out  # show_defaults=False
    assert "--config" in out and "--set" in out and "An input of the command's own." in out


def test_a_key_the_model_lacks_or_a_field_without_description_is_refused():
    with pytest.raises(KeyError, match="no config key 'section.nope'"):
        config_flags(Toy, {"section.nope": "--nope"})

    class Bare(BaseModel):
        x: int = 1

    with pytest.raises(TypeError, match="needs a Field"):
        config_flags(Bare, {"x": "--x"})


@pytest.mark.parametrize(
    "command, default",
    [("generate", "1.0"), ("self-instruct", "0.98"), ("questions", "0.95"),
     ("self-align", "0.95"), ("verbose-clone", "0.7"), ("chat", "0.9")],
)  # fmt: skip
def test_real_help_shows_the_default_of_the_commands_own_section(
    command, default, monkeypatch, capsys
):
    monkeypatch.setenv("COLUMNS", "250")
    code, out = run_cli(monkeypatch, capsys, command, "--help")
    assert code == 0
    (line,) = [x for x in out.splitlines() if "--top-p" in x]
    assert f"Nucleus sampling mass. [default: {default}]" in line


def test_field_at_walks_section_defaults():
    from selfalign.cli.instructions import Stage1File

    field, default = field_at(Stage1File, "questions.sampling.max_tokens")
    assert default == 384 and field.description
    assert field_at(Stage1File, "model.batch_size")[1] == 8  # model: None -> BackendConfig's


# -- one vocabulary across commands (issue 18, finding 5) ----------------------------------------


def all_commands() -> dict[str, Any]:
    """'engrave', 'constitution check', ... -> click command, every command and group."""
    found = {}

    def walk(group, prefix: str) -> None:
        for name, command in group.commands.items():
            found[f"{prefix}{name}"] = command
            if hasattr(command, "commands"):
                walk(command, f"{prefix}{name} ")

    root = typer.main.get_command(app)
    found[""] = root
    walk(root, "")
    return found


def test_every_command_uses_the_shared_command_classes():
    """A command registered without cls=Command would show <str> metavars and lose the aliases."""
    for name, command in all_commands().items():
        kind = options.Group if hasattr(command, "commands") else options.Command
        assert isinstance(command, kind), f"selfalign {name}: register it with cls={kind.__name__}"


def test_output_is_the_one_spelling_of_what_a_command_writes():
    old = set(options.RENAMED)
    for name, command in all_commands().items():
        assert not old & _flags(command), f"{name} shows an old spelling"
    for name in ("generate", "self-instruct", "topics", "questions", "merge-instructions",
                 "self-align", "engrave", "verbose-clone", "answer", "export", "eval"):  # fmt: skip
        assert "--output" in _flags(all_commands()[name]), name


def test_set_dtype_device_and_max_tokens_where_they_belong():
    commands = all_commands()
    for name, command in commands.items():
        if "--config" in _flags(command):
            assert "--set" in _flags(command), name
    assert "--set" in _flags(commands["run"]) and "--set" in _flags(commands["config show"])
    for name in ("generate", "self-instruct", "self-align", "engrave", "verbose-clone", "chat",
                 "answer", "eval"):  # fmt: skip
        assert {"--dtype", "--device"} <= _flags(commands[name]), name
    for name in ("generate", "self-instruct", "self-align", "verbose-clone", "chat", "answer"):
        assert "--max-tokens" in _flags(commands[name]), name


def test_old_spellings_are_rewritten_once_with_a_note():
    notes = []
    args = ["--out-dir", "o", "--max-new-tokens=5", "--out-dir", "p", "--", "--out"]
    have = {"--output", "--max-tokens"}
    assert options.renamed_args(args, have, notes.append) == [
        "--output", "o", "--max-tokens=5", "--output", "p", "--", "--out"]  # fmt: skip
    assert notes == ["note: --out-dir is now --output (the old spelling still works)",
                     "note: --max-new-tokens is now --max-tokens (the old spelling still works)"]  # fmt: skip
    # a command that still has the old flag keeps it
    assert options.renamed_args(["--out", "x"], {"--out", "--output"}, notes.append)[0] == "--out"


def test_an_old_spelling_still_works_on_the_real_command(monkeypatch, capsys, tmp_path):
    code, out = run_cli(monkeypatch, capsys, "export", str(tmp_path / "none"), "--out",
                        str(tmp_path / "x"))  # fmt: skip
    assert code == 2 and "no such run directory" in out, out  # parsed: --out reached --output
    assert "note: --out is now --output" in out
    monkeypatch.setenv("COLUMNS", "200")
    code, out = run_cli(monkeypatch, capsys, "export", "--help")
    assert "--output" in out and "--out " not in out  # hidden


TYPE_METAVAR = re.compile(r"<(?:str|int|float|bool|path|list\[\w+\])>")


@pytest.mark.parametrize("name", sorted(n for n in all_commands() if n))
def test_help_shows_plain_metavars(name, monkeypatch, capsys):
    monkeypatch.setenv("COLUMNS", "250")
    code, out = run_cli(monkeypatch, capsys, *name.split(), "--help")
    assert code == 0, out
    assert not TYPE_METAVAR.search(out), out
    (usage,) = [line for line in out.splitlines() if "Usage:" in line]
    assert "{" not in usage, usage
    (flag,) = [line for line in out.splitlines() if "--help" in line]
    assert re.search(r"--help\s+Show this", flag), flag  # a flag takes no value


def test_model_and_numbers_read_as_what_they_are(monkeypatch, capsys):
    monkeypatch.setenv("COLUMNS", "250")
    code, out = run_cli(monkeypatch, capsys, "verbose-clone", "--help")
    lines = {word: line for line in out.splitlines() for word in line.split()[1:3]
             if word.startswith("--")}  # fmt: skip
    assert " MODEL " in lines["--model"] and " MODEL " in lines["--base"]
    assert " N " in lines["--max-tokens"] and " FLOAT " in lines["--temperature"]
    assert " PATH " in lines["--output"] and " PATH " in lines["--identity-conversations"]
    assert "[default: 512]" in lines["--max-tokens"]
    code, out = run_cli(monkeypatch, capsys, "chat", "--help")
    assert re.search(r"Usage: .*chat \[OPTIONS\] MODEL\s*$", out, re.M), out


def test_engrave_takes_dtype_and_cuda_n_like_the_generating_commands(monkeypatch):
    assert [options.precision_of(d) for d in ("bfloat16", "float16", "float32", "auto", "bf16")] == [
        "bf16", "fp16", "fp32", "auto", "bf16"]  # fmt: skip
    with pytest.raises(options.UserError, match="--dtype 'half': choose auto, bfloat16"):
        options.precision_of("half")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3,5")
    assert options.train_device("cuda:1") == "cuda"
    assert os.environ["CUDA_VISIBLE_DEVICES"] == "5"  # GPU 1 of the ones this process sees
    with pytest.raises(options.UserError, match="shows 1 GPUs"):
        options.train_device("cuda:1")
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    assert options.train_device("cuda:2") == "cuda" and os.environ["CUDA_VISIBLE_DEVICES"] == "2"
    assert options.train_device("cpu") == "cpu"
    with pytest.raises(options.UserError, match="choose auto, cpu, cuda or cuda:N"):
        options.train_device("tpu:0")


# -- unknown keys: where they came from, and what was meant ---------------------------------------


def test_an_unknown_set_key_is_blamed_on_the_command_line_with_a_suggestion(
    monkeypatch, capsys, tmp_path
):
    path = tmp_path / "s.yaml"
    path.write_text("self_align:\n  max_instructionz: 3\n")
    code, out = run_cli(monkeypatch, capsys, "self-align", "--instructions", "i.jsonl",
                        "--output", str(tmp_path / "o"), "--config", str(path),
                        "--set", "self_align.tempreature=1")  # fmt: skip
    assert code == 2
    assert (
        "command line (override self_align.tempreature=1): unknown key "
        "'self_align.tempreature' (did you mean 'self_align.sampling.temperature'?)"
    ) in out
    assert (
        f"{path}: unknown key 'self_align.max_instructionz' (did you mean 'max_instructions'?)"
    ) in out


DEMO = str(Path(__file__).parents[1] / "src" / "selfalign" / "configs" / "demo.yaml")


def test_run_takes_set_like_the_other_commands(monkeypatch, capsys):
    code, out = run_cli(monkeypatch, capsys, "run", DEMO, "seed=1",
                        "--set", "engrave.epoch=2")  # fmt: skip
    assert code == 2
    assert "command line (override engrave.epoch=2): unknown key 'engrave.epoch' " in out
    assert "did you mean 'epochs'?" in out


def test_constitution_errors_are_one_per_line_with_list_paths(monkeypatch, capsys, tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("principles:\n  - {id: 1, name: a}\n  - {idd: 2, name: b, text: c}\n")
    code, out = run_cli(monkeypatch, capsys, "constitution", "check", str(path))
    assert code == 2 and ";" not in out
    lines = out.removeprefix("error: ").splitlines()
    assert all(line.startswith(f"{path}: ") for line in lines), lines
    assert f"{path}: missing required key 'principles[0].text'" in lines
    assert f"{path}: unknown key 'principles[1].idd' (did you mean 'id'?)" in lines


# -- `selfalign config show` and docs/CONFIG.md ---------------------------------------------------


def test_config_show_prints_every_key_with_value_default_and_description(monkeypatch, capsys):
    from selfalign.config import dotted_fields
    from selfalign.run.settings import PipelineConfig

    code, out = run_cli(monkeypatch, capsys, "config", "show", DEMO,
                        "--set", "engrave.epochs=3")  # fmt: skip
    assert code == 0, out
    lines = out.splitlines()
    assert "engrave.epochs = 3.0  (default: 1.0)" in lines
    at = lines.index("engrave.epochs = 3.0  (default: 1.0)")
    assert lines[at + 1] == "    Passes over the data."
    assert "self_align.sampling.top_p = 0.95  (default)" in lines  # the section's own default
    shown = [line.split(" = ")[0] for line in lines if not line.startswith(" ")]
    assert shown == [key for key, _, _ in dotted_fields(PipelineConfig)]
    code, out = run_cli(monkeypatch, capsys, "config", "show", "--defaults")
    assert code == 0 and "engrave.epochs = 1.0" in out.splitlines()
    code, out = run_cli(monkeypatch, capsys, "config", "show")
    assert code == 2 and "or --defaults" in out


def test_the_checked_in_config_reference_is_current():
    from selfalign.cli.config_doc import REGENERATE, reference

    page = Path(__file__).parents[1] / "docs" / "CONFIG.md"
    assert page.read_text(encoding="utf-8") == reference(), f"stale: run {REGENERATE}"


def test_the_reference_follows_a_changed_description(monkeypatch):
    from selfalign.cli.config_doc import reference
    from selfalign.generation import SamplingParams

    before = reference()
    monkeypatch.setattr(SamplingParams.model_fields["top_p"], "description", "Changed words.")
    after = reference()
    assert after != before and "| `self_align.sampling.top_p` | `0.95` | Changed words. |" in after
