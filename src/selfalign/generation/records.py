"""Generate completions for records, appending to a JSONL file with resume: the shell every
stage uses around a backend.

Each input record needs an `id` and a `prompt`; the output record is the input plus
`completion`, `finish_reason`, `prompt_tokens`, `completion_tokens` and two short hashes:
`prompt_sha` (of the exact prompt text) and `settings_sha` (of the sampling settings that change
the text, and of the row's seed). Records whose id is already in the output file are skipped, so
a killed job rerun continues where it stopped. A record there whose hashes differ from the ones
this job would write (another prompt, other settings, or a file written before the hashes
existed) stops the job with one line naming the file, the id and how to start over: completions
are never silently reused for another prompt. Each row's random stream comes from `(seed, id)`,
so the text does not depend on batching or resume.

A stage may pass a `tally` (a generated row -> how many items it yields that pass the stage's
filters, and how many it rejects) so the progress bar shows both as rows arrive.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from selfalign.errors import UserError
from selfalign.generation import Backend, Completion, SamplingParams, row_seed
from selfalign.generation.base import PromptTooLong
from selfalign.jsonl import JsonlAppender, check_unique_ids
from selfalign.progress import progress_bar

# a generated row -> (items that pass the stage's filters, items rejected), for the progress bar
Tally = Callable[[dict[str, Any]], tuple[int, int]]

# the fields of every generated record that say which prompt and settings made it
PROMPT_SHA, SETTINGS_SHA = "prompt_sha", "settings_sha"
# (prompt_sha, settings_sha) a job expects for an id; a settings_sha of None is not compared
Shas = tuple[str, str | None]


def verdicts(reasons: Iterable[str | None]) -> tuple[int, int]:
    """(passed, rejected) from one rejection reason (or None) per item."""
    reasons = list(reasons)
    passed = sum(r is None for r in reasons)
    return passed, len(reasons) - passed


def check_records(
    records: Sequence[dict[str, Any]], source: str, prompt_key: str = "prompt"
) -> None:
    """Every record has a unique id and a string prompt; otherwise a UserError naming it."""
    check_unique_ids(records, source)
    for n, record in enumerate(records, start=1):
        if not isinstance(record.get(prompt_key), str):
            raise UserError(
                f"{source}: record {n} (id {record['id']!r}) has no string '{prompt_key}'"
            )


# ----------------------------------------------------------------------------- resume guard


def prompt_shas(prompts: Iterable[str], prefix: str = "") -> list[str]:
    """The short hash of `prefix + prompt`, for each prompt.

    `prefix` is text every prompt starts with (stage 2's constitution). It is hashed once and
    only each prompt's own text after it: at paper scale (360K prompts behind a 2K-token
    constitution) hashing whole prompts would read some 3 GB on every resume.
    """
    base = hashlib.sha256(prefix.encode())
    out = []
    for prompt in prompts:
        h = base.copy()
        h.update(prompt.encode())
        out.append(h.hexdigest()[:16])
    return out


def settings_shas(params: SamplingParams, seed: int, ids: Iterable[Any]) -> list[str]:
    """The short hash of the sampling settings and each record's own seed (`row_seed(seed, id)`).

    `params.seed` is left out: with per-record seeds the backend never uses it. Every other field
    is in, so a setting added to SamplingParams later is guarded without anyone remembering to.
    """
    settings = params.model_dump(mode="json", exclude={"seed"})
    base = hashlib.sha256(json.dumps(settings, sort_keys=True).encode())
    out = []
    for key in ids:
        h = base.copy()
        h.update(f"\nseed={row_seed(seed, key)}".encode())
        out.append(h.hexdigest()[:16])
    return out


def expected_shas(
    records: Sequence[dict[str, Any]],
    params: SamplingParams,
    seed: int = 0,
    prompt_key: str = "prompt",
    prefix: str = "",
) -> dict[Any, Shas]:
    """id -> (prompt_sha, settings_sha) that `generate_records` writes for each record."""
    ids = [r["id"] for r in records]
    prompts = prompt_shas((r[prompt_key] for r in records), prefix)
    settings = settings_shas(params, seed, ids)
    return dict(zip(ids, zip(prompts, settings, strict=True), strict=True))


class ResumeMismatch(UserError):
    """A record already in an output file was made by another job: from another prompt, with
    other settings, or before records carried hashes. A caller that knows the way out better
    than "delete the file" (the pipeline: `--force STAGE`) may set `restart_hint`."""

    WHAT = {
        "prompt": "was generated from a different prompt",
        "settings": "was generated with different sampling settings (temperature, top_p, "
        "max_tokens, stop, logit_bias, ngram_penalties, truncate_prompt or seed)",
        "unhashed": f"has no {PROMPT_SHA}/{SETTINGS_SHA}: the file was written before "
        "completions recorded their prompt, so they cannot be matched to this job's prompts",
    }

    def __init__(self, path: str | Path, key: Any, what: str, restart_hint: str | None = None):
        super().__init__(path, key, what)
        self.path, self.key, self.what = Path(path), key, what
        self.restart_hint = restart_hint or f"delete {path} or use another output directory"

    def __str__(self) -> str:
        return f"{self.path}: record {self.key!r} {self.WHAT[self.what]}; {self.restart_hint}"


def check_resume(
    done: Iterable[dict[str, Any]],
    expected: Mapping[Any, Shas],
    path: str | Path,
    restart_hint: str | None = None,
) -> None:
    """Raise `ResumeMismatch` at the first record of `done` (read from `path`) whose hashes
    differ from `expected` (see `expected_shas`); records of other ids are left alone."""
    for record in done:
        want = expected.get(record.get("id"))
        if want is None:
            continue
        prompt, settings = want
        if PROMPT_SHA not in record or (settings is not None and SETTINGS_SHA not in record):
            what = "unhashed"
        elif record[PROMPT_SHA] != prompt:
            what = "prompt"
        elif settings is not None and record[SETTINGS_SHA] != settings:
            what = "settings"
        else:
            continue
        raise ResumeMismatch(path, record["id"], what, restart_hint)


# ----------------------------------------------------------------------------- generation


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
    *,
    prefix: str = "",
    chunk_size: int | None = None,
    restart_hint: str | None = None,
) -> list[dict[str, Any]]:
    """Complete every record not yet in `output`; return all output records in input order.

    First every record already in `output` is checked against the hashes this job would write
    for its id (`check_resume`); a mismatch is one line ending with `restart_hint` (default:
    delete the file or use another output directory). Only a torn last line may have been cut
    from `output` by then, as on every resume.

    `prefix`: text every prompt starts with, left out of the records' prompts (which hold only
    what follows it): the backend gets `prefix + prompt`, the hash reads the prefix once.
    `store_prompt=False` leaves the prompt out of the output records (a long shared prompt
    would otherwise be written once per row). `chunk_size`: prompts handed to the backend at a
    time (it tokenizes its whole job at once; long prompts make that large).
    """
    job = _Job(backend, params, seed, prompt_key, prefix, store_prompt)
    expected = expected_shas(records, params, seed, prompt_key, prefix)
    with JsonlAppender(output) as out:
        check_resume(out.records, expected, output, restart_hint)
        todo = [r for r in records if r["id"] not in out.ids]
        if todo:
            step = chunk_size or len(todo)
            with progress_bar(label, total=len(todo)) as bar:
                meter = _Meter(bar, tally)
                for start in range(0, len(todo), step):
                    job.run(todo[start : start + step], expected, out, meter)
        by_id = {r["id"]: r for r in out.records}
    return [by_id[r["id"]] for r in records if r["id"] in by_id]


@dataclass(frozen=True)
class _Job:
    backend: Backend
    params: SamplingParams
    seed: int
    prompt_key: str
    prefix: str
    store_prompt: bool

    def run(self, chunk, expected: Mapping[Any, Shas], out: JsonlAppender, meter: _Meter) -> None:
        """Generate `chunk`, appending each finished batch to `out`."""
        prompts = [self.prefix + r[self.prompt_key] for r in chunk]
        seeds = [row_seed(self.seed, r["id"]) for r in chunk]
        try:
            for batch in self.backend.iter_batches(prompts, self.params, seeds):
                rows = [self.row(chunk[i], c, expected[chunk[i]["id"]]) for i, c in batch]
                out.write_batch(rows)
                meter.advance(rows)
        except PromptTooLong as e:
            raise UserError(f"record {chunk[e.index]['id']!r}: {e}") from None

    def row(self, record: dict[str, Any], c: Completion, shas: Shas) -> dict[str, Any]:
        if not self.store_prompt:
            record = {k: v for k, v in record.items() if k != self.prompt_key}
        return {
            **record,
            PROMPT_SHA: shas[0],
            SETTINGS_SHA: shas[1],
            "completion": c.text,
            "finish_reason": c.finish_reason,
            "prompt_tokens": c.prompt_tokens,
            "completion_tokens": c.completion_tokens,
        }


class _Meter:
    """The progress bar's status: tokens per second and, with a tally, items kept/rejected."""

    def __init__(self, bar, tally: Tally | None):
        self.bar, self.tally = bar, tally
        self.started, self.tokens, self.passed, self.rejected = time.perf_counter(), 0, 0, 0

    def advance(self, rows: list[dict[str, Any]]) -> None:
        self.tokens += sum(r["completion_tokens"] for r in rows)
        rate = self.tokens / max(time.perf_counter() - self.started, 1e-9)
        status = f"{rate:.0f} tok/s"
        if self.tally is not None and self.bar.active:
            for row in rows:
                p, r = self.tally(row)
                self.passed, self.rejected = self.passed + p, self.rejected + r
            status = f"{self.passed} ok, {self.rejected} rejected, {status}"
        self.bar.advance(len(rows), status)
