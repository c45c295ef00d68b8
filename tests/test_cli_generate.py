"""`selfalign generate` as a user runs it: a subprocess on a tiny local model."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from selfalign.jsonl import read_jsonl


def run(*args, check=True):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "SELFALIGN_PROGRESS": "0"}
    proc = subprocess.run(
        [sys.executable, "-m", "selfalign", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    if check and proc.returncode != 0:
        raise AssertionError(proc.stderr)
    return proc


def write_prompts(path, n, **extra):
    with open(path, "w") as f:
        for i in range(n):
            f.write(
                json.dumps(
                    {
                        "id": f"r{i}",
                        "prompt": f"User: question {i} about the sea\nAssistant:",
                        **extra,
                    }
                )
                + "\n"
            )
    return path


def gen(model, inp, out, *args, check=True):
    return run(
        "generate",
        "--model",
        str(model),
        "--input",
        str(inp),
        "--output",
        str(out),
        *args,
        check=check,
    )


def test_version_and_help():
    assert run("--version").stdout.startswith("selfalign ")
    assert "generate" in run("--help").stdout


@pytest.mark.parametrize(
    "args, message",
    [
        (["chat", "some/model", "--top-k", "40"], "No such option"),
        (["generate", "--batch-size", "many"], "Invalid value"),
        (["no-such-command"], "No such command"),
    ],
)
def test_usage_errors_are_messages_not_tracebacks(args, message):
    proc = run(*args, check=False)
    assert proc.returncode == 2
    assert message in proc.stderr and "Traceback" not in proc.stderr


def test_generate_outputs_in_input_order_with_carried_fields(tiny_model_dir, tmp_path):
    inp = write_prompts(tmp_path / "in.jsonl", 12, topic="sea")
    gen(tiny_model_dir, inp, tmp_path / "out.jsonl", "--temperature", "0", "--max-tokens", "6")
    out = read_jsonl(tmp_path / "out.jsonl")
    assert [r["id"] for r in out] == [f"r{i}" for i in range(12)]
    for r in out:
        assert r["topic"] == "sea" and r["finish_reason"] in ("stop", "length")
        assert (
            1 <= r["completion_tokens"] <= 6
            and r["prompt_tokens"] > 0
            and isinstance(r["completion"], str)
        )


def test_greedy_same_across_runs_and_batch_sizes(tiny_model_dir, tmp_path):
    inp = write_prompts(tmp_path / "in.jsonl", 10)
    texts = []
    for name, bs in (("a", "1"), ("b", "8"), ("c", "8")):
        gen(
            tiny_model_dir,
            inp,
            tmp_path / f"{name}.jsonl",
            "--temperature",
            "0",
            "--max-tokens",
            "8",
            "--batch-size",
            bs,
        )
        texts.append([r["completion"] for r in read_jsonl(tmp_path / f"{name}.jsonl")])
    assert texts[0] == texts[1] == texts[2]


def test_seeded_sampling_reproducible(tiny_model_dir, tmp_path):
    inp = write_prompts(tmp_path / "in.jsonl", 6)
    args = ("--temperature", "1.0", "--top-p", "0.9", "--max-tokens", "8", "--seed", "11")
    gen(tiny_model_dir, inp, tmp_path / "a.jsonl", *args, "--batch-size", "2")
    gen(tiny_model_dir, inp, tmp_path / "b.jsonl", *args, "--batch-size", "5")
    assert read_jsonl(tmp_path / "a.jsonl") == read_jsonl(tmp_path / "b.jsonl")


def test_logit_bias_stop_and_ngram_options(tiny_model_dir, tmp_path):
    """Each option's effect, against the same greedy run without it."""
    from test_transformers_backend import adjacent_repeats, lone_ascii_tokens

    from selfalign.modeling import load_tokenizer

    tok = load_tokenizer(str(tiny_model_dir))
    inp = write_prompts(tmp_path / "in.jsonl", 8)
    greedy_args = ("--temperature", "0", "--max-tokens", "12")

    def completions(name: str, *args: str) -> list[dict]:
        gen(tiny_model_dir, inp, tmp_path / name, *greedy_args, *args)
        return read_jsonl(tmp_path / name)

    greedy = completions("g.jsonl")

    # --logit-bias ID=-100: a token the run without it produces never appears (a lone ASCII
    # token: its character is in the text exactly when the token was generated)
    seen = {i: sum(r["completion"].count(ch) for r in greedy) for i, ch in lone_ascii_tokens(tok).items()}  # fmt: skip
    banned = max(seen, key=seen.get)
    assert seen[banned] > 0
    for r in completions("b.jsonl", "--logit-bias", f"{banned}=-100"):
        assert tok.decode([banned]) not in r["completion"]

    # --stop: each completion is cut where the stop string first appears in the greedy one
    stop = greedy[0]["completion"][2:5]
    assert stop.strip()
    cut = completions("s.jsonl", "--stop", stop, "--stop", "@@@")
    for full, r in zip(greedy, cut, strict=True):
        text = full["completion"]
        if stop in text:
            assert r["finish_reason"] == "stop" and r["completion"] == text[: text.index(stop)]
        else:
            assert r["completion"] == text
    assert cut[0]["finish_reason"] == "stop"

    # --ngram-penalty: a token pushed to win every step repeats less with it than without it
    the = tok.convert_tokens_to_ids("Ġthe")
    pushed = completions("p.jsonl", "--logit-bias", f"{the}=30")
    assert all(r["completion"] == " the" * 12 for r in pushed)
    penalised = completions("n.jsonl", "--logit-bias", f"{the}=30", "--ngram-penalty", "2=40",
                            "--ngram-penalty", "3=1.0")  # fmt: skip
    for full, r in zip(pushed, penalised, strict=True):
        assert adjacent_repeats(r["completion"]) < adjacent_repeats(full["completion"]) == 11


