"""Answer quality: answers to the Vicuna / MT-bench questions (tiny model, resumable) and the
pairwise judge, driven by a fake OpenAI-compatible judge on 127.0.0.1 that says what each test
scripts (fair verdicts, a position bias, garbage, HTTP 500s)."""

from __future__ import annotations

import copy
import json
import logging
import threading
import time

import pytest
from fake_openai import serve

from selfalign.errors import UserError
from selfalign.evaluation.answers import answer_bench, turn_path
from selfalign.evaluation.judge import (
    Judge,
    format_judge_table,
    judge_messages,
    judge_pair,
    parse_verdict,
)
from selfalign.jsonl import read_jsonl
from selfalign.text.constitution import Identity
from selfalign.text.conversation import install_chat_template

# -- answers ---------------------------------------------------------------------------------------


@pytest.fixture
def backend(tiny_backend, monkeypatch):
    """The tiny model with a chat template (as `engrave` leaves one); generation calls counted."""
    tokenizer = copy.deepcopy(tiny_backend.tokenizer)
    install_chat_template(tokenizer, Identity(name="Quokka", developer="the Lab"))
    monkeypatch.setattr(tiny_backend, "tokenizer", tokenizer)
    calls = []
    real = tiny_backend.iter_batches

    def counted(prompts, params, seeds=None):
        calls.append(list(prompts))
        yield from real(prompts, params, seeds)

    monkeypatch.setattr(tiny_backend, "iter_batches", counted)
    monkeypatch.setattr(tiny_backend, "calls", calls, raising=False)
    return tiny_backend


def test_vicuna_answers_one_turn_and_a_rerun_generates_nothing(backend, tmp_path):
    out = tmp_path / "answers" / "vicuna.jsonl"
    rows = answer_bench(backend, "vicuna", out, limit=3, max_tokens=8)
    assert [r["id"] for r in rows] == ["vicuna-1", "vicuna-2", "vicuna-3"]
    assert [r["question_id"] for r in rows] == [1, 2, 3]
    assert all(len(r["turns"]) == len(r["answers"]) == 1 for r in rows)
    assert rows[0]["turns"] == ["How can I improve my time management skills?"]
    assert read_jsonl(out) == rows
    assert len(backend.calls) == 1 and len(backend.calls[0]) == 3
    assert "How can I improve my time management skills?" in backend.calls[0][0]
    assert answer_bench(backend, "vicuna", out, limit=3, max_tokens=8) == rows
    assert len(backend.calls) == 1  # resumed from the turn file: nothing generated again
    with pytest.raises(UserError, match="different sampling settings"):
        answer_bench(backend, "vicuna", out, limit=3, max_tokens=9)


def test_mt_bench_asks_the_second_turn_after_the_models_own_first_answer(backend, tmp_path):
    out = tmp_path / "mt.jsonl"
    rows = answer_bench(backend, "mt_bench", out, limit=2, max_tokens=8)
    assert [r["id"] for r in rows] == ["mt_bench-81", "mt_bench-82"]
    assert [r["category"] for r in rows] == ["writing", "writing"]
    assert all(len(r["turns"]) == len(r["answers"]) == 2 for r in rows)
    assert all(r["answers"][0] for r in rows)  # non-empty, so the check below means something
    second = {r["id"]: r["chat_prompt"] for r in read_jsonl(turn_path(out, 2))}
    for row in rows:
        prompt = second[row["id"]]
        first_turn, first_answer = prompt.index(row["turns"][0]), prompt.index(row["answers"][0])
        assert first_turn < first_answer < prompt.index(row["turns"][1])
    assert len(backend.calls) == 2  # one job per turn
    assert answer_bench(backend, "mt_bench", out, limit=2, max_tokens=8) == rows
    assert len(backend.calls) == 2


def test_answers_refuse_a_bad_bench_or_limit(backend, tmp_path):
    with pytest.raises(UserError, match="unknown question set 'alpaca'"):
        answer_bench(backend, "alpaca", tmp_path / "x.jsonl")
    with pytest.raises(UserError, match="limit must be at least 1"):
        answer_bench(backend, "vicuna", tmp_path / "x.jsonl", limit=0)


