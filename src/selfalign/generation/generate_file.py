"""`selfalign generate`: complete every prompt of a JSONL file with resume.

Reads `{"id", "prompt", ...}` records, appends `completion`, `finish_reason`, `prompt_tokens`
and `completion_tokens` per record (flushed per batch), and at the end rewrites the file in input
order, atomically.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from selfalign.config import apply_overrides, read_yaml, validate
from selfalign.errors import UserError
from selfalign.generation import BackendConfig, SamplingParams, load_backend
from selfalign.generation.records import check_records, generate_records
from selfalign.jsonl import read_jsonl, write_jsonl_atomic


class GenerateConfig(BaseModel):
    """Config of `selfalign generate` (YAML with these two sections, or command-line options)."""

    model_config = ConfigDict(extra="forbid")

    model: BackendConfig
    sampling: SamplingParams = Field(default_factory=SamplingParams)
    seed: int = Field(
        0, description="Base seed for per-record random streams when sampling.seed is unset."
    )

    @classmethod
    def from_sources(
        cls,
        path: Path | None,
        overrides: list[str],
        model_opts: dict[str, Any],
        sampling_opts: dict[str, Any],
    ) -> GenerateConfig:
        """YAML file < --set overrides < explicit command-line options."""
        data = read_yaml(path) if path else {}
        apply_overrides(data, overrides)
        for section, opts in (("model", model_opts), ("sampling", sampling_opts)):
            given = {k: v for k, v in opts.items() if v is not None}
            if given:
                node = data.setdefault(section, {})
                if not isinstance(node, dict):
                    raise UserError(f"{path}: '{section}' must be a mapping")
                node.update(given)
        if "model" not in data or not data["model"].get("model"):
            raise UserError(
                "no model given: pass --model PATH_OR_HUB_ID (or model.model in --config)"
            )
        return validate(cls, data, str(path) if path else "command line")


def run_generate(cfg: GenerateConfig, input_path: Path, output_path: Path) -> int:
    records = read_jsonl(input_path)
    check_records(records, str(input_path))
    if output_path.resolve() == input_path.resolve():
        raise UserError(f"--output {output_path} is the input file; choose another path")
    if output_path.exists():
        read_jsonl(output_path)  # a malformed output file stops us before any work
    backend = load_backend(cfg.model)
    seed = cfg.sampling.seed if cfg.sampling.seed is not None else cfg.seed
    done = generate_records(backend, records, cfg.sampling, output_path, seed)
    write_jsonl_atomic(output_path, done)
    return len(done)
