"""The vLLM backends on vLLM's CPU build (`make vllm`), against the transformers backend.

One in-process engine (backend `vllm`) serves the module; the server tests start real vLLM
servers (`model.serve: auto`). The tiny model has a head size vLLM's CPU attention supports.
Greedy decoding must give the transformers backend's text, finish reasons and token counts: the
contract holds whichever engine runs the model.
"""

from __future__ import annotations

import os
import random

import pytest

from selfalign.errors import UserError
from selfalign.generation import BackendConfig, SamplingParams, load_backend
from selfalign.generation.base import PromptTooLong

pytestmark = [pytest.mark.vllm, pytest.mark.slow]
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB: the tiny model needs little

PREFIX = "A conversation between a curious user and an AI assistant named Quokka. " * 3
PROMPTS = [
    PREFIX + "User: what is a river?\nQuokka:",
    PREFIX + "User: name three colours\nQuokka:",
    PREFIX + "User: hi\nQuokka:",
    "The cat",
    "Hello there, how are you today? I was wondering whether",
]
PENALTIES = {1: 0.5, 2: 1.0, 3: 1.0, 4: 2.0}


@pytest.fixture(scope="module")
def engine(vllm_model_dir):
    backend = load_backend(BackendConfig(model=str(vllm_model_dir), backend="vllm", context=2048))
    yield backend
    backend.close()


@pytest.fixture(scope="module")
def reference(vllm_model_dir):
    from selfalign.generation.transformers_backend import TransformersBackend

    return TransformersBackend.load(str(vllm_model_dir), device="cpu", dtype="float32")


def same(a, b) -> None:
    assert [c.text for c in a] == [c.text for c in b]
    assert [(c.finish_reason, c.prompt_tokens, c.completion_tokens) for c in a] == [
        (c.finish_reason, c.prompt_tokens, c.completion_tokens) for c in b
    ]


def test_greedy_equals_the_transformers_backend(engine, reference):
    params = SamplingParams(temperature=0, max_tokens=40)
    same(engine.generate(PROMPTS, params), reference.generate(PROMPTS, params))


def test_ngram_penalties_inside_vllm_equal_the_reference(engine, reference):
    plain = SamplingParams(temperature=0, max_tokens=60)
    penalised = SamplingParams(temperature=0, max_tokens=60, ngram_penalties=PENALTIES)
    got = engine.generate(PROMPTS, penalised)
    same(got, reference.generate(PROMPTS, penalised))
    # the penalties were applied, not ignored
    assert [c.text for c in got] != [c.text for c in engine.generate(PROMPTS, plain)]


def test_logit_bias_eos_and_token_counts(engine, reference):
    eos = min(engine.eos_token_ids)
    params = SamplingParams(temperature=0, max_tokens=5, logit_bias={eos: 100})
    got = engine.generate(PROMPTS, params)
    # the EOS ends the completion and is counted, as in the transformers backend
    assert {(c.text, c.finish_reason, c.completion_tokens) for c in got} == {("", "stop", 1)}
    same(got, reference.generate(PROMPTS, params))
    token = engine.tokenizer("river", add_special_tokens=False)["input_ids"][0]
    forced = SamplingParams(temperature=0, max_tokens=4, logit_bias={token: 100})
    same(engine.generate(PROMPTS, forced), reference.generate(PROMPTS, forced))


def test_stop_strings_cut_where_the_transformers_backend_cuts(engine, reference):
    free = engine.generate(PROMPTS, SamplingParams(temperature=0, max_tokens=40))
    stop = free[0].text[6:9]  # occurs in the first completion, maybe in others
    params = SamplingParams(temperature=0, max_tokens=40, stop=[stop])
    got = engine.generate(PROMPTS, params)
    assert got[0].finish_reason == "stop" and got[0].text == free[0].text[: free[0].text.find(stop)]
    same(got, reference.generate(PROMPTS, params))


def test_per_row_seeds_do_not_depend_on_the_job(engine):
    params = SamplingParams(temperature=1.0, max_tokens=24)
    seeds = [11, 12, 13, 14, 15]
    whole = [c.text for c in engine.generate(PROMPTS, params, seeds)]
    order = list(range(len(PROMPTS)))
    random.Random(0).shuffle(order)
    split = engine.generate([PROMPTS[i] for i in order], params, [seeds[i] for i in order])
    assert [split[order.index(i)].text for i in range(len(PROMPTS))] == whole
    other = [c.text for c in engine.generate(PROMPTS, params, [s + 100 for s in seeds])]
    assert other != whole


