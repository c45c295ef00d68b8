"""The `selfalign` command line: a thin shell over the stage modules.

Exit status and the last line on stderr (`main`):
    0    done
    1    a failure: one line (the exception, or for a full disk the file and the space left) and
         the log holding its traceback (RUN/logs/TIME.log for `run`, else a temp file);
         `selfalign --debug ...` also prints the traceback
    2    a user error (`UserError`, a bad option, a run directory in use): one line saying what to do
    130  Ctrl-C: "interrupted; rerun to resume"
"""

from __future__ import annotations

import logging
import os
import sys
import traceback
import warnings
from pathlib import Path
from typing import Annotated, Any

import typer

from selfalign import __version__
from selfalign.cli.options import (
    MODEL_FLAGS,
    NO_MODEL,
    Command,
    Group,
    config_flags,
    keys,
    sampling_flags,
)
from selfalign.errors import UserError
from selfalign.generation.generate_file import GenerateConfig

app = typer.Typer(
    name="selfalign",
    cls=Group,
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
    debug: Annotated[
        bool, typer.Option("--debug", help="On a failure, print the full traceback too.")
    ] = False,
) -> None:
    pass  # --debug is read by `main`, which reports the failure after the command is gone


def _require_model(data: dict[str, Any]) -> dict[str, Any]:
    """`generate` needs a model: say how to give one, not "missing key 'model'"."""
    model = data.get("model")
    if not isinstance(model, dict) or not model.get("model"):
        raise UserError(NO_MODEL)
    return data


@app.command(cls=Command)
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
    input: Annotated[
        Path, typer.Option(metavar="PATH", help="JSONL with {'id', 'prompt', ...} per line.")
    ],
    output: Annotated[
        Path, typer.Option(metavar="PATH", help="JSONL to append completions to (resumes).")
    ],
    cfg: GenerateConfig,
) -> None:
    """Complete every prompt of a JSONL file; rerun to resume."""
    from selfalign.generation.generate_file import run_generate

    count = run_generate(cfg, input, output)
    typer.echo(f"{output}: {count} records", err=True)


def _register_stage_commands() -> None:
    from selfalign.cli import configs, evaluate, hub, instructions, pipeline, self_align, training

    for module in (instructions, self_align, training, pipeline, evaluate, configs, hub):
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
    from selfalign.run.lock import release_held

    _quiet_libraries()
    try:
        code = _run(debug="--debug" in _root_options(sys.argv[1:]))
    finally:
        release_held()  # a stage command's out dir (the process's exit would drop it too)
    if code == INTERRUPTED:
        typer.echo("interrupted; rerun to resume", err=True)
    if isinstance(code, int) and code:
        sys.exit(code)


def _run(debug: bool) -> int | None:
    """The command's exit status; a user error is printed here, other failures by `_failed`."""
    try:
        # without standalone mode, typer turns Ctrl-C (and `typer.Exit`) into a returned status
        return app(standalone_mode=False)
    except UserError as e:
        typer.echo(f"error: {e}", err=True)
        return 2
    except (typer.Abort, KeyboardInterrupt):
        return INTERRUPTED
    except typer.Exit as e:
        return e.exit_code
    except typer.TyperException as e:  # usage errors (unknown option, bad value)
        if not hasattr(e, "show"):
            raise
        e.show()
        return getattr(e, "exit_code", 2)
    except Exception as e:
        return _failed(e, debug)


INTERRUPTED = 130  # 128 + SIGINT, as shells report it


def _root_options(args: list[str]) -> list[str]:
    """The options before the command name (`selfalign --debug run ...`)."""
    options = []
    for arg in args:
        if not arg.startswith("-"):
            break
        options.append(arg)
    return options


def _failed(error: Exception, debug: bool) -> int:
    """One line on stderr for a failure that is not the user's: the exception (or the full disk)
    and where its traceback is; exit status 1."""
    from selfalign.run.failures import disk_full, failure_reason, log_failure, logged

    if debug:
        traceback.print_exception(error)
    parts = [failure_reason(error)]
    parts += [str(note).splitlines()[0] for note in getattr(error, "__notes__", []) if str(note)]
    if disk_full(error) is None:
        log = logged(error) or log_failure(error)
        parts.append(f"traceback in {log}" if log else "no log written")
    typer.echo("error: " + "; ".join(parts), err=True)
    return 1
