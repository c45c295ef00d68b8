"""Pairwise judging: which of two models answered the Vicuna / MT-bench questions better, as any
OpenAI-compatible chat model sees it (the paper's Vicuna comparison, Sec. 5).

Reads two lists of answer records (`answer_bench`'s, matched by `id`). Asks the judge
(`POST {url}/chat/completions`, temperature 0) about every question twice: once with a's answer
shown as "Assistant 1", once with b's, so a judge that favours a position cancels out.
Writes `out` (JSONL), one verdict per question and order: `id` ("vicuna-1:ab"), `question`,
`category`, `order` ("ab": a shown first; "ba": b first), `verdict` ("1", "2", "tie" or
"invalid"), `reply` (the judge's whole text), `judge` (its model name) and `prompt_sha` (of the
request: answers, prompt, judge model). Each verdict is appended and flushed as it arrives; at
the end the file is rewritten in question order (atomically).

Verdicts are parsed strictly (`parse_verdict`): the reply's last non-empty line must be
`Verdict: [[1]]`, `Verdict: [[2]]` or `Verdict: [[tie]]`, and that marker the only `[[` in the
reply. Anything else is "invalid": counted, its reply kept, never guessed.
Per question: both orders prefer a -> a win; both prefer b -> a loss; a tie or a split -> a tie;
either order invalid -> invalid. Win rate = (wins + ties / 2) / (questions with a valid outcome).

Resume: a rerun asks only the verdicts not yet in `out`. Invalid verdicts are final too (at
temperature 0 the judge would likely say the same again): delete their lines to ask again. A
verdict in `out` made from other answers, prompt or judge model is refused, never mixed in.
A judge that is down (after the retries of `selfalign.generation.http`) or does not answer like
a chat-completions server stops the job with one line naming its URL; verdicts so far are kept.
The API key (from the environment variable `api_key_env`) is never written or shown.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import threading
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from selfalign.errors import UserError
from selfalign.generation.http import Client
from selfalign.jsonl import JsonlAppender, check_unique_ids, write_jsonl_atomic
from selfalign.progress import progress_bar

MAX_TOKENS = 512  # room for a short reason and the verdict line
ORDERS = ("ab", "ba")
OUTCOMES = ("win", "tie", "loss", "invalid")

SYSTEM = """\
You compare the responses of two AI assistants to the same user and decide which one serves \
the user better. Weigh first whether a response is correct and honest, then whether it does \
what the user asked, then whether it avoids harm, and only then how clear and complete it is. \
A response is not better for being longer. The order in which the two are shown tells you \
nothing about their quality, and the numbers 1 and 2 are only labels.

