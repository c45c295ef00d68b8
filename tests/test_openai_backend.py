"""The OpenAI-compatible backend against a fake completions server on loopback."""

import json
import logging
import queue
import threading

import pytest
from fake_openai import serve

from selfalign.errors import UserError
from selfalign.generation import (
    BackendConfig,
    Completion,
    SamplingParams,
    capabilities,
    load_backend,
)
from selfalign.generation import openai_backend as module
from selfalign.generation.ngram import PROBE_ARG, PROBE_REPLY
from selfalign.generation.openai_backend import OpenAIBackend, retry_wait
from selfalign.generation.records import generate_records

GUARD = 30  # seconds a gated reply waits at most, so a broken pool fails instead of hanging
STANDARD = {"model", "prompt", "temperature", "top_p", "max_tokens", "seed",
            "presence_penalty", "frequency_penalty"}  # fmt: skip


@pytest.fixture
def server():
    """A fake server: echoes; prompt "fail" gets HTTP 400, "flaky" HTTP 500 on its first two
    requests, "down" HTTP 500 always (with a two-line error body), "busy" HTTP 429 with
    Retry-After: 5 on its first, "hang" no reply until the test ends or `gate` is set. A probe
    for the n-gram processor gets its refusal while `state["processor"]`."""
    seen: list = []
    gate = threading.Event()
    state = {"processor": True, "guard_fired": False}

    def reply(body):
        tries = sum(b["prompt"] == body["prompt"] for b, _ in seen)
        if PROBE_ARG in body.get("vllm_xargs", {}) and state["processor"]:
            error = {"error": {"message": f"{PROBE_REPLY}", "type": "BadRequestError"}}
            return 400, json.dumps(error).encode()
        if body["prompt"] == "hang":
            state["guard_fired"] |= not gate.wait(GUARD)
        errors = {
            "fail": (400, b'{"error": {"message": "bad\\nprompt", "code": 400}}'),
            "down": (500, b"overloaded\nretry"),
        }
        if body["prompt"] == "flaky" and tries <= 2:
            errors["flaky"] = (500, b"warming up")
        if body["prompt"] == "busy" and tries <= 1:
            errors["busy"] = (429, b"slow down", {"Retry-After": "5"})
        if body["prompt"] in errors:
            return errors[body["prompt"]]
        text = f"echo:{body['prompt']}:{body.get('seed')}"
        return {
            "choices": [
                {"text": text, "finish_reason": "length" if body["max_tokens"] < 3 else "stop"}
            ],
            "usage": {"prompt_tokens": 4, "completion_tokens": 2},
        }

    url, _, httpd = serve(
        reply, seen, record=lambda body, headers: (body, headers.get("Authorization"))
    )
    httpd.gate, httpd.state = gate, state
    yield url, seen, httpd
    gate.set()
    httpd.shutdown()


@pytest.fixture
def waits(monkeypatch):
    """The backoff waits asked for, without waiting."""
    asked: list[float] = []
    monkeypatch.setattr(module, "_wait", lambda cancel, s: asked.append(s) or False)
    return asked


def bodies(seen, prompt=None):
    return [b for b, _ in seen if prompt is None or b["prompt"] == prompt]


# -- exact requests ----------------------------------------------------------------------------


def test_order_seeds_and_parameters(server, monkeypatch):
    url, seen, _ = server
    monkeypatch.setenv("MY_KEY", "sk-secret")
    backend = load_backend(
        BackendConfig(
            model="m", backend="openai", base_url=url, api_key_env="MY_KEY", concurrency=3
        )
    )
    params = SamplingParams(
        temperature=0.5, max_tokens=8, stop=["\n"], logit_bias={5: -100}, ngram_penalties={1: 0.5}
    )
    prompts = [f"p{i}" for i in range(7)]
    out = backend.generate(prompts, params, seeds=[i + 2**31 for i in range(7)])
    assert [c.text for c in out] == [f"echo:p{i}:{i}" for i in range(7)]  # seed % 2**31
    assert all(c.finish_reason == "stop" and c.completion_tokens == 2 for c in out)
    body, auth = seen[0]
    assert (
        body["stop"] == ["\n"]
        and body["logit_bias"] == {"5": -100}
        and body["frequency_penalty"] == 0.5
    )
    assert auth == "Bearer sk-secret"


