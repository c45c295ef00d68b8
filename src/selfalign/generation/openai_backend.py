"""Generation through an OpenAI-compatible completions server: `vllm serve`, SGLang, TGI,
llama.cpp's server.

Each prompt is one `POST {base_url}/completions` request carrying its own seed, so sampled text
does not depend on batching; `concurrency` requests are in flight at once and the server batches
them. Parameters the protocol cannot express are refused, never dropped: n-gram penalties of
order 2-4 (order 1 is exactly OpenAI's `frequency_penalty`). Left truncation uses vLLM's
`truncate_prompt_tokens`. The API key is read from an environment variable and never logged.
"""

from __future__ import annotations

import json
import os
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor

from selfalign.errors import UserError
from selfalign.generation.base import Backend, Completion, SamplingParams, resolve_seeds


class OpenAIBackend(Backend):
    def __init__(
        self,
        model: str,
        base_url: str,
        api_key_env: str = "OPENAI_API_KEY",
        concurrency: int = 16,
        timeout: float = 600.0,
        retries: int = 3,
        context: int | None = None,
    ):
        self.model = model
        self.base_url = base_url.rstrip("/")
        self._api_key = os.environ.get(api_key_env, "")
        self.concurrency = concurrency
        self.timeout = timeout
        self.retries = retries
        self.context = context

    def request_body(self, prompt: str, params: SamplingParams, seed: int) -> dict:
        """The JSON body for one prompt; refuses what the protocol cannot express."""
        higher = {n: a for n, a in params.ngram_penalties.items() if n > 1 and a}
        if higher:
            raise UserError(
                f"ngram_penalties {higher}: an OpenAI-compatible server supports only order 1 "
                "(frequency_penalty); use the transformers backend for higher orders"
            )
        body = {
            "model": self.model,
            "prompt": prompt,
            "temperature": params.temperature,
            "top_p": params.top_p,
            "max_tokens": params.max_tokens,
            "seed": seed,
        }
        if params.stop:
            body["stop"] = params.stop
        if params.logit_bias:
            body["logit_bias"] = {str(k): v for k, v in params.logit_bias.items()}
        if params.ngram_penalties.get(1):
            body["frequency_penalty"] = params.ngram_penalties[1]
        if params.truncate_prompt == "left":
            if self.context is None:
                raise UserError(
                    "truncate_prompt='left' with an HTTP backend needs model.context (the server's max length)"
                )
            body["truncate_prompt_tokens"] = self.context - params.max_tokens
        return body

    def _post(self, body: dict) -> dict:
        headers = {"Content-Type": "application/json"}
        if self._api_key:
            headers["Authorization"] = f"Bearer {self._api_key}"
        data = json.dumps(body).encode()
        for attempt in range(self.retries + 1):
            request = urllib.request.Request(
                f"{self.base_url}/completions", data=data, headers=headers
            )
            try:
                with urllib.request.urlopen(request, timeout=self.timeout) as response:
                    return json.loads(response.read())
            except urllib.error.HTTPError as e:
                detail = e.read().decode(errors="replace")[:300]
                if e.code < 500 or attempt == self.retries:
                    raise UserError(
                        f"{self.base_url}: HTTP {e.code} from the server: {detail}"
                    ) from None
            except (urllib.error.URLError, TimeoutError, ConnectionError) as e:
                if attempt == self.retries:
                    reason = getattr(e, "reason", e)
                    raise UserError(
                        f"{self.base_url}: cannot reach the server ({reason})"
                    ) from None
            time.sleep(min(2**attempt, 30))
        raise AssertionError("unreachable")

    def _complete(self, prompt: str, params: SamplingParams, seed: int) -> Completion:
        reply = self._post(self.request_body(prompt, params, seed))
        try:
            choice = reply["choices"][0]
            usage = reply.get("usage") or {}
            reason = "length" if choice.get("finish_reason") == "length" else "stop"
            return Completion(
                choice["text"],
                reason,
                int(usage.get("prompt_tokens", 0)),
                int(usage.get("completion_tokens", 0)),
            )
        except (KeyError, IndexError, TypeError):
            raise UserError(f"{self.base_url}: unexpected reply {str(reply)[:200]!r}") from None

    def iter_batches(
        self, prompts: Sequence[str], params: SamplingParams, seeds: Sequence[int] | None = None
    ) -> Iterator[list[tuple[int, Completion]]]:
        row_seeds = resolve_seeds(len(prompts), params, seeds)
        for p in prompts[:1]:
            self.request_body(p, params, 0)  # refuse unsupported parameters before any request
        with ThreadPoolExecutor(self.concurrency) as pool:
            for start in range(0, len(prompts), self.concurrency):
                rows = range(start, min(start + self.concurrency, len(prompts)))
                futures = [
                    pool.submit(self._complete, prompts[i], params, row_seeds[i] % 2**31)
                    for i in rows
                ]
                yield [(i, f.result()) for i, f in zip(rows, futures, strict=True)]
