"""CLI of stages 3 and 4 and of using the result: `engrave`, `verbose-clone`, `chat`, `answer`.

Thin shells: get the stage config (YAML < --set overrides < flags, see `selfalign.cli.options`),
call the stage's `run_*` function, print a one-line summary.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Annotated, Any

import typer
from pydantic import ConfigDict, Field

from selfalign.chat import ChatSettings
from selfalign.cli.options import (
    CHAT_FLAGS,
    IDENTITY_FLAGS,
    MODEL_FLAGS,
    TRAIN_PLACEMENT,
    Command,
    config_flags,
    field_flags,
    keys,
    require_model,
    sampling_flags,
)
from selfalign.config import build_config
from selfalign.errors import UserError
from selfalign.generation import BackendConfig
from selfalign.run.lock import hold_out_dir
from selfalign.stages.stage3_engrave import TrainConfig
from selfalign.stages.stage4_verbose import VerboseConfig
from selfalign.text.constitution import Identity
from selfalign.training.sft import main_process

log = logging.getLogger(__name__)

ModelArg = Annotated[
    str, typer.Argument(metavar="MODEL", help="Model directory (merged or adapter) or hub id.")
]


class VerboseCloneFile(VerboseConfig):
    """What a `verbose-clone --config` YAML may hold: stage 4's keys (as `verbose:` in a
    pipeline config) and `model:`, the engraved model that writes the verbose answers."""

    model_config = ConfigDict(extra="forbid")

    model: BackendConfig | None = Field(
        None, description="The engraved model (stage 3's output directory) and how it generates."
    )


def _identity(constitution, given: dict[str, str], fallback=None):
    """The assistant's identity: the loaded constitution's, else the trained model's, else the
    default; then --name / --developer / --knowledge-cutoff (`given`) on top."""
    base = constitution.identity if constitution is not None else fallback or Identity()
    return base.model_copy(update=given)


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
    (verbose cloning checks leakage of its exemplars); None otherwise (the caller falls back to
    the bundled default)."""
    from selfalign.training.model_dir import constitution_of

    recorded = constitution_of(model)
    if not recorded:
        return None
    try:
        return _load_constitution(recorded)
    except UserError as e:
        log.warning("the engraved model's constitution does not load (%s): using the default", e)
        return None


ConstitutionOpt = Annotated[
    Path | None,
    typer.Option(help="Constitution stage 2 used: YAML, raw prompt text or bundled name."),
]


@config_flags(
    TrainConfig,
    {**keys("", "model", "method", "max_length", "epochs", "max_steps", "learning_rate",
            "effective_batch_size", "micro_batch_size", "seed", "processes", "distributed"),
     **TRAIN_PLACEMENT},
    config_help="YAML with TrainConfig keys (as engrave: in a pipeline config).",
)  # fmt: skip
@field_flags(Identity, IDENTITY_FLAGS, into="identity", show_defaults=False)
def engrave(
    data: Annotated[
        Path, typer.Option("--data", help="SFT JSONL/JSON (Alpaca, ShareGPT) or datasets dir.")
    ],
    out: Annotated[
        Path, typer.Option("--output", metavar="PATH", help="Model directory to write (resumes).")
    ],
    cfg: TrainConfig,
    identity: dict[str, str],
    constitution: ConstitutionOpt = None,
) -> None:
    """Stage 3: fine-tune the base model on the self-aligned answers (principle engraving)."""
    from selfalign.stages.stage3_engrave import run_engrave

    released = _identity(_load_constitution(constitution), identity)
    hold_out_dir(out)
    stats = run_engrave(cfg, data, out, released, constitution=_constitution_label(constitution))
    if main_process():  # under `accelerate launch`: one summary, rank 0's
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


def _train_where_generating(data: dict[str, Any]) -> dict[str, Any]:
    """--device (model.device) also places the final SFT unless train.device is set; cuda:N
    only places generation (training takes auto, cpu or cuda)."""
    model, train = data.get("model"), data.setdefault("train", {})
    device = model.get("device") if isinstance(model, dict) else None
    if device in ("auto", "cpu", "cuda") and isinstance(train, dict):
        train.setdefault("device", device)
    return data


