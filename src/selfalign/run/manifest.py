"""The run directory's manifest: what each stage did, so a rerun knows what to skip.

`RUN/manifest.json`:
    {"stages": {NAME (per stage of the registry, in order):
                 {"status": "pending|running|done|failed|interrupted|stale", "counts": {...},
                  "seconds": ..., "outputs": [...], "config_hash": ..., "settings": {...},
                  "error": ...}},
     "versions": {...}, "seed": ..., "config_hash": ...}

A stage's `config_hash` covers its own settings and every upstream stage's, so changing stage 1
invalidates everything after it. `stale`: done once, but an earlier stage was redone since.
`interrupted`: stopped by Ctrl-C, or, decided when the manifest is read, left `running` by a
process that no longer holds the run's lock (`selfalign.run.lock`: it was killed). Written
atomically after every change.
"""

from __future__ import annotations

import hashlib
import json
import time
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
        self.save()

    def finish(self, name: str, counts: dict[str, Any], outputs: list[str], seconds: float) -> None:
        entry = self.stage(name)
        entry.update(status="done", counts=counts, outputs=outputs, seconds=round(seconds, 2))
        self.save()

    def fail(self, name: str, error: str, seconds: float, status: str = "failed") -> None:
        entry = self.stage(name)
        entry.update(status=status, error=error, seconds=round(seconds, 2))
        self.save()

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
