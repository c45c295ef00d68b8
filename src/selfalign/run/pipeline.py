"""`selfalign run`: one config takes a base model through the stages into a run directory.

    RUN/config.yaml        the resolved config actually used
    RUN/manifest.json      status, counts, seconds, outputs, config hash and warnings per stage
    RUN/1_instructions/    stage 1 (selfalign.stages.stage1_instructions)
    RUN/2_self_align/      stage 2 (selfalign.stages.stage2_self_align)
    RUN/3_engrave/model/   stage 3 (selfalign.stages.stage3_engrave)
    RUN/4_verbose/         stage 4 (selfalign.stages.stage4_verbose), final model in model/
    RUN/5_evaluate/        stage 5 (selfalign.stages.stage5_evaluate), results.json
    RUN/report/index.html  the report (selfalign.run.report)

The stages, their folders, config sections and files come from `selfalign.run.registry`; the
config, preflight and stage hashes from `selfalign.run.settings`. Each stage resumes by itself
(raw completions and checkpoints on disk), so the pipeline only decides which stages to run: a
stage that is done with the same settings is skipped; one whose settings changed is refused until
the user says `--force STAGE`, which redoes it and every later selected stage (their inputs
change); later stages outside `--stages` are marked stale, not deleted, and are redone when next
selected. A stage never run here whose outputs the stage commands wrote (Slurm: the merge and
finalize steps leave STAGE/stage.json, `selfalign.run.manifest`) is adopted as done when a later
stage needs it, if its settings are this config's and its files unchanged; otherwise refused.
A redone stage's previous folder waits in RUN/.trash/ until the redo succeeds. One process works
in a run directory at a time (`selfalign.run.lock`). A stage that finishes short of its target
(`selfalign.run.shortfalls`) says so after its summary line and in its manifest entry.
"""

from __future__ import annotations

import gc
import json
import logging
import shutil
import sys
import time
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from selfalign.config import dump_config
from selfalign.errors import UserError
from selfalign.generation import Backend, load_backend
from selfalign.generation.records import ResumeMismatch
from selfalign.jsonl import read_jsonl, write_text_atomic
from selfalign.run.failures import disk_full, failure_reason, log_failure, unexpected
from selfalign.run.lock import DirLock
from selfalign.run.manifest import STAGE_RECORD, Manifest, config_hash, record_problem
from selfalign.run.registry import STAGE, STAGES, Stage, names, producers
from selfalign.run.settings import (
    PipelineConfig,
    changed_keys,
    changed_message,
    check_force,
    check_needs,
    stage_configs,
    stage_hashes,
)
from selfalign.run.shortfalls import stage_warnings
from selfalign.stages.stage2_self_align import stage_constitution
from selfalign.training.model_dir import versions

log = logging.getLogger(__name__)

# -- events: human lines, or JSON lines for clusters -----------------------------------------------


class Events:
    """Stage-level messages: one readable line each, or one JSON object per line (`json_logs`)."""

    def __init__(self, json_logs: bool = False, quiet: bool = False, stream=None):
        self.json_logs, self.quiet = json_logs, quiet
        self.stream = stream or sys.stderr

    def __call__(self, event: str, message: str = "", **fields: Any) -> None:
        if self.json_logs:
            record = {"time": round(time.time(), 3), "event": event, **fields}
            print(json.dumps(record, ensure_ascii=False, default=str), file=self.stream, flush=True)
        elif message and (not self.quiet or event not in ("stage_start", "step_done")):
            print(message, file=self.stream, flush=True)


def summarize(counts: dict[str, Any]) -> str:
    parts = [f"{k} {v}" for k, v in counts.items() if isinstance(v, int | float)]
    reasons = counts.get("rejected_by_reason") or {}
    if reasons:
        top = sorted(reasons.items(), key=lambda kv: -kv[1])[:4]
        parts.append("(" + ", ".join(f"{k} {v}" for k, v in top) + ")")
    return ", ".join(parts)


# -- the run ---------------------------------------------------------------------------------------