@config_flags(
    VerboseCloneFile,
    {**MODEL_FLAGS, **sampling_flags("sampling"), **keys("", "seed"),
     **keys("train", "max_length", model="--base")},
    config_help="YAML with stage 4's keys (as verbose: in a pipeline config) and model:.",
    prepare=_train_where_generating,
)  # fmt: skip
@field_flags(Identity, IDENTITY_FLAGS, into="identity", show_defaults=False)
def verbose_clone(
    data: Annotated[Path, typer.Option("--data", help="Stage 2's aligned.jsonl.")],
    out: Annotated[
        Path, typer.Option("--output", metavar="PATH", help="Stage directory to write (resumes).")
    ],
    cfg: VerboseCloneFile,
    identity: dict[str, str],
    identity_data: Annotated[
        Path | None,
        typer.Option(
            "--identity-conversations",
            metavar="PATH",
            help="Stage 2's identity conversations, identity.jsonl (default: next to --data).",
        ),
    ] = None,
    constitution: ConstitutionOpt = None,
    generate_only: Annotated[
        bool, typer.Option("--generate-only", help="Skip the final SFT.")
    ] = False,
) -> None:
    """Stage 4: verbose answers from the engraved model, filtered; then SFT of the base model.

    --model is the engraved model (stage 3's output); --base, the model the final SFT starts
    from, defaults to the base the engraved model was trained from. --device also places the
    final SFT unless train.device is set. The identity is --constitution's, else the engraved
    model's, with --name / --developer / --knowledge-cutoff on top."""
    from selfalign.stages.stage4_verbose import run_final_sft
    from selfalign.training.model_dir import base_of

    engraved = require_model(cfg.model)
    stage = VerboseConfig(**{k: getattr(cfg, k) for k in VerboseConfig.model_fields})
    released = _released_constitution(constitution, engraved.model, identity)
    base_model = stage.train.model or base_of(engraved.model)
    if not generate_only and not base_model:
        raise UserError(
            f"--base: {engraved.model} does not say which base model it came from; pass --base"
        )
    hold_out_dir(out)
    _verbose_answers(engraved, stage, data, out, released, identity_data)
    if generate_only:
        return
    stats = run_final_sft(
        stage, out / "verbose.jsonl", out / "model", released.identity, base_model,
        _constitution_label(constitution),
    )  # fmt: skip
    typer.echo(_train_summary(out / "model", stats), err=True)


def _released_constitution(path: Path | None, engraved: str, given: dict[str, str]):
    """The constitution stage 2 used (--constitution, else the one the engraved model records,
    else the default), carrying the released identity (the constitution's, else the model's,
    with --name / --developer / --knowledge-cutoff on top)."""
    from selfalign.training.model_dir import identity_of

    loaded = _load_constitution(path)
    identity = _identity(loaded, given, identity_of(engraved))
    if loaded is None:  # the one stage 2 used, as `selfalign run` passes it
        loaded = _recorded_constitution(engraved) or _load_constitution(Path("default"))
    return loaded.with_identity(identity)


def _verbose_answers(
    engraved: BackendConfig,
    stage: VerboseConfig,
    data: Path,
    out: Path,
    constitution,
    identity_data: Path | None,
) -> None:
    """Generate and filter the verbose answers (out/verbose.jsonl); print the funnel."""
    from selfalign.generation import load_backend
    from selfalign.stages.stage4_verbose import run_verbose

    backend = load_backend(engraved)
    try:
        # the prompts are written with the engraved model's own chat template, whatever serves it
        counts = run_verbose(
            stage, backend, data, out, constitution, identity_data,
            engraved=engraved.tokenizer or engraved.model,
        )  # fmt: skip
    finally:
        backend.close()
    reasons = ", ".join(f"{k} {v}" for k, v in counts["rejected_by_reason"].items()) or "none"
    typer.echo(
        f"{out / 'verbose.jsonl'}: kept {counts['kept']}/{counts['generated']} (rejected: {reasons})",
        err=True,
    )


@config_flags(ChatSettings, CHAT_FLAGS)
@field_flags(BackendConfig, keys("", "device", "dtype"), into="placement")
def chat(model: ModelArg, cfg: ChatSettings, placement: dict[str, str]) -> None:
    """Talk to a model: multi-turn, streamed. Ctrl-C stops an answer; /help lists the commands."""
    from selfalign.chat import run_chat

    where = build_config(BackendConfig, flags={"model": model, **placement})
    run_chat(model, cfg, where.device, where.dtype)


@config_flags(ChatSettings, CHAT_FLAGS)
@field_flags(BackendConfig, keys("", "batch_size", "device", "dtype"), into="placement")
def answer(
    model: ModelArg,
    input: Annotated[
        Path, typer.Option(help="JSONL: id + messages | instruction (+input) | question.")
    ],
    output: Annotated[Path, typer.Option(help="JSONL to write answers to (resumes).")],
    cfg: ChatSettings,
    placement: dict[str, Any],
) -> None:
    """Answer every question of a JSONL file with a model's chat template (batched, resumable)."""
    from selfalign.chat import run_answer
    from selfalign.generation import SamplingParams, load_backend

    params = SamplingParams(temperature=cfg.temperature, top_p=cfg.top_p,
                            max_tokens=cfg.max_new_tokens)  # fmt: skip
    backend_cfg = build_config(BackendConfig, flags={"model": model, **placement})
    if output.exists():
        from selfalign.jsonl import read_jsonl

        read_jsonl(output)  # a malformed output file stops us before loading the model
    backend = load_backend(backend_cfg)
    try:
        count = run_answer(backend, backend.tokenizer, input, output, params, cfg.seed or 0,
                           cfg.system)  # fmt: skip
    finally:
        backend.close()
    typer.echo(f"{output}: {count} answers", err=True)


def register(app) -> None:
    app.command("engrave", cls=Command)(engrave)
    app.command("verbose-clone", cls=Command)(verbose_clone)
    app.command("chat", cls=Command)(chat)
    app.command("answer", cls=Command)(answer)
