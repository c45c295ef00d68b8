"""The stage registry: the one table of the pipeline's stages, in order.

Everything that walks the run directory reads this table: `selfalign run` (what to run, in which
folder, with which config section, what each stage needs), the manifest, `--stages`/`--force`,
`selfalign status`, the report (funnels and samples), `selfalign export` (datasets) and the
samples printed after a run. Adding a stage means adding a module under `selfalign.stages` and one
`Stage(...)` row here.

Each `run` function takes the `Pipeline` (config, run directory, backend, events) and returns
`(counts, outputs)`: the counts go into the manifest, the outputs are paths inside the run.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel

from selfalign.errors import UserError
from selfalign.stages.stage1_instructions import Stage1Config
from selfalign.stages.stage2_self_align import SelfAlignConfig
from selfalign.stages.stage3_engrave import TrainConfig
from selfalign.stages.stage4_verbose import VerboseConfig
from selfalign.stages.stage5_evaluate import EvaluateConfig

if TYPE_CHECKING:
    from selfalign.run.pipeline import Pipeline

Outputs = tuple[dict[str, Any], list[Path]]


@dataclass(frozen=True)
class Stage:
    """One stage of the pipeline and the files it reads and writes (paths inside the run)."""

    name: str
    folder: str
    config: type[BaseModel]
    description: str
    run: Callable[[Pipeline], Outputs]
    inputs: tuple[str, ...] = ()
    outputs: tuple[str, ...] = ()
    kept: str | None = (
        None  # the stage's accepted records (funnels, samples), beside rejected.jsonl
    )
    dataset: str | None = None  # what `selfalign export` publishes
    sample_fields: tuple[str, ...] = ()  # shown after a run
    seeded: tuple[tuple[str, ...], ...] = field(default=((),))  # sections taking the top-level seed

    @property
    def number(self) -> int:
        return names().index(self.name) + 1

    def path(self, run: Path, name: str = "") -> Path:
        return run / self.folder / name if name else run / self.folder


# -- the stages' glue: config section + run directory -> the stage module's run_* functions ------


def _instructions(p: Pipeline) -> Outputs:
    from selfalign.stages.stage1_instructions import (
        run_merge,
        run_questions,
        run_self_instruct,
        run_topics,
    )

    out, cfg, backend = p.dir("instructions"), p.cfg.instructions, p.backend()
    steps: dict[str, dict[str, Any]] = {}
    for name, step, step_cfg in (
        ("self_instruct", run_self_instruct, cfg.self_instruct),
        ("topics", run_topics, cfg.topics),
        ("questions", run_questions, cfg.questions),
    ):
        steps[name] = step(step_cfg, backend, out)
        p.step_done(name, steps[name])
    steps["merge"] = run_merge(cfg.merge, out)
    p.step_done("merge", steps["merge"])
    counts = {
        "generated": sum(s.get("generated", 0) for s in steps.values()),
        "kept": steps["merge"].get("kept", 0),
        **p.rejections(out / "rejected.jsonl"),
        "steps": steps,
    }
    return counts, [p.run / path for path in STAGE["instructions"].outputs]


def _self_align(p: Pipeline) -> Outputs:
    from selfalign.stages.stage2_self_align import run_self_align

    out = p.dir("self_align")
    counts = run_self_align(
        p.cfg.self_align, p.backend(), p.run / STAGE["self_align"].inputs[0], out
    )
    return counts, [p.run / path for path in STAGE["self_align"].outputs]


def _engrave(p: Pipeline) -> Outputs:
    from selfalign.stages.stage3_engrave import run_engrave

    p.release()  # the trainer needs the memory the generation model holds
    train = p.cfg.engrave
    if not train.model:
        train = train.model_copy(update={"model": p.cfg.model.model})
    model_dir = p.dir("engrave") / "model"
    stats = run_engrave(
        train,
        p.run / STAGE["engrave"].inputs[0],
        model_dir,
        p.constitution.identity,
        constitution=p.cfg.self_align.constitution,
        command=p.command or None,
    )
    return train_counts(stats), [model_dir]


def _verbose(p: Pipeline) -> Outputs:
    from selfalign.stages.stage4_verbose import run_final_sft, run_verbose

    out, engraved = p.dir("verbose"), p.dir("engrave") / "model"
    backend = p.backend(str(engraved))
    counts = run_verbose(
        p.cfg.verbose,
        backend,
        p.run / STAGE["verbose"].inputs[0],
        out,
        p.constitution,
        engraved=engraved,  # its chat template writes the prompts, whatever serves the model
    )
    p.release()
    stats = run_final_sft(
        p.cfg.verbose,
        out / "verbose.jsonl",
        out / "model",
        p.constitution.identity,
        base_model=p.cfg.model.model,
        constitution=p.cfg.self_align.constitution,
    )
    counts["final_model"] = train_counts(stats)
    return counts, [p.run / path for path in STAGE["verbose"].outputs]


def _evaluate(p: Pipeline) -> Outputs:
    from selfalign.stages.stage5_evaluate import run_evaluate

    p.release()  # scoring loads each model in turn
    paths = {
        "base": Path(p.cfg.model.model),
        "engraved": p.dir("engrave") / "model",
        "final": p.dir("verbose") / "model",
    }
    out = p.dir("evaluate")
    counts = run_evaluate(
        p.cfg.evaluate,
        paths,
        out,
        lambda label: p.backend(str(paths[label]) if label != "base" else None),
        device=p.cfg.model.device,
        dtype=p.cfg.model.dtype,
    )
    p.release()
    return counts, [out / "results.json"]


def train_counts(stats: dict[str, Any]) -> dict[str, Any]:
    keep = ("examples", "truncated", "dropped", "steps", "train_loss", "seconds")
    return {k: stats[k] for k in keep if k in stats}


# -- the table ------------------------------------------------------------------------------------

STAGES: tuple[Stage, ...] = (
    Stage(
        name="instructions",
        folder="1_instructions",
        config=Stage1Config,
        description="Stage 1: topic-guided red-teaming self-instruct (instructions to answer).",
        run=_instructions,
        outputs=tuple(
            f"1_instructions/{n}.jsonl"
            for n in ("self_instruct", "topics", "tgrt_questions", "instructions", "rejected")
        ),
        kept="instructions.jsonl",
        sample_fields=("source", "instruction"),
        seeded=(("self_instruct",), ("topics",), ("questions",), ("merge",)),
    ),
    Stage(
        name="self_align",
        folder="2_self_align",
        config=SelfAlignConfig,
        description="Stage 2: principle-driven self-alignment (answers under the constitution).",
        run=_self_align,
        inputs=("1_instructions/instructions.jsonl",),
        outputs=tuple(
            f"2_self_align/{n}.jsonl" for n in ("aligned", "identity", "sft", "rejected")
        ),
        kept="aligned.jsonl",
        dataset="sft.jsonl",
        sample_fields=("instruction", "output"),
    ),
    Stage(
        name="engrave",
        folder="3_engrave",
        config=TrainConfig,
        description="Stage 3: principle engraving (fine-tune the base model without the principles).",
        run=_engrave,
        inputs=("2_self_align/sft.jsonl",),
        outputs=("3_engrave/model",),
    ),
    Stage(
        name="verbose",
        folder="4_verbose",
        config=VerboseConfig,
        description="Stage 4: verbose cloning (long answers from the engraved model; final SFT).",
        run=_verbose,
        inputs=("2_self_align/aligned.jsonl", "3_engrave/model"),
        outputs=("4_verbose/verbose.jsonl", "4_verbose/rejected.jsonl", "4_verbose/model"),
        kept="verbose.jsonl",
        dataset="verbose.jsonl",
        sample_fields=("instruction", "output"),
        seeded=((), ("train",)),
    ),
    Stage(
        name="evaluate",
        folder="5_evaluate",
        config=EvaluateConfig,
        description="Stage 5: evaluation (TruthfulQA, HHH and answers: base vs engraved vs final).",
        run=_evaluate,
        inputs=("3_engrave/model", "4_verbose/model"),
        outputs=("5_evaluate/results.json",),
        seeded=((),),
    ),
)
STAGE: dict[str, Stage] = {s.name: s for s in STAGES}


def names() -> list[str]:
    return [s.name for s in STAGES]


def producers(stage: Stage) -> list[Stage]:
    """The earlier stages whose outputs `stage` reads."""
    return [s for s in STAGES if any(i in s.outputs for i in stage.inputs)]


def check_run_dir(run: Path) -> None:
    """Refuse, in one line, a directory that is not a run: no manifest and no stage folder."""
    if not run.is_dir():
        raise UserError(f"{run}: no such run directory")
    if not (run / "manifest.json").exists() and not any(s.path(run).is_dir() for s in STAGES):
        folders = ", ".join(s.folder for s in STAGES)
        raise UserError(
            f"{run}: not a selfalign run directory (no manifest.json, none of {folders}); "
            "give the run_dir of a `selfalign run`"
        )
