"""Generation through an OpenAI-compatible completions server: `vllm serve`, llama.cpp's server,
SGLang, TGI.

Reads `GET {base_url}/models` once when the backend is made, then sends one
`POST {base_url}/completions` per prompt; the API key comes from the environment variable
`model.api_key_env` and appears in no message or log line. Writes nothing.

Exact requests. A server fills every sampling field a request leaves out with its own default
(llama.cpp: top_k 40, min_p 0.05; vLLM: the model's generation_config.json), so each request
carries every field the configured server (`model.server`) would otherwise default, set to its
neutral value (`NEUTRAL`), then `model.extra_body` on top (its values win; a dict value is merged
into ours). Each prompt carries its own seed (`seed % 2**31`), so its text does not depend on how
requests are batched. Left truncation is vLLM's `truncate_prompt_tokens` (context - max_tokens).

n-gram penalties: order 1 is OpenAI's `frequency_penalty`. Orders 2-4 need `model.server: vllm`
with selfalign's logits processor loaded: then all orders travel in `vllm_xargs` (one place applies
each order, so `frequency_penalty` stays 0), and before the first such job the backend probes
once that the server has the processor.

Checks before any request of a job: what the server cannot do (`require`), logit-bias ids
against the tokenizer's vocabulary. When the backend is made: the model name against the
server's `/models` (a server without that endpoint only gets a warning).

Failures: HTTP 429, 5xx, a lost connection or no reply within `timeout` seconds are retried
`retries` times with exponential backoff (or the server's Retry-After, capped), one WARNING line
per retry; any other HTTP error fails at once. Every failure is one `UserError` line.

The pool: up to `concurrency` requests are in flight and a new one starts as soon as any
finishes; finished rows are yielded as they come. When a row fails for good, the rows already
finished are yielded first (the caller appends them to disk, so a resumed run keeps them), then
its error is raised and the requests still in flight are abandoned.

Token counts are passed through from the server's `usage`. `completion_tokens` is the number of
tokens the model generated, including the EOS or the token that completed a stop string (though
neither is in the text), as vLLM and the transformers backend count them. From a vLLM server
the token ids come back too (`return_token_ids`), and text that no stop string cut is decoded
here from them, as the in-process backends decode it.

The server tokenizes, but stages still need the tokenizer here (EOS ids to suppress, the token ids
of "Sorry", chat templates): it is read from `model.tokenizer`, or else from `model.model` when
that is a local directory or in the hub cache; the hub is never asked for it implicitly.
"""

from __future__ import annotations

import json
import logging
import os
import queue
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from selfalign.errors import UserError
from selfalign.generation.base import (
    ALL_NGRAM_ORDERS,
    Backend,
    Capabilities,
    Completion,
    SamplingParams,
    check_logit_bias,
    decoded_text,
    require,
    resolve_seeds,
)
from selfalign.generation.http import (  # noqa: F401 (MAX_RETRY_WAIT, retry_wait: re-exported)
    MAX_RETRY_WAIT,
    Client,
    RequestFailed,
    retry_wait,
)
from selfalign.generation.http import wait as _wait
from selfalign.generation.ngram import PROBE_ARG, PROBE_REPLY, ngram_args

if TYPE_CHECKING:
    from selfalign.generation import BackendConfig

log = logging.getLogger(__name__)

