"""Slurm job scripts for a pipeline config: stages 1-2 as array jobs across nodes, then training.

`slurm_scripts(cfg, config)` returns {file name: text}; `write_scripts(folder, files)` writes
them (`selfalign run CONFIG --print-slurm DIR`). Reads nothing; writes only into that folder:

    stage1.yaml, self_align.yaml   the `model:` and stage sections of the pipeline config, as the
                                   stage commands read them (`--config`)
    1a_self_instruct.sbatch        array: `selfalign self-instruct --shard I/N` (raw rounds
                                   I, I+N, ...; the merge filters them all in round order)
    1b_topics.sbatch               one job: `selfalign topics` (not sharded: each epoch needs the
                                   one before; the questions read its topics)
    1c_questions.sbatch            array, after 1b: `selfalign questions --shard I/N`
    1d_merge.sbatch                after 1a and 1c: `selfalign merge-instructions` (no GPU;
                                   writes RUN/1_instructions/stage.json when complete)
    2a_self_align.sbatch           array, after 1d: `selfalign self-align --shard I/N`
    2b_finalize.sbatch             after 2a: `selfalign self-align --finalize` (no GPU)
    3_train.sbatch                 after 2b: `selfalign run CONFIG --stages 3-` (adopts
                                   stages 1-2 as done from their stage.json: same settings)
    submit.sh                      submits them in that order with --dependency=afterok:

Each command writes where `selfalign run` would (RUN/1_instructions, RUN/2_self_align), so the
shards share one folder and the merge/finalize steps read every shard's files. Paths are written
as given (relative ones to the directory `submit.sh` is run from: Slurm starts each job there).
"""

from __future__ import annotations

import shlex
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import yaml

from selfalign.errors import UserError
from selfalign.run.registry import STAGE

# a shard count Slurm reads from the array; SHARDS=N in the environment wins, so one task can be
# resubmitted alone (`SHARDS=8 sbatch --array=3 FILE`: its own array then counts 1 task)
SHARD_ARG = '"$SLURM_ARRAY_TASK_ID/${SHARDS:-$SLURM_ARRAY_TASK_COUNT}"'
# ROUNDS=R: self-instruct generates at least its rounds below R (the merge says R when the shards
# stopped short of the target: `ROUNDS=R sbatch 1a_self_instruct.sbatch`, then the merge again)
ROUNDS_ARG = '${ROUNDS:+--rounds "$ROUNDS"}'
STAGE1_FILE, SELF_ALIGN_FILE, SUBMIT = "stage1.yaml", "self_align.yaml", "submit.sh"


@dataclass(frozen=True)
class Job:
    """One sbatch script: `command` after `after` (names of earlier jobs), `array` = sharded."""

    name: str
    file: str
    what: str
    command: str
    after: tuple[str, ...] = ()
    array: bool = False
    gpus: bool = True


def read_pipeline_config(
    path: str | Path, overrides: Sequence[str] = (), run_dir: str | Path | None = None
):
    """The pipeline config as `selfalign run` reads it, without the preflight: the scripts are
    written on a login node, which may not see the model or have vLLM (the jobs check those)."""
    from selfalign.config import build_config
    from selfalign.run.settings import PipelineConfig, shared_defaults

    flags = {"run_dir": str(run_dir) if run_dir is not None else None}
    return build_config(PipelineConfig, path, overrides, flags, prepare=shared_defaults)


def _q(value: str | Path) -> str:
    return shlex.quote(str(value))


def stage_files(cfg) -> dict[str, str]:
    """The `--config` files of the stage commands: the pipeline config's model and stage
    sections, resolved (top-level seed and constitution filled in), so every shard generates
    with exactly the settings `selfalign run` would use."""
    model = cfg.model.model_dump(mode="json")
    head = "# written by `selfalign run --print-slurm` from the pipeline config; regenerate it\n"
    dump = lambda data: head + yaml.safe_dump(data, sort_keys=False, allow_unicode=True)  # noqa: E731
    return {
        STAGE1_FILE: dump({"model": model, **cfg.instructions.model_dump(mode="json")}),
        SELF_ALIGN_FILE: dump(
            {"model": model, "self_align": cfg.self_align.model_dump(mode="json")}
        ),
    }


def jobs(cfg, config: str | Path, folder: str | Path, overrides: Sequence[str] = ()) -> list[Job]:
    """The jobs in submission order; `folder` is where the scripts and stage files will be."""
    run = Path(cfg.run_dir)
    stage1, stage2 = STAGE["instructions"].path(run), STAGE["self_align"].path(run)
    instructions = run / STAGE["self_align"].inputs[0]
    s1 = f"--config {_q(Path(folder) / STAGE1_FILE)} --output {_q(stage1)}"
    s2 = (f"--config {_q(Path(folder) / SELF_ALIGN_FILE)} --instructions {_q(instructions)} "
          f"--output {_q(stage2)}")  # fmt: skip
    train = " ".join(_q(a) for a in [config, *overrides, "--run-dir", run, "--stages", "3-"])
    return [
        Job("self_instruct", "1a_self_instruct.sbatch", "stage 1: self-instruct, one shard a task",
            f"selfalign self-instruct {s1} --shard {SHARD_ARG} {ROUNDS_ARG}", array=True),
        Job("topics", "1b_topics.sbatch", "stage 1: topic brainstorm (one job, not sharded)",
            f"selfalign topics {s1}"),
        Job("questions", "1c_questions.sbatch", "stage 1: TGRT questions, one shard a task",
            f"selfalign questions {s1} --shard {SHARD_ARG}", ("topics",), array=True),
        Job("merge", "1d_merge.sbatch", "stage 1: merge every shard into instructions.jsonl",
            f"selfalign merge-instructions {s1}", ("self_instruct", "questions"), gpus=False),
        Job("self_align", "2a_self_align.sbatch", "stage 2: self-align, one shard a task",
            f"selfalign self-align {s2} --shard {SHARD_ARG}", ("merge",), array=True),
        Job("finalize", "2b_finalize.sbatch", "stage 2: parse and filter every shard's answers",
            f"selfalign self-align {s2} --finalize", ("self_align",), gpus=False),
        Job("train", "3_train.sbatch", "stages 3-5: engrave, verbose cloning, evaluation",
            f"selfalign run {train} --quiet", ("finalize",)),
    ]  # fmt: skip


