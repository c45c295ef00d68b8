"""`selfalign.config.build_config`, the one way every command builds its config: the YAML file,
then `--set dotted.key=value`, then the flags given; validated, each mistake one line naming
where it came from. Commands only check that they pass their flags in (test_cli_options.py)."""

import pytest
from pydantic import BaseModel, ConfigDict, Field

from selfalign.config import build_config
from selfalign.errors import UserError
from selfalign.generation import SamplingParams


class Inner(BaseModel):
    model_config = ConfigDict(extra="forbid")
    temperature: float = Field(1.0, ge=0)
    top_p: float = 1.0
    max_tokens: int = 16
    stop: list[str] = []


class Outer(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str
    seed: int = 0
    # a section whose own defaults differ from Inner's, as a stage's sampling does
    sampling: Inner = Field(default_factory=lambda: Inner(temperature=0.3, stop=["\nUser:"]))


def yaml_file(tmp_path, text: str):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    return path


def test_each_source_wins_over_the_one_before(tmp_path):
    path = yaml_file(tmp_path, "name: file\nseed: 1\nsampling:\n  top_p: 0.1\n  max_tokens: 1\n")
    cfg = build_config(
        Outer,
        path,
        ["seed=2", "sampling.max_tokens=2", "sampling.max_tokens=3"],  # the later --set wins
        {"name": "flag", "sampling.max_tokens": 4, "seed": None},  # None: flag not given
    )
    assert cfg.name == "flag"  # file < flag
    assert cfg.seed == 2  # file < --set, and an unset flag changes nothing
    assert cfg.sampling.max_tokens == 4  # file < --set < flag
    assert cfg.sampling.top_p == 0.1  # file only
    # keys nobody gave keep the section's own defaults, not Inner's
    assert cfg.sampling.temperature == 0.3 and cfg.sampling.stop == ["\nUser:"]


@pytest.mark.parametrize("source", ["file", "set", "flag"])
def test_a_partial_section_from_any_source_keeps_the_section_defaults(tmp_path, source):
    path = yaml_file(
        tmp_path, "name: x\n" + ("sampling:\n  top_p: 0.5\n" if source == "file" else "")
    )
    overrides = ["sampling.top_p=0.5"] if source == "set" else []
    flags = {"sampling.top_p": 0.5} if source == "flag" else {}
    cfg = build_config(Outer, path, overrides, flags)
    assert cfg.sampling == Inner(temperature=0.3, top_p=0.5, stop=["\nUser:"])


def test_set_values_are_read_as_yaml():
    cfg = build_config(
        Outer,
        None,
        ["name=a=b", "sampling.stop=['x', 'y']", "sampling.temperature=0", "seed=7"],
    )
    assert cfg.name == "a=b"  # only the first '=' separates key and value
    assert cfg.sampling.stop == ["x", "y"] and cfg.sampling.temperature == 0 and cfg.seed == 7


def test_a_section_left_null_in_the_yaml_can_still_be_set(tmp_path):
    path = yaml_file(tmp_path, "name: x\nsampling:\n")
    assert build_config(Outer, path, ["sampling.top_p=0.2"]).sampling.top_p == 0.2
    assert build_config(Outer, path, flags={"sampling.top_p": 0.3}).sampling.top_p == 0.3


def test_prepare_sees_every_source_before_validation(tmp_path):
    """How `selfalign run` fills stage sections from top-level keys."""
    seen = {}

    def prepare(data):
        seen.update(data)
        data.setdefault("sampling", {}).setdefault("max_tokens", data["seed"] * 10)
        return data

    path = yaml_file(tmp_path, "name: x\nseed: 1\n")
    cfg = build_config(Outer, path, ["seed=2"], {"seed": 3}, prepare=prepare)
    assert seen["seed"] == 3 and cfg.sampling.max_tokens == 30


def test_a_real_command_config_keeps_its_stage_defaults():
    """Stage 1's self-instruct samples with top_p 0.98, 1024 tokens: one flag changes one key."""
    from selfalign.cli.instructions import Stage1File

    cfg = build_config(Stage1File, None, [], {"self_instruct.sampling.max_tokens": 9})
    assert cfg.self_instruct.sampling == SamplingParams(top_p=0.98, max_tokens=9)
    assert cfg.topics.sampling.max_tokens == 128


# -- every mistake is one line naming where it came from ------------------------------------------


@pytest.mark.parametrize(
    "yaml_text, overrides, flags, expected",
    [
        ("name: x\nsampling:\n  temprature: 0.5\n", [], {},
         "c.yaml: unknown key 'sampling.temprature' (did you mean 'temperature'?)"),
        ("name: x\n", ["sampling.temprature=0.5"], {},
         "command line (override sampling.temprature=0.5): unknown key 'sampling.temprature' "
         "(did you mean 'temperature'?)"),
        ("name: x\n", [], {"sampling.temperature": -1},
         "command line: sampling.temperature: Input should be greater than or equal to 0"),
        ("name: x\nsampling: {temperature: hot}\n", [], {},
         "c.yaml: sampling.temperature: Input should be a valid number"),
        ("seed: 1\n", [], {}, "c.yaml: missing required key 'name'"),
        ("name: x\nsampling: 3\n", [], {"sampling.top_p": 0.5},
         "c.yaml: 'sampling' must be a mapping to set sampling.top_p"),
        ("name: x\n", ["sampling.top_p"], {}, "override 'sampling.top_p': expected dotted.key=value"),
        ("name: x\nsampling: [unclosed\n", [], {}, "c.yaml:3: invalid YAML"),
        ("- a list\n", [], {}, "c.yaml: expected a mapping of keys at the top level"),
    ],
)  # fmt: skip
def test_mistakes_are_one_line_naming_the_source_and_key(
    tmp_path, yaml_text, overrides, flags, expected
):
    with pytest.raises(UserError) as e:
        build_config(Outer, yaml_file(tmp_path, yaml_text), overrides, flags)
    assert expected in str(e.value) and "\n" not in str(e.value)


def test_several_mistakes_from_several_sources_are_one_line(tmp_path):
    path = yaml_file(tmp_path, "name: x\nsampling: {top_q: 1}\n")
    with pytest.raises(UserError) as e:
        build_config(Outer, path, ["seed=many"], {"sampling.max_tokens": "lots"})
    message = str(e.value)
    assert "\n" not in message
    for part in (
        "c.yaml: unknown key 'sampling.top_q'",
        "command line (override seed=many): seed: Input should be a valid integer",
        "command line: sampling.max_tokens: Input should be a valid integer",
    ):
        assert part in message


def test_without_a_file_mistakes_name_the_command_line():
    with pytest.raises(UserError, match="^command line: missing required key 'name'$"):
        build_config(Outer)


def test_a_missing_config_file_is_named(tmp_path):
    with pytest.raises(UserError, match=r"none\.yaml: config file not found"):
        build_config(Outer, tmp_path / "none.yaml")
