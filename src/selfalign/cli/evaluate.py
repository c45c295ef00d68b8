"""`selfalign eval`: score models on the bundled benchmarks, answer questions, judge pairs.

    OUT/mc/<model>.<raw|chat>.json   multiple-choice scores per model and prompt mode
    OUT/answers/<model>.<set>.jsonl  answers to the Vicuna or MT-bench questions (--answers)
    OUT/judge/<a>-vs-<b>.jsonl       pairwise verdicts (--judge-url)
    OUT/results.json                 all of it

Every file resumes: rerun the same command after a crash or Ctrl-C.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Literal

import typer

from selfalign.cli.options import Command
from selfalign.errors import UserError


def _labels(models: list[str]) -> list[str]:
    """Short unique names: the last path part, or as many parts as make them differ."""
    parts = [Path(m).parts or (m,) for m in models]
    for depth in range(1, max(len(p) for p in parts) + 1):
        labels = ["_".join(p[-depth:]).replace("/", "_") for p in parts]
        if len(set(labels)) == len(labels):
            return labels
    return [f"{n}_{label}" for n, label in enumerate(labels, start=1)]


def _opt(kind, help: str, *names: str, **kw):
    return Annotated[kind, typer.Option(*names, help=help, **kw)]


Models = Annotated[
    list[str] | None,
    typer.Argument(help="Model directories (merged or adapter); with --base-url, served names."),
]
Tasks = _opt(str | None, "Comma-separated tasks (see --list-tasks); 'none' skips scoring. "
             "Default: truthfulqa_mc1,truthfulqa_mc2,hhh, or none with --answers.")  # fmt: skip
Count = _opt(int | None, "Items per task at most.", min=1)
ChatTemplate = _opt(bool, "Score with the chat template too (chat models).", "--chat-template")
Engine = _opt(str, "selfalign (shared contexts computed once) or hf (lm-eval as is).")
BaseUrl = _opt(str | None, "OpenAI-compatible server (e.g. vLLM) serving MODELS: score through it.")
Tokenizer = _opt(str | None, "With --base-url: the served model's tokenizer directory.")
Answers = _opt(Literal["vicuna", "mt_bench"] | None, "Answer this question set with every model.")
AnswersLimit = _opt(int | None, "Questions answered at most (default: all 80).", min=1)
JudgeUrl = _opt(str | None, "OpenAI-compatible judge comparing the first model's answers with "
                "each other model's (needs --answers).")  # fmt: skip


def evaluate(
    models: Models = None,
    tasks: Tasks = None,
    limit: Count = None,
    batch_size: _opt(int, "Scoring batch size.", min=1) = 8,
    device: _opt(str, "auto, cpu, cuda or cuda:N.") = "auto",
    dtype: _opt(str, "auto, float32, bfloat16 or float16.") = "auto",
    chat_template: ChatTemplate = False,
    engine: Engine = "selfalign",
    base_url: BaseUrl = None,
    tokenizer: Tokenizer = None,
    answers: Answers = None,
    answers_limit: AnswersLimit = None,
    max_tokens: _opt(int, "Tokens per answer at most.", min=1) = 512,
    judge_url: JudgeUrl = None,
    judge_model: _opt(str | None, "The judge's model name.") = None,
    judge_key_env: _opt(
        str, "Environment variable holding the judge's API key."
    ) = "OPENAI_API_KEY",
    output: _opt(Path, "Folder for the results (resumes).") = Path("runs/eval"),
    list_tasks: _opt(bool, "List the tasks and exit.", "--list-tasks") = False,
) -> None:
    """Did it work? Score models on TruthfulQA MC1/MC2 and HHH (lm-evaluation-harness, bundled
    data, offline), answer the Vicuna / MT-bench questions, and judge two models' answers."""
    from selfalign.evaluation import harness

    if list_tasks:
        for name, description in harness.TASKS.items():
            typer.echo(f"{name:16} {description}")
        return
    if not models:
        raise UserError("no model given: selfalign eval MODEL [MODEL ...] (--help for options)")
    if judge_url and not (answers and judge_model and len(models) >= 2):
        raise UserError("--judge-url needs --answers, --judge-model and at least two models")
    wanted = tasks or ("none" if answers else ",".join(harness.DEFAULT_TASKS))
    chosen = [] if wanted == "none" else harness.resolve_tasks(wanted)
    specs = _eval_models(models, base_url, tokenizer, device, dtype, batch_size, engine)
    results: dict = {
        "tasks": chosen,
        "limit": limit,
        "models": dict(zip(specs, models, strict=True)),
    }
    if chosen:
        mode = "both" if chat_template else False
        results["mc"] = harness.run_mc(
            specs, chosen, output / "mc", limit=limit, chat_template=mode
        )
        typer.echo(harness.format_table({k: v["raw"] for k, v in results["mc"].items()}))
        if chat_template:
            typer.echo("with the chat template:")
            typer.echo(harness.format_table({k: v["chat"] for k, v in results["mc"].items()}))
    if answers:
        results["answers"] = _answer_all(specs, answers, answers_limit, max_tokens, output)
    if judge_url:
        results["judge"] = _judge_all(results["answers"], judge_url, judge_model, judge_key_env,
                                      output)  # fmt: skip
    path = output / "results.json"
    from selfalign.jsonl import write_text_atomic

    write_text_atomic(path, json.dumps(results, indent=2, ensure_ascii=False))
    typer.echo(f"{path}", err=True)


