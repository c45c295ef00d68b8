"""A backend that answers from a Python function: canned completions for tests and dry runs."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence

from selfalign.generation.base import Backend, Completion, SamplingParams, resolve_seeds


class ScriptedBackend(Backend):
    """`respond(prompt, seed)` returns the completion text (or a full `Completion`).

    Stop strings cut the text as a real backend would; a text is "length"-finished when it has
    more whitespace-separated words than `max_tokens` (cut to that many).
    """

    def __init__(self, respond: Callable[[str, int], str | Completion], batch_size: int = 4):
        self.respond = respond
        self.batch_size = batch_size
        self.calls: list[str] = []  # every prompt seen, for assertions

    def iter_batches(
        self, prompts: Sequence[str], params: SamplingParams, seeds: Sequence[int] | None = None
    ) -> Iterator[list[tuple[int, Completion]]]:
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
