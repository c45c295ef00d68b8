"""Answers to the Vicuna or MT-bench questions, for reading side by side and for the judge.

Reads the bundled questions (`selfalign.evaluation.data.questions`). Each turn is answered by
`selfalign.chat.run_answer` (the model's chat template, resumable, refuses a rerun with other
prompts or sampling) into its own file beside `out`: `NAME.turn1.jsonl`, `NAME.turn2.jsonl`. An
MT-bench second turn is asked with the model's own first answer in the conversation, so it needs
turn 1 finished first. Then writes `out` (JSONL, atomically): per question `id` ("vicuna-1"),
`question_id`, `category`, `turns` (the user turns) and `answers` (one per turn).
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

from selfalign.chat import run_answer
from selfalign.errors import UserError
from selfalign.evaluation.data import questions
from selfalign.generation import Backend, SamplingParams
from selfalign.jsonl import read_jsonl, write_jsonl_atomic


def turn_path(out: Path, turn: int) -> Path:
    """Where turn `turn` (1, 2, ...) of `out` is answered and resumed."""
    return out.with_suffix(f".turn{turn}.jsonl")


def answer_bench(
    backend: Backend,
    bench: str,
    out: str | Path,
    *,
    limit: int | None = None,
    max_tokens: int = 512,
    temperature: float = 0.0,
    seed: int = 0,
    system: str | None = None,
    template: Any = None,
) -> list[dict[str, Any]]:
    """Answer the first `limit` (all when None) questions of `bench` ("vicuna" or "mt_bench")
    with `backend`, turn by turn; write `out` and return its records (see the module doc).
    `template`: the tokenizer whose chat template writes the prompts (default: the backend's;
    a base model answers through its tuned model's)."""
    if limit is not None and limit < 1:
        raise UserError(f"limit must be at least 1, got {limit}")
    template = template or backend.tokenizer
    if template is None:
        raise UserError(
            "answering needs the model's tokenizer for its chat template; set model.tokenizer"
        )
    items = {f"{bench}-{q['question_id']}": q for q in questions(bench)[:limit]}
    out = Path(out)
    params = SamplingParams(temperature=temperature, max_tokens=max_tokens)
    answers: dict[str, list[str]] = {key: [] for key in items}
    for turn in range(max(len(q["turns"]) for q in items.values())):
        asked = [
            {"id": key, "messages": conversation(q["turns"], answers[key])}
            for key, q in items.items()
            if len(q["turns"]) > turn
        ]
        path = turn_path(out, turn + 1)
        with tempfile.TemporaryDirectory() as tmp:
            # run_answer reads its questions from a file; this one is rebuilt every time
            questions_file = Path(tmp) / "questions.jsonl"
            write_jsonl_atomic(questions_file, asked)
            run_answer(backend, template, questions_file, path, params, seed, system)
        for record in read_jsonl(path):
            answers[record["id"]].append(record["answer"])
    rows = [
        {"id": key, "question_id": q["question_id"], "category": q["category"],
         "turns": list(q["turns"]), "answers": answers[key]}
        for key, q in items.items()
    ]  # fmt: skip
    write_jsonl_atomic(out, rows)
    return rows


def conversation(turns: list[str], answers: list[str]) -> list[dict[str, str]]:
    """The messages that ask turn `len(answers) + 1`: each earlier user turn with the model's
    own answer to it, then the next user turn."""
    messages = []
    for question, answer in zip(turns, answers, strict=False):
        messages += [{"role": "user", "content": question},
                     {"role": "assistant", "content": answer}]  # fmt: skip
    return [*messages, {"role": "user", "content": turns[len(answers)]}]
