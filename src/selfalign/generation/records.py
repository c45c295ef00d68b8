"""Generate completions for records, appending to a JSONL file with resume: the shell every
stage uses around a backend.

Each input record needs an `id` and a `prompt`; the output record is the input plus
`completion`, `finish_reason`, `prompt_tokens` and `completion_tokens`. Records whose id is
already in the output file are skipped, so a killed job rerun continues where it stopped. Each
row's random stream comes from `(seed, id)`, so the text does not depend on batching or resume.
A stage may pass a `tally` (a generated row -> how many items it yields that pass the stage's
filters, and how many it rejects) so the progress bar shows both as rows arrive.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

from selfalign.errors import UserError
from selfalign.generation import Backend, SamplingParams, row_seed
from selfalign.generation.base import PromptTooLong
from selfalign.jsonl import JsonlAppender
from selfalign.progress import progress_bar

# a generated row -> (items that pass the stage's filters, items rejected), for the progress bar
Tally = Callable[[dict[str, Any]], tuple[int, int]]


def verdicts(reasons: Iterable[str | None]) -> tuple[int, int]:
    """(passed, rejected) from one rejection reason (or None) per item."""
    reasons = list(reasons)
    passed = sum(r is None for r in reasons)
    return passed, len(reasons) - passed


def check_records(
    records: Sequence[dict[str, Any]], source: str, prompt_key: str = "prompt"
) -> None:
    """Every record has a unique id and a string prompt; otherwise a UserError naming it."""
    seen: set[Any] = set()
    for n, record in enumerate(records, start=1):
        key = record.get("id")
        if key is None:
            raise UserError(f"{source}: record {n} has no 'id'")
        if key in seen:
            raise UserError(f"{source}: record {n}: duplicate id {key!r}")
        seen.add(key)
        if not isinstance(record.get(prompt_key), str):
            raise UserError(f"{source}: record {n} (id {key!r}) has no string '{prompt_key}'")


def generate_records(
    backend: Backend,
    records: Sequence[dict[str, Any]],
    params: SamplingParams,
    output: str | Path,
    seed: int = 0,
    prompt_key: str = "prompt",
    label: str = "generating",
    store_prompt: bool = True,
    tally: Tally | None = None,
) -> list[dict[str, Any]]:
    """Complete every record not yet in `output`; return all output records in input order.

    `store_prompt=False` leaves the prompt out of the output records (a long shared prompt, e.g.
    a constitution, would otherwise be written once per row).
    """
    with JsonlAppender(output) as out:
        todo = [r for r in records if r["id"] not in out.ids]
        if todo:
            _run(backend, todo, params, out, seed, prompt_key, label, store_prompt, tally)
        by_id = {r["id"]: r for r in out.records}
    return [by_id[r["id"]] for r in records if r["id"] in by_id]


def _run(
    backend, todo, params, out: JsonlAppender, seed, prompt_key, label, store_prompt, tally
) -> None:
    prompts = [r[prompt_key] for r in todo]
    seeds = [row_seed(seed, r["id"]) for r in todo]
    started, tokens, passed, rejected = time.perf_counter(), 0, 0, 0
    with progress_bar(label, total=len(todo)) as bar:
        try:
            for batch in backend.iter_batches(prompts, params, seeds):
                rows = []
                for index, c in batch:
                    kept = todo[index]
                    if not store_prompt:
                        kept = {k: v for k, v in kept.items() if k != prompt_key}
                    rows.append(
                        {
                            **kept,
                            "completion": c.text,
                            "finish_reason": c.finish_reason,
                            "prompt_tokens": c.prompt_tokens,
                            "completion_tokens": c.completion_tokens,
                        }
                    )
                    tokens += c.completion_tokens
                out.write_batch(rows)
                rate = tokens / max(time.perf_counter() - started, 1e-9)
                status = f"{rate:.0f} tok/s"
                if tally is not None and bar.active:
                    for row in rows:
                        p, r = tally(row)
                        passed, rejected = passed + p, rejected + r
                    status = f"{passed} ok, {rejected} rejected, {status}"
                bar.advance(len(rows), status)
        except PromptTooLong as e:
            raise UserError(f"record {todo[e.index]['id']!r}: {e}") from None
