"""A backend that answers from a Python function: canned completions for tests and dry runs."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Any

from selfalign.generation.base import (
    ALL_NGRAM_ORDERS,
    Backend,
    Capabilities,
    Completion,
    SamplingParams,
    require,
    resolve_seeds,
)


class ScriptedBackend(Backend):
    """`respond(prompt, seed)` returns the completion text (or a full `Completion`).

    Stop strings cut the text as a real backend would; a text is "length"-finished when it has
    more whitespace-separated words than `max_tokens` (cut to that many). Logit biases and
    n-gram penalties have no tokens to act on and are accepted as they are.

    `tokenizer` (default none) is what stages read from `backend.tokenizer` (EOS ids, chat
    templates). `capabilities` makes it stand in for another backend type, e.g.
    `OpenAIBackend.CAPABILITIES`, refusing what that type refuses.
    """

    CAPABILITIES = Capabilities(
        "scripted", token_logit_bias=True, ngram_orders=ALL_NGRAM_ORDERS, tokenizer=False,
        canned=True,
    )  # fmt: skip

    def __init__(
        self,
        respond: Callable[[str, int], str | Completion],
        batch_size: int = 4,
        tokenizer: Any = None,
        capabilities: Capabilities | None = None,
    ):
        self.respond = respond
        self.batch_size = batch_size
        self.tokenizer = tokenizer
        if capabilities is not None:
            self.CAPABILITIES = capabilities
        self.calls: list[str] = []  # every prompt seen, for assertions

    def iter_batches(
        self, prompts: Sequence[str], params: SamplingParams, seeds: Sequence[int] | None = None
    ) -> Iterator[list[tuple[int, Completion]]]:
        require(self, params)
        row_seeds = resolve_seeds(len(prompts), params, seeds)
        for start in range(0, len(prompts), self.batch_size):
            batch = []
            for i in range(start, min(start + self.batch_size, len(prompts))):
                self.calls.append(prompts[i])
                batch.append((i, self._complete(prompts[i], params, row_seeds[i])))
            yield batch

    def _complete(self, prompt: str, params: SamplingParams, seed: int) -> Completion:
        answer = self.respond(prompt, seed)
        if isinstance(answer, Completion):
            return answer
        cuts = [i for s in params.stop if (i := answer.find(s)) >= 0]
        if cuts:
            text, reason = answer[: min(cuts)], "stop"
        else:
            text, reason = answer, "stop"
        words = text.split(" ")
        if len(words) > params.max_tokens:
            text, reason = " ".join(words[: params.max_tokens]), "length"
        return Completion(text, reason, len(prompt.split()), len(text.split(" ")))
