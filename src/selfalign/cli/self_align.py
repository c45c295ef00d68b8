"""CLI of stage 2: `self-align`, and `constitution show|check`.

Thin shells: get the config (YAML < --set overrides < flags, see `selfalign.cli.options`), load
the model, call `selfalign.stages.stage2_self_align.run_self_align`, print a one-line summary.
The YAML file holds a `model:` section (the backend) and a `self_align:` section
(`SelfAlignConfig`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer
from pydantic import BaseModel, ConfigDict, Field

from selfalign.cli.options import (
    IDENTITY_FLAGS,
    MODEL_FLAGS,
    Command,
    Group,
    OutputOpt,
    ShardOpt,
    config_flags,
    field_flags,
    keys,
    require_model,
    sampling_flags,
)
from selfalign.generation import BackendConfig
from selfalign.run.lock import hold_out_dir
from selfalign.stages.stage2_self_align import SelfAlignConfig
from selfalign.text.constitution import Identity

constitution_app = typer.Typer(
    cls=Group,
    help="Render or validate a constitution (YAML, bundled name, or raw prompt text).",
    no_args_is_help=True,
)


class SelfAlignFile(BaseModel):
    """What a `self-align --config` YAML may hold."""

    model_config = ConfigDict(extra="forbid")

    model: BackendConfig | None = Field(None, description="The model that writes the answers.")
    self_align: SelfAlignConfig = Field(
        default_factory=SelfAlignConfig, description="Stage 2's settings."
    )


@config_flags(
    SelfAlignFile,
    {
        **MODEL_FLAGS,
        **sampling_flags("self_align.sampling"),
        **keys("self_align.sampling", ngram_penalties="--ngram-penalty"),
        **keys("self_align", "constitution", "truncated", "max_instructions", "seed",
               "identity_conversations"),
    },
    config_help="YAML with model: and self_align: sections.",
)  # fmt: skip
@field_flags(Identity, IDENTITY_FLAGS, into="identity", show_defaults=False)
def self_align(
    instructions: Annotated[
        Path, typer.Option("--instructions", help="Stage-1 instructions JSONL (id, instruction).")
    ],
    out_dir: OutputOpt,
    cfg: SelfAlignFile,
    identity: dict[str, str],
    shard: ShardOpt = None,
    finalize: Annotated[
        bool,
        typer.Option(
            "--finalize",
            help="No generation: parse the completions already in --output (all shards) and "
            "write the outputs (e.g. after changing filter settings).",
        ),
    ] = False,
) -> None:
    """Stage 2: answer every instruction under the constitution, parse, filter; rerun to resume."""
    from selfalign.run.manifest import clear_stage_record, stage_settings, write_stage_record
    from selfalign.stages import stage2_self_align as s2
    from selfalign.stages.stage2_self_align import check_inputs, finalize_self_align

    stage = _with_identity(cfg.self_align, identity)
    check_inputs(stage, instructions)  # bad files fail before the model loads
    hold_out_dir(out_dir, shard)
    clear_stage_record(out_dir)
    if finalize:
        stats = finalize_self_align(stage, instructions, out_dir)
    else:
        stats = _answer(cfg.model, stage, instructions, out_dir, shard)
    if stats.get("finalized") and cfg.model is not None:  # `selfalign run` may adopt stage 2
        settings = stage_settings("self_align", cfg.model, stage)
        outputs = [s2.ALIGNED, s2.IDENTITY, s2.REJECTED, s2.SFT, s2.STATS]
        write_stage_record(out_dir, "self_align", settings, stats, outputs, [instructions])
    typer.echo(summary(stats, out_dir), err=True)


def _with_identity(stage: SelfAlignConfig, given: dict[str, str]) -> SelfAlignConfig:
    """--name / --developer / --knowledge-cutoff over the configured identity, or else over the
    constitution's."""
    if not given:
        return stage
    from selfalign.stages.stage2_self_align import stage_constitution

    base = stage.identity or stage_constitution(stage).identity
    return stage.model_copy(update={"identity": base.model_copy(update=given)})