def _eval_models(models, base_url, tokenizer, device, dtype, batch_size, engine) -> dict:
    from selfalign.evaluation.harness import EvalModel

    if engine not in ("selfalign", "hf"):
        raise UserError(f"--engine {engine!r}: choose selfalign or hf")
    specs = {}
    for label, model in zip(_labels(models), models, strict=True):
        if base_url:
            specs[label] = EvalModel(base_url=base_url, served_name=model,
                                     tokenizer=tokenizer or model, batch_size=batch_size)  # fmt: skip
        else:
            if not Path(model).exists():
                raise UserError(f"{model}: no such model directory")
            specs[label] = EvalModel(path=model, device=device, dtype=dtype,
                                     batch_size=batch_size, engine=engine)  # fmt: skip
    return specs


def _answer_all(specs: dict, bench: str, limit, max_tokens: int, output: Path) -> dict[str, str]:
    """Each model answers the questions in turn (loaded, answering, closed)."""
    from selfalign.evaluation.answers import answer_bench
    from selfalign.generation import BackendConfig, load_backend

    files = {}
    for label, spec in specs.items():
        if spec.base_url:
            where = BackendConfig(backend="openai", model=spec.served_name, base_url=spec.base_url,
                                  tokenizer=spec.tokenizer)  # fmt: skip
        else:
            where = BackendConfig(model=spec.path, device=spec.device, dtype=spec.dtype,
                                  batch_size=spec.batch_size)  # fmt: skip
        path = output / "answers" / f"{label}.{bench}.jsonl"
        backend = load_backend(where)
        try:
            answer_bench(backend, bench, path, limit=limit, max_tokens=max_tokens)
        finally:
            backend.close()
        files[label] = str(path)
        typer.echo(f"{path}: answers of {label}", err=True)
    return files


def _judge_all(files: dict[str, str], url: str, model: str, key_env: str, output: Path) -> dict:
    """The first model against each of the others."""
    from selfalign.evaluation.judge import Judge, format_judge_table, judge_pairs

    judge = Judge(url=url, model=model, api_key_env=key_env or None)
    first, *others = files
    summaries = judge_pairs(judge, files, [(first, o) for o in others], output / "judge")
    for summary, other in zip(summaries.values(), others, strict=True):
        typer.echo(format_judge_table(summary, (first, other)))
    return summaries


def register(app) -> None:
    app.command("eval", cls=Command)(evaluate)
