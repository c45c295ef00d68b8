"""Generation through an OpenAI-compatible completions server: `vllm serve`, SGLang, TGI,
llama.cpp's server.

Each prompt is one `POST {base_url}/completions` request carrying its own seed, so sampled text
does not depend on batching; `concurrency` requests are in flight at once and the server batches
them. Parameters the protocol cannot express are refused, never dropped: n-gram penalties of
order 2-4 (order 1 is exactly OpenAI's `frequency_penalty`). Left truncation uses vLLM's
`truncate_prompt_tokens`. The API key is read from an environment variable and never logged.
A reply of HTTP 5xx or a dropped connection is retried `retries` times, with backoff.

The server tokenizes, but stages still need the tokenizer here (EOS ids to suppress, the token ids
of "Sorry", chat templates): it is read from `model.tokenizer`, or else from `model.model` when
that is a local directory or in the hub cache; the hub is never asked for it implicitly.
"""

from __future__ import annotations

import json
import logging
import os
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from selfalign.errors import UserError
from selfalign.generation.base import (
    Backend,
    Capabilities,
    Completion,
    SamplingParams,
    require,
    resolve_seeds,
)

log = logging.getLogger(__name__)


def offline_source(name: str) -> str | None:
    """`name` as a directory loadable without the network: itself when it is a local directory,
    the cached snapshot when it is a hub id in the hub cache, else None."""
    if Path(name).expanduser().is_dir():
        return str(Path(name).expanduser())
    if name.startswith((".", "/", "~")) or name.count("/") > 1:
        return None  # a path that does not exist, not a hub id
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HFValidationError, LocalEntryNotFoundError

    try:
        return snapshot_download(name, local_files_only=True)
    except (LocalEntryNotFoundError, HFValidationError, OSError):
        return None


def has_http_tokenizer(model: str, tokenizer: str | None) -> bool:
    """Whether `load_http_tokenizer` will have a tokenizer to load (without loading it)."""
    return tokenizer is not None or offline_source(model) is not None


def load_http_tokenizer(model: str, tokenizer: str | None, trust_remote_code: bool = False) -> Any:
    """The tokenizer of the served model: `tokenizer` (model.tokenizer) when given, which must
    load; else `model` (model.model) when it loads offline; else None, logged once with why."""
    from selfalign.modeling import load_tokenizer

    if tokenizer is not None:
        try:
            return load_tokenizer(tokenizer, trust_remote_code)
        except UserError as e:
            raise UserError(f"model.tokenizer: {e}") from None
    source = offline_source(model)
    if source is None:
        log.info(
            "backend 'openai': no tokenizer (model.model %r is neither a local directory nor in "
            "the hub cache, and model.tokenizer is unset)", model,
        )  # fmt: skip
        return None
    try:
        return load_tokenizer(source, trust_remote_code)
    except UserError as e:
        log.info("backend 'openai': no tokenizer (%s; set model.tokenizer)", e)
        return None


class OpenAIBackend(Backend):
    # logit_bias maps token ids straight through; of the n-gram penalties only order 1 exists in
    # the protocol (frequency_penalty)
    CAPABILITIES = Capabilities(
        "openai", token_logit_bias=True, ngram_orders=frozenset({1}), tokenizer=False
    )

    def __init__(
        self,
        model: str,
        base_url: str,
        api_key_env: str = "OPENAI_API_KEY",
        concurrency: int = 16,
        timeout: float = 600.0,
        retries: int = 3,
        context: int | None = None,
        tokenizer: Any = None,
        backoff: float = 1.0,
    ):
        self.model = model
        self.base_url = base_url.rstrip("/")
        self._api_key = os.environ.get(api_key_env, "")
        self.concurrency = concurrency
        self.timeout = timeout
        self.retries = retries
        self.context = context
        self.tokenizer = tokenizer
        self.backoff = backoff  # seconds before the first retry, doubling (tests use 0)

    def request_body(self, prompt: str, params: SamplingParams, seed: int) -> dict:
        """The JSON body for one prompt; refuses what the protocol cannot express."""
        require(self, params)
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
            body["truncate_prompt_tokens"] = self._prompt_room(params)
        return body

    def _prompt_room(self, params: SamplingParams) -> int:
        """vLLM's `truncate_prompt_tokens`: the prompt tokens that fit beside max_tokens."""
        if self.context is None:
            raise UserError(
                "truncate_prompt='left' with an HTTP backend needs model.context (the server's "
                "max model length)"
            )
        if self.context - params.max_tokens < 1:
            raise UserError(
                f"max_tokens={params.max_tokens} leaves no room for a prompt in "
                f"model.context={self.context}; lower max_tokens"
            )
        return self.context - params.max_tokens

    def _post(self, body: dict) -> dict:
        """POST one request; HTTP 5xx and connection failures are retried with backoff."""
        headers = {"Content-Type": "application/json"}
        if self._api_key:
            headers["Authorization"] = f"Bearer {self._api_key}"
        data = json.dumps(body).encode()
        url = f"{self.base_url}/completions"
        for attempt in range(self.retries + 1):
            last = attempt == self.retries
            try:
                request = urllib.request.Request(url, data=data, headers=headers)
                with urllib.request.urlopen(request, timeout=self.timeout) as response:
                    return json.loads(response.read())
            except urllib.error.HTTPError as e:
                detail = " ".join(e.read().decode(errors="replace").split())[:300]
                if e.code < 500 or last:
                    tries = f" (after {attempt + 1} attempts)" if e.code >= 500 else ""
                    raise UserError(
                        f"{url}: HTTP {e.code} from the server{tries}: {detail}"
                    ) from None
            except (urllib.error.URLError, TimeoutError, ConnectionError) as e:
                if last:
                    reason = e.reason if isinstance(e, urllib.error.URLError) else e
                    raise UserError(f"{url}: cannot reach the server ({reason})") from None
            except json.JSONDecodeError:
                raise UserError(f"{url}: the server's reply is not JSON") from None
            time.sleep(min(self.backoff * 2**attempt, 30))
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
