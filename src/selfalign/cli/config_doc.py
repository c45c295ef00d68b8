"""Every key of the pipeline config with its value, default and description, generated from the
pydantic models (`selfalign.run.settings.PipelineConfig`), so the reference cannot drift from
the code.

`selfalign config show [CONFIG] [--defaults]` prints the keys (`show_lines`); `selfalign config
doc` and `python -m selfalign.cli.config_doc` print the Markdown reference checked in as
docs/CONFIG.md (`reference`; tests/test_cli_options.py fails when that file is stale). Reads the
CONFIG given; writes only to stdout.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any, NamedTuple

from pydantic import BaseModel

from selfalign.config import dotted_fields

REGENERATE = "selfalign config doc > docs/CONFIG.md"


class Key(NamedTuple):
    key: str
    value: Any
    default: Any
    description: str


def keys_of(model: type[BaseModel], cfg: BaseModel | None = None) -> Iterator[Key]:
    """Each leaf key of `model`: its value in `cfg` (the default without one), its default and
    description."""
    for key, field, default in dotted_fields(model):
        value = _value_at(cfg, key) if cfg is not None else default
        yield Key(key, value, default, " ".join((field.description or "").split()))


def _value_at(cfg: Any, key: str) -> Any:
    for part in key.split("."):
        cfg = getattr(cfg, part, None)
    return cfg


def shown(value: Any) -> str:
    """A value as a user would write it in the YAML (null, true, [a, b], text unquoted)."""
    if isinstance(value, BaseModel):
        value = value.model_dump(mode="json")
    if isinstance(value, str):
        return value if value else '""'
    return json.dumps(value, default=str)


def show_lines(model: type[BaseModel], cfg: BaseModel | None = None) -> Iterator[str]:
    """`key = value  (default: X)` then the description indented, per key; without `cfg`, the
    defaults."""
    for k in keys_of(model, cfg):
        mark = "" if cfg is None else "  (default)" if k.value == k.default else (
            f"  (default: {shown(k.default)})"
        )  # fmt: skip
        yield f"{k.key} = {shown(k.value)}{mark}"
        yield f"    {k.description}"


def reference(model: type[BaseModel] | None = None) -> str:
    """The Markdown page docs/CONFIG.md: one table per top-level section of the config."""
    if model is None:
        from selfalign.run.settings import PipelineConfig

        model = PipelineConfig
    lines = [
        "# Pipeline config reference",
        "",
        f"Generated from the code by `{REGENERATE}`; do not edit by hand.",
        "Every key can be set in the YAML, as `KEY=VALUE` after `selfalign run CONFIG`, or with",
        "`--set KEY=VALUE`; `selfalign config show CONFIG` prints the values a config gets.",
        "",
    ]
    for section, rows in _sections(model):
        field = model.model_fields.get(section)
        lines += [f"## `{section}`" if field else "## Top level", ""]
        lines += [field.description, ""] if field and field.description else []
        lines += ["| key | default | description |", "| --- | --- | --- |"]
        lines += [
            f"| `{k.key}` | `{_cell(shown(k.default))}` | {_cell(k.description)} |" for k in rows
        ]
        lines.append("")
    return "\n".join(lines)


def _sections(model: type[BaseModel]) -> list[tuple[str, list[Key]]]:
    """The keys grouped by their first part, in declaration order."""
    groups: dict[str, list[Key]] = {}
    for k in keys_of(model):
        section, dot, _ = k.key.partition(".")
        groups.setdefault(section if dot else "", []).append(k)
    return list(groups.items())


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def main() -> None:
    print(reference(), end="")


if __name__ == "__main__":
    main()