class Pipeline:
    """Runs the selected stages of one config in one run directory."""

    def __init__(self, cfg: PipelineConfig, events: Events | None = None, command: str = ""):
        self.cfg = cfg
        self.run = Path(cfg.run_dir)
        self.events = events or Events()
        self.command = command
        self.constitution = stage_constitution(cfg.self_align)
        self._backend: Backend | None = None
        self._backend_model: str | None = None
        self._lock: DirLock | None = None  # held by `execute`
        self.settings: dict[str, dict[str, Any]] = {}  # per stage, set by `plan`
        self.hashes: dict[str, str] = {}

    def dir(self, stage: str) -> Path:
        return STAGE[stage].path(self.run)

    # which stages to run ------------------------------------------------------------------------

    def plan(self, manifest: Manifest, stages: list[str], force: Iterable[str]) -> list[_Todo]:
        """The stages to run now, in order. Changes nothing on disk.

        A forced stage, a stale one, and every selected stage after one of those is redone from
        scratch; a done stage whose settings changed is refused; one whose inputs are missing is
        refused naming the stage that makes them."""
        force = check_force(set(force), stages)
        # read once per run (they hash the files the settings name): the plan and the manifest agree
        self.settings = settings = stage_configs(self.cfg)
        self.hashes = hashes = stage_hashes(self.cfg, settings)
        todo: list[_Todo] = []
        cascade = False  # an earlier selected stage is redone, so this one's inputs change
        for stage in STAGES:
            if stage.name not in stages:
                continue
            entry = manifest.stage(stage.name)
            redo = cascade or stage.name in force or entry["status"] == "stale"
            cascade = redo
            if (
                not redo
                and entry["status"] != "pending"
                and entry.get("config_hash") != hashes[stage.name]
            ):
                raise UserError(changed_message(stage.name, entry, settings[stage.name]))
            if entry["status"] == "done" and not redo:
                self.events(
                    "stage_skipped", f"[{stage.name}] done already, skipped", stage=stage.name
                )
                continue
            self._check_inputs(manifest, stage, stages)
            todo.append(_Todo(stage, redo and entry["status"] != "pending"))
        return todo

    def _check_inputs(self, manifest: Manifest, stage: Stage, selected: list[str]) -> None:
        for producer in producers(stage):
            status = manifest.stage(producer.name)["status"]
            if producer.name in selected or status == "done":
                continue
            if status == "pending" and self._adopt(manifest, producer):
                continue
            raise UserError(
                f"stage {stage.name!r} needs stage {producer.name!r} "
                f"({', '.join(i for i in stage.inputs if i in producer.outputs)}), which is not "
                f"done; include it: --stages {producer.number}-{stage.number}"
            )

    def _adopt(self, manifest: Manifest, stage: Stage) -> bool:
        """Record as done a stage this run never ran but the stage commands made (the Slurm
        scripts: its merge/finalize step wrote STAGE/stage.json once its outputs were complete),
        if its outputs and inputs are unchanged since and its settings are this config's. False
        when there is no record; a record that does not fit is refused in one line."""
        folder = stage.path(self.run)
        inputs = [self.run / name for name in stage.inputs]
        record, problem = record_problem(folder, stage.name, inputs)
        if record is None:
            return False
        where = f"{folder / STAGE_RECORD}: stage {stage.name!r} made by the stage commands"
        if problem:
            raise UserError(f"{where} cannot be adopted: {problem}")
        changed = [
            k if k.startswith(("model", "constitution")) else f"{stage.name}.{k}"
            for k in changed_keys(record["settings"], self.settings[stage.name])
        ]
        if changed:
            raise UserError(
                f"{where} ran with other settings than {self.cfg.run_dir}'s config "
                f"({', '.join(changed[:5])}); rerun it with this config's stage files "
                f"(selfalign run CONFIG --print-slurm DIR), or run it here: --stages "
                f"{stage.number}-"
            )
        for producer in producers(stage):  # its inputs came from them: they must be done too
            if manifest.stage(producer.name)["status"] != "done" and not (
                manifest.stage(producer.name)["status"] == "pending"
                and self._adopt(manifest, producer)
            ):
                raise UserError(
                    f"{where} cannot be adopted: stage {producer.name!r}, which made its inputs, "
                    f"is not done; run it: --stages {producer.number}-"
                )
        source = str((folder / STAGE_RECORD).relative_to(self.run))
        manifest.adopt(stage.name, self.hashes[stage.name], self.settings[stage.name], record,
                       source)  # fmt: skip
        manifest.stage(stage.name)["warnings"] = stage_warnings(
            stage.name, record.get("counts", {}), self.cfg
        )
        files = ", ".join(record["outputs"])
        self.events("stage_adopted", f"[{stage.name}] adopted as done: made by the stage commands "
                    f"with this config's settings ({files}; {source})", stage=stage.name,
                    record=source)  # fmt: skip
        return True

    # running ------------------------------------------------------------------------------------

    def execute(self, stages: list[str] | None = None, force: Iterable[str] = ()) -> Manifest:
        # one process per run directory: a second one would redo the same work into the same
        # files; the lock is taken before the manifest is read, so the plan sees settled state
        with DirLock(self.run, reserve=True) as self._lock:
            manifest = Manifest.load(self.run, names())
            todo = self.plan(manifest, stages or names(), force)
            check_needs(self.cfg, [item.stage.name for item in todo])
            # only a run that is going ahead records its settings (a refused one leaves them)
            write_text_atomic(self.run / "config.yaml", dump_config(self.cfg))
            manifest.data.update(
                versions=versions(), seed=self.cfg.seed,
                config_hash=config_hash(self.cfg.model_dump()),
            )  # fmt: skip
            self._mark_stale(manifest, todo)
            manifest.save()
            try:
                for item in todo:
                    self._run_stage(manifest, item)
            finally:
                self.release()
        return manifest

    def _record_failure(
        self, manifest: Manifest, stage: Stage, error: BaseException, seconds: float
    ) -> None:
        """The manifest says in one line why the stage stopped: `interrupted` (Ctrl-C), the disk
        that filled (the run's reserve is given back first, so this write fits), or the error and
        the log of its traceback. If even that cannot be written, the error says so."""
        reason = failure_reason(error)
        if unexpected(error) and (log := log_failure(error, self.run)):
            reason += f" (traceback in {log})"
        if disk_full(error) is not None and self._lock is not None:
            self._lock.free_reserve()
        status = "interrupted" if isinstance(error, KeyboardInterrupt) else "failed"
        try:
            manifest.fail(stage.name, reason, seconds, status)
        except OSError as e:
            error.add_note(f"{manifest.path} could not record it: {e.strerror or e}")
        # the reason itself is the command's last line (`error: ...`): said once, not twice
        self.events("stage_failed", f"[{stage.name}] {status}", stage=stage.name, status=status,
                    reason=reason)  # fmt: skip

    def _mark_stale(self, manifest: Manifest, todo: list[_Todo]) -> None:
        """From the first redone stage on, no earlier output matches its inputs any more: mark
        those stages stale before any work, so a failure on the way leaves none of them "done"."""
        redone = [t.stage.number for t in todo if t.redo]
        if not redone:
            return
        running = {t.stage.name for t in todo}
        for stage in STAGES[min(redone) - 1 :]:
            entry = manifest.stage(stage.name)
            if entry["status"] == "pending":
                continue
            entry["status"] = "stale"
            if stage.name not in running:
                self.events("stage_stale", f"[{stage.name}] marked stale: an earlier stage is "
                            "redone; it is redone the next time it is selected", stage=stage.name)  # fmt: skip

    def _run_stage(self, manifest: Manifest, item: _Todo) -> None:
        stage = item.stage
        trash = self._set_aside(manifest, stage) if item.redo else None
        manifest.start(stage.name, self.hashes[stage.name])
        manifest.stage(stage.name)["settings"] = self.settings[stage.name]
        self.events("stage_start", f"[{stage.name}] starting", stage=stage.name)
        started = time.perf_counter()
        try:
            counts, outputs = stage.run(self)
        except BaseException as e:
            if isinstance(e, ResumeMismatch):  # a raw file made from other prompts: redo the stage
                e.restart_hint = f"rerun with --force {stage.name}"
            self._record_failure(manifest, stage, e, time.perf_counter() - started)
            raise
        seconds = time.perf_counter() - started
        warnings = stage_warnings(stage.name, counts, self.cfg)
        outputs = [str(p.relative_to(self.run)) for p in outputs]
        manifest.finish(stage.name, counts, outputs, seconds, warnings)
        if trash is not None:
            shutil.rmtree(trash, ignore_errors=True)
        flag = f" [{len(warnings)} warning{'s' if len(warnings) > 1 else ''}]" if warnings else ""
        self.events("stage_done", f"[{stage.name}] done in {seconds:.0f}s: {summarize(counts)}"
                    f"{flag}", stage=stage.name, seconds=round(seconds, 2), counts=counts,
                    warnings=warnings)  # fmt: skip
        for warning in warnings:  # a stage short of its target goes on, but says so
            self.events("stage_warning", f"[{stage.name}] WARNING: {warning}", stage=stage.name,
                        warning=warning)  # fmt: skip

    def _set_aside(self, manifest: Manifest, stage: Stage) -> Path | None:
        """Move a redone stage's previous outputs to RUN/.trash/ (deleted once the redo succeeds,
        so a failed redo loses nothing)."""
        folder = stage.path(self.run)
        manifest.reset(stage.name)
        if not folder.exists():
            return None
        trash = _unique(self.run / ".trash" / f"{stage.folder}-{time.strftime('%Y%m%d-%H%M%S')}")
        trash.parent.mkdir(exist_ok=True)
        folder.rename(trash)
        self.events("stage_reset", f"[{stage.name}] redone: previous outputs set aside in "
                    f"{trash} until it succeeds", stage=stage.name, trash=str(trash))  # fmt: skip
        return trash

    # what the stages use ------------------------------------------------------------------------

    def backend(self, model: str | None = None) -> Backend:
        """The generation backend: the base model, or `model` (stage 4: the engraved one)."""
        wanted = model or self.cfg.model.model
        if self._backend is not None and self._backend_model != wanted:
            self.release()
        if self._backend is None:
            update = {"model": wanted}
            if model:  # another model than the configured one: it is served under its path
                update["served_name"] = None
            self._backend = load_backend(self.cfg.model.model_copy(update=update))
            self._backend_model = wanted
        return self._backend

    def release(self) -> None:
        """Close the generation model before training (the trainer needs its GPU memory)."""
        if self._backend is not None:
            self._backend.close()
        self._backend = self._backend_model = None
        gc.collect()
        try:
            import torch

            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        except ImportError:  # pragma: no cover
            pass

    def step_done(self, step: str, counts: dict[str, Any]) -> None:
        self.events("step_done", f"  {step}: {summarize(counts)}", step=step, counts=counts)

    @staticmethod
    def rejections(path: Path) -> dict[str, Any]:
        """`rejected` and `rejected_by_reason` counts of a rejected.jsonl."""
        rejected = read_jsonl(path) if path.exists() else []
        reasons = Counter(r.get("reason", "unknown") for r in rejected)
        return {"rejected": len(rejected), "rejected_by_reason": dict(reasons.most_common())}


def _unique(path: Path) -> Path:
    n = 1
    while path.exists():
        path, n = path.with_name(f"{path.name.rsplit('.', 1)[0]}.{n}"), n + 1
    return path


@dataclass(frozen=True)
class _Todo:
    """A stage to run now; `redo`: remove its previous outputs first."""

    stage: Stage
    redo: bool


def run_pipeline(
    cfg: PipelineConfig,
    stages: list[str] | None = None,
    force: Iterable[str] = (),
    events: Events | None = None,
    command: str = "",
    report: bool = True,
) -> Manifest:
    """Run the selected stages, then write the report; the manifest is returned."""
    manifest = Pipeline(cfg, events, command).execute(stages, force)
    if report:
        from selfalign.run.report import write_report

        path = write_report(cfg.run_dir)
        (events or Events())("run_done", f"report: {path}", report=str(path))
    return manifest