# -- the judge: prompt and parsing -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("reply", "verdict"),
    [
        ("A is more accurate.\nVerdict: [[1]]", "1"),
        ("B explains more.\n\nverdict: [[2]]  \n\n", "2"),
        ("Equally good.\nVerdict: [[TIE]]", "tie"),
        ("Verdict: [[1]]\nOn reflection the second is better.", "invalid"),  # not the last line
        ("First [[1]] then\nVerdict: [[2]]", "invalid"),  # two markers
        ("Verdict: [[1]] or [[2]]", "invalid"),
        ("**Verdict: [[1]]**", "invalid"),
        ("Verdict: [[3]]", "invalid"),
        ("Assistant 1 is better.", "invalid"),
        ("", "invalid"),
    ],
)
def test_verdicts_are_parsed_strictly(reply, verdict):
    assert parse_verdict(reply) == verdict


def test_the_prompt_shows_every_turn_and_labels_the_answers():
    one = judge_messages(["Why?"], ["Because A."], ["Because B."])
    assert [m["role"] for m in one] == ["system", "user"]
    assert "Verdict: [[tie]]" in one[0]["content"]
    text = one[1]["content"]
    assert text.index("Why?") < text.index("Because A.") < text.index("Because B.")
    two = judge_messages(["Q1", "Q2"], ["a1", "a2"], ["b1", "b2"])[1]["content"]
    order = ["Assistant 1]", "Q1", "a1", "Q2", "a2", "Assistant 2]", "Q1", "b1", "Q2", "b2"]
    at = 0
    for piece in order:
        at = two.index(piece, at)
    assert "Assistant 2: b2" in two


# -- the judge against a fake server ---------------------------------------------------------------

QUESTIONS = [("vicuna-1", "writing"), ("vicuna-2", "writing"), ("vicuna-3", "math"),
             ("vicuna-4", "math")]  # fmt: skip


def answers(quality: str, questions=QUESTIONS) -> list[dict]:
    """Answer records, GOOD or BAD per question (`quality`: one letter per question)."""
    return [
        {"id": qid, "question_id": n, "category": cat, "turns": [f"Question {n}?"],
         "answers": [f"{'GOOD' if q == 'g' else 'BAD'} answer {n}"]}
        for n, ((qid, cat), q) in enumerate(zip(questions, quality, strict=True), start=1)
    ]  # fmt: skip


A, B = answers("ggbg"), answers("bggb")  # a: win, tie (both good), loss, win