def test_seeded_long_prompts_that_fill_an_engine_step(engine):
    """More prompt tokens than one engine step takes: vLLM 0.32 on CPU would prefill one in
    chunks and then fail its seeded sampling ("CPU Generator does not use offset")."""
    long = [f"{i} " + "word " * 700 for i in range(8)]  # ~1,400 tokens each
    params = SamplingParams(temperature=1.0, max_tokens=8)
    together = [c.text for c in engine.generate(long, params, list(range(8)))]
    assert together[5] == engine.generate(long[5:6], params, [5])[0].text


def test_prompts_are_checked_against_the_context_as_in_every_backend(engine):
    long = "word " * 3000
    with pytest.raises(PromptTooLong, match="prompt #1"):
        engine.generate(["short", long], SamplingParams(max_tokens=8))
    left = SamplingParams(temperature=0, max_tokens=8, truncate_prompt="left")
    (cut,) = engine.generate([long + " The cat"], left)
    assert cut.prompt_tokens == engine.context - 8
    with pytest.raises(UserError, match="outside the vocabulary"):
        engine.generate(["x"], SamplingParams(logit_bias={10**6: 1.0}))


def test_the_logits_processor_refuses_bad_weights_and_answers_the_probe():
    from vllm import SamplingParams as VllmParams

    from selfalign.generation.ngram import PROBE_ARG, PROBE_REPLY
    from selfalign.generation.vllm_ngram import NgramPenalty

    NgramPenalty.validate_params(VllmParams(extra_args={"selfalign_ngram_3": 1.0}))
    with pytest.raises(ValueError, match="selfalign_ngram_2"):
        NgramPenalty.validate_params(VllmParams(extra_args={"selfalign_ngram_2": "high"}))
    with pytest.raises(ValueError, match=PROBE_REPLY):
        NgramPenalty.validate_params(VllmParams(extra_args={PROBE_ARG: 1}))


def test_the_logits_processor_follows_the_batch():
    """Rows added, moved and removed as vLLM's persistent batch does; penalties follow their
    request, and each row equals the transformers backend's penalty on the same history."""
    import torch
    from vllm import SamplingParams as VllmParams
    from vllm.v1.sample.logits_processor import BatchUpdate, MoveDirectionality

    from selfalign.generation.ngram import ngram_args, ngram_penalty
    from selfalign.generation.vllm_ngram import NgramPenalty

    vocab, rng = 7, random.Random(3)
    processor = NgramPenalty(None, torch.device("cpu"), False)
    a, b = [rng.randrange(vocab) for _ in range(12)], [rng.randrange(vocab) for _ in range(9)]
    with_penalty = VllmParams(extra_args=ngram_args(PENALTIES))
    added = [(0, with_penalty, None, a), (1, VllmParams(), None, []), (2, with_penalty, None, b)]
    processor.update_state(BatchUpdate(3, removed=[], added=added, moved=[]))

    def expect(history):
        return -ngram_penalty(torch.tensor([history]), PENALTIES, vocab)[0]

    got = processor.apply(torch.zeros(3, vocab))
    assert torch.allclose(got[0], expect(a)) and torch.allclose(got[2], expect(b))
    assert not got[1].any()
    a.extend([1, 1, 1])  # vLLM appends to the request's own list as it decodes
    swap = [(0, 2, MoveDirectionality.SWAP)]
    processor.update_state(BatchUpdate(3, removed=[1], added=[], moved=swap))
    got = processor.apply(torch.zeros(3, vocab))
    assert torch.allclose(got[2], expect(a)) and torch.allclose(got[0], expect(b))


# -- through a real vLLM server -----------------------------------------------------------------


@pytest.fixture(scope="module")
def served(vllm_model_dir):
    """backend openai with serve=auto: selfalign starts the server, and stops it on close."""
    backend = load_backend(
        BackendConfig(model=str(vllm_model_dir), backend="openai", serve="auto", context=2048)
    )
    yield backend
    backend.close()


def test_a_server_selfalign_starts_gives_the_transformers_backend_output(served, reference):
    assert served.capabilities.ngram_orders == {1, 2, 3, 4} and served.tokenizer is not None
    for params in (
        SamplingParams(temperature=0, max_tokens=40),
        SamplingParams(temperature=0, max_tokens=60, ngram_penalties=PENALTIES),
    ):
        same(served.generate(PROMPTS, params), reference.generate(PROMPTS, params))


def test_seeded_sampling_is_the_same_served_or_in_process(served, engine):
    params = SamplingParams(temperature=1.0, max_tokens=16, seed=7)
    first = [c.text for c in served.generate(PROMPTS, params)]
    assert [c.text for c in served.generate(PROMPTS, params)] == first
    assert [c.text for c in engine.generate(PROMPTS, params)] == first


