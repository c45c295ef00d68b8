"""CLI of stages 3 and 4 and of using the result: `engrave`, `verbose-clone`, `chat`, `answer`.

Thin shells: parse options, build the stage config (YAML < --set overrides < explicit options),
call the stage's `run_*` function, print a one-line summary.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Annotated, Any

import typer

from selfalign.errors import UserError

log = logging.getLogger(__name__)

DeviceOpt = Annotated[str | None, typer.Option(help="auto, cpu, cuda.")]


def _build(model, path: Path | None, overrides: list[str] | None, explicit: dict[str, Any]):
    """Config from YAML, then `--set` overrides, then the options given on the command line."""
    from selfalign.config import build_config

    return build_config(model, path, overrides, explicit)


def _identity(constitution, name, developer, cutoff, fallback=None):
    """The assistant's identity: the loaded constitution's, else the trained model's, else the
    default; then --name / --developer / --knowledge-cutoff on top."""
    from selfalign.text.constitution import Identity

    base = constitution.identity if constitution is not None else fallback or Identity()
    given = {"name": name, "developer": developer, "knowledge_cutoff": cutoff}
    return base.model_copy(update={k: v for k, v in given.items() if v is not None})


def _load_constitution(path: Path | None):
    from selfalign.text.constitution import load_constitution

    return load_constitution(path) if path is not None else None


def _constitution_label(path: Path | None) -> str | None:
    """How the model card names the constitution: an absolute path (so verbose cloning finds it
    again from any directory), or the bundled name as given."""
    if path is None:
        return None
    return str(path.resolve()) if path.exists() else str(path)


def _recorded_constitution(model: str):
    """The constitution a selfalign-trained model records in train_stats.json, if it still loads
    (verbose cloning checks leakage of its exemplars); None otherwise."""
    from selfalign.stages.stage4_verbose import training_stats

    recorded = training_stats(model).get("constitution")
    if not recorded:
        return None
    try:
        return _load_constitution(recorded)
    except UserError as e:
        log.warning("no exemplar-leakage check: the engraved model's constitution: %s", e)
        return None


def engrave(
    data: Annotated[Path, typer.Option("--data", help="SFT JSONL (stage 2's sft.jsonl).")] = ...,
    out: Annotated[Path, typer.Option("--out", help="Model directory to write (resumes).")] = ...,
    model: Annotated[str | None, typer.Option(help="Base model: directory or hub id.")] = None,
    config: Annotated[Path | None, typer.Option(help="YAML with TrainConfig keys.")] = None,
    method: Annotated[str | None, typer.Option(help="lora, qlora or full.")] = None,
    max_length: Annotated[
        int | None, typer.Option("--max-length", help="Cut-off in tokens.")
    ] = None,
    epochs: Annotated[float | None, typer.Option()] = None,
    max_steps: Annotated[int | None, typer.Option("--max-steps")] = None,
    learning_rate: Annotated[float | None, typer.Option("--learning-rate")] = None,
    effective_batch_size: Annotated[int | None, typer.Option("--effective-batch-size")] = None,
    micro_batch_size: Annotated[int | None, typer.Option("--micro-batch-size")] = None,
    seed: Annotated[int | None, typer.Option()] = None,
    device: DeviceOpt = None,
    precision: Annotated[str | None, typer.Option(help="auto, bf16, fp16, fp32.")] = None,
    constitution: Annotated[
        Path | None, typer.Option(help="Constitution file (for the identity).")
    ] = None,
    name: Annotated[str | None, typer.Option(help="Assistant's name.")] = None,
    developer: Annotated[str | None, typer.Option()] = None,
    knowledge_cutoff: Annotated[str | None, typer.Option("--knowledge-cutoff")] = None,
    set_: Annotated[
        list[str] | None, typer.Option("--set", help="dotted.key=value override.")
    ] = None,
) -> None:
    """Stage 3: fine-tune the base model on the self-aligned answers (principle engraving)."""
    from selfalign.stages.stage3_engrave import TrainConfig, run_engrave

    cfg = _build(
        TrainConfig,
        config,
        set_,
        {
            "model": model, "method": method, "max_length": max_length, "epochs": epochs,
            "max_steps": max_steps, "learning_rate": learning_rate,
            "effective_batch_size": effective_batch_size, "micro_batch_size": micro_batch_size,
            "seed": seed, "device": device, "precision": precision,
        },
    )  # fmt: skip
    identity = _identity(_load_constitution(constitution), name, developer, knowledge_cutoff)
    stats = run_engrave(cfg, data, out, identity, constitution=_constitution_label(constitution))
    typer.echo(_train_summary(out, stats), err=True)


def _train_summary(out: Path, stats: dict[str, Any]) -> str:
    if stats.get("skipped"):
        return f"{out}: already trained ({stats['trained']} examples); nothing to do"
    lost = stats["truncated"] + stats["dropped_overlong"] + stats["dropped_prompt_too_long"]
    return (
        f"{out}: trained on {stats['trained']}/{stats['examples']} examples "
        f"({stats['truncated']} truncated, {lost - stats['truncated']} dropped) in {stats['steps']} steps, "
        f"loss {stats['train_loss']:.4f}"
    )


def verbose_clone(
    model: Annotated[
        str, typer.Option(help="The engraved model (stage 3 output directory).")
    ] = ...,
    data: Annotated[Path, typer.Option("--data", help="Stage 2's aligned.jsonl.")] = ...,
    out: Annotated[Path, typer.Option("--out", help="Stage directory to write (resumes).")] = ...,
    base: Annotated[
        str | None,
        typer.Option(help="Base model of the final SFT (default: the engraved model's base)."),
    ] = None,
    identity_data: Annotated[
        Path | None,
        typer.Option("--identity-data", help="identity.jsonl (default: next to --data)."),
    ] = None,
    config: Annotated[Path | None, typer.Option(help="YAML with VerboseConfig keys.")] = None,
    temperature: Annotated[float | None, typer.Option()] = None,
    top_p: Annotated[float | None, typer.Option("--top-p")] = None,
    max_tokens: Annotated[int | None, typer.Option("--max-tokens")] = None,
    seed: Annotated[int | None, typer.Option()] = None,
    max_length: Annotated[
        int | None, typer.Option("--max-length", help="Cut-off of the final SFT.")
    ] = None,
    batch_size: Annotated[int | None, typer.Option("--batch-size")] = None,
    device: DeviceOpt = None,
    dtype: Annotated[str | None, typer.Option(help="auto, float32, bfloat16, float16.")] = None,
    constitution: Annotated[
        Path | None, typer.Option(help="Constitution (identity, exemplars).")
    ] = None,
    name: Annotated[str | None, typer.Option(help="Assistant's name.")] = None,
    developer: Annotated[str | None, typer.Option()] = None,
    knowledge_cutoff: Annotated[str | None, typer.Option("--knowledge-cutoff")] = None,
    generate_only: Annotated[
        bool, typer.Option("--generate-only", help="Skip the final SFT.")
    ] = False,
    set_: Annotated[
        list[str] | None, typer.Option("--set", help="dotted.key=value override.")
    ] = None,
) -> None:
    """Stage 4: verbose answers from the engraved model, filtered; then SFT of the base model."""
    from selfalign.generation import BackendConfig, load_backend
    from selfalign.modeling import load_tokenizer
    from selfalign.stages.stage4_verbose import (
        VerboseConfig,
        base_of,
        identity_of,
        run_final_sft,
        run_verbose,
    )

    cfg = _build(
        VerboseConfig,
        config,
        set_,
        {
            "sampling.temperature": temperature, "sampling.top_p": top_p,
            "sampling.max_tokens": max_tokens, "seed": seed, "train.max_length": max_length,
            "train.device": device if device in ("auto", "cpu", "cuda") else None,
        },
    )  # fmt: skip
    loaded = _load_constitution(constitution)
    identity = _identity(loaded, name, developer, knowledge_cutoff, identity_of(model))
    if loaded is None:
        loaded = _recorded_constitution(model)
    backend_opts = {"model": model, "batch_size": batch_size, "device": device, "dtype": dtype}
    backend_cfg = _build(BackendConfig, None, None, backend_opts)
    base_model = cfg.train.model or base or base_of(model)
    if not generate_only and not base_model:
        raise UserError(f"--base: {model} does not say which base model it came from; pass --base")
    backend = load_backend(backend_cfg)
    try:
        tokenizer = getattr(backend, "tokenizer", None) or load_tokenizer(model)
        counts = run_verbose(
            cfg, backend, data, out, identity, identity_data, tokenizer=tokenizer,
            constitution=loaded,
        )  # fmt: skip
    finally:
        backend.close()
    reasons = ", ".join(f"{k} {v}" for k, v in counts["rejected_by_reason"].items()) or "none"
    typer.echo(
        f"{out / 'verbose.jsonl'}: kept {counts['kept']}/{counts['generated']} (rejected: {reasons})",
        err=True,
    )
    if generate_only:
        return
    stats = run_final_sft(
        cfg, out / "verbose.jsonl", out / "model", identity, base_model,
        _constitution_label(constitution),
    )  # fmt: skip
    typer.echo(_train_summary(out / "model", stats), err=True)


def chat(
    model: Annotated[str, typer.Argument(help="Model directory (merged or adapter) or hub id.")],
    system: Annotated[
        str | None, typer.Option(help="System prompt (default: the model's own).")
    ] = None,
    temperature: Annotated[float, typer.Option(help="0 = greedy.")] = 0.7,
    top_p: Annotated[float, typer.Option("--top-p")] = 0.9,
    max_new_tokens: Annotated[int, typer.Option("--max-new-tokens")] = 512,
    seed: Annotated[int | None, typer.Option()] = None,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda, cuda:N.")] = "auto",
    dtype: Annotated[str, typer.Option(help="auto, float32, bfloat16, float16.")] = "auto",
) -> None:
    """Talk to a model: multi-turn, streamed; /reset starts over, /exit leaves."""
    from selfalign.chat import ChatSettings, run_chat
    from selfalign.config import validate

    settings = validate(
        ChatSettings,
        {"system": system, "temperature": temperature, "top_p": top_p,
         "max_new_tokens": max_new_tokens, "seed": seed},
        "command line",
    )  # fmt: skip
    run_chat(model, settings, device, dtype)


def answer(
    model: Annotated[str, typer.Argument(help="Model directory (merged or adapter) or hub id.")],
    input: Annotated[
        Path, typer.Option(help="JSONL: id + messages | instruction (+input) | question.")
    ] = ...,
    output: Annotated[Path, typer.Option(help="JSONL to write answers to (resumes).")] = ...,
    system: Annotated[
        str | None, typer.Option(help="System prompt (default: the model's own).")
    ] = None,
    temperature: Annotated[float, typer.Option(help="0 = greedy.")] = 0.7,
    top_p: Annotated[float, typer.Option("--top-p")] = 0.9,
    max_tokens: Annotated[int, typer.Option("--max-tokens")] = 512,
    seed: Annotated[int, typer.Option(help="Per-record sampling streams come from it.")] = 0,
    batch_size: Annotated[int, typer.Option("--batch-size")] = 8,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda, cuda:N.")] = "auto",
    dtype: Annotated[str, typer.Option(help="auto, float32, bfloat16, float16.")] = "auto",
) -> None:
    """Answer every question of a JSONL file with a model's chat template (batched, resumable)."""
    from selfalign.chat import run_answer
    from selfalign.config import validate
    from selfalign.generation import BackendConfig, SamplingParams, load_backend

    params = validate(
        SamplingParams,
        {"temperature": temperature, "top_p": top_p, "max_tokens": max_tokens},
        "command line",
    )
    backend_cfg = validate(
        BackendConfig,
        {"model": model, "batch_size": batch_size, "device": device, "dtype": dtype},
        "command line",
    )
    if output.exists():
        from selfalign.jsonl import read_jsonl

        read_jsonl(output)  # a malformed output file stops us before loading the model
    backend = load_backend(backend_cfg)
    try:
        count = run_answer(backend, backend.tokenizer, input, output, params, seed, system)
    finally:
        backend.close()
    typer.echo(f"{output}: {count} answers", err=True)


def register(app) -> None:
    app.command("engrave")(engrave)
    app.command("verbose-clone")(verbose_clone)
    app.command("chat")(chat)
    app.command("answer")(answer)
