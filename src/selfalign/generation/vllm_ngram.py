"""SELF-ALIGN's n-gram frequency penalties inside vLLM, as a custom logits processor.

The in-process `vllm` backend passes `NgramPenalty` to `vllm.LLM(logits_processors=[...])`; a vLLM
server loads it with

    python -m vllm.entrypoints.openai.api_server --model DIR \\
        --logits-processors selfalign.generation.vllm_ngram:NgramPenalty

(selfalign installed in the server's environment). Each request carries its weights as flat
scalar extra args (`ngram.ngram_args`): `SamplingParams.extra_args` in process, the request's
`vllm_xargs` over HTTP. Requests without them are not touched.

The arithmetic is `ngram.NgramCounts`, the same penalties the transformers backend applies
(tests compare both with a plain reference). It runs before temperature and top-p, like the
transformers backend's. This is vLLM's V1 logits-processor interface (vLLM 0.32, CPU and GPU
model runners alike); nothing here runs unless vLLM imports it.
"""

from __future__ import annotations

import torch
from vllm import SamplingParams
from vllm.v1.sample.logits_processor import BatchUpdate, LogitsProcessor
from vllm.v1.sample.logits_processor.builtin import process_dict_updates

from selfalign.generation.ngram import PROBE_ARG, PROBE_REPLY, NgramCounts, parse_ngram_args


class _Row:
    """One request's counts, fed from vLLM's live list of its output tokens."""

    def __init__(self, weights: dict[int, float], output_ids: list[int]):
        self.counts = NgramCounts(weights)
        self.output_ids = output_ids  # vLLM appends to this list as the request decodes

    def penalties(self) -> dict[int, float]:
        for token in self.output_ids[len(self.counts.tokens) :]:
            self.counts.add(token)
        return self.counts.penalties()


class NgramPenalty(LogitsProcessor):
    """Subtracts each request's n-gram penalties from its row of the logits."""

    def __init__(self, vllm_config, device: torch.device, is_pin_memory: bool):
        self.rows: dict[int, _Row] = {}  # batch index -> state, for requests with penalties

    @classmethod
    def validate_params(cls, sampling_params: SamplingParams) -> None:
        """Refuse bad weights at admission (a ValueError is HTTP 400; one raised in `apply`
        would kill the engine)."""
        args = sampling_params.extra_args or {}
        if PROBE_ARG in args:
            raise ValueError(PROBE_REPLY)
        parse_ngram_args(args)

    def is_argmax_invariant(self) -> bool:
        return False  # penalties change which token is most likely

    def update_state(self, batch_update: BatchUpdate | None) -> None:
        process_dict_updates(self.rows, batch_update, self._new_row)

    @staticmethod
    def _new_row(params: SamplingParams, prompt_ids, output_ids: list[int]) -> _Row | None:
        weights = {n: a for n, a in parse_ngram_args(params.extra_args).items() if a}
        return _Row(weights, output_ids) if weights else None

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        rows: list[int] = []
        cols: list[int] = []
        values: list[float] = []
        for index, row in self.rows.items():
            for token, penalty in row.penalties().items():
                rows.append(index)
                cols.append(token)
                values.append(-penalty)
        if rows:
            at = (
                torch.tensor(rows, device=logits.device),
                torch.tensor(cols, device=logits.device),
            )
            logits.index_put_(at, torch.tensor(values, dtype=logits.dtype, device=logits.device),
                              accumulate=True)  # fmt: skip
        return logits
