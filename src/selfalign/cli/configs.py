"""`selfalign configs`: the example pipeline configs shipped inside the package.

`selfalign configs` lists them (reads `selfalign/configs/*.yaml`, prints each one's name and
first comment line); `selfalign configs copy NAME DEST` writes one where the user can edit it
(DEST: a file, or a folder to put NAME.yaml in), never over an existing file unless --force.
Like torchtune's `tune ls` / `tune cp`, so a pip install has them too.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path
from typing import Annotated

import typer

from selfalign.errors import UserError

configs_app = typer.Typer(
    help="List the example configs shipped with selfalign, or copy one to edit.",
    invoke_without_command=True,
)


def bundled() -> dict[str, str]:
    """{name: YAML text} of every bundled config, by name."""
    folder = resources.files("selfalign") / "configs"
    files = [f for f in folder.iterdir() if f.name.endswith(".yaml")]
    return {
        f.name.removesuffix(".yaml"): f.read_text(encoding="utf-8")
        for f in sorted(files, key=lambda f: f.name)
    }


def summary(text: str) -> str:
    """A config's first comment line (each opens with what it is for and how to run it)."""
    for line in text.splitlines():
        if line.startswith("#"):
            return line.lstrip("#").strip().removesuffix(":")
    return ""


@configs_app.callback()
def configs(ctx: typer.Context) -> None:
    """List the example configs shipped with selfalign (`selfalign configs copy NAME DEST` to
    edit one)."""
    if ctx.invoked_subcommand is not None:
        return
    found = bundled()
    width = max(map(len, found))
    for name, text in found.items():
        typer.echo(f"{name:<{width}}  {summary(text)}")


@configs_app.command("copy")
def copy(
    name: Annotated[
        str, typer.Argument(help="A bundled config, e.g. demo (see `selfalign configs`).")
    ],
    dest: Annotated[Path, typer.Argument(help="File to write, or a folder to put NAME.yaml in.")],
    force: Annotated[bool, typer.Option("--force", help="Overwrite DEST if it exists.")] = False,
) -> None:
    """Write a bundled config to DEST, to edit and run with `selfalign run DEST`."""
    found = bundled()
    key = name.removesuffix(".yaml")
    if key not in found:
        raise UserError(f"no bundled config {name!r}; choose one of: {', '.join(found)}")
    target = dest / f"{key}.yaml" if dest.is_dir() else dest
    if target.exists() and not force:
        raise UserError(f"{target} exists; pass --force to overwrite it")
    if not target.parent.is_dir():
        raise UserError(f"{target.parent}: no such folder")
    target.write_text(found[key], encoding="utf-8")
    typer.echo(str(target))


def register(app) -> None:
    app.add_typer(configs_app, name="configs")
