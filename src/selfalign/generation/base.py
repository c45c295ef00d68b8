"""The generation contract every backend honours.

`generate(prompts, params)` returns one `Completion` per prompt, in input order. `iter_batches`
yields lists of `(index, Completion)` as batches finish, so a caller can append them to disk and
resume after a crash. Sampling parameters use OpenAI/vLLM names, plus SELF-ALIGN's n-gram
frequency penalties. A backend that cannot honour a parameter raises `UserError`; it never
ignores one silently.

What a backend can do is data, not guesswork: each backend type declares its `Capabilities`
(known from the config, before any model is loaded), every backend has a `tokenizer` (None when
it has none) and `eos_token_ids`, and `require` turns a stage's needs into one error line naming
the config key and the fix, so a stage refuses before any work instead of quietly doing less.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from selfalign.errors import UserError


class SamplingParams(BaseModel):
    """How to sample one completion per prompt (names follow OpenAI/vLLM)."""

    model_config = ConfigDict(extra="forbid")

    temperature: float = Field(1.0, ge=0.0, description="0 means greedy decoding.")
    top_p: float = Field(1.0, gt=0.0, le=1.0, description="Nucleus sampling mass.")
    max_tokens: int = Field(256, ge=1, description="New tokens at most per completion.")
    stop: list[str] = Field(
        default_factory=list,
        description="Stop strings; the completion is cut before the first one.",
    )
    seed: int | None = Field(
        None, description="Makes sampling reproducible; each row gets its own stream."
    )
    logit_bias: dict[int, float] = Field(
        default_factory=dict,
        description="Token id -> bias added to its logit before sampling, -100..100 (OpenAI's "
        "range; vLLM clamps to it, so every backend takes the same).",
    )
    ngram_penalties: dict[int, float] = Field(
        default_factory=dict,
        description="n (1..4) -> weight a_n: each candidate token is penalised a_n times the count of the "
        "n-gram (last n-1 generated tokens, candidate) already in this completion.",
    )
    truncate_prompt: Literal["error", "left"] = Field(
        "error",
        description="A prompt that does not fit the context with max_tokens: 'error' names it; "
        "'left' drops tokens from its START, keeping the question at its end.",
    )

    @field_validator("ngram_penalties")
    @classmethod
    def _orders(cls, v: dict[int, float]) -> dict[int, float]:
        bad = [n for n in v if not 1 <= n <= 4]
        if bad:
            raise ValueError(f"n-gram penalty orders must be 1..4, got {bad}")
        return v

    @field_validator("logit_bias")
    @classmethod
    def _bias_range(cls, v: dict[int, float]) -> dict[int, float]:
        bad = {t: b for t, b in v.items() if not -100 <= b <= 100}
        if bad:
            raise ValueError(f"logit biases must be within -100..100, got {bad}")
        return v

    @field_validator("stop")
    @classmethod
    def _no_empty_stop(cls, v: list[str]) -> list[str]:
        if any(s == "" for s in v):
            raise ValueError("a stop string cannot be empty")
        return v


@dataclass(frozen=True)
class Completion:
    text: str
    finish_reason: Literal["stop", "length"]
    prompt_tokens: int
    completion_tokens: int


def row_seed(seed: int, key: str | int) -> int:
    """A 63-bit seed for one record, stable across runs, batchings, shards and machines."""
    digest = hashlib.sha256(f"{seed}:{key}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


class PromptTooLong(UserError):
    def __init__(self, index: int, prompt_tokens: int, max_tokens: int, context: int):
        self.index = index
        super().__init__(
            f"prompt #{index} has {prompt_tokens} tokens; with max_tokens={max_tokens} it needs "
            f"{prompt_tokens + max_tokens} > the model's context of {context}. Shorten it, lower "
            "max_tokens, or opt into truncate_prompt='left' (keeps the end of the prompt)"
        )


def encode_prompts(
    tokenizer, prompts: Sequence[str], params: SamplingParams, context: int
) -> list[list[int]]:
    """Token ids per prompt (special tokens added), checked against `context - max_tokens`: a
    prompt that does not fit is an error naming it, or, with truncate_prompt='left', loses
    tokens from its start (its BOS kept), never from its end."""
    limit = context - params.max_tokens
    encoded = tokenizer(list(prompts), add_special_tokens=True)["input_ids"]
    for i, ids in enumerate(encoded):
        if len(ids) <= limit:
            continue
        if params.truncate_prompt == "error" or limit < 2:
            raise PromptTooLong(i, len(ids), params.max_tokens, context)
        bos = ids[:1] if ids[0] == tokenizer.bos_token_id else []
        encoded[i] = bos + ids[len(ids) - (limit - len(bos)) :]
    return encoded


@dataclass(frozen=True)
class Capabilities:
    """What a backend type can honour, known from its config without loading a model."""

    backend: str  # its name in messages: "transformers", "openai", "scripted"
    token_logit_bias: bool  # applies SamplingParams.logit_bias (token id -> bias)
    ngram_orders: frozenset[int]  # the n-gram penalty orders it applies
    tokenizer: bool  # has a tokenizer: EOS ids, token ids of words, chat templates
    # Completions come from Python (tests, dry runs), not from sampled tokens: token-level
    # controls (logit biases, n-gram penalties, biases found through a tokenizer) have nothing
    # to act on, so they are accepted without being required.
    canned: bool = False

    def with_tokenizer(self, has: bool) -> Capabilities:
        return replace(self, tokenizer=has)


ALL_NGRAM_ORDERS = frozenset({1, 2, 3, 4})


@dataclass(frozen=True)
class Need:
    """A feature a stage switched on that needs the backend's tokenizer."""

    feature: str  # "EOS suppression"
    switch_off: str = ""  # the setting that turns the feature off ("" when it cannot be)
    what: str = "the model's tokenizer"
    token_logit_bias: bool = False  # the feature biases token ids found through the tokenizer


