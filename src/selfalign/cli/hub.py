"""`selfalign push`: upload a trained model directory to the Hugging Face Hub.

    selfalign push PATH --repo ORG/NAME [--stage 3|4] [--private] [--revision BRANCH] [--dry-run]

Reads PATH: a model directory (config.json or adapter_config.json in it), or a run directory,
whose final model RUN/4_verbose/model is pushed (RUN/3_engrave/model with --stage 3). Uploads
every file in it but training leftovers (`checkpoints/`, hidden files) in one commit to the model
repo ORG/NAME, created when missing (private with --private), on branch --revision (made from
the default branch when missing). The model card (README.md) names the hub base model
(`selfalign.training.model_dir.hub_id`). The token is the hub client's: HF_TOKEN, else the cache
of `hf auth login`; it is never printed or written. --dry-run lists the repo and the files and
contacts nothing. Writes nothing locally. No network, offline mode, a missing or refused token:
one line saying what to do.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated

import typer

from selfalign.cli.options import Command
from selfalign.errors import UserError
from selfalign.run.registry import STAGE

# what a run directory pushes, by --stage
RUN_MODELS = {3: STAGE["engrave"].path(Path(), "model"), 4: STAGE["verbose"].path(Path(), "model")}
MODEL_FILES = ("config.json", "adapter_config.json")  # one of them makes a model directory
# resumable checkpoints and lock or temp files are not part of the model
IGNORED = ["checkpoints/*", ".*", "*/.*"]
NO_TOKEN = (
    "no Hugging Face token: set HF_TOKEN to a token with write access, or run `hf auth login`, "
    "then rerun"
)


def model_to_push(path: Path, stage: int | None) -> Path:
    """The model directory PATH names: itself, or a run directory's model of `stage` (4)."""
    if not path.is_dir():
        raise UserError(f"{path}: no such directory; give a model directory or a run directory")
    if any((path / name).is_file() for name in MODEL_FILES):
        if stage is not None:
            raise UserError(f"{path} is a model directory; --stage picks a run directory's model")
        return path
    model = path / RUN_MODELS[stage or 4]
    if not any((model / name).is_file() for name in MODEL_FILES):
        raise UserError(
            f"{model}: no trained model (no {' or '.join(MODEL_FILES)}); finish that stage, "
            "or give a model directory"
        )
    return model


def files_to_push(model: Path) -> list[str]:
    """Every file of `model` to upload, as paths in the repo (sorted)."""
    from huggingface_hub.utils import filter_repo_objects

    found = sorted(p.relative_to(model).as_posix() for p in model.rglob("*") if p.is_file())
    return list(filter_repo_objects(found, ignore_patterns=IGNORED))


def _size(n: float) -> str:
    units = ["B", "KB", "MB", "GB"]
    while n >= 1024 and len(units) > 1:
        n, units = n / 1024, units[1:]
    return f"{n:.0f} B" if units[0] == "B" else f"{n:.1f} {units[0]}"


@contextmanager
def hub_errors(repo: str) -> Iterator[None]:
    """A failed hub call as one line saying what to do (never the token, never a traceback)."""
    from huggingface_hub.errors import HfHubHTTPError, HTTPError, OfflineModeIsEnabled

    try:
        yield
    except OfflineModeIsEnabled:
        raise UserError(
            "cannot push: the Hugging Face Hub client is in offline mode (HF_HUB_OFFLINE is set); "
            "unset it on a machine with network access and rerun"
        ) from None
    except HfHubHTTPError as e:
        status = e.response.status_code if e.response is not None else None
        why = {
            401: "the token was refused: set a valid write token in HF_TOKEN or run `hf auth login`",
            403: f"the token may not write to {repo}: use a write token, or a repo you own",
        }.get(status, (e.server_message or str(e) or type(e).__name__).strip().splitlines()[0])
        raise UserError(f"push to {repo} failed ({status}): {why}") from None
    except (HTTPError, ConnectionError, TimeoutError) as e:  # no network, DNS, timeout
        raise UserError(
            f"cannot reach the Hugging Face Hub ({type(e).__name__}: {e}); check the network "
            "(and HF_ENDPOINT if set) and rerun"
        ) from None


def push_model(
    model: Path, repo: str, files: list[str], private: bool, revision: str | None
) -> str:
    """Create `repo` if needed (and branch `revision`), upload `files` in one commit; its URL."""
    from huggingface_hub import CommitOperationAdd, HfApi, get_token

    with hub_errors(repo):
        token = get_token()  # HF_TOKEN, else the login cache (or a CI's OIDC exchange)
        if token is None:
            raise UserError(NO_TOKEN)
        api = HfApi(token=token)
        api.create_repo(repo, private=private, exist_ok=True)
        if revision:
            api.create_branch(repo, branch=revision, exist_ok=True)
        operations = [CommitOperationAdd(f, model / f) for f in files]
        commit = api.create_commit(
            repo,
            operations,
            commit_message=f"Upload {model.name} with selfalign",
            revision=revision,
        )
    return commit.commit_url


def push(
    path: Annotated[
        Path, typer.Argument(metavar="PATH", help="A model directory, or a run directory.")
    ],
    repo: Annotated[
        str, typer.Option("--repo", metavar="ORG/NAME", help="Model repo on the Hugging Face Hub.")
    ],
    stage: Annotated[
        int | None,
        typer.Option(
            "--stage",
            min=3,
            max=4,
            metavar="3|4",
            help="For a run directory: 4 the final model (default), 3 the engraved one.",
        ),
    ] = None,  # fmt: skip
    private: Annotated[bool, typer.Option("--private", help="Create the repo private.")] = False,
    revision: Annotated[
        str | None,
        typer.Option("--revision", metavar="BRANCH", help="Branch to push to (default: main)."),
    ] = None,
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="List what would be pushed; contact nothing.")
    ] = False,
) -> None:
    """Push a trained model to the Hugging Face Hub (token: HF_TOKEN or `hf auth login`)."""
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_repo_id(repo)
    except HFValidationError as e:
        raise UserError(f"--repo {repo!r}: {str(e).splitlines()[0]}") from None
    model = model_to_push(path, stage)
    files = files_to_push(model)
    where = f"{repo}@{revision}" if revision else repo
    if dry_run:
        sizes = [(model / f).stat().st_size for f in files]
        for name, size in zip(files, sizes, strict=True):
            typer.echo(f"{size:>12,}  {name}")
        new = " (created private if new)" if private else ""
        typer.echo(f"dry run: would push {len(files)} files ({_size(sum(sizes))}) from {model} "
                   f"to {where}{new}")  # fmt: skip
        return
    url = push_model(model, repo, files, private, revision)
    typer.echo(f"pushed {len(files)} files from {model} to {where}: {url}")


def register(app) -> None:
    app.command("push", cls=Command)(push)