Explain your comparison in a few sentences. Then end with a line that is exactly one of
Verdict: [[1]]
Verdict: [[2]]
Verdict: [[tie]]
where [[1]] means Assistant 1 did better, [[2]] means Assistant 2 did better, and [[tie]] means \
neither did clearly better. Write nothing after that line."""

VERDICT_LINE = re.compile(r"verdict:\s*\[\[(1|2|tie)\]\]", re.IGNORECASE)


@dataclass(frozen=True)
class Judge:
    """An OpenAI-compatible chat-completions server and the model that judges there."""

    url: str  # up to the API version, e.g. http://localhost:8000/v1
    model: str
    api_key_env: str | None = "OPENAI_API_KEY"  # an unset variable sends no key
    timeout: float = 120.0  # seconds per request
    retries: int = 3  # on HTTP 429, 5xx, lost connections and timeouts
    backoff: float = 1.0  # seconds before the first retry, doubling (tests use 0)
    concurrency: int = 4  # requests in flight at once

    def __post_init__(self) -> None:
        if not self.url.startswith(("http://", "https://")):
            raise UserError(
                f"judge URL must be an http(s) URL, e.g. http://localhost:8000/v1; got {self.url!r}"
            )
        if self.concurrency < 1:
            raise UserError(f"judge concurrency must be at least 1, got {self.concurrency}")

    def client(self) -> Client:
        key = os.environ.get(self.api_key_env, "") if self.api_key_env else ""
        return Client(self.url.rstrip("/"), key, self.timeout, self.retries, self.backoff,
                      timeout_setting="the judge's timeout")  # fmt: skip


# -- the prompt and the verdict -------------------------------------------------------------------


def judge_messages(turns: Sequence[str], first: Sequence[str], second: Sequence[str]) -> list:
    """The chat messages asking which of two answer lists (one answer per user turn) is better."""
    if len(turns) == 1:
        body = (
            f"[The user's request]\n{turns[0]}\n\n"
            f"[Assistant 1's response]\n{first[0]}\n\n"
            f"[Assistant 2's response]\n{second[0]}\n\n"
            "Which response is better?"
        )
    else:
        shown = [_conversation(turns, answers, n) for n, answers in ((1, first), (2, second))]
        body = (
            f"The user had the same {len(turns)}-turn conversation with both assistants. Judge "
            "each conversation as a whole, the assistant's last response above all.\n\n"
            f"{shown[0]}\n\n{shown[1]}\n\nWhich assistant did better?"
        )
    return [{"role": "system", "content": SYSTEM}, {"role": "user", "content": body}]


def _conversation(turns: Sequence[str], answers: Sequence[str], n: int) -> str:
    lines = [f"[Conversation with Assistant {n}]"]
    for question, answer in zip(turns, answers, strict=True):
        lines += [f"User: {question}", f"Assistant {n}: {answer}"]
    return "\n\n".join(lines)


def parse_verdict(reply: str) -> str:
    """The reply's verdict, "1", "2" or "tie", when it ends as the prompt asks (see the module
    doc); else "invalid"."""
    lines = [line.strip() for line in reply.splitlines() if line.strip()]
    if not lines or reply.count("[[") != 1:
        return "invalid"
    match = VERDICT_LINE.fullmatch(lines[-1])
    return match.group(1).lower() if match else "invalid"


def outcome(ab: str, ba: str) -> str:
    """a's result from the verdicts of both orders (see the module doc)."""
    if "invalid" in (ab, ba):
        return "invalid"
    if (ab, ba) == ("1", "2"):
        return "win"
    if (ab, ba) == ("2", "1"):
        return "loss"
    return "tie"


# -- judging --------------------------------------------------------------------------------------


def judge_pair(
    judge: Judge,
    a: list[dict[str, Any]],
    b: list[dict[str, Any]],
    out: str | Path,
    *,
    names: Sequence[str] = ("A", "B"),
) -> dict[str, Any]:
    """Judge a's answers against b's into `out` (resumable); return the summary: "names",
    "judge", "per_category" and "total" ({"win", "tie", "loss", "invalid", "n", "win_rate"},
    from a's side), "invalid_example" (the first invalid verdict's id and reply, or None)."""
    out = Path(out)
    pairs = pair_answers(a, b, names)
    tasks = [_task(judge, qa, qb, order) for qa, qb in pairs for order in ORDERS]
    expected = {t["record"]["id"]: t["record"]["prompt_sha"] for t in tasks}
    with JsonlAppender(out) as appender:
        check_verdicts(appender.records, expected, out)
        todo = [t for t in tasks if t["record"]["id"] not in appender.ids]
        try:
            _ask_all(judge, todo, appender)
        except UserError as e:
            raise UserError(
                f"judge: {e} (the verdicts so far are kept in {out}; a rerun asks only the rest)"
            ) from None
        records = appender.records
    by_id = {r["id"]: r for r in records}
    ordered = [by_id[i] for i in expected]
    write_jsonl_atomic(out, ordered + [r for r in records if r["id"] not in expected])
    return summarize(pairs, by_id, judge.model, names)


