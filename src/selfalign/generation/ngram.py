"""SELF-ALIGN's n-gram frequency penalties, for every backend that applies them.

For order n with weight a_n, a candidate token t costs a_n times the number of times the n-gram
(last n-1 generated tokens, t) already occurs in the completion's generated tokens (the prompt
does not count); the orders add up. Order 1 is OpenAI's `frequency_penalty`.

Two forms of the same arithmetic: `ngram_penalty` scores a whole batch from its histories (the
transformers backend, vectorised), and `NgramCounts` keeps one completion's counts up to date one
token at a time (vLLM's logits processor: each step costs O(orders), not O(history)). Per-request
settings travel to vLLM as flat scalar `extra_args` (`ngram_args`), which its server accepts in a
request's `vllm_xargs`.
"""

from __future__ import annotations

from collections import defaultdict

import torch

ARG_PREFIX = "selfalign_ngram_"  # extra_args key of order n: f"{ARG_PREFIX}{n}" -> weight
# A request carrying this key is refused by the logits processor with PROBE_REPLY (HTTP 400):
# how a client learns that a vLLM server was started with the processor.
PROBE_ARG = "selfalign_probe"
PROBE_REPLY = "selfalign n-gram logits processor is loaded"


def ngram_penalty(
    generated: torch.Tensor, penalties: dict[int, float], vocab_size: int
) -> torch.Tensor:
    """Penalty per (row, candidate token) for SELF-ALIGN's n-gram frequency penalties.

    For order n with weight a_n, candidate t costs a_n times the number of times the n-gram
    (last n-1 generated tokens, t) already occurs in the row's generated tokens; orders add up.
    `generated` is [rows, steps] (generated tokens only, the first one included).
    """
    rows, steps = generated.shape
    total = torch.zeros(rows, vocab_size, dtype=torch.float32, device=generated.device)
    for n, weight in penalties.items():
        if weight == 0 or steps < n:
            continue
        windows = generated.unfold(1, n, 1)  # [rows, steps-n+1, n]: every n-gram seen so far
        if n == 1:
            hits = torch.ones(windows.shape[:2], dtype=torch.float32, device=generated.device)
        else:
            context = generated[:, steps - n + 1 :]  # the last n-1 tokens
            hits = (windows[:, :, :-1] == context[:, None, :]).all(-1).float()
        total.scatter_add_(1, windows[:, :, -1], hits * weight)
    return total


class NgramCounts:
    """One completion's n-gram counts, fed its generated tokens in order.

    `penalties()` gives the (token, penalty) pairs of the next step: only tokens that would
    repeat a seen n-gram are penalised, so a step costs one dictionary lookup per order.
    """

    def __init__(self, weights: dict[int, float]):
        self.weights = {n: a for n, a in weights.items() if a}
        self.tokens: list[int] = []
        # order n -> (the n-1 tokens before, as a tuple) -> next token -> count
        self.counts = {n: defaultdict(lambda: defaultdict(int)) for n in self.weights}

    def add(self, token: int) -> None:
        self.tokens.append(token)
        for n, table in self.counts.items():
            if len(self.tokens) >= n:
                table[tuple(self.tokens[len(self.tokens) - n : -1])][token] += 1

    def penalties(self) -> dict[int, float]:
        """Token -> total penalty for the next step."""
        out: dict[int, float] = defaultdict(float)
        for n, table in self.counts.items():
            if len(self.tokens) < n - 1:
                continue
            context = tuple(self.tokens[len(self.tokens) - (n - 1) :]) if n > 1 else ()
            for token, count in table.get(context, {}).items():
                out[token] += self.weights[n] * count
        return out


def ngram_args(penalties: dict[int, float]) -> dict[str, float]:
    """The penalties as flat scalar extra args (a vLLM server refuses nested values)."""
    return {f"{ARG_PREFIX}{n}": float(a) for n, a in sorted(penalties.items()) if a}


def parse_ngram_args(args: dict | None) -> dict[int, float]:
    """The penalties in a request's extra args; ValueError naming a bad key or value."""
    out: dict[int, float] = {}
    for key, value in (args or {}).items():
        if not key.startswith(ARG_PREFIX):
            continue
        order = key[len(ARG_PREFIX) :]
        if order not in ("1", "2", "3", "4"):
            raise ValueError(f"{key}: n-gram orders are 1..4")
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ValueError(f"{key}: the weight must be a number, got {value!r}")
        out[int(order)] = float(value)
    return out