@pytest.mark.parametrize(
    "server_kind, neutral",
    [
        ("vllm", {"repetition_penalty": 1.0, "top_k": -1, "min_p": 0.0, "return_token_ids": True}),
        ("llama.cpp", {"repeat_penalty": 1.0, "top_k": 0, "min_p": 0.0, "typical_p": 1.0}),
        ("generic", {}),
    ],
)
def test_every_field_a_server_would_default_is_sent_neutral(server, server_kind, neutral):
    url, seen, _ = server
    backend = OpenAIBackend("m", url, server=server_kind)
    backend.generate(["a"], SamplingParams(temperature=0.0, max_tokens=5), seeds=[3])
    assert bodies(seen)[0] == {
        "model": "m", "prompt": "a", "temperature": 0.0, "top_p": 1.0, "max_tokens": 5,
        "seed": 3, "presence_penalty": 0.0, "frequency_penalty": 0.0, **neutral,
    }  # fmt: skip


def test_text_is_decoded_from_the_token_ids_unless_a_stop_string_cut_it(tiny_model_dir):
    """vLLM's own text drops a trailing partial UTF-8 character; decoded from the ids, a
    completion reads as the in-process backends write it. A stop string's cut stays the server's."""
    from selfalign.modeling import load_tokenizer

    tokenizer = load_tokenizer(str(tiny_model_dir))
    ids = tokenizer("caf\u00e9 ok", add_special_tokens=False)["input_ids"]
    eos = tokenizer.eos_token_id

    def reply(body):
        stop = "ok" if body["prompt"] == "cut" else None
        choice = {"text": "server text", "finish_reason": "stop", "stop_reason": stop,
                  "token_ids": [*ids, eos]}  # fmt: skip
        return {"choices": [choice], "usage": {"prompt_tokens": 1, "completion_tokens": 3}}

    url, _, httpd = serve(reply)
    try:
        backend = OpenAIBackend("m", url, server="vllm", tokenizer=tokenizer)
        eos_ended, cut = backend.generate(["eos", "cut"], SamplingParams())
        assert eos_ended.text == "caf\u00e9 ok" and cut.text == "server text"
    finally:
        httpd.shutdown()


def test_extra_body_goes_on_top(server):
    url, seen, _ = server
    extra = {"top_k": 20, "ignore_eos": True, "vllm_xargs": {"mine": 1}}
    backend = OpenAIBackend("m", url, server="vllm", extra_body=extra)
    backend.generate(["a"], SamplingParams(ngram_penalties={1: 0.5, 2: 1.0}))
    body = bodies(seen, "a")[0]
    assert body["top_k"] == 20 and body["ignore_eos"] is True and body["min_p"] == 0.0
    # a dict is merged into ours, so the user's extra args do not drop the n-gram penalties
    assert body["vllm_xargs"] == {"selfalign_ngram_1": 0.5, "selfalign_ngram_2": 1.0, "mine": 1}


def test_left_truncation_sends_vllm_truncate_prompt_tokens(server):
    url, seen, _ = server
    params = SamplingParams(max_tokens=100, truncate_prompt="left")
    OpenAIBackend("m", url, context=2048).generate(["a"], params)
    assert bodies(seen)[0]["truncate_prompt_tokens"] == 2048 - 100
    OpenAIBackend("m", url, context=2048).generate(["a"], SamplingParams(max_tokens=100))
    assert "truncate_prompt_tokens" not in bodies(seen)[1]  # default: too long is an error
    OpenAIBackend("m", url, context=2048, server="vllm").generate(["a"], params)
    assert bodies(seen)[2]["truncation_side"] == "left"
    with pytest.raises(UserError, match="needs model.context"):
        OpenAIBackend("m", url).generate(["a"], params)
    with pytest.raises(UserError, match="no room for a prompt"):
        OpenAIBackend("m", url, context=100).generate(["a"], params)
    assert len(seen) == 3


def test_logit_bias_ids_outside_the_vocabulary_are_refused_before_any_request(
    server, tiny_model_dir
):
    from selfalign.modeling import load_tokenizer

    url, seen, _ = server
    tokenizer = load_tokenizer(str(tiny_model_dir))
    size = len(tokenizer)
    backend = OpenAIBackend("m", url, tokenizer=tokenizer)
    bias = {size - 1: -100.0, size: -100.0, -1: 5.0}
    with pytest.raises(UserError, match=rf"ids -1, {size} are outside.*\(0\.\.{size - 1}\)"):
        backend.generate(["a"], SamplingParams(logit_bias=bias))
    assert seen == []
    backend.generate(["a"], SamplingParams(logit_bias={size - 1: -100.0}))
    assert len(seen) == 1