class Backend:
    """Base class: subclasses set `CAPABILITIES` and implement `iter_batches`."""

    CAPABILITIES: ClassVar[Capabilities]
    tokenizer: Any = None  # the model's tokenizer (transformers API), or None

    @property
    def capabilities(self) -> Capabilities:
        """The type's capabilities, with `tokenizer` as this backend actually has it."""
        return self.CAPABILITIES.with_tokenizer(self.tokenizer is not None)

    @property
    def eos_token_ids(self) -> frozenset[int]:
        """Token ids that end a completion (empty without a tokenizer)."""
        eos = None if self.tokenizer is None else self.tokenizer.eos_token_id
        return frozenset() if eos is None else frozenset({int(eos)})

    def iter_batches(
        self,
        prompts: Sequence[str],
        params: SamplingParams,
        seeds: Sequence[int] | None = None,
    ) -> Iterator[list[tuple[int, Completion]]]:
        """Yield one list of `(index, completion)` per finished batch; every index once.

        `seeds` gives each row its own random stream (default: derived from `params.seed` and the
        row's index), so sampled text does not depend on how rows are batched.
        """
        raise NotImplementedError

    def generate(
        self,
        prompts: Sequence[str],
        params: SamplingParams,
        seeds: Sequence[int] | None = None,
    ) -> list[Completion]:
        """One completion per prompt, in input order."""
        out: list[Completion | None] = [None] * len(prompts)
        for batch in self.iter_batches(prompts, params, seeds):
            for index, completion in batch:
                out[index] = completion
        missing = [i for i, c in enumerate(out) if c is None]
        if missing:
            raise RuntimeError(f"backend returned no completion for prompts {missing[:5]}")
        return out  # type: ignore[return-value]

    def close(self) -> None:
        """Release the model (GPU memory); the default has nothing to release."""


def require(
    backend: Backend | Capabilities,
    params: SamplingParams | None = None,
    where: str | None = None,
    key: str = "sampling",
    needs: Sequence[Need] = (),
) -> None:
    """Refuse, in one `UserError` line, the first thing `backend` cannot honour.

    `params` are checked against the backend's logit bias and n-gram orders (`key` is their
    config key, e.g. "verbose.sampling"); each of `needs` against its tokenizer. `where` (e.g.
    "stage 'verbose'") starts the message. Pass a loaded backend, or `capabilities(cfg)` in a
    preflight before any model is loaded.
    """
    caps = backend.capabilities if isinstance(backend, Backend) else backend
    problem = _params_problem(caps, params, key) if params is not None else None
    for need in needs:
        if problem is None:
            problem = _need_problem(caps, need)
    if problem is not None:
        raise UserError(f"{where}: {problem}" if where else problem)


def _params_problem(caps: Capabilities, params: SamplingParams, key: str) -> str | None:
    if caps.canned:
        return None
    if params.logit_bias and not caps.token_logit_bias:
        return (
            f"backend {caps.backend!r} cannot bias token ids ({key}.logit_bias); remove it or "
            "use backend transformers"
        )
    orders = sorted(
        n for n, a in params.ngram_penalties.items() if a and n not in caps.ngram_orders
    )
    if orders:
        return (
            f"backend {caps.backend!r} cannot apply n-gram penalties of order"
            f"{'s' if len(orders) > 1 else ''} {', '.join(map(str, orders))} "
            f"({key}.ngram_penalties); remove them, or run them in vLLM (model.backend: vllm, "
            "or model.server: vllm for a vLLM server) or with backend transformers"
        )
    return None


def _need_problem(caps: Capabilities, need: Need) -> str | None:
    if caps.canned and need.token_logit_bias:
        return None
    off = f", or switch it off with {need.switch_off}" if need.switch_off else ""
    if need.token_logit_bias and not caps.token_logit_bias:
        return (
            f"{need.feature} biases token ids, which backend {caps.backend!r} cannot do; use "
            f"backend transformers{off}"
        )
    if not caps.tokenizer:
        return (
            f"{need.feature} needs {need.what}, and backend {caps.backend!r} has none; set "
            f"model.tokenizer to the served model's tokenizer (a local directory or hub id){off}"
        )
    return None


def check_logit_bias(params: SamplingParams, vocab_size: int, hint: str = "") -> None:
    """Refuse, in one line, logit-bias token ids outside 0..vocab_size-1 (before any work)."""
    bad = sorted(t for t in params.logit_bias if not 0 <= t < vocab_size)
    if bad:
        raise UserError(
            f"logit_bias: token ids {', '.join(map(str, bad))} are outside the vocabulary "
            f"(0..{vocab_size - 1}){hint}"
        )


def decoded_text(tokenizer, eos: frozenset[int], choice_text: str, token_ids, stopped_by) -> str:
    """A vLLM completion's text as every backend writes it: decoded from its token ids (EOS
    dropped) unless a stop string cut it (`stopped_by` is that string; the engine's cut text is
    kept then). vLLM's own incremental text holds back a trailing partial UTF-8 character."""
    if isinstance(stopped_by, str):
        return choice_text
    return tokenizer.decode([t for t in token_ids if t not in eos], skip_special_tokens=True)


def resolve_seeds(n: int, params: SamplingParams, seeds: Sequence[int] | None) -> list[int]:
    if seeds is not None:
        if len(seeds) != n:
            raise ValueError(f"got {len(seeds)} seeds for {n} prompts")
        return list(seeds)
    base = params.seed if params.seed is not None else random.getrandbits(63)
    return [row_seed(base, i) for i in range(n)]