def test_rerun_skips_done_ids(tiny_model_dir, tmp_path):
    inp = write_prompts(tmp_path / "in.jsonl", 4)
    out = tmp_path / "out.jsonl"
    gen(tiny_model_dir, inp, out, "--temperature", "0", "--max-tokens", "4")
    before = out.read_text()
    write_prompts(inp, 6)  # two more prompts
    gen(tiny_model_dir, inp, out, "--temperature", "0", "--max-tokens", "4")
    records = read_jsonl(out)
    assert [r["id"] for r in records] == [f"r{i}" for i in range(6)]
    assert out.read_text().startswith(before)


@pytest.mark.slow
def test_sigkill_midway_then_rerun_gives_every_record_once(tiny_model_dir, tmp_path):
    inp = write_prompts(tmp_path / "in.jsonl", 200)
    out = tmp_path / "out.jsonl"
    args = [
        "--temperature",
        "0.8",
        "--seed",
        "5",
        "--max-tokens",
        "48",
        "--batch-size",
        "2",
        "--logit-bias",
        "2=-100",
    ]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "SELFALIGN_PROGRESS": "0"}
    cmd = [
        sys.executable,
        "-m",
        "selfalign",
        "generate",
        "--model",
        str(tiny_model_dir),
        "--input",
        str(inp),
        "--output",
        str(out),
        *args,
    ]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        if out.exists() and out.read_text().count("\n") >= 30:
            break
        time.sleep(0.05)
    assert proc.poll() is None, "generation finished before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    partial = read_jsonl(out)
    assert 30 <= len(partial) < 200
    gen(tiny_model_dir, inp, out, *args)
    records = read_jsonl(out)
    ids = [r["id"] for r in records]
    assert len(ids) == 200 and len(set(ids)) == 200
    # resumed rows are the rows an uninterrupted run produces
    gen(tiny_model_dir, inp, tmp_path / "ref.jsonl", *args)
    assert records == read_jsonl(tmp_path / "ref.jsonl")


@pytest.mark.parametrize(
    "case, expect",
    [
        ("missing_input", "file not found"),
        ("malformed", "in.jsonl:2: malformed JSON"),
        ("no_prompt", "has no string 'prompt'"),
        ("unknown_key", "unknown key 'sampling.temprature'"),
        ("missing_model", "no such directory"),
        ("bad_ngram", "n-gram penalty orders must be 1..4"),
        ("bad_bias", "--logit-bias"),
        ("corrupt_output", "out.jsonl:1: malformed JSON"),
        ("unhashed_output", "record 'r0' has no prompt_sha/settings_sha"),
    ],
)
def test_bad_input_is_one_line_error_and_output_intact(tiny_model_dir, tmp_path, case, expect):
    inp = write_prompts(tmp_path / "in.jsonl", 3)
    out = tmp_path / "out.jsonl"
    out.write_text('{"id": "r9", "completion": "kept"}\n')  # an id not asked for: left alone
    model, extra = str(tiny_model_dir), []
    if case == "missing_input":
        inp = tmp_path / "nope.jsonl"
    elif case == "malformed":
        inp.write_text('{"id": 1, "prompt": "a"}\n{oops\n{"id": 3, "prompt": "c"}\n')
    elif case == "no_prompt":
        inp.write_text('{"id": 1, "text": "a"}\n')
    elif case == "unknown_key":
        cfg = tmp_path / "c.yaml"
        cfg.write_text("sampling:\n  temprature: 0.3\n")
        extra = ["--config", str(cfg)]
    elif case == "missing_model":
        model = str(tmp_path / "no-model")
    elif case == "bad_ngram":
        extra = ["--ngram-penalty", "7=1"]
    elif case == "bad_bias":
        extra = ["--logit-bias", "abc"]
    elif case == "corrupt_output":
        out.write_text("not json\n{}\n")
    elif case == "unhashed_output":  # written before records carried their prompt's hash
        out.write_text('{"id": "r0", "completion": "kept"}\n')
    before = out.read_text()
    proc = gen(model, inp, out, *extra, check=False)
    assert proc.returncode != 0
    assert expect in proc.stderr
    assert "Traceback" not in proc.stderr and len(proc.stderr.strip().splitlines()) == 1, (
        proc.stderr
    )
    assert out.read_text() == before
