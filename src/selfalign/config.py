"""Typed configs: one function, `build_config`, turns a YAML file, `--set dotted.key=value`
overrides and command-line flags into a validated pydantic model.

Every config is a pydantic model that rejects unknown keys; a mistake becomes one `UserError`
line naming where the bad value came from (the YAML file, `--set`, or the command line) and the
key. Reads the YAML file it is given; writes nothing (`dump_config` returns text).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ValidationError

from selfalign.errors import UserError

M = TypeVar("M", bound=BaseModel)

COMMAND_LINE = "command line"
# `--set KEY=VALUE` for most commands, a bare KEY=VALUE argument for `selfalign run`
SET = "override"


def build_config(
    model: type[M],
    path: str | Path | None = None,
    overrides: Iterable[str] = (),
    flags: Mapping[str, Any] | None = None,
    *,
    prepare: Callable[[dict[str, Any]], dict[str, Any]] | None = None,
) -> M:
    """Any command's config: the YAML file at `path`, then the `--set` `overrides`
    (`dotted.key=value`, the value parsed as YAML; a later one wins), then `flags` (dotted key ->
    value, None meaning not given). A section given in part keeps the defaults of the keys it
    leaves out. `prepare` sees the merged dict just before validation (e.g. to fill stage
    sections from shared top-level keys). Any problem is one UserError naming its source."""
    data = read_yaml(path) if path else {}
    origins = dict.fromkeys(apply_overrides(data, overrides or (), path), SET)
    for key, value in (flags or {}).items():
        if value is not None:
            _put(data, key.split("."), value, COMMAND_LINE, path)
            origins[key] = COMMAND_LINE
    if prepare is not None:
        data = prepare(data)
    return validate(model, data, str(path) if path else COMMAND_LINE, origins)


def parse_override(text: str) -> tuple[list[str], Any]:
    """`a.b.c=value` -> (["a", "b", "c"], value parsed as YAML)."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise UserError(f"{SET} {text!r}: expected dotted.key=value")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key.strip().split("."), value


def apply_overrides(
    data: dict[str, Any], overrides: Iterable[str], path: str | Path | None = None
) -> list[str]:
    """Set each `dotted.key=value` of `overrides` in `data` (the YAML read from `path`); return
    the dotted keys set."""
    keys = []
    for text in overrides:
        parts, value = parse_override(text)
        _put(data, parts, value, SET, path)
        keys.append(".".join(parts))
    return keys


def _put(data: dict[str, Any], keys: list[str], value: Any, source: str, path) -> None:
    node = data
    for i, part in enumerate(keys[:-1]):
        if node.get(part) is None:  # absent, or `section: null` in the YAML
            node[part] = {}
        child = node[part]
        if not isinstance(child, dict):
            where = ".".join(keys[: i + 1])
            raise UserError(
                f"{path or source}: '{where}' must be a mapping to set {'.'.join(keys)}"
            )
        node = child
    node[keys[-1]] = value


def format_validation_error(
    error: ValidationError, source: str, origins: Mapping[str, str] | None = None
) -> str:
    """One clause per problem: `where it came from: key.path: message`, joined by '; '.

    `origins` maps a dotted key to what set it (`--set`, the command line); other keys are
    blamed on `source` (the YAML file)."""
    clauses = []
    for e in error.errors():
        loc = [str(p) for p in e["loc"]]
        where = ".".join(loc) or "(top level)"
        # the longest given key that contains the bad one set it
        given = (".".join(loc[:n]) for n in range(len(loc), 0, -1))
        origin = next((origins[k] for k in given if k in (origins or {})), source)
        if e["type"] == "extra_forbidden":
            clauses.append(f"{origin}: unknown key '{where}' (check its spelling)")
        elif e["type"] == "missing":
            clauses.append(f"{origin}: missing required key '{where}'")
        else:
            clauses.append(f"{origin}: {where}: {e['msg']} (got {e.get('input')!r})")
    return "; ".join(clauses)


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


def validate(model: type[M], data: Any, source: str, origins: Mapping[str, str] | None = None) -> M:
    """`data` as a `model`; a problem is one UserError naming `source` (see
    `format_validation_error` for `origins`)."""
    try:
        if isinstance(data, dict):
            data = fill_defaults(model, data)
        return model.model_validate(data)
    except ValidationError as e:
        raise UserError(format_validation_error(e, source, origins)) from None


def read_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserError(f"{path}: config file not found") from None
    except IsADirectoryError:
        raise UserError(f"{path}: is a directory, not a config file") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f":{mark.line + 1}" if mark else ""
        raise UserError(f"{path}{where}: invalid YAML ({getattr(e, 'problem', e)})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UserError(f"{path}: expected a mapping of keys at the top level")
    return data


def dump_config(config: BaseModel) -> str:
    return yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False, allow_unicode=True)
