"""CLI of stage 2: `self-align`, and `constitution show|check`.

Thin shells: build the config (YAML < --set overrides < explicit options), load the model, call
`selfalign.stages.stage2_self_align.run_self_align`, print a one-line summary. The YAML file holds a `model:`
section (the backend) and a `self_align:` section (`SelfAlignConfig`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer
from pydantic import BaseModel, ConfigDict, Field

from selfalign.errors import UserError
from selfalign.generation import BackendConfig
from selfalign.stages.stage2_self_align import SelfAlignConfig

constitution_app = typer.Typer(
    help="Render or validate a constitution (YAML, bundled name, or raw prompt text).",
    no_args_is_help=True,
)


class SelfAlignFile(BaseModel):
    """What a `self-align --config` YAML may hold."""

    model_config = ConfigDict(extra="forbid")

    model: BackendConfig | None = Field(None, description="The generating model.")
    self_align: SelfAlignConfig = Field(default_factory=SelfAlignConfig)


def _build(path: Path | None, overrides: list[str] | None, explicit: dict[str, Any]):
    from selfalign.config import build_config

    return build_config(SelfAlignFile, path, overrides, explicit)


def self_align(
    instructions: Annotated[
        Path, typer.Option("--instructions", help="Stage-1 instructions JSONL (id, instruction).")
    ] = ...,
    out_dir: Annotated[
        Path, typer.Option("--out-dir", help="Folder for this stage's files.")
    ] = ...,
    model: Annotated[str | None, typer.Option("--model", help="Model directory or hub id.")] = None,
    constitution: Annotated[
        str | None,
        typer.Option(help="Constitution YAML, raw prompt .txt, or bundled name (default)."),
    ] = None,
    name: Annotated[str | None, typer.Option(help="Released assistant name.")] = None,
    developer: Annotated[str | None, typer.Option(help="Who made the assistant.")] = None,
    knowledge_cutoff: Annotated[
        str | None, typer.Option("--knowledge-cutoff", help="e.g. 2023-09.")
    ] = None,
    temperature: Annotated[float | None, typer.Option(help="Paper: 0.5.")] = None,
    top_p: Annotated[float | None, typer.Option("--top-p", help="Paper: 0.95.")] = None,
    max_tokens: Annotated[
        int | None, typer.Option("--max-tokens", help="New tokens per answer (paper: 256).")
    ] = None,
    ngram_penalty: Annotated[
        list[str] | None, typer.Option("--ngram-penalty", help="N=ALPHA, N in 1..4 (repeatable).")
    ] = None,
    truncated: Annotated[
        str | None,
        typer.Option(help="Answers cut by the length limit: drop (default) or cut to a sentence."),
    ] = None,
    max_instructions: Annotated[
        int | None, typer.Option("--max-instructions", help="Answer only the first N.")
    ] = None,
    identity_conversations: Annotated[
        Path | None,
        typer.Option("--identity-conversations", help="ShareGPT-style identity data to add."),
    ] = None,
    seed: Annotated[int | None, typer.Option(help="Seed for sampling and choices.")] = None,
    shard: Annotated[
        str | None, typer.Option("--shard", help="I/N: answer slice I (0-based) of N.")
    ] = None,
    finalize: Annotated[
        bool,
        typer.Option(
            "--finalize",
            help="No generation: parse the completions already in OUT_DIR (all shards) and "
            "write the outputs (e.g. after changing filter settings).",
        ),
    ] = False,
    config: Annotated[
        Path | None, typer.Option("--config", help="YAML with model: and self_align: sections.")
    ] = None,
    set_: Annotated[
        list[str] | None, typer.Option("--set", help="dotted.key=value override.")
    ] = None,
    batch_size: Annotated[
        int | None, typer.Option("--batch-size", help="Prompts decoded together.")
    ] = None,
    device: Annotated[str | None, typer.Option(help="auto, cpu, cuda, cuda:N.")] = None,
    dtype: Annotated[str | None, typer.Option(help="auto, float32, bfloat16, float16.")] = None,
) -> None:
    """Stage 2: answer every instruction under the constitution, parse, filter; rerun to resume."""
    from selfalign.cli import parse_pairs
    from selfalign.stages.stage2_self_align import check_inputs, finalize_self_align, run_self_align

    s = "self_align"
    identity = {"name": name, "developer": developer, "knowledge_cutoff": knowledge_cutoff}
    penalties = parse_pairs(ngram_penalty or [], "--ngram-penalty") or None
    cfg = _build(config, set_, {
        "model.model": model, "model.batch_size": batch_size, "model.device": device,
        "model.dtype": dtype,
        f"{s}.constitution": constitution, f"{s}.sampling.temperature": temperature,
        f"{s}.sampling.top_p": top_p, f"{s}.sampling.max_tokens": max_tokens,
        f"{s}.sampling.ngram_penalties": penalties, f"{s}.truncated": truncated,
        f"{s}.max_instructions": max_instructions, f"{s}.seed": seed,
        f"{s}.identity_conversations": str(identity_conversations) if identity_conversations else None,
    })  # fmt: skip
    stage = cfg.self_align
    if any(v is not None for v in identity.values()):
        from selfalign.stages.stage2_self_align import stage_constitution

        base = stage.identity or stage_constitution(stage).identity
        given = {k: v for k, v in identity.items() if v is not None}
        stage = stage.model_copy(update={"identity": base.model_copy(update=given)})
    check_inputs(stage, instructions)  # bad files fail before the model loads
    if finalize:
        stats = finalize_self_align(stage, instructions, out_dir)
    else:
        if cfg.model is None or not cfg.model.model:
            raise UserError(
                "no model given: pass --model PATH_OR_HUB_ID (or model.model in --config)"
            )
        from selfalign.generation import load_backend

        backend = load_backend(cfg.model)
        try:
            stats = run_self_align(stage, backend, instructions, out_dir, shard=shard)
        finally:
            backend.close()
    typer.echo(summary(stats, out_dir), err=True)


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


@constitution_app.command("show")
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


@constitution_app.command("check")
def constitution_check(
    file: Annotated[str, typer.Argument(help="Constitution YAML, raw .txt, or bundled name.")],
    tokenizer: Annotated[
        str | None, typer.Option(help="Model/tokenizer to count the prompt's tokens with.")
    ] = None,
) -> None:
    """Validate a constitution; errors name the place (principles[2], exemplars[1].turns[0])."""
    from selfalign.text.constitution import load_constitution, render_prefix

    c = load_constitution(file)
    prefix = render_prefix(c)
    size = f"{len(prefix)} characters"
    if tokenizer:
        from selfalign.modeling import load_tokenizer

        size += f", {len(load_tokenizer(tokenizer)(prefix)['input_ids'])} tokens"
    name = c.identity.name + (f" (codename {c.codename})" if c.codename else "")
    typer.echo(
        f"{file}: ok: {name}, {len(c.principles)} principles, {len(c.exemplars)} exemplars, "
        f"prompt prefix {size}"
    )


def register(app) -> None:
    app.command("self-align")(self_align)
    app.add_typer(constitution_app, name="constitution")
