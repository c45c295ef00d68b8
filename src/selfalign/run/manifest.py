"""The run directory's manifest: what each stage did, so a rerun knows what to skip.

`RUN/manifest.json`:
    {"stages": {NAME (per stage of the registry, in order):
                 {"status": "pending|running|done|failed|interrupted|stale", "counts": {...},
                  "seconds": ..., "outputs": [...], "config_hash": ..., "settings": {...},
                  "warnings": ["stage 1 kept 3 of 24 target instructions ...: raise ..."],
                  "error": ...}},
     "versions": {...}, "seed": ..., "config_hash": ...}

A stage's `config_hash` covers its own settings and every upstream stage's, so changing stage 1
invalidates everything after it. `stale`: done once, but an earlier stage was redone since.
`warnings`: one line per way a done stage fell short of its target, each saying what to do
(empty or absent when none; the report shows them). `interrupted`: stopped by Ctrl-C, or,
decided when the manifest is read, left `running` by a process that no longer holds the run's
lock (`selfalign.run.lock`: it was killed). Written atomically after every change.

`STAGE/stage.json` (`write_stage_record`): what a stage command (`merge-instructions`, the
`self-align` finalize; the Slurm scripts run them) writes beside a stage's outputs once they are
complete: the settings they were made with (as `selfalign run` compares them), the counts, and
hashes of its outputs and inputs. `selfalign run` adopts such a stage as done (`adopted_from`)
when nothing changed since and the settings are its config's.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from selfalign.errors import UserError
from selfalign.jsonl import write_text_atomic
from selfalign.run.lock import holder


def config_hash(data: Any) -> str:
    text = json.dumps(data, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


class Manifest:
    def __init__(self, path: Path, data: dict[str, Any]):
        self.path = path
        self.data = data

    @classmethod
    def load(cls, run: Path, stages: list[str]) -> Manifest:
        path = run / "manifest.json"
        data = read_manifest(path) if path.exists() else {"stages": {}}
        for stage in stages:
            data["stages"].setdefault(stage, {"status": "pending"})
        return cls(path, data)

    def save(self) -> None:
        write_text_atomic(self.path, json.dumps(self.data, indent=2, ensure_ascii=False) + "\n")

    def stage(self, name: str) -> dict[str, Any]:
        return self.data["stages"][name]

    def start(self, name: str, stage_hash: str) -> None:
        entry = self.stage(name)
        entry.update(status="running", config_hash=stage_hash, started=time.time())
        entry.pop("error", None)
        entry.pop("warnings", None)  # an earlier attempt's; `finish` writes this one's
        self.save()

    def finish(
        self,
        name: str,
        counts: dict[str, Any],
        outputs: list[str],
        seconds: float,
        warnings: Sequence[str] = (),
    ) -> None:
        """Done; `warnings`: its shortfalls (`selfalign.run.shortfalls`), [] when none."""
        entry = self.stage(name)
        entry.update(status="done", counts=counts, outputs=outputs, seconds=round(seconds, 2),
                     warnings=list(warnings))  # fmt: skip
        self.save()

    def fail(self, name: str, error: str, seconds: float, status: str = "failed") -> None:
        entry = self.stage(name)
        entry.update(status=status, error=error, seconds=round(seconds, 2))
        self.save()

    def adopt(self, name: str, stage_hash: str, settings: dict[str, Any], record: dict[str, Any],
              source: str) -> None:  # fmt: skip
        """Mark as done a stage the stage commands made (`record`: its checked stage.json, at
        `source` inside the run); in memory only, like a plan: the run that goes ahead saves it."""
        folder = Path(source).parent
        self.data["stages"][name] = {
            "status": "done", "config_hash": stage_hash, "settings": settings,
            "counts": record.get("counts", {}),
            "outputs": [str(folder / output) for output in record["outputs"]],
            "adopted_from": source,
        }  # fmt: skip

    def reset(self, name: str) -> None:
        self.data["stages"][name] = {"status": "pending"}
        self.save()


def read_manifest(path: Path) -> dict[str, Any]:
    """A manifest's data; a damaged file is one UserError saying what to do."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(data, dict) or not isinstance(data.get("stages", {}), dict):
            raise ValueError("not a manifest object")
    except (ValueError, UnicodeDecodeError) as e:
        raise UserError(
            f"{path}: damaged ({e}); the stages' own files are intact: delete {path.name} and rerun "
            "(done stages are then redone, resuming from their files where they can)"
        ) from None
    data.setdefault("stages", {})
    _interrupted(data, path.parent)
    return data


def _interrupted(data: dict[str, Any], run: Path) -> None:
    """A stage still `running` in a run nobody holds lost its process (SIGKILL, a reboot): it
    reads as `interrupted`; a rerun resumes it like any unfinished stage."""
    running = [
        s for s in data["stages"].values() if isinstance(s, dict) and s.get("status") == "running"
    ]
    if running and holder(run) is None:
        for entry in running:
            entry.update(
                status="interrupted", error="its process stopped (killed?); rerun to resume"
            )


# -- what the stage commands leave for `selfalign run` to adopt ------------------------------------

STAGE_RECORD = "stage.json"


def file_sha(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()[:16]


def stage_settings(stage: str, model: Any, section: Any) -> dict[str, Any]:
    """The settings `selfalign run` keeps and compares for `stage`, from a stage command's model
    (`BackendConfig`) and stage section (files they name hashed by content, as the run does)."""
    from selfalign.run.settings import PipelineConfig, stage_configs  # it imports this module

    return stage_configs(PipelineConfig(model=model, **{stage: section}))[stage]


def clear_stage_record(folder: Path) -> None:
    """Before a stage command rewrites a stage's outputs: until it is done, nothing is adoptable."""
    (Path(folder) / STAGE_RECORD).unlink(missing_ok=True)


def write_stage_record(
    folder: Path,
    stage: str,
    settings: dict[str, Any],
    counts: dict[str, Any],
    outputs: list[str],
    inputs: list[Path] = (),
) -> Path:
    """`folder/stage.json` for the complete `outputs` (names in `folder`) made from `inputs`."""
    folder = Path(folder)
    record = {
        "stage": stage, "settings": settings, "counts": counts,
        "outputs": {name: file_sha(folder / name) for name in outputs},
        "inputs": [file_sha(Path(p)) for p in inputs], "time": round(time.time(), 3),
    }  # fmt: skip
    path = folder / STAGE_RECORD
    write_text_atomic(path, json.dumps(record, indent=2, ensure_ascii=False, default=str) + "\n")
    return path


def record_problem(folder: Path, stage: str, inputs: list[Path]) -> tuple[dict | None, str | None]:
    """(the record, None) when `folder/stage.json` describes `stage`'s outputs as they are, made
    from `inputs` as they are; (None, None) with no record; (record, what is wrong) otherwise."""
    path = Path(folder) / STAGE_RECORD
    if not path.is_file():
        return None, None
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
        outputs, made_from = dict(record["outputs"]), list(record["inputs"])
    except (ValueError, KeyError, TypeError, UnicodeDecodeError):
        return {}, f"{path} is damaged; rerun the command that wrote it"
    if record.get("stage") != stage:
        return record, f"{path} is stage {record.get('stage')!r}'s, not {stage!r}'s"
    for name, sha in outputs.items():
        if not (folder / name).is_file() or file_sha(folder / name) != sha:
            return record, f"{folder / name} is missing or changed since {path.name} was written"
    for given, sha in zip(inputs, made_from, strict=False):
        if not given.is_file() or file_sha(given) != sha:
            return record, f"it was made from another {given} than the run's"
    return record, None