def judge_pairs(
    judge: Judge, answers: dict[str, str | Path], pairs: Sequence[tuple[str, str]], out: Path
) -> dict[str, dict[str, Any]]:
    """`judge_pair` for each (first, second) of `pairs` whose two answer files are in `answers`
    ({model: JSONL}); verdicts in out/<first>-vs-<second>.jsonl. Returns the summaries by name."""
    from selfalign.jsonl import read_jsonl

    summaries = {}
    for first, second in pairs:
        if first in answers and second in answers:
            name = f"{first}-vs-{second}"
            summaries[name] = judge_pair(judge, read_jsonl(answers[first]),
                                         read_jsonl(answers[second]), out / f"{name}.jsonl",
                                         names=(first, second))  # fmt: skip
    return summaries


def pair_answers(a: list[dict], b: list[dict], names: Sequence[str]) -> list[tuple[dict, dict]]:
    """a's and b's records of each question, in a's order; a question only one side answered,
    or answers that do not fit their turns, is one line naming the ids."""
    if len(names) != 2 or names[0] == names[1]:
        raise UserError(f"judge: give two different names for the models, got {list(names)}")
    for records, name in ((a, names[0]), (b, names[1])):
        check_unique_ids(records, f"answers of {name}")
        for r in records:
            turns, answers = r.get("turns"), r.get("answers")
            if not (isinstance(turns, list) and isinstance(answers, list)
                    and 0 < len(turns) == len(answers)):  # fmt: skip
                raise UserError(f"answers of {name}: {r['id']!r} needs one answer per turn")
    b_by_id = {r["id"]: r for r in b}
    a_ids = {r["id"] for r in a}
    for ids, name, other in ((a_ids, names[1], b_by_id), (set(b_by_id), names[0], a_ids)):
        missing = sorted(ids - set(other), key=str)
        if missing:
            raise UserError(
                f"the answers of {name} lack {len(missing)} question(s) the other model "
                f"answered: {', '.join(map(str, missing[:10]))}; answer the same questions "
                "with both models"
            )
    for r in a:
        if r["turns"] != b_by_id[r["id"]]["turns"]:
            raise UserError(f"question {r['id']!r} differs between {names[0]} and {names[1]}")
    return [(r, b_by_id[r["id"]]) for r in a]


def _task(judge: Judge, qa: dict, qb: dict, order: str) -> dict[str, Any]:
    """One request to make: its messages, and the verdict record it will become."""
    first, second = (qa, qb) if order == "ab" else (qb, qa)
    messages = judge_messages(qa["turns"], first["answers"], second["answers"])
    request = {"model": judge.model, "max_tokens": MAX_TOKENS, "messages": messages}
    sha = hashlib.sha256(json.dumps(request, sort_keys=True).encode()).hexdigest()[:16]
    record = {"id": f"{qa['id']}:{order}", "question": qa["id"], "category": qa.get("category"),
              "order": order, "judge": judge.model, "prompt_sha": sha}  # fmt: skip
    return {"messages": messages, "record": record}


def check_verdicts(records: list[dict], expected: dict[str, str], out: Path) -> None:
    """Refuse a verdict in `out` that this job would have asked differently."""
    for r in records:
        want = expected.get(r.get("id"))
        if want is not None and r.get("prompt_sha") != want:
            raise UserError(
                f"{out}: verdict {r['id']!r} was made from other answers, another judge prompt or "
                f"another judge model; delete {out} or choose another output"
            )


def _ask_all(judge: Judge, tasks: list[dict], appender: JsonlAppender) -> None:
    """Ask for every task's verdict, `judge.concurrency` at a time, appending each as it comes.
    The first failure is raised; requests still in flight then are abandoned (a rerun asks
    them again)."""
    client, cancel = judge.client(), threading.Event()
    pool = ThreadPoolExecutor(judge.concurrency, thread_name_prefix="selfalign-judge")
    futures = [pool.submit(_ask, judge, client, t, cancel) for t in tasks]
    invalid = 0
    try:
        with progress_bar("judging", total=len(tasks)) as bar:
            for future in as_completed(futures):
                record = future.result()
                if record is None:  # skipped after another request failed; that one raises
                    continue
                appender.write_batch([record])
                invalid += record["verdict"] == "invalid"
                bar.advance(1, f"{invalid} invalid")
    finally:
        cancel.set()  # no more retries; requests not started are dropped
        pool.shutdown(wait=False, cancel_futures=True)


