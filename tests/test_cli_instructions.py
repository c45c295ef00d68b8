"""Stage 1 commands as a user runs them: subprocesses on the tiny local model, a kill -9 midway,
and one-line errors for bad input."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from selfalign.jsonl import read_jsonl

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "SELFALIGN_PROGRESS": "0"}
SMALL = ["--max-tokens", "12", "--device", "cpu", "--seed", "7"]


def selfalign(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", "selfalign", *map(str, args)],
                          capture_output=True, text=True, env=ENV, timeout=300)  # fmt: skip
    if check and proc.returncode != 0:
        raise AssertionError(proc.stderr)
    return proc


def _summary(proc: subprocess.CompletedProcess) -> dict:
    """The counts of a step's one-line summary, its rejection reasons under 'rejected'."""
    line = proc.stderr.strip().splitlines()[0]
    counts, rejected = line.split(": ", 1)[1].rsplit(" rejected=", 1)
    return {**json.loads(counts), "rejected": json.loads(rejected)}


@pytest.mark.slow
def test_every_subcommand_writes_its_files_and_counts(tiny_model_dir, tmp_path):
    """Each command's one-line summary states the counts of the files it wrote."""
    from test_instructions import check_merge_files, check_step_files

    out, model = tmp_path / "out", tiny_model_dir
    si = selfalign("self-instruct", "--model", model, "--output", out, "--num-instructions", 2,
                   "--prompts-per-round", 4, "--max-rounds", 1, *SMALL)  # fmt: skip
    instructions = check_step_files(_summary(si), out, "self_instruct")
    assert _summary(si)["prompts"] == 4
    assert (f"warning: kept {len(instructions)} of 2" in si.stderr) == (len(instructions) < 2)

    topics = selfalign("topics", "--model", model, "--output", out, "--epochs", 1,
                       "--max-prompts-per-type", 1, *SMALL)  # fmt: skip
    kept_topics = check_step_files(_summary(topics), out, "topics")
    assert _summary(topics)["prompts"] == 20 and len(kept_topics) >= 20  # a seed topic per type
    assert _summary(topics)["seed_topics"] == sum(t["source"] == "seed" for t in kept_topics)

    questions = selfalign("questions", "--model", model, "--output", out,
                          "--max-topics-per-type", 1, "--shard", "0/1", *SMALL)  # fmt: skip
    check_step_files(_summary(questions), out, "tgrt_questions")
    raw = read_jsonl(out / "tgrt_questions.raw.jsonl")
    assert _summary(questions)["hints"] == sum(len(r["hints"]) for r in raw) == 20

    merged = _summary(selfalign("merge-instructions", "--output", out, "--threshold", "0.7"))
    assert merged["step"] == "merge"
    check_merge_files(merged, out)


@pytest.mark.slow
def test_sigkill_midway_then_rerun_gives_each_record_once(tiny_model_dir, tiny_backend, tmp_path):
    args = ["self-instruct", "--model", str(tiny_model_dir), "--num-instructions", "50",
            "--prompts-per-round", "12", "--max-rounds", "1", "--batch-size", "1",
            "--num-prompt-instructions", "2", "--max-tokens", "16", "--device", "cpu"]  # fmt: skip
    out = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-m", "selfalign", *args, "--output", str(out)],
                            env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    raw = out / "self_instruct.raw.jsonl"
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        if raw.exists() and raw.read_text().count("\n") >= 2:
            break
        time.sleep(0.05)
    assert proc.poll() is None, "the step finished before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert 2 <= len(read_jsonl(raw)) < 12 and not (out / "self_instruct.jsonl").exists()
    selfalign(*args, "--output", out)
    ids = [r["id"] for r in read_jsonl(raw)]
    assert len(ids) == len(set(ids)) == 12
    # the same step in-process, uninterrupted, batched differently: the same records
    from selfalign.generation import SamplingParams
    from selfalign.stages.stage1_instructions import SelfInstructConfig, run_self_instruct

    cfg = SelfInstructConfig(num_instructions=50, prompts_per_round=12, max_rounds=1,
                             num_prompt_instructions=2,
                             sampling=SamplingParams(top_p=0.98, max_tokens=16))  # fmt: skip
    run_self_instruct(cfg, tiny_backend, tmp_path / "ref")
    for name in ("self_instruct.raw.jsonl", "self_instruct.jsonl", "self_instruct.rejected.jsonl"):
        assert read_jsonl(out / name) == read_jsonl(tmp_path / "ref" / name), name


@pytest.mark.parametrize(
    "args, expect",
    [
        (["self-instruct", "--shard", "2/2"], "--shard 2/2: need 0 <= I < N"),
        (["self-instruct", "--seed-tasks", "{tmp}/nope.jsonl"], "nope.jsonl: file not found"),
        (["self-instruct", "--num-prompt-instructions", "999"], "> 134 seed tasks"),
        (["self-instruct", "--threshold", "1.5"], "similarity_threshold"),
        (["self-instruct", "--set", "self_instruct.bogus=1"], "unknown key 'self_instruct.bogus'"),
        (["topics", "--prompt", "{tmp}/bad.txt"], "bad.txt: expected 1 '{}' placeholder"),
        (["topics", "--seed-questions", "{tmp}/bad.jsonl"], "bad.jsonl:1: malformed JSON"),
        (["questions"], "no topics file; run `selfalign topics` first"),
        (["merge-instructions"], "no self_instruct.jsonl or tgrt_questions.jsonl to merge"),
    ],
)
def test_bad_input_is_a_one_line_error_before_the_model_loads(tmp_path, args, expect):
    (tmp_path / "bad.txt").write_text("no placeholder here")
    (tmp_path / "bad.jsonl").write_text("{oops\n{}\n")
    args = [a.replace("{tmp}", str(tmp_path)) for a in args]
    if args[0] != "merge-instructions":  # a model that does not exist: inputs fail first
        args += ["--model", str(tmp_path / "no-model")]
    proc = selfalign(*args, "--output", tmp_path / "out", check=False)
    assert proc.returncode == 2, proc.stderr
    assert expect in proc.stderr and "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr


def test_missing_model_is_named(tmp_path):
    proc = selfalign("topics", "--output", tmp_path, check=False)
    assert proc.returncode == 2 and "no model given: pass --model" in proc.stderr
