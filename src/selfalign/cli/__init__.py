"""The `selfalign` command line: a thin shell over the stage modules.

Every user mistake surfaces as a `UserError` and is printed as one line, exit status 2.
"""

from __future__ import annotations

import logging
import os
import sys
import warnings
from pathlib import Path
from typing import Annotated

import typer

from selfalign import __version__
from selfalign.errors import UserError

app = typer.Typer(
    name="selfalign",
    help="SELF-ALIGN: turn a base language model into an aligned assistant (arXiv 2305.03047).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"selfalign {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version.")
    ] = False,
) -> None:
    pass


def parse_pairs(values: list[str], option: str, key_type=int) -> dict:
    """`["5=-100", "7=2.5"]` -> {5: -100.0, 7: 2.5}; a bad pair is a UserError naming it."""
    pairs = {}
    for text in values:
        key, sep, value = text.partition("=")
        try:
            if not sep:
                raise ValueError
            pairs[key_type(key.strip())] = float(value)
        except ValueError:
            raise UserError(
                f"{option} {text!r}: expected KEY=NUMBER, e.g. {option} 13=-100"
            ) from None
    return pairs


@app.command()
def generate(
    model: Annotated[str | None, typer.Option(help="Model directory or hub id.")] = None,
    input: Annotated[Path, typer.Option(help="JSONL with {'id', 'prompt', ...} per line.")] = ...,
    output: Annotated[Path, typer.Option(help="JSONL to append completions to (resumes).")] = ...,
    config: Annotated[
        Path | None, typer.Option(help="YAML with 'model:' and 'sampling:' sections.")
    ] = None,
    temperature: Annotated[float | None, typer.Option(help="0 = greedy.")] = None,
    top_p: Annotated[float | None, typer.Option("--top-p")] = None,
    max_tokens: Annotated[int | None, typer.Option("--max-tokens")] = None,
    stop: Annotated[list[str] | None, typer.Option(help="Stop string (repeatable).")] = None,
    seed: Annotated[int | None, typer.Option(help="Seed for reproducible sampling.")] = None,
    logit_bias: Annotated[
        list[str] | None, typer.Option("--logit-bias", help="TOKEN_ID=BIAS (repeatable).")
    ] = None,
    ngram_penalty: Annotated[
        list[str] | None, typer.Option("--ngram-penalty", help="N=ALPHA, N in 1..4 (repeatable).")
    ] = None,
    truncate_prompt: Annotated[
        str | None, typer.Option("--truncate-prompt", help="error (default) or left.")
    ] = None,
    batch_size: Annotated[int | None, typer.Option("--batch-size")] = None,
    device: Annotated[str | None, typer.Option(help="auto, cpu, cuda, cuda:N.")] = None,
    dtype: Annotated[str | None, typer.Option(help="auto, float32, bfloat16, float16.")] = None,
    set_: Annotated[
        list[str] | None, typer.Option("--set", help="dotted.key=value config override.")
    ] = None,
) -> None:
    """Complete every prompt of a JSONL file; rerun to resume."""
    from selfalign.generation.generate_file import GenerateConfig, run_generate

    overrides = list(set_ or [])
    model_opts = {"model": model, "batch_size": batch_size, "device": device, "dtype": dtype}
    sampling_opts = {
        "temperature": temperature,
        "top_p": top_p,
        "max_tokens": max_tokens,
        "stop": stop or None,
        "seed": seed,
        "logit_bias": parse_pairs(logit_bias or [], "--logit-bias") or None,
        "ngram_penalties": parse_pairs(ngram_penalty or [], "--ngram-penalty") or None,
        "truncate_prompt": truncate_prompt,
    }
    cfg = GenerateConfig.from_sources(config, overrides, model_opts, sampling_opts)
    count = run_generate(cfg, input, output)
    typer.echo(f"{output}: {count} records", err=True)


def _register_stage_commands() -> None:
    from selfalign.cli import instructions, pipeline, self_align, training

    for module in (instructions, self_align, training, pipeline):
        module.register(app)


_register_stage_commands()


def _quiet_libraries() -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
        from huggingface_hub.utils import disable_progress_bars

        disable_progress_bars()  # "Loading weights" / "Writing model shards" bars
    except ImportError:
        pass
    # deprecation notices inside the libraries are for their callers, not for our users
    warnings.filterwarnings("ignore", category=FutureWarning)


def main() -> None:
    _quiet_libraries()
    try:
        app(standalone_mode=False)
    except UserError as e:
        typer.echo(f"error: {e}", err=True)
        sys.exit(2)
    except (typer.Abort, KeyboardInterrupt):
        typer.echo("aborted", err=True)
        sys.exit(130)
    except typer.Exit as e:
        sys.exit(e.exit_code)
    except (
        typer.TyperException
    ) as e:  # usage errors (unknown option, bad value) in non-standalone mode
        if not hasattr(e, "show"):
            raise
        e.show()
        sys.exit(getattr(e, "exit_code", 2))
