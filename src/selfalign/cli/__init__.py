"""The `selfalign` command line: a thin shell over the stage modules.

Every user mistake surfaces as a `UserError` and is printed as one line, exit status 2.
"""

from __future__ import annotations

import logging
import os
import sys
import warnings
from pathlib import Path
from typing import Annotated, Any

import typer

from selfalign import __version__
from selfalign.cli.options import MODEL_FLAGS, NO_MODEL, config_flags, keys, sampling_flags
from selfalign.errors import UserError
from selfalign.generation.generate_file import GenerateConfig

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


def _require_model(data: dict[str, Any]) -> dict[str, Any]:
    """`generate` needs a model: say how to give one, not "missing key 'model'"."""
    model = data.get("model")
    if not isinstance(model, dict) or not model.get("model"):
        raise UserError(NO_MODEL)
    return data


@app.command()
@config_flags(
    GenerateConfig,
    {
        **MODEL_FLAGS,
        **sampling_flags("sampling"),
        **keys("sampling", "stop", "seed", "truncate_prompt"),
        **keys("sampling", logit_bias="--logit-bias", ngram_penalties="--ngram-penalty"),
    },
    config_help="YAML with model: and sampling: sections.",
    prepare=_require_model,
)
def generate(
    input: Annotated[Path, typer.Option(help="JSONL with {'id', 'prompt', ...} per line.")],
    output: Annotated[Path, typer.Option(help="JSONL to append completions to (resumes).")],
    cfg: GenerateConfig,
) -> None:
    """Complete every prompt of a JSONL file; rerun to resume."""
    from selfalign.generation.generate_file import run_generate

    count = run_generate(cfg, input, output)
    typer.echo(f"{output}: {count} records", err=True)


def _register_stage_commands() -> None:
    from selfalign.cli import configs, instructions, pipeline, self_align, training

    for module in (instructions, self_align, training, pipeline, configs):
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