def _ask(
    judge: Judge, client: Client, task: dict, cancel: threading.Event
) -> dict[str, Any] | None:
    """The task's verdict record; None when the job already failed (no request then). A failure
    here cancels the job at once, so no other request starts before the caller sees it."""
    if cancel.is_set():
        return None
    try:
        return _verdict(judge, client, task, cancel)
    except BaseException:
        cancel.set()
        raise


def _verdict(judge: Judge, client: Client, task: dict, cancel: threading.Event) -> dict[str, Any]:
    body = {"model": judge.model, "messages": task["messages"], "temperature": 0,
            "max_tokens": MAX_TOKENS}  # fmt: skip
    raw = client.send("/chat/completions", body, cancel)
    try:
        content = json.loads(raw)["choices"][0]["message"]["content"]
        if content is not None and not isinstance(content, str):
            raise TypeError
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, IndexError, TypeError):
        text = client.scrub(" ".join(raw.decode(errors="replace").split())[:200])
        raise UserError(
            f"{client.base_url}/chat/completions: not a chat-completions reply: {text!r}"
        ) from None
    reply = client.scrub(content or "")  # a refusal may come with no content: invalid
    return {**task["record"], "verdict": parse_verdict(reply), "reply": reply}


# -- the summary ----------------------------------------------------------------------------------


def summarize(
    pairs: list[tuple[dict, dict]], verdicts: dict[str, dict], model: str, names: Sequence[str]
) -> dict[str, Any]:
    """Outcomes per category and in total, from a's side (see `judge_pair`)."""
    per_category: dict[str, dict[str, int]] = {}
    total = dict.fromkeys(OUTCOMES, 0)
    example = None
    for qa, _ in pairs:
        ab, ba = (verdicts[f"{qa['id']}:{order}"] for order in ORDERS)
        result = outcome(ab["verdict"], ba["verdict"])
        category = str(qa.get("category") or "all")
        per_category.setdefault(category, dict.fromkeys(OUTCOMES, 0))[result] += 1
        total[result] += 1
        if result == "invalid" and example is None:
            bad = ab if ab["verdict"] == "invalid" else ba
            example = {"id": bad["id"], "reply": bad["reply"]}
    return {
        "names": list(names),
        "judge": model,
        "per_category": {c: _rates(counts) for c, counts in per_category.items()},
        "total": _rates(total),
        "invalid_example": example,
    }


def _rates(counts: dict[str, int]) -> dict[str, Any]:
    valid = counts["win"] + counts["tie"] + counts["loss"]
    rate = (counts["win"] + counts["tie"] / 2) / valid if valid else None
    return {**counts, "n": valid + counts["invalid"], "win_rate": rate}


def format_judge_table(summary: dict[str, Any], names: Sequence[str]) -> str:
    """The summary as plain text: one row per category and a total, from names[0]'s side."""
    a, b = names
    header = ("category", "n", f"{a} wins", "ties", f"{b} wins", "invalid", f"{a} win rate")
    rows = [header]
    for label, c in [*summary["per_category"].items(), ("total", summary["total"])]:
        rate = "-" if c["win_rate"] is None else f"{c['win_rate']:.3f}"
        rows.append((label, *(str(c[k]) for k in ("n", "win", "tie", "loss", "invalid")), rate))
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines = [
        f"{a} vs {b}, judged by {summary['judge']} (each question in both orders; a split "
        "verdict counts as a tie)"
    ]
    for row in rows:
        cells = [
            row[0].ljust(widths[0]),
            *(v.rjust(w) for v, w in zip(row[1:], widths[1:], strict=True)),
        ]
        lines.append("  ".join(cells))
    example = summary.get("invalid_example")
    if example is not None:
        reply = " ".join(example["reply"].split())
        reply = reply if len(reply) <= 160 else reply[:157] + "..."
        lines.append(
            f"invalid: {summary['total']['invalid']} question(s) without a parseable verdict; "
            f"first ({example['id']}): {reply!r}"
        )
    return "\n".join(lines)
