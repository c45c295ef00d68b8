import pytest
from pydantic import BaseModel, ConfigDict

from selfalign.config import apply_overrides, load_config, validate
from selfalign.errors import UserError


class Inner(BaseModel):
    model_config = ConfigDict(extra="forbid")
    temperature: float = 1.0
    stop: list[str] = []


class Outer(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str
    sampling: Inner = Inner()


def test_unknown_key_names_key_and_file(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("name: x\nsampling:\n  temprature: 0.5\n")
    with pytest.raises(UserError, match=r"c\.yaml: unknown key 'sampling\.temprature'"):
        load_config(Outer, path)


def test_wrong_type_and_missing_key(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("sampling:\n  temperature: hot\n")
    with pytest.raises(UserError) as e:
        load_config(Outer, path)
    assert "missing required key 'name'" in str(e.value)
    assert "sampling.temperature" in str(e.value)


def test_dotted_overrides_parse_yaml_values(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("name: x\n")
    cfg = load_config(
        Outer, path, ["sampling.temperature=0.25", "sampling.stop=['a', 'b']", "name=y"]
    )
    assert cfg.sampling.temperature == 0.25 and cfg.sampling.stop == ["a", "b"] and cfg.name == "y"


def test_override_without_equals_is_an_error():
    with pytest.raises(UserError, match="dotted.key=value"):
        apply_overrides({}, ["sampling.temperature"])


def test_invalid_yaml_names_line(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("name: x\nsampling: [unclosed\n")
    with pytest.raises(UserError, match=r"c\.yaml:\d+: invalid YAML"):
        load_config(Outer, path)


def test_missing_config_file(tmp_path):
    with pytest.raises(UserError, match="config file not found"):
        load_config(Outer, tmp_path / "none.yaml")


def test_partial_nested_section_keeps_the_other_defaults():
    from pydantic import BaseModel, ConfigDict, Field

    from selfalign.generation import SamplingParams

    class Stage(BaseModel):
        model_config = ConfigDict(extra="forbid")
        sampling: SamplingParams = Field(
            default_factory=lambda: SamplingParams(temperature=0.3, stop=["\nUser:"])
        )

    class Top(BaseModel):
        model_config = ConfigDict(extra="forbid")
        stage: Stage = Field(default_factory=Stage)

    cfg = validate(Top, {"stage": {"sampling": {"max_tokens": 7}}}, "x.yaml")
    assert cfg.stage.sampling.max_tokens == 7
    assert cfg.stage.sampling.temperature == 0.3 and cfg.stage.sampling.stop == ["\nUser:"]
    with pytest.raises(UserError, match="unknown key 'stage.sampling.nope'"):
        validate(Top, {"stage": {"sampling": {"nope": 1}}}, "x.yaml")
