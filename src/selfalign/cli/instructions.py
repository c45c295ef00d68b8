"""CLI of stage 1: `self-instruct`, `topics`, `questions`, `merge-instructions`.

Thin shells: get the config (YAML < --set overrides < flags, see `selfalign.cli.options`), load
the model, call the step's `run_*` function in `selfalign.stages.stage1_instructions`, print a
one-line summary.

The YAML file holds a `model:` section (the backend) and the stage-1 sections
(`self_instruct:`, `topics:`, `questions:`, `merge:`); each command reads the one it needs.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer
from pydantic import ConfigDict, Field

from selfalign.cli.options import (
    MODEL_FLAGS,
    Command,
    OutputOpt,
    ShardOpt,
    config_flags,
    keys,
    require_model,
    sampling_flags,
)
from selfalign.generation import BackendConfig
from selfalign.run.lock import hold_out_dir
from selfalign.stages.stage1_instructions import SELF_INSTRUCT, Stage1Config

CONFIG_HELP = "YAML with model: and stage-1 sections (self_instruct:, topics:, ...)."


class Stage1File(Stage1Config):
    """What a stage-1 YAML may hold: the backend plus the step sections."""

    model_config = ConfigDict(extra="forbid")

    model: BackendConfig | None = Field(None, description="The model that writes the text.")


def _step_flags(step: str, *fields: str, **renamed: str) -> dict[str, str]:
    """The flags of a generating step: the model, the step's sampling, its seed and `fields`."""
    return {**MODEL_FLAGS, **sampling_flags(f"{step}.sampling"),
            **keys(step, "seed", *fields, **renamed)}  # fmt: skip


def _backend(cfg: Stage1File):
    from selfalign.generation import load_backend

    return load_backend(require_model(cfg.model))


def _summary(counts: dict[str, Any], out_dir: Path) -> None:
    flat = {k: v for k, v in counts.items() if not isinstance(v, dict)}
    typer.echo(
        f"{out_dir}: " + json.dumps(flat) + f" rejected={json.dumps(counts.get('rejected', {}))}",
        err=True,
    )
    counts = counts.get(SELF_INSTRUCT, counts)  # the merge reports sharded self-instruct's
    if counts.get("shortfall"):
        typer.echo(
            f"warning: kept {counts['kept']} of {counts['target']} instructions after "
            f"{counts['rounds']} rounds (raise max_rounds, or check the model's output in "
            f"{out_dir}/*.rejected.jsonl)",
            err=True,
        )


@config_flags(
    Stage1File,
    _step_flags("self_instruct", "num_instructions", "num_prompt_instructions",
                "prompts_per_round", "max_rounds", "seed_tasks", "meta_prompt",
                similarity_threshold="--threshold"),
    config_help=CONFIG_HELP,
)  # fmt: skip
def self_instruct(
    out_dir: OutputOpt,
    cfg: Stage1File,
    shard: ShardOpt = None,
    rounds: Annotated[
        int | None,
        typer.Option(
            "--rounds",
            min=1,
            help="With --shard: generate at least this shard's rounds below N (the merge "
            "names N when the shards stopped short of the target).",
        ),
    ] = None,
) -> None:
    """Vanilla self-instruct with the ROUGE-L novelty filter; rerun to resume. Sharded, it only
    generates its rounds; merge-instructions filters every shard's rounds in order."""
    from selfalign.stages.stage1_instructions import (
        parse_shard,
        run_self_instruct,
        self_instruct_inputs,
    )

    shard_ = parse_shard(shard)
    self_instruct_inputs(cfg.self_instruct)  # bad files fail before the model loads
    hold_out_dir(out_dir, shard)
    counts = run_self_instruct(cfg.self_instruct, _backend(cfg), out_dir, shard_, rounds)
    _summary(counts, out_dir)


@config_flags(
    Stage1File,
    _step_flags("topics", "epochs", "num_examples", "max_prompts_per_type", "seed_questions",
                "prompt"),
    config_help=CONFIG_HELP,
)  # fmt: skip
def topics(out_dir: OutputOpt, cfg: Stage1File) -> None:
    """Brainstorm topics for each red-teaming question type; rerun to resume."""
    from selfalign.stages.stage1_instructions import run_topics, topics_inputs

    topics_inputs(cfg.topics)  # bad files fail before the model loads
    hold_out_dir(out_dir)
    _summary(run_topics(cfg.topics, _backend(cfg), out_dir), out_dir)


@config_flags(
    Stage1File,
    _step_flags("questions", "topics", "hints_per_prompt", "num_examples",
                "max_topics_per_type", "max_topic_epoch", "seed_questions", "prompt"),
    config_help=CONFIG_HELP,
)  # fmt: skip
def questions(out_dir: OutputOpt, cfg: Stage1File, shard: ShardOpt = None) -> None:
    """Generate topic-guided red-teaming questions; rerun to resume."""
    from selfalign.stages.stage1_instructions import parse_shard, questions_inputs, run_questions

    shard_ = parse_shard(shard)
    questions_inputs(cfg.questions, out_dir)  # bad files fail before the model loads
    hold_out_dir(out_dir, shard)
    _summary(run_questions(cfg.questions, _backend(cfg), out_dir, shard=shard_), out_dir)


@config_flags(
    Stage1File, keys("merge", "seed", similarity_threshold="--threshold"), config_help=CONFIG_HELP
)
def merge_instructions(out_dir: OutputOpt, cfg: Stage1File) -> None:
    """Merge self-instruct and TGRT outputs (all shards) into instructions.jsonl. With a model:
    section, also stage.json, so `selfalign run` can adopt stage 1 as done."""
    from selfalign.run.manifest import clear_stage_record, stage_settings, write_stage_record
    from selfalign.stages.stage1_instructions import INSTRUCTIONS, REJECTED, run_merge

    hold_out_dir(out_dir)
    clear_stage_record(out_dir)
    counts = run_merge(cfg.merge, out_dir, cfg.self_instruct)
    if cfg.model is not None:  # what `selfalign run` needs to adopt stage 1 (Slurm)
        stage1 = Stage1Config.model_validate(cfg.model_dump(exclude={"model"}))
        settings = stage_settings("instructions", cfg.model, stage1)
        write_stage_record(out_dir, "instructions", settings, counts, [INSTRUCTIONS, REJECTED])
    _summary(counts, out_dir)


def register(app) -> None:
    app.command("self-instruct", cls=Command)(self_instruct)
    app.command("topics", cls=Command)(topics)
    app.command("questions", cls=Command)(questions)
    app.command("merge-instructions", cls=Command)(merge_instructions)