# -- n-gram penalties --------------------------------------------------------------------------


def test_higher_order_ngram_penalties_are_refused_by_other_servers(server):
    url, seen, _ = server
    for kind in ("generic", "llama.cpp"):
        backend = OpenAIBackend("m", url, server=kind)
        with pytest.raises(UserError, match=r"orders 3, 4 \(sampling.ngram_penalties\)"):
            backend.generate(["a"], SamplingParams(ngram_penalties={1: 0.5, 3: 1.0, 4: 2.0}))
    assert seen == []
    # order 1 is the protocol's frequency_penalty; a zero weight asks for nothing
    backend.generate(["a"], SamplingParams(ngram_penalties={1: 0.5, 3: 0.0}))
    assert bodies(seen)[0]["frequency_penalty"] == 0.5 and "vllm_xargs" not in bodies(seen)[0]


def test_capabilities_follow_the_server_kind(tiny_model_dir):
    def caps(**extra):
        return capabilities(BackendConfig(model="m", backend="openai", **extra))

    assert caps(server="vllm").ngram_orders == {1, 2, 3, 4}
    assert caps(serve="auto").ngram_orders == {1, 2, 3, 4}  # serve=auto starts vLLM
    assert caps().ngram_orders == caps(server="llama.cpp").ngram_orders == {1}
    assert not caps().tokenizer and caps(tokenizer=str(tiny_model_dir)).tokenizer


def test_vllm_gets_all_orders_in_its_extra_args_after_one_probe(server):
    url, seen, _ = server
    backend = OpenAIBackend("m", url, server="vllm")
    params = SamplingParams(ngram_penalties={1: 0.5, 2: 0.0, 3: 1.0, 4: 2.0})
    backend.generate(["a", "b"], params)
    backend.generate(["c"], params)
    probes = [b for b in bodies(seen) if "selfalign_probe" in b.get("vllm_xargs", {})]
    assert len(probes) == 1 and probes[0]["max_tokens"] == 1  # once per backend
    assert bodies(seen)[0] is probes[0]  # before the first request
    for body in bodies(seen)[1:]:
        args = {"selfalign_ngram_1": 0.5, "selfalign_ngram_3": 1.0, "selfalign_ngram_4": 2.0}
        assert body["vllm_xargs"] == args
        assert body["frequency_penalty"] == 0.0  # order 1 is applied by the processor alone
    # order 1 alone needs no processor: OpenAI's frequency_penalty, no probe
    OpenAIBackend("m", url, server="vllm").generate(["d"], SamplingParams(ngram_penalties={1: 1}))
    assert bodies(seen, "d")[0]["frequency_penalty"] == 1 and len(seen) == 5


def test_a_vllm_server_without_the_processor_is_refused_before_any_completion(server):
    url, seen, httpd = server
    httpd.state["processor"] = False
    backend = OpenAIBackend("m", url, server="vllm")
    with pytest.raises(UserError) as error:
        backend.generate(["a"], SamplingParams(ngram_penalties={3: 1.0}))
    message = str(error.value)
    assert message.startswith(f"the vLLM server at {url} was started without selfalign's")
    assert "--logits-processors selfalign.generation.vllm_ngram:NgramPenalty" in message
    assert "model.serve: auto" in message
    assert len(seen) == 1 and PROBE_ARG in bodies(seen)[0]["vllm_xargs"]


# -- failures ----------------------------------------------------------------------------------


def test_server_errors_are_retried_then_reported_in_one_line(server, waits, caplog):
    url, seen, _ = server
    backend = OpenAIBackend("m", url, retries=2, backoff=1.5)
    with caplog.at_level(logging.WARNING, logger=module.__name__):
        assert backend.generate(["flaky"], SamplingParams(), seeds=[5])[0].text == "echo:flaky:5"
    assert len(seen) == 3 and waits == [1.5, 3.0]  # two HTTP 500s, then the answer
    lines = [r.getMessage() for r in caplog.records]
    assert lines == [
        f"HTTP 500 from {url}/completions; retry 1/2 in 1.5 s",
        f"HTTP 500 from {url}/completions; retry 2/2 in 3 s",
    ]
    with pytest.raises(UserError) as error:
        backend.generate(["down"], SamplingParams())
    assert len(seen) == 3 + 3  # the first request and two retries
    message = str(error.value)
    assert "HTTP 500" in message and "after 3 attempts" in message and "\n" not in message


