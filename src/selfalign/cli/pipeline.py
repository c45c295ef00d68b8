"""Whole-run commands: `run`, `status`, `report`, `export`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from selfalign.cli.options import Command, SetOpt
from selfalign.errors import UserError


def run(
    config: Annotated[
        Path, typer.Argument(help="Pipeline YAML (`selfalign configs` lists the examples).")
    ],
    overrides: Annotated[
        list[str] | None,
        typer.Argument(metavar="KEY=VALUE...", help="dotted.key=value settings over the YAML."),
    ] = None,
    set_: SetOpt = None,
    run_dir: Annotated[
        Path | None, typer.Option("--run-dir", help="Run directory (default: run_dir in YAML).")
    ] = None,
    stages: Annotated[
        str | None, typer.Option("--stages", help="Stages to run: 2, 1-2, 3-, self_align, ...")
    ] = None,
    force: Annotated[
        list[str] | None,
        typer.Option(
            "--force", metavar="STAGE", help="Redo STAGE (and the stages after it) from scratch."
        ),
    ] = None,
    quiet: Annotated[
        bool, typer.Option("--quiet", "-q", help="No progress bars; one line per stage.")
    ] = False,
    log_json: Annotated[
        bool, typer.Option("--log-json", help="Events as JSON lines on stderr (clusters).")
    ] = False,
    print_slurm: Annotated[
        Path | None,
        typer.Option(
            "--print-slurm",
            metavar="DIR",
            help="Run nothing: write Slurm scripts into DIR (stages 1-2 as array jobs, then "
            "training) and say how to submit them.",
        ),
    ] = None,
    shards: Annotated[
        int, typer.Option("--shards", help="With --print-slurm: array tasks per stage step.")
    ] = 8,
) -> None:
    """Take a base model through all four stages into a run directory (resumable)."""
    import os
    import shlex
    import sys

    from selfalign.run.pipeline import Events, run_pipeline
    from selfalign.run.settings import check_force, load_pipeline_config, parse_stages

    overrides = [*(overrides or []), *(set_ or [])]  # --set as other commands take it
    if print_slurm is not None:
        _print_slurm(config, overrides, run_dir, print_slurm, shards)
        return
    if quiet or log_json:
        os.environ["SELFALIGN_PROGRESS"] = "0"
    selected = parse_stages(stages)
    check_force(set(force or []), selected)  # before the run directory is made
    cfg = load_pipeline_config(config, overrides, run_dir)
    command = "selfalign " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    manifest = run_pipeline(cfg, selected, force or [], Events(log_json, quiet), command)
    if not (quiet or log_json):
        _print_samples(Path(cfg.run_dir))
    stages = manifest.data["stages"].values()
    done = sum(s["status"] == "done" for s in stages)
    typer.echo(f"{cfg.run_dir}: {done}/{len(stages)} stages done; selfalign status {cfg.run_dir}")


def _print_slurm(
    config: Path, overrides: list[str], run_dir: Path | None, folder: Path, shards: int
) -> None:
    import shlex

    from selfalign.run.slurm import SUBMIT, read_pipeline_config, slurm_scripts, write_scripts

    cfg = read_pipeline_config(config, overrides, run_dir)
    written = write_scripts(folder, slurm_scripts(cfg, config, folder, shards, overrides))
    typer.echo(f"{folder}: {len(written)} files written; edit the #SBATCH lines, then from here:")
    typer.echo(f"  bash {shlex.quote(str(folder / SUBMIT))}")


def _print_samples(run: Path, n: int = 2) -> None:
    """A few records per stage, so the user sees what the run made."""
    from selfalign.jsonl import read_jsonl
    from selfalign.run.registry import STAGES

    for stage in STAGES:
        path = stage.path(run, stage.kept or "")
        if not stage.sample_fields or not path.is_file():
            continue
        typer.echo(f"--- {path.relative_to(run)}")
        for record in read_jsonl(path)[:n]:
            fields = (str(record.get(f, ""))[:160].replace("\n", " ") for f in stage.sample_fields)
            typer.echo("  " + " | ".join(fields))


def status(run: Annotated[Path, typer.Argument(help="Run directory.")]) -> None:
    """Print a run's manifest as a table (a stage whose process died reads `interrupted`)."""
    from rich.console import Console
    from rich.table import Table

    from selfalign.run.manifest import Manifest
    from selfalign.run.registry import names

    if not (run / "manifest.json").exists():
        raise UserError(
            f"{run}: no manifest.json (not a run directory, or the run has not started)"
        )
    manifest = Manifest.load(run, names()).data
    table = Table(title=f"{run}")
    for column in ("stage", "status", "seconds", "counts"):
        table.add_column(column)
    colours = {"done": "green", "failed": "red", "interrupted": "red", "running": "yellow",
               "stale": "magenta"}  # fmt: skip
    for name, stage in manifest.get("stages", {}).items():
        state = stage.get("status", "pending")
        counts = ", ".join(
            f"{k}={v}" for k, v in stage.get("counts", {}).items() if not isinstance(v, dict)
        )
        if stage.get("error"):
            counts = f"[red]{stage['error']}[/red]"
        table.add_row(
            name,
            f"[{colours.get(state, 'white')}]{state}[/]",
            str(stage.get("seconds", "")),
            counts,
        )
    Console().print(table)


def report(run: Annotated[Path, typer.Argument(help="Run directory.")]) -> None:
    """Write RUN/report/index.html from the run's files."""
    from selfalign.run.registry import check_run_dir
    from selfalign.run.report import write_report

    check_run_dir(run)
    typer.echo(str(write_report(run)))


def export(
    run: Annotated[Path, typer.Argument(help="Run directory.")],
    format: Annotated[
        str, typer.Option("--format", help="alpaca, sharegpt, messages, llama-factory, hf-dataset.")
    ] = "messages",
    out: Annotated[Path, typer.Option("--output", metavar="PATH", help="Output folder.")] = ...,
) -> None:
    """Export the stage-2 and stage-4 datasets."""
    from selfalign.run.export import export_run
    from selfalign.run.registry import check_run_dir

    check_run_dir(run)
    counts = export_run(run, format, out)
    typer.echo(f"{out}: " + ", ".join(f"{name} {n} rows" for name, n in counts.items()))


def build_demo_model(
    out: Annotated[Path, typer.Argument(help="Folder for the demo model.")] = Path(
        "runs/demo-model"
    ),
    seed: Annotated[int, typer.Option("--seed")] = 0,
) -> None:
    """Build the offline demo model (a tiny model trained on the prompt formats; text is noise)."""
    from selfalign.demo import build_demo_model as build

    build(out, seed=seed, log=typer.echo)


def register(app) -> None:
    app.command(cls=Command)(run)
    app.command("build-demo-model", cls=Command)(build_demo_model)
    app.command(cls=Command)(status)
    app.command(cls=Command)(report)
    app.command(cls=Command)(export)
