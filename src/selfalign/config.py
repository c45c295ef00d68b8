"""Typed configs: one function, `build_config`, turns a YAML file, `--set dotted.key=value`
overrides and command-line flags into a validated pydantic model.

Every config is a pydantic model that rejects unknown keys; a mistake becomes one `UserError`
line naming where the bad value came from (the YAML file, `--set`, or the command line) and the
key. Reads the YAML file it is given; writes nothing (`dump_config` returns text).
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any, TypeVar, get_args

import yaml
from pydantic import BaseModel, ValidationError
from pydantic.fields import FieldInfo
from pydantic_core import PydanticUndefined

from selfalign.errors import UserError

M = TypeVar("M", bound=BaseModel)

COMMAND_LINE = "command line"
# `--set KEY=VALUE` for most commands, a bare KEY=VALUE argument for `selfalign run`: a mistake
# in one is blamed on the command line, quoting the override
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
    origins = apply_overrides(data, overrides or (), path)
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
) -> dict[str, str]:
    """Set each `dotted.key=value` of `overrides` in `data` (the YAML read from `path`); return
    {dotted key set: where it came from, as an error names it}."""
    origins = {}
    for text in overrides:
        parts, value = parse_override(text)
        _put(data, parts, value, SET, path)
        origins[".".join(parts)] = f"{COMMAND_LINE} ({SET} {text.strip()})"
    return origins


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
    error: ValidationError,
    source: str,
    origins: Mapping[str, str] | None = None,
    model: type[BaseModel] | None = None,
    sep: str = "; ",
) -> str:
    """One clause per problem: `where it came from: key.path: message`, joined by `sep`.

    `origins` maps a dotted key to what set it (`--set`, the command line); other keys are
    blamed on `source` (the YAML file). With `model`, an unknown key names the closest known
    one ("did you mean 'temperature'?")."""
    clauses = []
    for e in error.errors():
        loc = list(e["loc"])
        where = key_path(loc) or "(top level)"
        origin = _origin(loc, origins or {}, source)
        if e["type"] == "extra_forbidden":
            hint = _did_you_mean(model, loc) or "check its spelling"
            clauses.append(f"{origin}: unknown key '{where}' ({hint})")
        elif e["type"] == "missing":
            clauses.append(f"{origin}: missing required key '{where}'")
        else:
            clauses.append(f"{origin}: {where}: {e['msg']} (got {e.get('input')!r})")
    return sep.join(clauses)


def key_path(loc: Iterable[str | int]) -> str:
    """("principles", 3, "text") -> "principles[3].text", as a user finds it in the file."""
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else f".{part}" if out else str(part)
    return out


def _origin(loc: list[str | int], origins: Mapping[str, str], source: str) -> str:
    """What set the key at `loc`: the longest given key that contains it, else `source`."""
    parts = [str(p) for p in loc]
    given = (".".join(parts[:n]) for n in range(len(parts), 0, -1))
    return next((origins[k] for k in given if k in origins), source)


def _did_you_mean(model: type[BaseModel] | None, loc: list[str | int]) -> str | None:
    """The "did you mean 'x'?" for an unknown key at `loc`: the closest key of its section."""
    section: Any = model
    for part in loc[:-1]:
        if isinstance(part, int):  # an item of a list section: its model is the list's
            continue
        field = section.model_fields.get(part)
        if field is None:
            return None
        section = _section_model(field.annotation)
        if section is None:
            return None
    if section is None:
        return None
    close = difflib.get_close_matches(str(loc[-1]), list(section.model_fields), n=1, cutoff=0.6)
    if close:
        return f"did you mean '{close[0]}'?"
    # a key put in the wrong section: self_align.temperature is self_align.sampling.temperature
    prefix = key_path(loc[:-1])
    below: dict[str, str] = {}  # leaf name -> the first key below `prefix` that ends in it
    for key, _, _ in dotted_fields(model):
        if key.startswith(prefix):
            below.setdefault(key.rsplit(".", 1)[-1], key)
    close = difflib.get_close_matches(str(loc[-1]), list(below), n=1, cutoff=0.6)
    return f"did you mean '{below[close[0]]}'?" if close else None


def dotted_fields(
    model: type[BaseModel], prefix: str = "", default: Any = None
) -> Iterator[tuple[str, FieldInfo, Any]]:
    """(dotted key, field, default) of every leaf setting of `model`, in declaration order; a
    section's own default wins over its model's (SamplingParams.top_p is 1.0, stage 1's 0.98)."""
    for name, field in model.model_fields.items():
        value = getattr(default, name) if default is not None else _field_default(field)
        section = _section_model(field.annotation)
        # an optional section left unset (identity: null) is one setting, not its keys
        if section is not None and (value is not None or field.is_required()):
            yield from dotted_fields(section, f"{prefix}{name}.", value)
        else:
            yield f"{prefix}{name}", field, value


def _field_default(field: FieldInfo) -> Any:
    value = field.get_default(call_default_factory=True)
    return None if value is PydanticUndefined else value


def _section_model(annotation: Any) -> type[BaseModel] | None:
    """The model class of a section annotated `Model` or `Model | None`; None for a leaf."""
    kinds = (annotation, *get_args(annotation))
    return next((k for k in kinds if isinstance(k, type) and issubclass(k, BaseModel)), None)


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


def validate(
    model: type[M],
    data: Any,
    source: str,
    origins: Mapping[str, str] | None = None,
    sep: str = "; ",
) -> M:
    """`data` as a `model`; a problem is one UserError naming `source`, its problems joined by
    `sep` (see `format_validation_error` for `origins`)."""
    try:
        if isinstance(data, dict):
            data = fill_defaults(model, data)
        return model.model_validate(data)
    except ValidationError as e:
        raise UserError(format_validation_error(e, source, origins, model, sep)) from None


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