def test_429_is_retried_after_the_servers_retry_after(server, waits):
    url, seen, _ = server
    backend = OpenAIBackend("m", url, retries=1, backoff=0)
    assert backend.generate(["busy"], SamplingParams(), seeds=[1])[0].text == "echo:busy:1"
    assert len(seen) == 2 and waits == [5.0]
    assert retry_wait(1, 1.0, "600") == module.MAX_RETRY_WAIT  # capped
    assert retry_wait(3, 1.0, "Wed, 21 Oct 2015 07:28:00 GMT") == 4.0  # a date: our backoff


def test_a_client_error_fails_at_once_with_the_servers_message(server, waits):
    url, seen, _ = server
    with pytest.raises(UserError) as error:
        OpenAIBackend("m", url, retries=3).generate(["fail"], SamplingParams())
    assert str(error.value) == f"{url}/completions: HTTP 400 from the server: bad prompt"
    assert len(seen) == 1 and waits == []


def test_no_api_key_in_messages_or_logs(server, monkeypatch, caplog):
    url, seen, _ = server
    monkeypatch.setenv("OPENAI_API_KEY", "sk-secret-key")

    def echo_key(body):  # a server that echoes the header it got
        return 401, b'{"error": {"message": "invalid key Bearer sk-secret-key"}}'

    leaky, _, httpd = serve(echo_key)
    try:
        with pytest.raises(UserError) as error:
            OpenAIBackend("m", leaky).generate(["a"], SamplingParams())
    finally:
        httpd.shutdown()
    assert "sk-secret-key" not in str(error.value) and "***" in str(error.value)
    assert "sk-secret-key" not in caplog.text


def test_a_request_without_a_reply_times_out_and_is_retried(server, waits, caplog):
    url, seen, _ = server
    backend = OpenAIBackend("m", url, retries=1, timeout=0.2)
    with caplog.at_level(logging.WARNING, logger=module.__name__):
        with pytest.raises(UserError) as error:
            backend.generate(["hang"], SamplingParams())
    assert len(seen) == 2 and len(caplog.records) == 1
    assert caplog.records[0].getMessage() == (
        f"no reply from {url}/completions: timed out after 0.2 s (model.timeout); retry 1/1 in 1 s"
    )
    assert str(error.value) == (
        f"{url}/completions: no reply from the server after 2 attempts: timed out after 0.2 s "
        "(model.timeout)"
    )


def test_unreachable_server():
    backend = OpenAIBackend("m", "http://127.0.0.1:9/v1", retries=0, timeout=2)
    with pytest.raises(UserError, match="no reply from the server: .*refused"):
        backend.generate(["a"], SamplingParams())


def test_missing_or_bad_base_url():
    with pytest.raises(UserError, match="base_url"):
        load_backend(BackendConfig(model="m", backend="openai"))
    with pytest.raises(UserError, match="model.base_url must be an http"):
        load_backend(BackendConfig(model="m", backend="openai", base_url="localhost:8000/v1"))


# -- the pool ----------------------------------------------------------------------------------


def test_a_new_request_starts_when_any_finishes_and_rows_come_as_they_finish(server):
    """While "hang" is in flight, the other slot serves every other prompt, and their rows
    reach the caller; only then is "hang" answered."""
    url, seen, httpd = server
    backend = OpenAIBackend("m", url, concurrency=2)
    prompts = ["hang", "a", "b", "c", "d"]
    batches = []
    for batch in backend.iter_batches(prompts, SamplingParams(), seeds=list(range(5))):
        batches.append(sorted(i for i, _ in batch))
        if sum(map(len, batches)) == 4:
            httpd.gate.set()
    assert not httpd.state["guard_fired"]
    assert sorted(sum(batches, [])) == [0, 1, 2, 3, 4] and batches[-1] == [0]


