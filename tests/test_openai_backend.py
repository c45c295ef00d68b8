"""The OpenAI-compatible backend against a fake completions server on loopback."""

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from selfalign.errors import UserError
from selfalign.generation import BackendConfig, SamplingParams, load_backend
from selfalign.generation.openai_backend import OpenAIBackend


@pytest.fixture
def server():
    seen = []

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):  # noqa: N802
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            seen.append((body, self.headers.get("Authorization")))
            if body["prompt"] == "fail":
                self.send_response(400)
                self.end_headers()
                self.wfile.write(b'{"error": "bad prompt"}')
                return
            text = f"echo:{body['prompt']}:{body['seed']}"
            reply = {
                "choices": [
                    {"text": text, "finish_reason": "length" if body["max_tokens"] < 3 else "stop"}
                ],
                "usage": {"prompt_tokens": 4, "completion_tokens": 2},
            }
            data = json.dumps(reply).encode()
            self.send_response(200)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args):
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}/v1", seen
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
    with pytest.raises(UserError, match="only order 1"):
        backend.generate(["a"], SamplingParams(ngram_penalties={3: 1.0}))
    assert seen == []


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
