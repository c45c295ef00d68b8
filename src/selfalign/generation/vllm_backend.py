"""In-process generation with vLLM (`model.backend: vllm`): the engine for paper-scale runs.

One `vllm.LLM` engine behind the backend contract: prompts are tokenized here (the same checks
and left truncation as the transformers backend), each row is one engine request with its own
seed, and rows are yielded as the engine finishes them (about once a second), so a crash loses
at most a second of work. Automatic prefix caching is on: a stage's constitution or meta prompt
is computed once and shared by every request. The paper's n-gram penalties run inside the engine
through selfalign's logits processor (`vllm_ngram.NgramPenalty`).

`completion_tokens` counts the tokens the model generated, the EOS or the token that completed
a stop string included, as the transformers backend counts them.

`close()` shuts the engine down (its worker processes and their memory), so a training stage
that follows gets the GPU back.
"""

from __future__ import annotations

import itertools
import logging
import os
import time
from collections.abc import Iterator, Sequence
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
    encode_prompts,
    resolve_seeds,
)
from selfalign.generation.ngram import ngram_args

if TYPE_CHECKING:
    from selfalign.generation import BackendConfig

log = logging.getLogger(__name__)

MAX_IN_FLIGHT = 4096  # requests handed to the engine at once (it schedules its own batches)
DEFAULT_CPU_BATCH_TOKENS = 8192  # tokens per engine step on CPU (at least one whole prompt)
YIELD_EVERY = 1.0  # seconds between handing finished rows to the caller (each is an fsync)
INSTALL_HINT = (
    "backend 'vllm' needs vLLM in this environment: pip install 'selfalign[vllm]' on a GPU "
    "machine, or `make vllm` for vLLM's CPU build"
)


def import_vllm():
    """vLLM, imported with its own log at ERROR: its start-up warnings are about vLLM's
    internals, not the run (VLLM_LOGGING_LEVEL=INFO shows them)."""
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "ERROR")
    try:
        import vllm
    except ImportError as e:
        raise UserError(f"{INSTALL_HINT} ({e})") from None
    return vllm


def engine_args(cfg: BackendConfig) -> dict[str, Any]:
    """`vllm.LLM` keyword arguments from the model config (also the server's flags)."""
    import torch

    from selfalign.modeling import _check_exists, adapter_base, configured_context

    _check_exists(cfg.model)
    if adapter_base(cfg.model):
        raise UserError(
            f"model {cfg.model!r} is a LoRA adapter; vLLM loads merged models (stage 3 writes "
            "one next to the adapter unless engrave.merge is false)"
        )
    on_gpu = torch.cuda.is_available()
    args = {
        "model": cfg.model,
        # auto on CPU: float32, as the transformers backend
        "dtype": "float32" if cfg.dtype == "auto" and not on_gpu else cfg.dtype,
        "tensor_parallel_size": cfg.tensor_parallel_size,
        "gpu_memory_utilization": cfg.gpu_memory_utilization,
        "max_model_len": cfg.context,
        "trust_remote_code": cfg.trust_remote_code,
        "enable_prefix_caching": cfg.share_prefix,
        # CUDA graphs and torch.compile pay off on GPUs; on CPU they only add start-up time
        "enforce_eager": not on_gpu,
    }
    if not on_gpu:
        # vLLM 0.32 on CPU fails a seeded request whose prompt is prefilled in chunks ("CPU
        # Generator does not use offset"): every prompt is prefilled in one step instead.
        context = cfg.context or configured_context(cfg.model) or DEFAULT_CPU_BATCH_TOKENS
        args["enable_chunked_prefill"] = False
        args["max_num_batched_tokens"] = max(context, DEFAULT_CPU_BATCH_TOKENS)
    return args


class VllmBackend(Backend):
    CAPABILITIES = Capabilities(
        "vllm", token_logit_bias=True, ngram_orders=ALL_NGRAM_ORDERS, tokenizer=True
    )

    def __init__(self, llm: Any, tokenizer: Any, eos_token_ids: frozenset[int]):
        self.llm, self.tokenizer, self._eos = llm, tokenizer, eos_token_ids
        model_config = llm.llm_engine.model_config
        self.context = model_config.max_model_len
        self.vocab_size = model_config.get_vocab_size()
        self._ids = itertools.count()

    @classmethod
    def load(cls, cfg: BackendConfig) -> VllmBackend:
        from selfalign.generation.vllm_ngram import NgramPenalty
        from selfalign.modeling import load_tokenizer, model_eos_ids

        vllm = import_vllm()
        args = engine_args(cfg)
        tokenizer = load_tokenizer(cfg.model, cfg.trust_remote_code)
        log.info("loading %s in vLLM %s (%s)", cfg.model, vllm.__version__, args["dtype"])
        llm = vllm.LLM(**args, logits_processors=[NgramPenalty], seed=0)
        return cls(llm, tokenizer, model_eos_ids(cfg.model, tokenizer))

    @property
    def eos_token_ids(self) -> frozenset[int]:
        return self._eos

    def iter_batches(
        self, prompts: Sequence[str], params: SamplingParams, seeds: Sequence[int] | None = None
    ) -> Iterator[list[tuple[int, Completion]]]:
        if not prompts:
            return
        check_logit_bias(params, self.vocab_size)
        row_seeds = resolve_seeds(len(prompts), params, seeds)
        encoded = encode_prompts(self.tokenizer, prompts, params, self.context)
        engine = self.llm.llm_engine
        pending = iter(range(len(prompts)))
        rows: dict[str, int] = {}  # engine request id -> row
        done: list[tuple[int, Completion]] = []
        last_yield = time.monotonic()
        try:
            while True:
                while len(rows) < MAX_IN_FLIGHT and (row := next(pending, None)) is not None:
                    request = f"selfalign-{next(self._ids)}"
                    engine.add_request(request, {"prompt_token_ids": encoded[row]},
                                       self._request_params(params, row_seeds[row]))  # fmt: skip
                    rows[request] = row
                if not rows:
                    break
                for output in engine.step():
                    if output.finished:
                        done.append((rows.pop(output.request_id), self._completion(output)))
                if done and (not rows or time.monotonic() - last_yield >= YIELD_EVERY):
                    yield done
                    done, last_yield = [], time.monotonic()
        finally:
            if rows:  # the caller stopped early or an error: leave the engine idle
                engine.abort_request(list(rows))

    def _request_params(self, params: SamplingParams, seed: int):
        from vllm import SamplingParams as VllmParams
        from vllm.sampling_params import RequestOutputKind

        return VllmParams(
            temperature=params.temperature,
            top_p=params.top_p,
            max_tokens=params.max_tokens,
            stop=list(params.stop) or None,
            seed=seed % 2**31,  # as the openai backend sends it: served vLLM samples alike
            logit_bias=dict(params.logit_bias) or None,
            extra_args=ngram_args(params.ngram_penalties) or None,
            output_kind=RequestOutputKind.FINAL_ONLY,
        )

    def close(self) -> None:
        llm, self.llm = getattr(self, "llm", None), None
        if llm is not None:
            llm.llm_engine.engine_core.shutdown()

    def _completion(self, output: Any) -> Completion:
        choice = output.outputs[0]
        return Completion(
            decoded_text(
                self.tokenizer, self._eos, choice.text, choice.token_ids, choice.stop_reason
            ),  # fmt: skip
            "length" if choice.finish_reason == "length" else "stop",
            len(output.prompt_token_ids),
            len(choice.token_ids),
        )
