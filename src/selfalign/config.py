"""Typed configs loaded from YAML, with `dotted.key=value` overrides from the command line.

Every config is a pydantic model that rejects unknown keys; a mistake becomes one `UserError`
line naming the file and the key.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ValidationError

from selfalign.errors import UserError

M = TypeVar("M", bound=BaseModel)


def parse_override(text: str) -> tuple[list[str], Any]:
    """`a.b.c=value` -> (["a", "b", "c"], value parsed as YAML)."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise UserError(f"override {text!r}: expected dotted.key=value")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key.strip().split("."), value


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    for text in overrides:
        keys, value = parse_override(text)
        node = data
        for k in keys[:-1]:
            child = node.get(k)
            if not isinstance(child, dict):
                child = node[k] = {}
            node = child
        node[keys[-1]] = value
    return data


def format_validation_error(error: ValidationError, source: str) -> str:
    """One line per problem: `source: key.path: message`."""
    lines = []
    for e in error.errors():
        where = ".".join(str(p) for p in e["loc"]) or "(top level)"
        if e["type"] == "extra_forbidden":
            lines.append(f"{source}: unknown key '{where}' (check its spelling)")
        elif e["type"] == "missing":
            lines.append(f"{source}: missing required key '{where}'")
        else:
            lines.append(f"{source}: {where}: {e['msg']} (got {e.get('input')!r})")
    return "; ".join(lines)


def fill_defaults(model: type[BaseModel], data: dict[str, Any]) -> dict[str, Any]:
    """A nested section given in part keeps its defaults for the keys it leaves out.

    `sampling: {max_tokens: 64}` changes one setting of a stage's sampling, not all of them back
    to the generic defaults (a stage's defaults, such as its stop strings, are the paper's).
    """
    out = dict(data)
    for name, field in model.model_fields.items():
        value, kind = out.get(name), field.annotation
        if not (isinstance(value, dict) and isinstance(kind, type) and issubclass(kind, BaseModel)):
            continue
        default = field.get_default(call_default_factory=True)
        base = default.model_dump() if isinstance(default, BaseModel) else {}
        out[name] = fill_defaults(kind, {**base, **value})
    return out


def validate(model: type[M], data: Any, source: str) -> M:
    try:
        if isinstance(data, dict):
            data = fill_defaults(model, data)
        return model.model_validate(data)
    except ValidationError as e:
        raise UserError(format_validation_error(e, source)) from None


def read_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserError(f"{path}: config file not found") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f":{mark.line + 1}" if mark else ""
        raise UserError(f"{path}{where}: invalid YAML ({getattr(e, 'problem', e)})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UserError(f"{path}: expected a mapping of keys at the top level")
    return data


def load_config(model: type[M], path: str | Path | None, overrides: list[str] = ()) -> M:
    """Read `path` (optional), apply overrides, validate into `model`."""
    data = read_yaml(path) if path else {}
    apply_overrides(data, list(overrides))
    source = str(path) if path else "command line"
    return validate(model, data, source)


def build_config(
    model: type[M], path: str | Path | None, overrides: list[str] | None, explicit: dict[str, Any]
) -> M:
    """A command's config: the YAML file, then `--set` overrides, then the options given on the
    command line (`explicit`: dotted key -> value; None means not given)."""
    data = read_yaml(path) if path else {}
    apply_overrides(data, list(overrides or []))
    for key, value in explicit.items():
        if value is None:
            continue
        node = data
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise UserError(f"{path}: '{part}' must be a mapping")
        node[leaf] = value
    return validate(model, data, str(path) if path else "command line")


def dump_config(config: BaseModel) -> str:
    return yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False, allow_unicode=True)
