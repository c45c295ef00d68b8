"""CLI of stage 1: `self-instruct`, `topics`, `questions`, `merge-instructions`.

Thin shells: build the config (YAML < --set overrides < explicit options), load the model, call
the step's `run_*` function in `selfalign.stages.stage1_instructions`, print a one-line summary.

The YAML file holds a `model:` section (the backend) and the stage-1 sections
(`self_instruct:`, `topics:`, `questions:`, `merge:`); each command reads the one it needs.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer
from pydantic import ConfigDict

from selfalign.errors import UserError
from selfalign.generation import BackendConfig
from selfalign.stages.stage1_instructions import Stage1Config

ModelOpt = Annotated[str | None, typer.Option("--model", help="Model directory or hub id.")]
OutOpt = Annotated[Path, typer.Option("--out-dir", help="Folder for this stage's files.")]
ConfigOpt = Annotated[
    Path | None, typer.Option("--config", help="YAML with model: and stage-1 sections.")
]
SetOpt = Annotated[list[str] | None, typer.Option("--set", help="dotted.key=value override.")]
SeedOpt = Annotated[int | None, typer.Option("--seed", help="Seed for sampling and choices.")]
ShardOpt = Annotated[str | None, typer.Option("--shard", help="I/N: run slice I (0-based) of N.")]
TempOpt = Annotated[float | None, typer.Option("--temperature", help="Sampling temperature (1.0).")]
TopPOpt = Annotated[
    float | None, typer.Option("--top-p", help="Nucleus mass (paper: 0.98, questions 0.95).")
]
MaxTokOpt = Annotated[int | None, typer.Option("--max-tokens", help="New tokens per completion.")]
BatchOpt = Annotated[int | None, typer.Option("--batch-size", help="Prompts decoded together.")]
DeviceOpt = Annotated[str | None, typer.Option("--device", help="auto, cpu, cuda, cuda:N.")]
DtypeOpt = Annotated[str | None, typer.Option("--dtype", help="auto, float32, bfloat16, float16.")]


class Stage1File(Stage1Config):
    """What a stage-1 YAML may hold: the backend plus the step sections."""

    model_config = ConfigDict(extra="forbid")

    model: BackendConfig | None = None


def _build(path: Path | None, overrides: list[str] | None, explicit: dict[str, Any]):
    from selfalign.config import build_config

    return build_config(Stage1File, path, overrides, explicit)


def _backend(cfg: Stage1File):
    from selfalign.generation import load_backend

    if cfg.model is None or not cfg.model.model:
        raise UserError("no model given: pass --model PATH_OR_HUB_ID (or model.model in --config)")
    return load_backend(cfg.model)


def _model_opts(model, batch_size, device, dtype) -> dict[str, Any]:
    return {"model.model": model, "model.batch_size": batch_size, "model.device": device,
            "model.dtype": dtype}  # fmt: skip


def _sampling_opts(section: str, temperature, top_p, max_tokens) -> dict[str, Any]:
    return {f"{section}.sampling.temperature": temperature, f"{section}.sampling.top_p": top_p,
            f"{section}.sampling.max_tokens": max_tokens}  # fmt: skip


def _summary(counts: dict[str, Any], out_dir: Path) -> None:
    flat = {k: v for k, v in counts.items() if not isinstance(v, dict)}
    typer.echo(
        f"{out_dir}: " + json.dumps(flat) + f" rejected={json.dumps(counts.get('rejected', {}))}",
        err=True,
    )
    if counts.get("shortfall"):
        typer.echo(
            f"warning: kept {counts['kept']} of {counts['target']} instructions after "
            f"{counts['rounds']} rounds (raise max_rounds, or check the model's output in "
            f"{out_dir}/*.rejected.jsonl)",
            err=True,
        )


def self_instruct(
    out_dir: OutOpt = ...,
    model: ModelOpt = None,
    num_instructions: Annotated[
        int | None, typer.Option("--num-instructions", help="Instructions to keep (all shards).")
    ] = None,
    num_prompt_instructions: Annotated[
        int | None, typer.Option("--num-prompt-instructions", help="Seed tasks per prompt (5).")
    ] = None,
    prompts_per_round: Annotated[
        int | None, typer.Option("--prompts-per-round", help="Prompts per round (64).")
    ] = None,
    max_rounds: Annotated[
        int | None, typer.Option("--max-rounds", help="Give up after this many rounds.")
    ] = None,
    threshold: Annotated[
        float | None, typer.Option("--threshold", help="ROUGE-L F1 above this is rejected (0.7).")
    ] = None,
    seed_tasks: Annotated[
        Path | None, typer.Option("--seed-tasks", help="Seed tasks JSONL (default: bundled).")
    ] = None,
    meta_prompt: Annotated[
        Path | None, typer.Option("--meta-prompt", help="Meta prompt text (default: bundled).")
    ] = None,
    temperature: TempOpt = None,
    top_p: TopPOpt = None,
    max_tokens: MaxTokOpt = None,
    seed: SeedOpt = None,
    shard: ShardOpt = None,
    config: ConfigOpt = None,
    set_: SetOpt = None,
    batch_size: BatchOpt = None,
    device: DeviceOpt = None,
    dtype: DtypeOpt = None,
) -> None:
    """Vanilla self-instruct with the ROUGE-L novelty filter; rerun to resume."""
    from selfalign.stages.stage1_instructions import (
        parse_shard,
        run_self_instruct,
        self_instruct_inputs,
    )

    s = "self_instruct"
    cfg = _build(config, set_, {
        **_model_opts(model, batch_size, device, dtype),
        **_sampling_opts(s, temperature, top_p, max_tokens),
        f"{s}.num_instructions": num_instructions,
        f"{s}.num_prompt_instructions": num_prompt_instructions,
        f"{s}.prompts_per_round": prompts_per_round,
        f"{s}.max_rounds": max_rounds,
        f"{s}.similarity_threshold": threshold,
        f"{s}.seed_tasks": str(seed_tasks) if seed_tasks else None,
        f"{s}.meta_prompt": str(meta_prompt) if meta_prompt else None,
        f"{s}.seed": seed,
    })  # fmt: skip
    shard_ = parse_shard(shard)
    self_instruct_inputs(cfg.self_instruct)  # bad files fail before the model loads
    counts = run_self_instruct(cfg.self_instruct, _backend(cfg), out_dir, shard=shard_)
    _summary(counts, out_dir)


def topics(
    out_dir: OutOpt = ...,
    model: ModelOpt = None,
    epochs: Annotated[
        int | None, typer.Option("--epochs", help="Rounds of growing the pool (9).")
    ] = None,
    num_examples: Annotated[
        int | None, typer.Option("--num-examples", help="Known topics per prompt (5).")
    ] = None,
    max_prompts_per_type: Annotated[
        int | None, typer.Option("--max-prompts-per-type", help="Cap per type and epoch.")
    ] = None,
    seed_questions: Annotated[
        Path | None,
        typer.Option("--seed-questions", help="Question types JSONL (default: bundled)."),
    ] = None,
    prompt: Annotated[
        Path | None, typer.Option("--prompt", help="Brainstorm prompt text (default: bundled).")
    ] = None,
    temperature: TempOpt = None,
    top_p: TopPOpt = None,
    max_tokens: MaxTokOpt = None,
    seed: SeedOpt = None,
    config: ConfigOpt = None,
    set_: SetOpt = None,
    batch_size: BatchOpt = None,
    device: DeviceOpt = None,
    dtype: DtypeOpt = None,
) -> None:
    """Brainstorm topics for each red-teaming question type; rerun to resume."""
    from selfalign.stages.stage1_instructions import run_topics, topics_inputs

    s = "topics"
    cfg = _build(config, set_, {
        **_model_opts(model, batch_size, device, dtype),
        **_sampling_opts(s, temperature, top_p, max_tokens),
        f"{s}.epochs": epochs,
        f"{s}.num_examples": num_examples,
        f"{s}.max_prompts_per_type": max_prompts_per_type,
        f"{s}.seed_questions": str(seed_questions) if seed_questions else None,
        f"{s}.prompt": str(prompt) if prompt else None,
        f"{s}.seed": seed,
    })  # fmt: skip
    topics_inputs(cfg.topics)  # bad files fail before the model loads
    _summary(run_topics(cfg.topics, _backend(cfg), out_dir), out_dir)


def questions(
    out_dir: OutOpt = ...,
    model: ModelOpt = None,
    topics_file: Annotated[
        Path | None, typer.Option("--topics", help="Topics JSONL (default: OUT_DIR/topics.jsonl).")
    ] = None,
    hints_per_prompt: Annotated[
        int | None, typer.Option("--hints-per-prompt", help="New hints per prompt (5).")
    ] = None,
    num_examples: Annotated[
        int | None, typer.Option("--num-examples", help="Seed questions per prompt (5).")
    ] = None,
    max_topics_per_type: Annotated[
        int | None, typer.Option("--max-topics-per-type", help="Cap on topics per type.")
    ] = None,
    max_topic_epoch: Annotated[
        int | None,
        typer.Option("--max-topic-epoch", help="Only topics of epochs <= this (seeds: 0)."),
    ] = None,
    seed_questions: Annotated[
        Path | None,
        typer.Option("--seed-questions", help="Seed questions JSONL (default: bundled)."),
    ] = None,
    prompt: Annotated[
        Path | None, typer.Option("--prompt", help="Question prompt text (default: bundled).")
    ] = None,
    temperature: TempOpt = None,
    top_p: TopPOpt = None,
    max_tokens: MaxTokOpt = None,
    seed: SeedOpt = None,
    shard: ShardOpt = None,
    config: ConfigOpt = None,
    set_: SetOpt = None,
    batch_size: BatchOpt = None,
    device: DeviceOpt = None,
    dtype: DtypeOpt = None,
) -> None:
    """Generate topic-guided red-teaming questions; rerun to resume."""
    from selfalign.stages.stage1_instructions import parse_shard, questions_inputs, run_questions

    s = "questions"
    cfg = _build(config, set_, {
        **_model_opts(model, batch_size, device, dtype),
        **_sampling_opts(s, temperature, top_p, max_tokens),
        f"{s}.topics": str(topics_file) if topics_file else None,
        f"{s}.hints_per_prompt": hints_per_prompt,
        f"{s}.num_examples": num_examples,
        f"{s}.max_topics_per_type": max_topics_per_type,
        f"{s}.max_topic_epoch": max_topic_epoch,
        f"{s}.seed_questions": str(seed_questions) if seed_questions else None,
        f"{s}.prompt": str(prompt) if prompt else None,
        f"{s}.seed": seed,
    })  # fmt: skip
    shard_ = parse_shard(shard)
    questions_inputs(cfg.questions, out_dir)  # bad files fail before the model loads
    _summary(run_questions(cfg.questions, _backend(cfg), out_dir, shard=shard_), out_dir)


def merge_instructions(
    out_dir: OutOpt = ...,
    threshold: Annotated[
        float | None, typer.Option("--threshold", help="ROUGE-L F1 above this is rejected (0.7).")
    ] = None,
    seed: SeedOpt = None,
    config: ConfigOpt = None,
    set_: SetOpt = None,
) -> None:
    """Merge self-instruct and TGRT outputs (all shards) into instructions.jsonl."""
    from selfalign.stages.stage1_instructions import run_merge

    cfg = _build(config, set_, {"merge.similarity_threshold": threshold, "merge.seed": seed})
    _summary(run_merge(cfg.merge, out_dir), out_dir)


def register(app) -> None:
    app.command("self-instruct")(self_instruct)
    app.command("topics")(topics)
    app.command("questions")(questions)
    app.command("merge-instructions")(merge_instructions)
