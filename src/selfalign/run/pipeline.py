"""`selfalign run`: one config takes a base model through the four stages into a run directory.

    RUN/config.yaml        the resolved config actually used
    RUN/manifest.json      status, counts, seconds, outputs and config hash per stage
    RUN/1_instructions/    stage 1 (selfalign.stages.stage1_instructions)
    RUN/2_self_align/      stage 2 (selfalign.stages.stage2_self_align)
    RUN/3_engrave/model/   stage 3 (selfalign.stages.stage3_engrave)
    RUN/4_verbose/         stage 4 (selfalign.stages.stage4_verbose), final model in model/
    RUN/report/index.html  the report (selfalign.run.report)

Each stage resumes by itself (raw completions and checkpoints on disk), so the pipeline only
decides which stages to run: a stage that is done with the same settings is skipped; one whose
settings changed is refused until the user says `--force STAGE` (which also redoes every later
stage, since their inputs change). A stage's hash covers its own section, the model and every
upstream stage's hash.
"""

from __future__ import annotations

import gc
import json
import logging
import shutil
import sys
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from selfalign.config import apply_overrides, dump_config, read_yaml, validate
from selfalign.errors import UserError
from selfalign.generation import Backend, BackendConfig, load_backend
from selfalign.jsonl import read_jsonl, write_text_atomic
from selfalign.run.manifest import STAGES, Manifest, config_hash, versions
from selfalign.stages.stage1_instructions import (
    Stage1Config,
    run_merge,
    run_questions,
    run_self_instruct,
    run_topics,
)
from selfalign.stages.stage2_self_align import SelfAlignConfig, run_self_align, stage_constitution
from selfalign.stages.stage3_engrave import TrainConfig, run_engrave
from selfalign.stages.stage4_verbose import VerboseConfig, run_final_sft, run_verbose

log = logging.getLogger(__name__)

FOLDERS = {
    "instructions": "1_instructions",
    "self_align": "2_self_align",
    "engrave": "3_engrave",
    "verbose": "4_verbose",
}
# model settings that change what is generated (batch size, device and concurrency do not)
MODEL_KEYS = ("model", "backend", "dtype", "base_url", "trust_remote_code")


class PipelineConfig(BaseModel):
    """Everything `selfalign run` needs; one section per stage."""

    model_config = ConfigDict(extra="forbid")

    run_dir: str = Field("runs/selfalign", description="Run directory (--run-dir overrides).")
    seed: int = Field(42, description="Default seed of every stage that does not set its own.")
    constitution: str = Field(
        "default", description="Constitution: a bundled name or a YAML/prompt-text file."
    )
    model: BackendConfig = Field(..., description="The base model and how it generates.")
    instructions: Stage1Config = Field(default_factory=Stage1Config)
    self_align: SelfAlignConfig = Field(default_factory=SelfAlignConfig)
    engrave: TrainConfig = Field(default_factory=TrainConfig)
    verbose: VerboseConfig = Field(default_factory=VerboseConfig)


_SEEDED = [("instructions", step) for step in ("self_instruct", "topics", "questions", "merge")] + [
    ("self_align",),
    ("engrave",),
    ("verbose",),
    ("verbose", "train"),
]


def shared_defaults(data: dict[str, Any]) -> dict[str, Any]:
    """The top-level seed and constitution fill the stage sections that leave them unset."""
    seed = data.get("seed", 42)
    for path in _SEEDED:
        section = _section(data, path)
        if section is not None:
            section.setdefault("seed", seed)
    self_align = _section(data, ("self_align",))
    if self_align is not None:
        self_align.setdefault("constitution", data.get("constitution", "default"))
    return data


def _section(data: dict, path: tuple[str, ...]) -> dict | None:
    """The nested dict at `path`, created when missing; None if something on the way is not one."""
    node = data
    for key in path:
        child = node.setdefault(key, {})
        if not isinstance(child, dict):
            return None
        node = child
    return node


# -- config ---------------------------------------------------------------------------------------


