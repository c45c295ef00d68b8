"""Stage 5: did the alignment work? The base, engraved and final models side by side.

    RUN/5_evaluate/mc/<model>.<raw|chat>.json   multiple-choice scores per model and prompt mode
                                                (TruthfulQA MC1/MC2, HHH; lm-evaluation-harness)
    RUN/5_evaluate/answers/<model>.jsonl        answers to the first `answers` Vicuna questions
    RUN/5_evaluate/judge/<a>-vs-<b>.jsonl       pairwise verdicts (only with `evaluate.judge`)
    RUN/5_evaluate/results.json                 all of it summarised; the report opens with it

Every part resumes: scores are written per model and mode, answers and verdicts per record. The
base model is scored on raw prompts only (it has no chat template); the tuned models raw, and with
their chat template too when `chat_template` is on. The report's table shows raw prompts, the one
mode all three models share; the chat-template scores are listed under it.

The base model answers through the final model's chat template (the same tokenizer with the
template engraving installed), so all answers are read in the same format: the base model is the
"before" picture, prompted exactly as the tuned models are.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from selfalign.errors import UserError
from selfalign.jsonl import write_text_atomic

MODELS = ("base", "engraved", "final")
Which = Literal["base", "engraved", "final"]


class JudgeSettings(BaseModel):
    """An OpenAI-compatible chat model that compares two models' answers (off unless set)."""

    model_config = ConfigDict(extra="forbid")

    url: str = Field(..., description="Base URL of the judge's API, e.g. http://host:8000/v1.")
    model: str = Field(..., description="The judge's model name at that server.")
    api_key_env: str | None = Field(
        "OPENAI_API_KEY", description="Environment variable holding the judge's API key."
    )
    pairs: list[tuple[Which, Which]] = Field(
        [("final", "base"), ("final", "engraved")],
        description="Which answers are compared, [first, second] each.",
    )


class EvaluateConfig(BaseModel):
    """Stage 5: multiple-choice benchmarks and answers for the base, engraved and final models."""

    model_config = ConfigDict(extra="forbid")

    models: list[Which] = Field(list(MODELS), description="Which models are evaluated.")
    tasks: list[str] = Field(
        ["truthfulqa_mc1", "truthfulqa_mc2", "hhh"],
        description="Multiple-choice tasks (`selfalign eval --list-tasks` lists them); [] = no "
        "scores (answers and judge only; lm-evaluation-harness not needed).",
    )
    limit: int | None = Field(None, ge=1, description="Items per task at most; None = all.")
    batch_size: int = Field(8, ge=1, description="Scoring batch size.")
    chat_template: bool = Field(
        True, description="Also score the tuned models with their chat template."
    )
    engine: Literal["selfalign", "hf"] = Field(
        "selfalign",
        description="Scorer: selfalign (lm-eval's hf model, each shared context computed once) "
        "or hf (lm-eval's hf model as is).",
    )
    answers: int = Field(
        5, ge=0, description="Questions each model answers for side-by-side reading (0 = none)."
    )
    questions: Literal["vicuna", "mt_bench"] = Field(
        "vicuna", description="Question set answered (and judged)."
    )
    max_tokens: int = Field(256, ge=1, description="Tokens per answer at most.")
    judge: JudgeSettings | None = Field(None, description="Pairwise judge of the answers.")
    seed: int = Field(0, description="Seed of the answers' sampling (greedy) and the scorer.")

    @field_validator("tasks")
    @classmethod
    def _known(cls, tasks: list[str]) -> list[str]:
        from selfalign.evaluation.harness import resolve_tasks

        try:
            return resolve_tasks(tasks) if tasks else []
        except UserError as e:
            raise ValueError(str(e)) from None


def score_modes(label: str, chat_template: bool) -> list[str]:
    """The prompt modes a model is scored in: the base model has no chat template."""
    return ["raw", "chat"] if chat_template and label != "base" else ["raw"]