def chat(text: str) -> dict:
    return {"choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                         "finish_reason": "stop"}]}  # fmt: skip


def fair(body, note="fair") -> dict:
    """A judge that prefers the GOOD answer wherever it is shown."""
    text = body["messages"][-1]["content"]
    good, bad = text.find("GOOD"), text.find("BAD")
    verdict = "tie" if min(good, bad) < 0 else ("1" if good < bad else "2")
    return chat(f"{note}: one answer is better.\nVerdict: [[{verdict}]]")


@pytest.fixture
def judge_server():
    """start(reply, **serve args) -> (a Judge on a fake server, the requests it saw)."""
    servers = []

    def start(reply, **judge_args):
        url, seen, httpd = serve(reply, record=lambda body, headers: (body, headers))
        servers.append(httpd)
        return Judge(url, "judge-model", **{"backoff": 0, **judge_args}), seen

    yield start
    for httpd in servers:
        httpd.shutdown()


def test_a_fair_judge_gives_wins_ties_and_losses_per_category(judge_server, tmp_path):
    judge, seen = judge_server(fair)
    summary = judge_pair(judge, A, B, tmp_path / "v.jsonl", names=("ours", "base"))
    assert len(seen) == 8  # every question in both orders
    body = seen[0][0]
    assert (body["model"], body["temperature"], body["max_tokens"]) == ("judge-model", 0, 512)
    assert summary["per_category"]["writing"] == dict(win=1, tie=1, loss=0, invalid=0, n=2,
                                                      win_rate=0.75)  # fmt: skip
    assert summary["per_category"]["math"] == dict(win=1, tie=0, loss=1, invalid=0, n=2,
                                                   win_rate=0.5)  # fmt: skip
    assert summary["total"] == dict(win=2, tie=1, loss=1, invalid=0, n=4, win_rate=0.625)
    verdicts = read_jsonl(tmp_path / "v.jsonl")
    assert [v["id"] for v in verdicts] == [f"{q}:{o}" for q, _ in QUESTIONS for o in ("ab", "ba")]
    assert [v["verdict"] for v in verdicts[:2]] == ["1", "2"]  # a's GOOD answer, shown 1st, 2nd
    table = format_judge_table(summary, ("ours", "base"))
    assert table.splitlines()[1:] == [
        "category  n  ours wins  ties  base wins  invalid  ours win rate",
        "writing   2          1     1          0        0          0.750",
        "math      2          1     0          1        0          0.500",
        "total     4          2     1          1        0          0.625",
    ]


def test_a_position_biased_judge_only_gives_ties(judge_server, tmp_path):
    judge, _ = judge_server(lambda body: chat("The first one.\nVerdict: [[1]]"))
    summary = judge_pair(judge, A, B, tmp_path / "v.jsonl")
    assert summary["total"] == dict(win=0, tie=4, loss=0, invalid=0, n=4, win_rate=0.5)


def test_garbage_verdicts_are_counted_kept_and_shown_never_guessed(judge_server, tmp_path):
    def reply(body):
        if "Question 3?" in body["messages"][-1]["content"]:
            return chat("I prefer the GOOD one, clearly the first.")
        return fair(body)

    judge, _ = judge_server(reply)
    summary = judge_pair(judge, A, B, tmp_path / "v.jsonl")
    assert summary["per_category"]["math"]["invalid"] == 1 and summary["total"]["invalid"] == 1
    assert summary["total"]["n"] == 4 and summary["total"]["win_rate"] == (2 + 0.5) / 3
    assert summary["invalid_example"] == {
        "id": "vicuna-3:ab", "reply": "I prefer the GOOD one, clearly the first."
    }  # fmt: skip
    kept = {v["id"]: v for v in read_jsonl(tmp_path / "v.jsonl")}
    assert kept["vicuna-3:ba"]["verdict"] == "invalid"
    assert kept["vicuna-3:ba"]["reply"] == "I prefer the GOOD one, clearly the first."
    table = format_judge_table(summary, ("A", "B"))
    assert table.splitlines()[-1] == (
        "invalid: 1 question(s) without a parseable verdict; first (vicuna-3:ab): "
        "'I prefer the GOOD one, clearly the first.'"
    )


def test_a_500_is_retried_with_one_warning(judge_server, tmp_path, caplog):
    failed = []

    def reply(body):
        if not failed:
            failed.append(1)
            return 500, b"warming up"
        return fair(body)

    judge, seen = judge_server(reply, concurrency=1)
    with caplog.at_level(logging.WARNING):
        summary = judge_pair(judge, A, B, tmp_path / "v.jsonl")
    assert len(seen) == 9 and summary["total"]["win"] == 2
    assert [r.getMessage() for r in caplog.records] == [
        f"HTTP 500 from {judge.url}/chat/completions; retry 1/3 in 0 s"
    ]


def test_a_judge_that_goes_down_keeps_verdicts_and_a_rerun_asks_only_the_rest(
    judge_server, tmp_path
):
    def dies_after_three(body):
        answered = len(seen) - 1  # this request is in `seen` already
        return fair(body, "early") if answered < 3 else (500, b"the judge crashed")

    judge, seen = judge_server(dies_after_three, concurrency=1, retries=1)
    out = tmp_path / "v.jsonl"
    with pytest.raises(UserError) as error:
        judge_pair(judge, A, B, out)
    message = str(error.value)
    assert "\n" not in message and f"{judge.url}/chat/completions" in message
    assert "HTTP 500" in message and "after 2 attempts" in message and str(out) in message
    assert len(read_jsonl(out)) == 3 and len(seen) == 3 + 2

    healthy, again = judge_server(lambda body: fair(body, "late"), concurrency=2)
    summary = judge_pair(healthy, A, B, out)
    assert len(again) == 8 - 3  # only the missing verdicts were asked
    notes = [v["reply"].split(":")[0] for v in read_jsonl(out)]
    assert sorted(notes) == ["early"] * 3 + ["late"] * 5
    assert summary["total"] == dict(win=2, tie=1, loss=1, invalid=0, n=4, win_rate=0.625)


def test_verdicts_are_on_disk_while_the_judge_is_still_busy(judge_server, tmp_path):
    busy, gate = threading.Event(), threading.Event()

    def reply(body):
        if len(seen) == 4:  # the fourth request waits until the test has looked at the file
            busy.set()
            gate.wait(30)
        return fair(body)

    judge, seen = judge_server(reply, concurrency=1)
    out = tmp_path / "v.jsonl"
    worker = threading.Thread(target=judge_pair, args=(judge, A, B, out))
    worker.start()
    try:
        assert busy.wait(30)
        # the third verdict's write may trail the fourth request by a moment: poll, no threshold
        for _ in range(200):
            on_disk = len(read_jsonl(out)) if out.exists() else 0
            if on_disk == 3:
                break
            time.sleep(0.05)
    finally:
        gate.set()
        worker.join()
    assert on_disk == 3 and len(read_jsonl(out)) == 8


def test_a_reply_that_is_not_a_chat_completion_is_one_line(judge_server, tmp_path):
    judge, _ = judge_server(lambda body: (200, b"<html>\n<body>proxy error</body></html>"))
    with pytest.raises(UserError) as error:
        judge_pair(judge, A, B, tmp_path / "v.jsonl")
    message = str(error.value)
    assert "\n" not in message
    assert f"{judge.url}/chat/completions: not a chat-completions reply" in message


def test_the_api_key_is_sent_but_never_written_or_shown(judge_server, tmp_path, monkeypatch,
                                                        caplog):  # fmt: skip
    monkeypatch.setenv("JUDGE_KEY", "sk-judge-secret")
    judge, seen = judge_server(lambda body: chat("key sk-judge-secret\nVerdict: [[1]]"),
                               api_key_env="JUDGE_KEY")  # fmt: skip
    judge_pair(judge, A, B, tmp_path / "v.jsonl")
    assert {headers["Authorization"] for _, headers in seen} == {"Bearer sk-judge-secret"}
    written = (tmp_path / "v.jsonl").read_text()
    assert "sk-judge-secret" not in written and "key ***" in written

    def refuse(body):
        return 401, b'{"error": {"message": "bad key Bearer sk-judge-secret"}}'

    judge, _ = judge_server(refuse, api_key_env="JUDGE_KEY")
    with caplog.at_level(logging.WARNING), pytest.raises(UserError) as error:
        judge_pair(judge, A, B, tmp_path / "w.jsonl")
    assert "HTTP 401" in str(error.value) and "***" in str(error.value)
    assert "sk-judge-secret" not in str(error.value) + caplog.text


def test_unmatched_answers_name_the_missing_ids(judge_server, tmp_path):
    judge, seen = judge_server(fair)
    with pytest.raises(UserError, match=r"answers of base lack 1 question\(s\).*: vicuna-3;"):
        judge_pair(judge, A, [r for r in B if r["id"] != "vicuna-3"], tmp_path / "v.jsonl",
                   names=("ours", "base"))  # fmt: skip
    with pytest.raises(UserError, match=r"answers of ours lack 2 .*: vicuna-1, vicuna-4;"):
        judge_pair(judge, A[1:3], B, tmp_path / "v.jsonl", names=("ours", "base"))
    assert seen == []


def test_verdicts_for_other_answers_are_refused(judge_server, tmp_path):
    judge, _ = judge_server(fair)
    out = tmp_path / "v.jsonl"
    judge_pair(judge, A, B, out)
    changed = json.loads(json.dumps(A))
    changed[1]["answers"] = ["GOOD but different"]
    with pytest.raises(UserError, match="'vicuna-2:ab' was made from other answers"):
        judge_pair(judge, changed, B, out)
    with pytest.raises(UserError, match="'vicuna-1:ab' was made from other answers"):
        judge_pair(Judge(judge.url, "another-judge", backoff=0), A, B, out)


def test_two_turn_questions_show_both_turns_in_both_orders(judge_server, tmp_path):
    two = [{"id": "mt_bench-81", "question_id": 81, "category": "writing",
            "turns": ["Write a poem.", "Now shorter."]}]  # fmt: skip
    a = [{**two[0], "answers": ["GOOD poem", "GOOD short poem"]}]
    b = [{**two[0], "answers": ["BAD poem", "BAD short poem"]}]
    judge, seen = judge_server(fair, concurrency=1)
    summary = judge_pair(judge, a, b, tmp_path / "v.jsonl")
    assert summary["total"]["win"] == 1
    ab, ba = (body["messages"][-1]["content"] for body, _ in seen)
    assert ab.index("GOOD short poem") < ab.index("BAD poem") and "Now shorter." in ab
    assert ba.index("BAD short poem") < ba.index("GOOD poem")