def _answer(model, stage: SelfAlignConfig, instructions: Path, out_dir: Path, shard) -> dict:
    """Generate (this shard's) answers with the model, then parse and filter them."""
    from selfalign.generation import load_backend
    from selfalign.stages.stage2_self_align import run_self_align

    backend = load_backend(require_model(model))
    try:
        return run_self_align(stage, backend, instructions, out_dir, shard=shard)
    finally:
        backend.close()


def summary(stats: dict[str, Any], out_dir: Path) -> str:
    if not stats.get("finalized"):
        return (
            f"{out_dir}: shard {stats.get('shard')} done; {stats['pending']} of "
            f"{stats['instructions']} instructions still wait for other shards"
        )
    return (
        f"{out_dir}: kept {stats['kept']}/{stats['generated']} answers "
        f"(rejected {json.dumps(stats['rejected'])}), {stats['identity']} identity rows, "
        f"{stats['sft']} SFT rows"
    )


@constitution_app.command("show", cls=Command)
def constitution_show(
    file: Annotated[str, typer.Argument(help="Constitution YAML, raw .txt, or bundled name.")],
    instruction: Annotated[
        str, typer.Option(help="Instruction to render the prompt for.")
    ] = "<instruction>",
    input: Annotated[str, typer.Option("--input", help="Its input, if any.")] = "",
    as_yaml: Annotated[
        bool, typer.Option("--yaml", help="Print the validated constitution as YAML instead.")
    ] = False,
) -> None:
    """Print the self-align prompt a constitution renders (or its normalised YAML)."""
    from selfalign.text.constitution import dump_constitution, load_constitution, render_prompt

    c = load_constitution(file)
    typer.echo(dump_constitution(c) if as_yaml else render_prompt(c, instruction, input))


@constitution_app.command("check", cls=Command)
def constitution_check(
    file: Annotated[str, typer.Argument(help="Constitution YAML, raw .txt, or bundled name.")],
    tokenizer: Annotated[
        str | None, typer.Option(help="Model/tokenizer to count the prompt's tokens with.")
    ] = None,
    context: Annotated[
        int | None,
        typer.Option(
            help="Context of the model it is for [default: the --tokenizer model's, "
            "else 4096, Llama 2's; the paper's LLaMA had 2048]."
        ),
    ] = None,
    max_tokens: Annotated[
        int, typer.Option("--max-tokens", help="Answer tokens stage 2 generates.")
    ] = 256,
) -> None:
    """Validate a constitution; errors name the place (principles[2], exemplars[1].turns[0]).
    Warns when its prompt leaves too little of the model's context for an instruction and answer."""
    from selfalign.modeling import configured_context, load_tokenizer
    from selfalign.stages.stage2_self_align import context_shortfall
    from selfalign.text.constitution import load_constitution, render_prefix

    c = load_constitution(file)
    prefix = render_prefix(c)
    if tokenizer:
        tokens, counted = len(load_tokenizer(tokenizer)(prefix)["input_ids"]), "tokens"
    else:  # about 4 characters per token for English text with LLaMA-style tokenizers
        tokens, counted = len(prefix) // 4, "tokens at ~4 characters per token"
    context = context or (configured_context(tokenizer) if tokenizer else None) or 4096
    name = c.identity.name + (f" (codename {c.codename})" if c.codename else "")
    typer.echo(
        f"{file}: ok: {name}, {len(c.principles)} principles, {len(c.exemplars)} exemplars, "
        f"prompt prefix {len(prefix)} characters, {tokens} {counted}"
    )
    problem = context_shortfall(tokens, context, max_tokens)
    if problem:
        typer.echo(
            f"warning: {problem} (context {context} assumed; --context, --tokenizer)", err=True
        )


def register(app) -> None:
    app.command("self-align", cls=Command)(self_align)
    app.add_typer(constitution_app, name="constitution")