# The neutral value of every sampling field a server defaults when a request leaves it out
# (presence and frequency penalties are sent to every server). vLLM takes top_k -1 as "off" in
# every version (newer ones also 0, older ones only -1); llama.cpp takes 0.
NEUTRAL: dict[str, dict[str, Any]] = {
    "vllm": {"repetition_penalty": 1.0, "top_k": -1, "min_p": 0.0},
    "llama.cpp": {"repeat_penalty": 1.0, "top_k": 0, "min_p": 0.0, "typical_p": 1.0},
    "generic": {},
}
PROBE_PROMPT = "Hello"  # not empty: some servers refuse an empty prompt before any processor


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
    # the protocol (frequency_penalty); a vLLM server with selfalign's processor applies them all
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
        server: str = "generic",
        extra_body: dict[str, Any] | None = None,
        on_close: Callable[[], None] | None = None,
    ):
        if not base_url.startswith(("http://", "https://")):
            raise UserError(
                f"model.base_url must be an http(s) URL, e.g. http://localhost:8000/v1; got "
                f"{base_url!r}"
            )
        self.model = model  # the name the server serves it under
        self.base_url = base_url.rstrip("/")
        self._api_key = os.environ.get(api_key_env, "")
        self.concurrency = concurrency
        self.timeout = timeout
        self.retries = retries
        self.context = context
        self.tokenizer = tokenizer
        self.backoff = backoff  # seconds before the first retry, doubling (tests use 0)
        self.server = server
        self.extra_body = dict(extra_body or {})
        self.on_close = on_close
        self.CAPABILITIES = self.capabilities_of(server)
        self._probed = False  # the n-gram processor was found on the server

    @classmethod
    def from_config(
        cls,
        cfg: BackendConfig,
        base_url: str | None = None,
        served_name: str | None = None,
        on_close: Callable[[], None] | None = None,
    ) -> OpenAIBackend:
        """The backend of `cfg` (explicit arguments win over cfg's), its model name checked
        against the server's /models. `on_close` runs in `close()` (e.g. stops the server)."""
        tokenizer = load_http_tokenizer(cfg.model, cfg.tokenizer, cfg.trust_remote_code)
        backend = cls(
            served_name or cfg.served_name or cfg.model, base_url or cfg.base_url or "",
            cfg.api_key_env, cfg.concurrency, cfg.timeout, cfg.retries, cfg.context, tokenizer,
            server=cfg.server, extra_body=cfg.extra_body, on_close=on_close,
        )  # fmt: skip
        backend.check_served_model()
        return backend

    @classmethod
    def capabilities_of(cls, server: str) -> Capabilities:
        """CAPABILITIES, with every n-gram order on vLLM (through selfalign's processor)."""
        if server == "vllm":
            return replace(cls.CAPABILITIES, ngram_orders=ALL_NGRAM_ORDERS)
        return cls.CAPABILITIES

    @classmethod
    def capabilities_for(cls, cfg: BackendConfig) -> Capabilities:
        """What the backend of `cfg` can honour, known without asking the server."""
        caps = cls.capabilities_of(cfg.server)
        return caps.with_tokenizer(has_http_tokenizer(cfg.model, cfg.tokenizer))

    def close(self) -> None:
        on_close, self.on_close = self.on_close, None  # run it once
        if on_close is not None:
            on_close()

    # -- checks --------------------------------------------------------------------------------

    def check_served_model(self) -> None:
        """Refuse a model name the server does not serve (GET /models); a server without that
        endpoint, or with a reply that is not a model list, gets one WARNING line."""
        url = f"{self.base_url}/models"
        try:
            reply = json.loads(self._send("/models"))
            served = [m["id"] for m in reply["data"]]
        except RequestFailed as e:
            if e.status not in (404, 405):
                raise
            log.warning("%s: no model list (HTTP %s); the model name is not checked", url, e.status)
            return
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError):
            log.warning("%s: the reply is not a model list; the model name is not checked", url)
            return
        if self.model not in served:
            raise UserError(
                f"the server at {self.base_url} does not serve model {self.model!r} (it serves "
                f"{', '.join(map(repr, served)) or 'nothing'}): set model.served_name (or "
                f"model.model) to its name, start the server on {self.model!r}, or use "
                "model.serve: auto"
            )

    def _check_job(self, params: SamplingParams) -> None:
        """Refuse, before any request, what this job asks and the server cannot do."""
        require(self, params)
        if params.truncate_prompt == "left":
            self._prompt_room(params)
        if params.logit_bias and self.tokenizer is not None:
            size = len(self.tokenizer)
            hint = "; model.tokenizer must be the served model's tokenizer"
            check_logit_bias(params, size, hint)
        if self._via_processor(params) and not self._probed:
            self._probe_ngram_processor()

    def _via_processor(self, params: SamplingParams) -> bool:
        """Whether the job's n-gram penalties go to selfalign's logits processor (orders 2-4)."""
        return self.server == "vllm" and any(a for n, a in params.ngram_penalties.items() if n > 1)

    def _probe_ngram_processor(self) -> None:
        """The processor refuses a request carrying PROBE_ARG with PROBE_REPLY; a server without
        it ignores the argument and answers."""
        body = {"model": self.model, "prompt": PROBE_PROMPT, "max_tokens": 1}
        try:
            self._send("/completions", {**body, "vllm_xargs": {PROBE_ARG: 1}})
        except RequestFailed as e:
            if e.status == 400 and PROBE_REPLY in e.detail:
                self._probed = True
                return
            raise UserError(f"checking for selfalign's n-gram logits processor: {e}") from None
        raise UserError(
            f"the vLLM server at {self.base_url} was started without selfalign's n-gram logits "
            "processor; start it with --logits-processors "
            "selfalign.generation.vllm_ngram:NgramPenalty (selfalign installed in the server's "
            "environment) or set model.serve: auto"
        )

    # -- one request ---------------------------------------------------------------------------

    def request_body(self, prompt: str, params: SamplingParams, seed: int) -> dict:
        """The JSON body for one prompt: every field the server would default, set."""
        penalties = {n: a for n, a in params.ngram_penalties.items() if a}
        body: dict[str, Any] = {
            "model": self.model,
            "prompt": prompt,
            "temperature": params.temperature,
            "top_p": params.top_p,
            "max_tokens": params.max_tokens,
            "seed": seed,
            "presence_penalty": 0.0,
            "frequency_penalty": 0.0,
            **NEUTRAL[self.server],
        }
        if params.stop:
            body["stop"] = params.stop
        if params.logit_bias:
            body["logit_bias"] = {str(k): v for k, v in params.logit_bias.items()}
        if self._via_processor(params):
            body["vllm_xargs"] = ngram_args(penalties)
        elif 1 in penalties:
            body["frequency_penalty"] = penalties[1]
        if self.server == "vllm":  # decoded here, as every backend decodes (see _text)
            body["return_token_ids"] = True
        if params.truncate_prompt == "left":
            body["truncate_prompt_tokens"] = self._prompt_room(params)
            if self.server == "vllm":  # vLLM's default side is the tokenizer's: say it
                body["truncation_side"] = "left"
        for key, value in self.extra_body.items():  # the user's values win
            merge = isinstance(value, dict) and isinstance(body.get(key), dict)
            body[key] = {**body[key], **value} if merge else value
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

    def _send(
        self, path: str, body: dict | None = None, cancel: threading.Event | None = None
    ) -> bytes:
        """GET `path` (POST `body` when given) and return the reply, retried as
        `selfalign.generation.http` says until `cancel` is set; else raises RequestFailed."""
        client = Client(self.base_url, self._api_key, self.timeout, self.retries, self.backoff)
        # _wait is looked up here, at call time, so tests can replace it and skip the sleeping
        return client.send(path, body, cancel, pause=_wait)

    def _complete(
        self, prompt: str, params: SamplingParams, seed: int, cancel: threading.Event | None
    ) -> Completion:
        raw = self._send("/completions", self.request_body(prompt, params, seed), cancel)
        try:
            reply = json.loads(raw)
            choice = reply["choices"][0]
            usage = reply.get("usage") or {}
            reason = "length" if choice.get("finish_reason") == "length" else "stop"
            return Completion(
                self._text(choice),
                reason,
                int(usage.get("prompt_tokens", 0)),
                int(usage.get("completion_tokens", 0)),
            )
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, IndexError, TypeError):
            text = " ".join(raw.decode(errors="replace").split())[:200]
            raise UserError(f"{self.base_url}/completions: unexpected reply {text!r}") from None

    def _text(self, choice: dict) -> str:
        """The completion's text; with its token ids (vLLM's return_token_ids) and a tokenizer,
        as the in-process backends write it (`decoded_text`)."""
        ids = choice.get("token_ids")
        if ids is None or self.tokenizer is None:
            return choice["text"]
        return decoded_text(self.tokenizer, self.eos_token_ids, choice["text"], ids,
                            choice.get("stop_reason"))  # fmt: skip

    # -- the pool ------------------------------------------------------------------------------

    def iter_batches(
        self, prompts: Sequence[str], params: SamplingParams, seeds: Sequence[int] | None = None
    ) -> Iterator[list[tuple[int, Completion]]]:
        """Yield the rows finished since the last yield, as they finish (see the module doc)."""
        row_seeds = resolve_seeds(len(prompts), params, seeds)
        self._check_job(params)
        if not prompts:
            return
        todo: queue.SimpleQueue[int] = queue.SimpleQueue()
        for i in range(len(prompts)):
            todo.put(i)
        done: queue.SimpleQueue[tuple[int, Completion | Exception]] = queue.SimpleQueue()
        cancel = threading.Event()

        def work() -> None:
            while not cancel.is_set():
                try:
                    i = todo.get_nowait()
                except queue.Empty:
                    return
                try:
                    done.put((i, self._complete(prompts[i], params, row_seeds[i] % 2**31, cancel)))
                except Exception as e:  # the job is lost: start no other request; main raises it
                    cancel.set()
                    done.put((i, e))

        # daemon threads: a request still in flight when the job fails must not hold up the exit
        for _ in range(min(self.concurrency, len(prompts))):
            threading.Thread(target=work, daemon=True, name="selfalign-openai").start()
        try:
            yield from self._collect(done, len(prompts))
        finally:
            cancel.set()  # also when the caller stops early: no new requests, no more retries

    @staticmethod
    def _collect(done: queue.SimpleQueue, total: int) -> Iterator[list[tuple[int, Completion]]]:
        """Lists of finished rows as they arrive; a failure is raised after the rows that
        finished before it (or with it) were yielded."""
        received = 0
        while received < total:
            arrived = [done.get()]
            while not done.empty():
                arrived.append(done.get())
            received += len(arrived)
            rows = [(i, c) for i, c in arrived if isinstance(c, Completion)]
            if rows:
                yield rows
            failures = [c for _, c in arrived if not isinstance(c, Completion)]
            if failures:
                raise failures[0]