def _script(job: Job, shards: int, gpus: int, time: str, partition: str | None,
            account: str | None) -> str:  # fmt: skip
    """One sbatch file: the #SBATCH lines a user edits, then the command."""

    def option(key: str, value: str | None, placeholder: str) -> str:
        # `##SBATCH` is ignored by Slurm: the site's default applies until the user sets it
        return f"#SBATCH --{key}={value}" if value else f"##SBATCH --{key}={placeholder}"

    lines = [
        "#!/usr/bin/env bash",
        f"# selfalign {job.what}.",
        "# Written by `selfalign run CONFIG --print-slurm DIR`; submitted by submit.sh.",
        f"#SBATCH --job-name=selfalign-{job.name.replace('_', '-')}",
        option("partition", partition, "PARTITION"),
        option("account", account, "ACCOUNT"),
        f"#SBATCH --time={time}",
        "#SBATCH --nodes=1",
        "#SBATCH --ntasks=1",
    ]
    if job.gpus:
        lines.append(f"#SBATCH --gpus-per-task={gpus}")
    if job.array:
        lines += [f"#SBATCH --array=0-{shards - 1}", "#SBATCH --output=slurm-%x-%A_%a.out"]
    else:
        lines.append("#SBATCH --output=slurm-%x-%j.out")
    lines += [
        "set -euo pipefail",
        "# selfalign must be on PATH here (sbatch passes on the environment it was called from)",
        "export SELFALIGN_PROGRESS=0  # no progress bars in the log files",
        job.command,
        "",
    ]
    return "\n".join(lines)


def _submit(job_list: list[Job], config: str | Path, folder: str | Path) -> str:
    lines = [
        "#!/usr/bin/env bash",
        "# Submits selfalign stages 1-2 as Slurm array jobs, the merge/finalize steps after them",
        "# and the training after those (--dependency=afterok: a failed job stops what follows).",
        "# Run it from the directory the paths in the scripts are relative to:",
        f"#   bash {_q(Path(folder) / SUBMIT)}",
        "set -euo pipefail",
        f"if [ ! -f {_q(config)} ]; then",
        f"  echo {_q(f'{SUBMIT}: no {config} here; run it from the directory that has it')} >&2",
        "  exit 2",
        "fi",
        "submit() {  # sbatch --parsable prints ID or ID;CLUSTER",
        "  local id",
        '  id=$(sbatch --parsable "$@")',
        '  echo "${id%%;*}"',
        "}",
    ]
    for job in job_list:
        after = ":".join(f"${j}" for j in job.after)
        dependency = f"--dependency=afterok:{after} " if after else ""
        lines.append(f"{job.name}=$(submit {dependency}{_q(Path(folder) / job.file)})")
    names = " ".join(f"{j.name}=${j.name}" for j in job_list)
    lines += [f'echo "submitted: {names}"', ""]
    return "\n".join(lines)


def slurm_scripts(
    cfg,
    config: str | Path,
    folder: str | Path,
    shards: int = 8,
    overrides: Sequence[str] = (),
    *,
    time: str = "24:00:00",
    gpus: int | None = None,
    partition: str | None = None,
    account: str | None = None,
) -> dict[str, str]:
    """{file name: text} of the stage files, the job scripts and submit.sh for the pipeline
    config `cfg` read from `config` (with `overrides`), to be written into `folder`. `gpus` per
    job defaults to the model's tensor_parallel_size."""
    if shards < 1:
        raise UserError(f"--shards {shards}: need at least 1")
    gpus = gpus or cfg.model.tensor_parallel_size
    job_list = jobs(cfg, config, folder, overrides)
    files = stage_files(cfg)
    for job in job_list:
        files[job.file] = _script(job, shards, gpus, time, partition, account)
    files[SUBMIT] = _submit(job_list, config, folder)
    return files


def write_scripts(folder: str | Path, files: dict[str, str]) -> list[Path]:
    """Write `files` into `folder`; a file there with other content is refused before anything is
    written (a file with the same content is left as it is). Returns the paths written."""
    folder = Path(folder)
    for name, text in files.items():
        path = folder / name
        if path.exists() and (not path.is_file() or path.read_text(encoding="utf-8") != text):
            raise UserError(
                f"{path} exists with other content; remove it or give --print-slurm another folder"
            )
    written = []
    try:
        folder.mkdir(parents=True, exist_ok=True)
        for name, text in files.items():
            path = folder / name
            if not path.exists():
                path.write_text(text, encoding="utf-8")
                if name.endswith((".sbatch", ".sh")):
                    path.chmod(0o755)
                written.append(path)
    except OSError as e:
        raise UserError(f"{folder}: cannot write the Slurm scripts ({e.strerror or e})") from None
    return written
