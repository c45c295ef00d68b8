"""In-process generation with `transformers`: the embedded default, CPU or GPU.

A small decoding loop over the model's forward pass, because SELF-ALIGN needs controls that
`model.generate` does not give together: the paper's n-gram frequency penalties, per-row seeded
sampling (a row's text does not depend on its batch), stop strings checked in the step that
completes them, and a shared prompt prefix computed once per job.

How a job runs:
1. Tokenize every prompt; a prompt that does not fit `context - max_tokens` is an error naming it
   (or, if the user opted in, loses tokens from its start, never its end).
2. The longest common token prefix of the job (the stage's meta prompt or constitution) is
   prefilled once, with batch size 1, and kept for later jobs that share it.
3. Rows are sorted by length and batched; each batch holds `prefix | left padding | suffix`, the
   padding masked out and the position ids counted over real tokens only, so every row sees
   exactly the tokens it would see alone. For plain-attention models the prefix is stored once
   and attended once per step for the whole batch (`prefix_attention`, as in Hydragen); for
   others each row's cache starts with a copy of it.
4. Decoding drops rows as they finish. Results are yielded per batch with their input index.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
from transformers.cache_utils import DynamicLayer

from selfalign.generation.base import (
    ALL_NGRAM_ORDERS,
    Backend,
    Capabilities,
    Completion,
    SamplingParams,
    check_logit_bias,
    encode_prompts,
    resolve_seeds,
)
from selfalign.generation.ngram import ngram_penalty
from selfalign.generation.prefix_attention import prefix_attention, suffix_mask, supports
from selfalign.modeling import context_length, eos_ids, load_model, with_cache

MIN_SHARED_PREFIX = 16  # shorter common prefixes are not worth a separate prefill


class InPlaceLayer(DynamicLayer):
    """A KV-cache layer with a buffer preallocated for `capacity` positions, written in place.

    Returns views of the filled part; dropping finished rows copies once per drop, not per step.
    """

    def __init__(
        self, capacity: int, keys: torch.Tensor | None = None, values: torch.Tensor | None = None
    ):
        super().__init__()
        self.capacity = capacity
        self.length = 0
        if keys is not None:
            self._allocate(keys, values)
            self._write(keys, values)

    def _allocate(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        rows, heads, _, dim = keys.shape
        self.k_buffer = keys.new_empty(rows, heads, self.capacity, dim)
        self.v_buffer = values.new_empty(rows, values.shape[1], self.capacity, values.shape[-1])
        self.device, self.dtype, self.is_initialized = keys.device, keys.dtype, True

    def _write(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        end = self.length + keys.shape[-2]
        if end > self.capacity:  # never expected (capacity covers the run), but stay correct
            self.capacity = max(end, 2 * self.capacity)
            old_k, old_v = self.k_buffer[:, :, : self.length], self.v_buffer[:, :, : self.length]
            self._allocate(old_k, old_v)
            self.k_buffer[:, :, : self.length], self.v_buffer[:, :, : self.length] = old_k, old_v
        self.k_buffer[:, :, self.length : end] = keys
        self.v_buffer[:, :, self.length : end] = values
        self.length = end
        self.keys, self.values = self.k_buffer[:, :, :end], self.v_buffer[:, :, :end]

    def update(self, key_states, value_states, *args, **kwargs):
        if not self.is_initialized:
            self._allocate(key_states, value_states)
        self._write(key_states, value_states)
        return self.keys, self.values

    def get_seq_length(self) -> int:
        return self.length

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        if self.is_initialized:
            self.k_buffer, self.v_buffer = self.k_buffer[indices], self.v_buffer[indices]
            self.keys, self.values = (
                self.k_buffer[:, :, : self.length],
                self.v_buffer[:, :, : self.length],
            )


def top_p_filter(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    """Set to -inf every token outside the smallest set whose probability reaches `top_p`."""
    if top_p >= 1.0:
        return logits
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    probs = sorted_logits.softmax(-1)
    outside = probs.cumsum(-1) - probs > top_p  # mass before this token already reaches top_p
    sorted_logits = sorted_logits.masked_fill(outside, float("-inf"))
    return torch.empty_like(logits).scatter_(1, order, sorted_logits)


def choose_tokens(
    logits: torch.Tensor, params: SamplingParams, generators: list[torch.Generator]
) -> torch.Tensor:
    """Greedy at temperature 0; otherwise temperature + top-p, one random stream per row."""
    if params.temperature == 0:
        return logits.argmax(-1)
    logits = top_p_filter(logits / params.temperature, params.top_p)
    # Exponential-race sampling: argmax(p / E) with E ~ Exp(1) draws from p, and lets each row use
    # its own generator while the rest stays vectorised.
    noise = torch.stack(
        [torch.empty(logits.shape[-1]).exponential_(generator=g) for g in generators]
    ).to(logits.device)
    return (logits.softmax(-1) / noise).argmax(-1)


@dataclass
class _Batch:
    """The decoding state of one batch. Rows leave `live` as they finish; the tensors hold live
    rows only, in `live` order, while the lists are indexed by the batch's original row."""

    params: SamplingParams
    prompt_lengths: list[int]
    generators: list[torch.Generator]
    bias: torch.Tensor | None  # logit_bias as a vector over the vocabulary
    mask: torch.Tensor  # attention mask: prefix, padding, suffix, generated tokens
    next_position: torch.Tensor  # position id of each live row's next token
    history: torch.Tensor  # [live rows, steps]: generated tokens, for the n-gram penalties
    live: list[int]
    tokens: list[list[int]]
    results: list[Completion | None]
    scanned: list[int]  # characters of decoded text already searched for stop strings

    def choose(self, logits: torch.Tensor) -> torch.Tensor:
        """The next token of every live row, after the logit bias and n-gram penalties."""
        if self.bias is not None:
            logits = logits + self.bias
        if self.params.ngram_penalties and self.history.shape[1]:
            logits = logits - ngram_penalty(
                self.history, self.params.ngram_penalties, logits.shape[-1]
            )
        chosen = choose_tokens(logits, self.params, [self.generators[r] for r in self.live])
        self.history = torch.cat([self.history, chosen[:, None]], dim=1)
        return chosen

    def keep_rows(self, keep: list[int], chosen: torch.Tensor, cache) -> torch.Tensor:
        """Drop every live row not in `keep` (batch positions) from the state and the cache;
        returns the kept rows' chosen tokens."""
        if len(keep) == len(self.live):
            return chosen
        index = torch.tensor(keep, device=chosen.device)
        cache.batch_select_indices(index)
        self.mask, self.history = self.mask[index], self.history[index]
        self.next_position = self.next_position[index]
        self.live = [self.live[b] for b in keep]
        return chosen[index]