def load_pipeline_config(
    path: str | Path, overrides: Iterable[str] = (), run_dir: str | Path | None = None
) -> PipelineConfig:
    """Read, override, validate and pre-flight a pipeline config; any problem is one UserError."""
    data = read_yaml(path)
    apply_overrides(data, list(overrides))
    if run_dir is not None:
        data["run_dir"] = str(run_dir)
    cfg = validate(PipelineConfig, shared_defaults(data), str(path))
    preflight(cfg, str(path))
    return cfg


def preflight(cfg: PipelineConfig, source: str) -> None:
    """Check what can be checked before any work: model, constitution, input files, run dir."""
    from selfalign.modeling import _check_exists

    if cfg.model.backend == "transformers":
        _check_exists(cfg.model.model)
    stage_constitution(cfg.self_align)
    stage1 = cfg.instructions
    for key, value in (
        ("instructions.self_instruct.seed_tasks", stage1.self_instruct.seed_tasks),
        ("instructions.self_instruct.meta_prompt", stage1.self_instruct.meta_prompt),
        ("instructions.topics.seed_questions", stage1.topics.seed_questions),
        ("instructions.topics.prompt", stage1.topics.prompt),
        ("instructions.questions.seed_questions", stage1.questions.seed_questions),
        ("instructions.questions.prompt", stage1.questions.prompt),
    ):
        if value is not None and not Path(value).is_file():
            raise UserError(f"{source}: {key}: no such file {value!r}")
    _check_writable(Path(cfg.run_dir))


def _check_writable(run: Path) -> None:
    try:
        run.mkdir(parents=True, exist_ok=True)
        probe = run / ".write-test"
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        raise UserError(f"run directory {str(run)!r} is not writable ({e.strerror})") from None


def stage_configs(cfg: PipelineConfig) -> dict[str, dict[str, Any]]:
    """Per stage, the settings its outputs depend on (hashed for change detection); an edit of
    the constitution file counts as a change of stage 2."""
    model = cfg.model.model_dump(include=set(MODEL_KEYS))
    constitution = stage_constitution(cfg.self_align).model_dump()
    settings = {
        "instructions": {"model": model, **cfg.instructions.model_dump()},
        "self_align": {
            "model": model,
            "constitution_content": config_hash(constitution),
            **cfg.self_align.model_dump(),
        },
        "engrave": {"model": model["model"], **cfg.engrave.model_dump()},
        "verbose": cfg.verbose.model_dump(),
    }
    # as JSON sees them (string keys), so they compare equal to what the manifest stored
    return json.loads(json.dumps(settings, sort_keys=True, default=str))


def stage_hashes(cfg: PipelineConfig) -> dict[str, str]:
    hashes, upstream = {}, ""
    for stage, settings in stage_configs(cfg).items():
        upstream = hashes[stage] = config_hash({"upstream": upstream, "settings": settings})
    return hashes


def parse_stages(text: str | None) -> list[str]:
    """`None` = all; `2`, `self_align`, `1-2`, `2-`, `instructions-engrave` select a range."""
    if not text:
        return list(STAGES)

    def index(part: str, default: int) -> int:
        part = part.strip()
        if not part:
            return default
        if part.isdigit() and 1 <= int(part) <= len(STAGES):
            return int(part) - 1
        if part in STAGES:
            return STAGES.index(part)
        raise UserError(
            f"--stages {text!r}: {part!r} is not a stage; use 1-4 or {', '.join(STAGES)}"
        )

    # names use underscores, so after this a dash can only separate the two ends of a range
    first, sep, last = text.replace("self-align", "self_align").partition("-")
    lo = index(first, 0)
    hi = index(last, len(STAGES) - 1) if sep else lo
    if lo > hi:
        raise UserError(f"--stages {text!r}: the range runs backwards")
    return list(STAGES[lo : hi + 1])


