"""The OpenAI-compatible backend against a fake completions server on loopback."""

import pytest
from fake_openai import serve

from selfalign.errors import UserError
from selfalign.generation import BackendConfig, SamplingParams, load_backend
from selfalign.generation.openai_backend import OpenAIBackend


@pytest.fixture
def server():
    """A fake server: echoes; prompt "fail" gets HTTP 400, "flaky" HTTP 500 on its first two
    requests, "down" HTTP 500 always (with a two-line error body)."""
    seen: list = []

    def reply(body):
        tries = sum(b["prompt"] == body["prompt"] for b, _ in seen)
        errors = {"fail": (400, b'{"error": "bad prompt"}'), "down": (500, b"overloaded\nretry")}
        if body["prompt"] == "flaky" and tries <= 2:
            errors["flaky"] = (500, b"warming up")
        if body["prompt"] in errors:
            return errors[body["prompt"]]
        text = f"echo:{body['prompt']}:{body['seed']}"
        return {
            "choices": [
                {"text": text, "finish_reason": "length" if body["max_tokens"] < 3 else "stop"}
            ],
            "usage": {"prompt_tokens": 4, "completion_tokens": 2},
        }

    url, _, httpd = serve(
        reply, seen, record=lambda body, headers: (body, headers.get("Authorization"))
    )
    yield url, seen
    httpd.shutdown()


def test_order_seeds_and_parameters(server, monkeypatch):
    url, seen = server
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
    out = backend.generate(prompts, params, seeds=list(range(7)))
    assert [c.text for c in out] == [f"echo:p{i}:{i}" for i in range(7)]
    assert all(c.finish_reason == "stop" and c.completion_tokens == 2 for c in out)
    body, auth = seen[0]
    assert (
        body["stop"] == ["\n"]
        and body["logit_bias"] == {"5": -100}
        and body["frequency_penalty"] == 0.5
    )
    assert auth == "Bearer sk-secret"


def test_higher_order_ngram_penalties_are_refused(server):
    url, seen = server
    backend = OpenAIBackend("m", url)
    with pytest.raises(UserError, match=r"orders 3, 4 \(sampling.ngram_penalties\)"):
        backend.generate(["a"], SamplingParams(ngram_penalties={1: 0.5, 3: 1.0, 4: 2.0}))
    assert seen == []
    # order 1 is the protocol's frequency_penalty; a zero weight asks for nothing
    backend.generate(["a"], SamplingParams(ngram_penalties={1: 0.5, 3: 0.0}))
    assert seen[0][0]["frequency_penalty"] == 0.5


def test_server_errors_are_retried_then_reported_in_one_line(server):
    url, seen = server
    backend = OpenAIBackend("m", url, retries=2, backoff=0)
    assert backend.generate(["flaky"], SamplingParams(), seeds=[5])[0].text == "echo:flaky:5"
    assert len(seen) == 3  # two HTTP 500s, then the answer
    with pytest.raises(UserError) as error:
        backend.generate(["down"], SamplingParams())
    assert len(seen) == 3 + 3  # the first request and two retries
    message = str(error.value)
    assert "HTTP 500" in message and "after 3 attempts" in message and "\n" not in message


def test_left_truncation_sends_vllm_truncate_prompt_tokens(server):
    url, seen = server
    params = SamplingParams(max_tokens=100, truncate_prompt="left")
    OpenAIBackend("m", url, context=2048).generate(["a"], params)
    assert seen[0][0]["truncate_prompt_tokens"] == 2048 - 100
    OpenAIBackend("m", url, context=2048).generate(["a"], SamplingParams(max_tokens=100))
    assert "truncate_prompt_tokens" not in seen[1][0]  # default: a too-long prompt is an error
    with pytest.raises(UserError, match="needs model.context"):
        OpenAIBackend("m", url).generate(["a"], params)
    with pytest.raises(UserError, match="no room for a prompt"):
        OpenAIBackend("m", url, context=100).generate(["a"], params)
    assert len(seen) == 2


def test_http_error_is_a_user_error(server):
    url, _ = server
    with pytest.raises(UserError, match="HTTP 400"):
        OpenAIBackend("m", url).generate(["fail"], SamplingParams())


def test_unreachable_server():
    backend = OpenAIBackend("m", "http://127.0.0.1:9/v1", retries=0, timeout=2)
    with pytest.raises(UserError, match="cannot reach"):
        backend.generate(["a"], SamplingParams())


def test_missing_base_url():
    with pytest.raises(UserError, match="base_url"):
        load_backend(BackendConfig(model="m", backend="openai"))
