"""`selfalign configs`: the example pipeline configs shipped inside the package.

`selfalign configs` lists them (reads `selfalign/configs/*.yaml`, prints each one's name and
first comment line); `selfalign configs copy NAME DEST` writes one where the user can edit it
(DEST: a file, or a folder to put NAME.yaml in), never over an existing file unless --force.
Like torchtune's `tune ls` / `tune cp`, so a pip install has them too.

`selfalign config show [CONFIG] [--defaults]` prints every key of a pipeline config (or of the
defaults) with its value, default and description; `selfalign config doc` prints the Markdown
reference docs/CONFIG.md (see `selfalign.cli.config_doc`). `configs` is about the shipped
files, `config` about the keys inside one.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path
from typing import Annotated

import typer

from selfalign.cli.options import Command, Group, SetOpt
from selfalign.errors import UserError

configs_app = typer.Typer(
    cls=Group,
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


@configs_app.command("copy", cls=Command)
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


config_app = typer.Typer(
    cls=Group,
    help="Every key of a pipeline config: its value, default and description.",
    no_args_is_help=True,
)


@config_app.command("show", cls=Command)
def show(
    config: Annotated[
        Path | None, typer.Argument(help="Pipeline YAML whose values to show (after --set).")
    ] = None,
    defaults: Annotated[
        bool, typer.Option("--defaults", help="Show the defaults (no CONFIG needed).")
    ] = False,
    set_: SetOpt = None,
) -> None:
    """Print every key, dotted as --set takes it, with its value, default and description."""
    from selfalign.cli.config_doc import show_lines
    from selfalign.config import build_config
    from selfalign.run.settings import PipelineConfig, shared_defaults

    if defaults == (config is not None):
        raise UserError("give a pipeline CONFIG to show, or --defaults (not both)")
    cfg = None
    if config is not None:  # read and validated, not pre-flighted: the model need not exist here
        cfg = build_config(PipelineConfig, config, set_ or (), prepare=shared_defaults)
    for line in show_lines(PipelineConfig, cfg):
        typer.echo(line)


@config_app.command("doc", cls=Command)
def doc() -> None:
    """Print the config reference in Markdown (docs/CONFIG.md is this output)."""
    from selfalign.cli.config_doc import reference

    typer.echo(reference(), nl=False)


def register(app) -> None:
    app.add_typer(configs_app, name="configs")
    app.add_typer(config_app, name="config")