def test_the_server_is_stopped_on_close_and_a_dead_one_is_reported(vllm_model_dir, monkeypatch):
    """A server without selfalign's processor: n-gram penalties refused (never dropped); close()
    ends it; a server that dies while starting is one error line carrying its log's end."""
    from selfalign.generation import server as server_module

    command = server_module.server_command

    def without_processor(cfg, port, name):
        args = command(cfg, port, name)
        at = args.index("--logits-processors")
        return args[:at] + args[at + 2 :]

    monkeypatch.setattr(server_module, "server_command", without_processor)
    cfg = BackendConfig(model=str(vllm_model_dir), backend="openai", serve="auto", context=2048)
    backend = load_backend(cfg)
    process = backend.on_close.__self__.process  # the Server whose stop() it is
    with pytest.raises(UserError, match="started without selfalign's n-gram logits processor"):
        backend.generate(["x"], SamplingParams(max_tokens=4, ngram_penalties={3: 1.0}))
    backend.close()
    assert process.poll() is not None

    monkeypatch.setattr(server_module, "server_command",
                        lambda cfg, port, name: [*command(cfg, port, name), "--no-such-flag"])  # fmt: skip
    with pytest.raises(UserError, match=r"exited with code .* before it was ready; its log"):
        load_backend(cfg)


def test_a_server_does_not_outlive_a_killed_selfalign(vllm_model_dir, tmp_path):
    """SIGKILL leaves no chance to clean up: the server still goes (Linux parent-death signal),
    and its engine processes with it."""
    import subprocess
    import sys
    import time

    import psutil

    script = tmp_path / "killed.py"
    script.write_text(
        "import os, signal, sys, psutil\n"
        "from selfalign.generation import BackendConfig, load_backend\n"
        "b = load_backend(BackendConfig(model=sys.argv[1], backend='openai', serve='auto', "
        "context=2048))\n"
        "server = psutil.Process(b.on_close.__self__.process.pid)\n"
        "print(*[p.pid for p in [server, *server.children(recursive=True)]], flush=True)\n"
        "os.kill(os.getpid(), signal.SIGKILL)\n"
    )
    done = subprocess.run([sys.executable, str(script), str(vllm_model_dir)],
                          capture_output=True, text=True, timeout=600)  # fmt: skip
    pids = [int(p) for p in done.stdout.split()]
    assert done.returncode == -9 and len(pids) >= 2, done.stderr[-2000:]

    def alive(pid: int) -> bool:  # a zombie is dead (nobody may be left to reap it)
        try:
            return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
        except psutil.NoSuchProcess:
            return False

    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and any(alive(p) for p in pids):
        time.sleep(0.5)
    assert not [p for p in pids if alive(p)]


# -- `selfalign run` through all five stages -------------------------------------------------------


@pytest.mark.parametrize(
    "backend", [["model.backend=vllm"], ["model.backend=openai", "model.serve=auto"]]
)
def test_selfalign_run_generates_every_stage_in_vllm(
    backend, demo_model_dir, tmp_path, monkeypatch, capsys
):
    import json
    from importlib import resources

    import psutil
    from cli_run import run_main

    demo = str(resources.files("selfalign") / "configs" / "demo.yaml")
    run = tmp_path / "run"
    before = {p.pid for p in psutil.Process().children(recursive=True)}  # this module's engine
    result = run_main(monkeypatch, capsys, "run", demo, f"model.model={demo_model_dir}", *backend,
                      "--run-dir", str(run), "--quiet")  # fmt: skip
    assert result.code == 0, result.err
    manifest = json.loads((run / "manifest.json").read_text())
    assert [s["status"] for s in manifest["stages"].values()] == ["done"] * 5
    assert manifest["stages"]["self_align"]["counts"]["kept"] > 0
    # stage 5: each model's answers were generated through vLLM too (3 questions each)
    for label in ("base", "engraved", "final"):
        answers = run / "5_evaluate" / "answers" / f"{label}.jsonl"
        assert len(answers.read_text().splitlines()) == 3, label
    assert manifest["stages"]["verbose"]["counts"]["generated"] > 0
    assert (run / "4_verbose" / "model" / "model.safetensors").exists()
    # every engine and server the run started was released: none outlives it
    left = [p for p in psutil.Process().children(recursive=True) if p.pid not in before]
    vllm = [p for p in left if p.status() != psutil.STATUS_ZOMBIE
            and ("vllm" in " ".join(p.cmdline()).lower() or p.name().startswith("VLLM"))]  # fmt: skip
    assert not vllm