def run_evaluate(
    cfg: EvaluateConfig,
    paths: dict[str, Path],
    out: Path,
    answer_backend: Callable[[str], Any],
    *,
    device: str = "auto",
    dtype: str = "auto",
) -> dict[str, Any]:
    """Score, answer and (optionally) judge the models of `paths` ({"base": dir, ...}) into
    `out`; `answer_backend(label)` opens a generation backend for a model (closed by the caller).
    Returns the counts for the manifest; `out/results.json` holds the summary."""
    from selfalign.evaluation.harness import EvalModel, require_lm_eval, run_mc

    if cfg.tasks:
        require_lm_eval()
    for label, path in paths.items():
        if not Path(path).exists():
            raise UserError(f"evaluate: the {label} model {path} does not exist; rerun its stage")
    mc: dict[str, dict[str, Any]] = {}
    for label in cfg.models if cfg.tasks else ():
        model = EvalModel(path=str(paths[label]), device=device, dtype=dtype,
                          batch_size=cfg.batch_size, engine=cfg.engine)  # fmt: skip
        modes = score_modes(label, cfg.chat_template)
        chat: bool | str = "both" if modes == ["raw", "chat"] else False
        mc.update(run_mc({label: model}, cfg.tasks, out / "mc", limit=cfg.limit,
                         chat_template=chat, seed=cfg.seed))  # fmt: skip
    answers = _answers(cfg, paths, out / "answers", answer_backend)
    verdicts = _judge(cfg, out / "judge", answers)
    results = {
        "tasks": cfg.tasks,
        "limit": cfg.limit,
        "shown": "raw",
        "models": {label: str(paths[label]) for label in cfg.models},
        "mc": mc,
        "answers": {"questions": cfg.questions, "files": {k: str(v) for k, v in answers.items()}},
        "judge": verdicts,
    }
    import json

    write_text_atomic(out / "results.json", json.dumps(results, indent=2, ensure_ascii=False))
    return summary_counts(results)


def _answers(
    cfg: EvaluateConfig, paths: dict[str, Path], out: Path, open_backend
) -> dict[str, Path]:
    """Each model's answers to the first `cfg.answers` questions (resumable files)."""
    from selfalign.evaluation.answers import answer_bench
    from selfalign.modeling import load_tokenizer

    files: dict[str, Path] = {}
    if not cfg.answers:
        return files
    tuned = paths["final"] if paths["final"].exists() else paths["engraved"]
    for label in cfg.models:
        path = out / f"{label}.jsonl"
        backend = open_backend(label)
        # the prompts are written by the model directory's chat template, whatever serves the
        # model; the base model is asked through the tuned model's (same vocabulary), exactly
        # as the tuned models are
        template = load_tokenizer(str(tuned if label == "base" else paths[label]))
        answer_bench(backend, cfg.questions, path, limit=cfg.answers, max_tokens=cfg.max_tokens,
                     seed=cfg.seed, template=template)  # fmt: skip
        files[label] = path
    return files


def _judge(cfg: EvaluateConfig, out: Path, answers: dict[str, Path]) -> dict[str, Any]:
    """Pairwise verdicts for each configured pair whose two models answered."""
    if cfg.judge is None or not answers:
        return {}
    from selfalign.evaluation.judge import Judge, judge_pairs

    judge = Judge(url=cfg.judge.url, model=cfg.judge.model, api_key_env=cfg.judge.api_key_env)
    return judge_pairs(judge, answers, cfg.judge.pairs, out)


def summary_counts(results: dict[str, Any]) -> dict[str, Any]:
    """The manifest's counts: each model's raw-prompt accuracy per task asked for (a group's
    subsets are in results.json)."""
    counts: dict[str, Any] = {}
    for label, modes in results["mc"].items():
        rows = modes.get("raw", {}).get("tasks", {})
        for task in results["tasks"]:
            if task in rows:
                counts[f"{label} {task}"] = round(rows[task]["acc"], 4)
    return counts