def _mask(mask: torch.Tensor, own: int, queries: int) -> torch.Tensor:
    """The attention mask the model is given: the 2D padding mask when its cache holds every
    column (own = 0), else the 4D mask over the columns from `own` on (the prefix is attended
    apart, by `prefix_attention`)."""
    return mask if own == 0 else suffix_mask(mask[:, own:], queries)


class TransformersBackend(Backend):
    CAPABILITIES = Capabilities(
        "transformers", token_logit_bias=True, ngram_orders=ALL_NGRAM_ORDERS, tokenizer=True
    )

    def __init__(self, model, tokenizer, batch_size: int = 8, share_prefix: bool = True):
        """Wrap a model already in memory; `TransformersBackend.load` loads one by name."""
        if tokenizer.pad_token_id is None:
            tokenizer.pad_token = tokenizer.eos_token
        self.model, self.tokenizer = model, tokenizer
        self.device = next(model.parameters()).device
        self.batch_size = batch_size
        self.share_prefix = share_prefix
        # the shared prefix attended once per batch (`prefix_attention`), for plain-attention
        # models; else copied into every row's cache (False here: always copied, for comparison)
        self.shared_attention = share_prefix and supports(model)
        self.context = context_length(model)
        self.vocab_size = model.get_output_embeddings().weight.shape[0]
        self._eos = eos_ids(getattr(model, "generation_config", None), tokenizer)
        self._prefix: tuple[tuple[int, ...], object] | None = None  # (token ids, KV cache)
        self.last_shared_prefix = 0  # for logs and tests: tokens shared by the last job

    @classmethod
    def load(
        cls,
        model: str,
        device: str = "auto",
        dtype: str = "auto",
        batch_size: int = 8,
        trust_remote_code: bool = False,
        share_prefix: bool = True,
    ) -> TransformersBackend:
        loaded, tokenizer, _ = load_model(model, device, dtype, trust_remote_code)
        return cls(loaded, tokenizer, batch_size, share_prefix)

    @property
    def eos_token_ids(self) -> frozenset[int]:
        """The tokenizer's EOS and every EOS of the model's generation config (chat models
        often end a turn with a token of their own)."""
        return self._eos

    # -- the job ---------------------------------------------------------------------------------

    def encode(self, prompts: Sequence[str], params: SamplingParams) -> list[list[int]]:
        """Token ids per prompt, checked (or left-truncated) against the context length."""
        return encode_prompts(self.tokenizer, prompts, params, self.context)

    def iter_batches(
        self,
        prompts: Sequence[str],
        params: SamplingParams,
        seeds: Sequence[int] | None = None,
    ) -> Iterator[list[tuple[int, Completion]]]:
        if not prompts:
            return
        check_logit_bias(params, self.vocab_size)
        row_seeds = resolve_seeds(len(prompts), params, seeds)
        encoded = self.encode(prompts, params)
        shared = self._shared_length(encoded)
        prefix_cache = self._prefix_cache(tuple(encoded[0][:shared])) if shared else None
        self.last_shared_prefix = shared
        order = sorted(range(len(encoded)), key=lambda i: -len(encoded[i]))
        for start in range(0, len(order), self.batch_size):
            rows = order[start : start + self.batch_size]
            completions = self._generate_batch(
                [encoded[i][shared:] for i in rows],
                [len(encoded[i]) for i in rows],
                prefix_cache,
                shared,
                params,
                [row_seeds[i] for i in rows],
            )
            yield list(zip(rows, completions, strict=True))

    def _shared_length(self, encoded: list[list[int]]) -> int:
        if not self.share_prefix or len(encoded) < 2:
            return 0
        first = encoded[0]
        # at least one token of each row stays out of the prefix: its logits start decoding
        length = min(len(ids) for ids in encoded) - 1
        for ids in encoded[1:]:
            k = 0
            while k < length and ids[k] == first[k]:
                k += 1
            length = k
        return length if length >= MIN_SHARED_PREFIX else 0

    @torch.no_grad()
    def _prefix_cache(self, prefix: tuple[int, ...]):
        from transformers import DynamicCache

        if self._prefix is None or self._prefix[0] != prefix:
            self._prefix = None  # free the old one before computing the next
            cache = DynamicCache(config=self.model.config)
            ids = torch.tensor([prefix], device=self.device)
            self.model(
                input_ids=ids, **with_cache(self.model, cache), use_cache=True, logits_to_keep=1
            )
            self._prefix = (prefix, cache)
        return self._prefix[1]

    def _batch_cache(self, prefix_cache, rows: int, capacity: int):
        """A cache for one batch, holding the shared prefix (if given) for every row.

        Plain attention models get buffers sized for the whole batch run and written in place,
        so a decoding step does not copy the whole cache (as concatenation would); other
        layouts (sliding windows, hybrids) keep transformers' own DynamicCache.
        """
        from transformers import Cache, DynamicCache

        data = [
            (k.expand(rows, -1, -1, -1), v.expand(rows, -1, -1, -1))
            for k, v, *_ in prefix_cache or []
        ]
        layer_types = (
            getattr(self.model.config.get_text_config(decoder=True), "layer_types", None) or []
        )
        if any(t != "full_attention" for t in layer_types):
            return DynamicCache(ddp_cache_data=data or None, config=self.model.config)
        layers = self.model.config.get_text_config(decoder=True).num_hidden_layers
        return Cache(
            layers=[InPlaceLayer(capacity, *(data[i] if data else ())) for i in range(layers)]
        )

    # -- one batch ---------------------------------------------------------------------------------

    @torch.no_grad()
    def _generate_batch(
        self,
        suffixes: list[list[int]],
        prompt_lengths: list[int],
        prefix_cache,
        shared: int,
        params: SamplingParams,
        seeds: list[int],
    ) -> list[Completion]:
        """Prefill the rows' suffixes after the shared prefix, then decode until every row ends."""
        input_ids, mask, positions = self._pack(suffixes, shared)
        # the prefix attended once for the whole batch, or copied into every row's cache
        hydragen = prefix_cache is not None and self.shared_attention
        own = shared if hydragen else 0  # the mask columns not in the batch's own cache
        cache = self._batch_cache(
            None if hydragen else prefix_cache, len(suffixes),
            mask.shape[1] - own + params.max_tokens,
        )  # fmt: skip
        with prefix_attention(self.model, prefix_cache) if hydragen else contextlib.nullcontext():
            logits = self._forward(input_ids, _mask(mask, own, input_ids.shape[1]),
                                   positions[:, shared:], cache)  # fmt: skip
            batch = self._start(params, prompt_lengths, seeds, mask, positions[:, -1] + 1)
            for step in range(params.max_tokens):
                chosen = batch.choose(logits)
                keep = self._record(batch, chosen.tolist(), last=step + 1 == params.max_tokens)
                if not keep:
                    break
                chosen = batch.keep_rows(keep, chosen, cache)
                ones = batch.mask.new_ones((len(batch.live), 1))
                batch.mask = torch.cat([batch.mask, ones], dim=1)
                logits = self._forward(chosen[:, None], _mask(batch.mask, own, 1),
                                       batch.next_position[:, None], cache)  # fmt: skip
                batch.next_position = batch.next_position + 1
        return batch.results  # type: ignore[return-value]

    def _pack(self, suffixes: list[list[int]], shared: int) -> tuple[torch.Tensor, ...]:
        """(input ids, attention mask, position ids) of `prefix | left padding | suffix` rows:
        the padding masked out, positions counted over real tokens only."""
        rows, width = len(suffixes), max(len(s) for s in suffixes)
        input_ids = torch.full((rows, width), self.tokenizer.pad_token_id, dtype=torch.long)
        mask = torch.zeros((rows, shared + width), dtype=torch.long)
        mask[:, :shared] = 1
        for r, ids in enumerate(suffixes):
            input_ids[r, width - len(ids) :] = torch.tensor(ids)
            mask[r, shared + width - len(ids) :] = 1
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        return tuple(t.to(self.device) for t in (input_ids, mask, positions))

    def _forward(self, input_ids, mask, positions, cache) -> torch.Tensor:
        """Run the model over new tokens (extending `cache`); the last position's logits."""
        out = self.model(
            input_ids=input_ids,
            attention_mask=mask,
            position_ids=positions,
            **with_cache(self.model, cache),
            use_cache=True,
            logits_to_keep=1,
        )
        return out.logits[:, -1, :].float()

    def _start(self, params, prompt_lengths, seeds, mask, next_position) -> _Batch:
        rows = len(prompt_lengths)
        bias = None
        if params.logit_bias:
            bias = torch.zeros(self.vocab_size, device=self.device)
            for token, value in params.logit_bias.items():
                bias[token] = value
        return _Batch(
            params, prompt_lengths, [torch.Generator().manual_seed(s) for s in seeds], bias,
            mask, next_position, torch.empty((rows, 0), dtype=torch.long, device=self.device),
            live=list(range(rows)), tokens=[[] for _ in range(rows)], results=[None] * rows,
            scanned=[0] * rows,
        )  # fmt: skip

    def _record(self, batch: _Batch, chosen: list[int], last: bool) -> list[int]:
        """Append each live row's token; finish the rows that stop (or reach max_tokens, when
        `last`). Returns the batch positions of the rows that go on."""
        keep = []
        for b, token in enumerate(chosen):
            r = batch.live[b]
            batch.tokens[r].append(token)
            reason, text = self._stop(batch, r, token)
            if reason is None and last:
                reason = "length"
            if reason is None:
                keep.append(b)
                continue
            if text is None:
                text = self._decode(batch.tokens[r])
            batch.results[r] = Completion(
                text, reason, batch.prompt_lengths[r], len(batch.tokens[r])
            )
        return keep

    def _stop(self, batch: _Batch, r: int, token: int) -> tuple[str | None, str | None]:
        """("stop", text) when row `r` ends at `token` (EOS or a stop string); else (None, its
        decoded text if it had to be decoded)."""
        tokens, stops = batch.tokens[r], batch.params.stop
        if token in self._eos:
            return "stop", self._decode(tokens[:-1])
        if not stops:
            return None, None
        text = self._decode(tokens)
        # a stop string may straddle the text already searched: look back by the longest one
        start = max(0, batch.scanned[r] - max(len(s) for s in stops))
        cut = self._find_stop(text, stops, start)
        batch.scanned[r] = len(text)
        return ("stop", text[:cut]) if cut is not None else (None, text)

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    @staticmethod
    def _find_stop(text: str, stops: list[str], start: int) -> int | None:
        hits = [i for s in stops if (i := text.find(s, start)) >= 0]
        return min(hits) if hits else None

    def close(self) -> None:
        self._prefix = None
        del self.model
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
