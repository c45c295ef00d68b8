"""`selfalign generate`: complete every prompt of a JSONL file with resume.

Reads `{"id", "prompt", ...}` records, appends `completion`, `finish_reason`, `prompt_tokens`,
`completion_tokens`, `prompt_sha` and `settings_sha` per record (flushed per batch), and at the
end rewrites the file in input order, atomically. A rerun resumes; an output written from other
prompts or sampling settings is refused before the model is loaded.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field

from selfalign.errors import UserError
from selfalign.generation import BackendConfig, SamplingParams, load_backend
from selfalign.generation.records import (
    check_records,
    check_resume,
    expected_shas,
    generate_records,
)
from selfalign.jsonl import read_jsonl, write_jsonl_atomic


class GenerateConfig(BaseModel):
    """Config of `selfalign generate` (YAML with these two sections, or command-line options)."""

    model_config = ConfigDict(extra="forbid")

    model: BackendConfig = Field(..., description="The model that completes the prompts.")
    sampling: SamplingParams = Field(
        default_factory=SamplingParams, description="How each completion is sampled."
    )
    seed: int = Field(
        0, description="Base seed for per-record random streams when sampling.seed is unset."
    )


def run_generate(cfg: GenerateConfig, input_path: Path, output_path: Path) -> int:
    records = read_jsonl(input_path)
    check_records(records, str(input_path))
    if output_path.resolve() == input_path.resolve():
        raise UserError(f"--output {output_path} is the input file; choose another path")
    seed = cfg.sampling.seed if cfg.sampling.seed is not None else cfg.seed
    hint = f"delete {output_path} or choose another --output"
    if output_path.exists():  # a malformed or mismatched output stops us before loading a model
        expected = expected_shas(records, cfg.sampling, seed)
        check_resume(read_jsonl(output_path), expected, output_path, hint)
    backend = load_backend(cfg.model)
    done = generate_records(backend, records, cfg.sampling, output_path, seed, restart_hint=hint)
    write_jsonl_atomic(output_path, done)
    return len(done)