def _changed_keys(old: dict[str, Any], new: dict[str, Any], prefix: str = "") -> list[str]:
    keys = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            keys += _changed_keys(a, b, f"{prefix}{key}.")
        elif a != b:
            keys.append(f"{prefix}{key}")
    return keys


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
        self.identity = self.constitution.identity
        self._backend: Backend | None = None

    def dir(self, stage: str) -> Path:
        return self.run / FOLDERS[stage]

    # which stages to run ------------------------------------------------------------------------

    def plan(self, manifest: Manifest, stages: list[str], force: Iterable[str]) -> list[str]:
        """The stages to run now; resets forced ones (and everything after them)."""
        force = set(force)
        unknown = force - set(STAGES)
        if unknown:
            raise UserError(f"--force {sorted(unknown)[0]!r}: not a stage; use {', '.join(STAGES)}")
        hashes, settings = stage_hashes(self.cfg), stage_configs(self.cfg)
        first_forced = min((STAGES.index(s) for s in force), default=len(STAGES))
        todo = []
        for i, stage in enumerate(STAGES):
            entry = manifest.stage(stage)
            if i >= first_forced and entry["status"] != "pending":
                self._reset(manifest, stage)
                entry = manifest.stage(stage)
            if stage not in stages:
                continue
            if entry["status"] != "pending" and entry.get("config_hash") != hashes[stage]:
                changed = [
                    k if k.startswith(("model", "constitution")) else f"{stage}.{k}"
                    for k in _changed_keys(entry.get("settings", {}), settings[stage])
                ]
                what = ", ".join(changed[:5]) or "an earlier stage's settings"
                raise UserError(
                    f"stage {stage!r} already ran ({entry['status']}) with different settings "
                    f"({what}); rerun with --force {stage} to redo it and the stages after it"
                )
            if entry["status"] == "done":
                self.events("stage_skipped", f"[{stage}] done already, skipped", stage=stage)
                continue
            self._check_inputs(manifest, stage, stages)
            todo.append(stage)
        return todo

    def _check_inputs(self, manifest: Manifest, stage: str, selected: list[str]) -> None:
        i = STAGES.index(stage)
        if (
            i
            and STAGES[i - 1] not in selected
            and manifest.stage(STAGES[i - 1])["status"] != "done"
        ):
            raise UserError(
                f"stage {stage!r} needs stage {STAGES[i - 1]!r}, which is not done; "
                f"include it in --stages"
            )

    def _reset(self, manifest: Manifest, stage: str) -> None:
        folder = self.dir(stage)
        if folder.exists():
            shutil.rmtree(folder)
        manifest.reset(stage)
        self.events("stage_reset", f"[{stage}] forced: previous outputs removed", stage=stage)

    # running ------------------------------------------------------------------------------------

    def execute(self, stages: list[str] | None = None, force: Iterable[str] = ()) -> Manifest:
        self.run.mkdir(parents=True, exist_ok=True)
        write_text_atomic(self.run / "config.yaml", dump_config(self.cfg))
        manifest = Manifest.load(self.run)
        manifest.data.update(
            versions=versions(), seed=self.cfg.seed, config_hash=config_hash(self.cfg.model_dump())
        )
        manifest.save()
        hashes, settings = stage_hashes(self.cfg), stage_configs(self.cfg)
        for stage in self.plan(manifest, stages or list(STAGES), force):
            manifest.start(stage, hashes[stage])
            manifest.stage(stage)["settings"] = settings[stage]
            self.events("stage_start", f"[{stage}] starting", stage=stage)
            started = time.perf_counter()
            try:
                counts, outputs = getattr(self, f"_{stage}")()
            except BaseException as e:
                message = str(e) if isinstance(e, UserError) else f"{type(e).__name__}: {e}"
                manifest.fail(stage, message.splitlines()[0] if message else type(e).__name__,
                              time.perf_counter() - started)  # fmt: skip
                self.events("stage_failed", f"[{stage}] failed: {message}", stage=stage)
                raise
            seconds = time.perf_counter() - started
            manifest.finish(stage, counts, [str(p.relative_to(self.run)) for p in outputs], seconds)
            self.events(
                "stage_done",
                f"[{stage}] done in {seconds:.0f}s: {summarize(counts)}",
                stage=stage,
                seconds=round(seconds, 2),
                counts=counts,
            )
        self._release()
        return manifest

    def backend(self, model: str | None = None) -> Backend:
        """The generation backend: the base model, or `model` (stage 4: the engraved one)."""
        wanted = model or self.cfg.model.model
        if self._backend is not None and self._backend_model != wanted:
            self._release()
        if self._backend is None:
            self._backend = load_backend(self.cfg.model.model_copy(update={"model": wanted}))
            self._backend_model = wanted
        return self._backend

    def _release(self) -> None:
        """Free the generation model before training (GPU memory is needed for the trainer)."""
        self._backend = None
        gc.collect()
        try:
            import torch

            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        except ImportError:  # pragma: no cover
            pass

    # the four stages: each returns (counts, outputs) --------------------------------------------

    def _instructions(self) -> tuple[dict[str, Any], list[Path]]:
        out, cfg, backend = self.dir("instructions"), self.cfg.instructions, self.backend()
        steps: dict[str, dict[str, Any]] = {}
        for name, step, step_cfg in (
            ("self_instruct", run_self_instruct, cfg.self_instruct),
            ("topics", run_topics, cfg.topics),
            ("questions", run_questions, cfg.questions),
            ("merge", run_merge, cfg.merge),
        ):
            steps[name] = step(step_cfg, backend, out)
            self.events("step_done", f"  {name}: {summarize(steps[name])}", step=name,
                        counts=steps[name])  # fmt: skip
        rejected = read_jsonl(out / "rejected.jsonl")
        counts = {
            "generated": sum(s.get("generated", 0) for s in steps.values()),
            "kept": steps["merge"].get("kept", 0),
            "rejected": len(rejected),
            "rejected_by_reason": _by_reason(rejected),
            "steps": steps,
        }
        names = ("self_instruct", "topics", "tgrt_questions", "instructions", "rejected")
        return counts, [out / f"{n}.jsonl" for n in names]

    def _self_align(self) -> tuple[dict[str, Any], list[Path]]:
        out = self.dir("self_align")
        instructions = self.dir("instructions") / "instructions.jsonl"
        counts = run_self_align(self.cfg.self_align, self.backend(), instructions, out)
        return counts, [out / f"{n}.jsonl" for n in ("aligned", "identity", "sft", "rejected")]

    def _engrave(self) -> tuple[dict[str, Any], list[Path]]:
        self._release()
        train = self.cfg.engrave
        if not train.model:
            train = train.model_copy(update={"model": self.cfg.model.model})
        model_dir = self.dir("engrave") / "model"
        stats = run_engrave(
            train,
            self.dir("self_align") / "sft.jsonl",
            model_dir,
            self.identity,
            constitution=self.cfg.self_align.constitution,
            command=self.command or None,
        )
        return _train_counts(stats), [model_dir]

    def _verbose(self) -> tuple[dict[str, Any], list[Path]]:
        out, engraved = self.dir("verbose"), self.dir("engrave") / "model"
        counts = run_verbose(
            self.cfg.verbose,
            self.backend(str(engraved)),
            self.dir("self_align") / "aligned.jsonl",
            out,
            self.identity,
            exemplar_texts=[t for ex in self.constitution.exemplars for t in ex.texts()],
        )
        self._release()
        stats = run_final_sft(
            self.cfg.verbose,
            out / "verbose.jsonl",
            out / "model",
            self.identity,
            base_model=self.cfg.model.model,
            constitution=self.cfg.self_align.constitution,
        )
        counts["final_model"] = _train_counts(stats)
        outputs = [out / "verbose.jsonl", out / "rejected.jsonl", out / "model"]
        return counts, outputs


def _by_reason(rejected: list[dict[str, Any]]) -> dict[str, int]:
    reasons: dict[str, int] = {}
    for r in rejected:
        reasons[r.get("reason", "unknown")] = reasons.get(r.get("reason", "unknown"), 0) + 1
    return dict(sorted(reasons.items(), key=lambda kv: -kv[1]))


def _train_counts(stats: dict[str, Any]) -> dict[str, Any]:
    keep = ("examples", "truncated", "dropped", "steps", "train_loss", "seconds")
    return {k: stats[k] for k in keep if k in stats}


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