def test_rows_finished_before_a_failure_are_on_disk(server, tmp_path):
    """generate_records appends what the pool yields: the rows that finished before a row
    failed for good are kept for the resumed run."""
    url, seen, httpd = server
    out = tmp_path / "out.jsonl"

    def reply(body):  # "fail" is answered once the other rows are in the output file
        if body["prompt"] == "fail":
            for _ in range(GUARD * 100):
                if out.exists() and out.read_text().count("\n") == 3:
                    break
                threading.Event().wait(0.01)
            return 400, b'{"error": {"message": "bad prompt"}}'
        return {"choices": [{"text": body["prompt"], "finish_reason": "stop"}]}

    slow_url, _, slow = serve(reply)
    records = [{"id": i, "prompt": p} for i, p in enumerate(["fail", "a", "b", "c"])]
    try:
        with pytest.raises(UserError, match="HTTP 400"):
            generate_records(
                OpenAIBackend("m", slow_url, concurrency=4), records, SamplingParams(), out
            )
    finally:
        slow.shutdown()
    assert sorted(json.loads(line)["completion"] for line in out.read_text().splitlines()) == [
        "a", "b", "c",
    ]  # fmt: skip


def test_a_failure_abandons_the_requests_in_flight_and_starts_no_more(server):
    url, seen, httpd = server
    backend = OpenAIBackend("m", url, concurrency=2)
    with pytest.raises(UserError, match="HTTP 400"):
        backend.generate(["hang", "fail", "x", "y"], SamplingParams())
    assert not httpd.state["guard_fired"]  # raised while "hang" was still in flight
    httpd.gate.set()  # now let every worker finish what it does, then see what it did
    for thread in threading.enumerate():
        if thread.name == "selfalign-openai":
            thread.join(GUARD)
    assert sorted(b["prompt"] for b in bodies(seen)) == ["fail", "hang"]


def test_rows_that_arrive_with_a_failure_are_yielded_before_it():
    done = queue.SimpleQueue()
    row = Completion("a", "stop", 1, 1)
    for item in [(0, row), (2, UserError("row 2 failed")), (1, row)]:
        done.put(item)
    got = []
    with pytest.raises(UserError, match="row 2 failed"):
        for batch in OpenAIBackend._collect(done, 3):
            got.extend(batch)
    assert got == [(0, row), (1, row)]


# -- the model name and the backend's life ----------------------------------------------------


def openai_cfg(url, **extra) -> BackendConfig:
    return BackendConfig(model="org/base", backend="openai", base_url=url, **extra)


def test_the_served_model_name_is_checked_against_the_servers_list(caplog):
    url, seen, httpd = serve(lambda body: {}, models=["org/base", "other"])
    try:
        assert load_backend(openai_cfg(url)).model == "org/base"
        named = load_backend(openai_cfg(url, served_name="other"))
        assert named.model == "other"
        with pytest.raises(UserError) as error:
            load_backend(openai_cfg(url, served_name="org/missing"))
    finally:
        httpd.shutdown()
    assert str(error.value) == (
        f"the server at {url} does not serve model 'org/missing' (it serves 'org/base', "
        "'other'): set model.served_name (or model.model) to its name, start the server on "
        "'org/missing', or use model.serve: auto"
    )
    assert httpd.gets == ["/v1/models"] * 3 and seen == []


@pytest.mark.parametrize("models", [None, (200, b"<html>hello</html>")])
def test_a_server_without_a_model_list_gets_a_warning(models, caplog):
    url, seen, httpd = serve(lambda body: {}, models=models)
    try:
        with caplog.at_level(logging.WARNING, logger=module.__name__):
            load_backend(openai_cfg(url))
    finally:
        httpd.shutdown()
    assert len(caplog.records) == 1 and "the model name is not checked" in caplog.text


def test_from_config_takes_explicit_arguments_and_close_runs_on_close():
    url, seen, httpd = serve(lambda body: {}, models=["served"])
    closed = []
    try:
        cfg = openai_cfg("http://127.0.0.1:9/v1", served_name="x", server="vllm", retries=0)
        backend = OpenAIBackend.from_config(
            cfg, base_url=url, served_name="served", on_close=lambda: closed.append(1)
        )
    finally:
        httpd.shutdown()
    assert (backend.base_url, backend.model, backend.retries) == (url, "served", 0)
    assert backend.capabilities.ngram_orders == {1, 2, 3, 4}
    backend.close()
    backend.close()
    assert closed == [1]
