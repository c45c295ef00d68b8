"""Whole-run commands: `run`, `status`, `report`, `export`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from selfalign.errors import UserError


def status(run: Annotated[Path, typer.Argument(help="Run directory.")]) -> None:
    """Print a run's manifest as a table."""
    from rich.console import Console
    from rich.table import Table

    path = run / "manifest.json"
    if not path.exists():
        raise UserError(
            f"{run}: no manifest.json (not a run directory, or the run has not started)"
        )
    manifest = json.loads(path.read_text())
    table = Table(title=f"{run}")
    for column in ("stage", "status", "seconds", "counts"):
        table.add_column(column)
    colours = {"done": "green", "failed": "red", "running": "yellow"}
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
    from selfalign.report import write_report

    if not run.is_dir():
        raise UserError(f"{run}: no such run directory")
    typer.echo(str(write_report(run)))


def export(
    run: Annotated[Path, typer.Argument(help="Run directory.")],
    format: Annotated[
        str, typer.Option("--format", help="alpaca, sharegpt, messages or hf-dataset.")
    ] = "messages",
    out: Annotated[Path, typer.Option("--out", help="Output folder.")] = ...,
) -> None:
    """Export the stage-2 and stage-4 datasets."""
    from selfalign.export import export_run

    counts = export_run(run, format, out)
    typer.echo(f"{out}: " + ", ".join(f"{name} {n} rows" for name, n in counts.items()))


def register(app) -> None:
    app.command()(status)
    app.command()(report)
    app.command()(export)
