"""Multiple-choice scoring that computes each shared context once: `SharedPrefixLM`.

lm-eval's `hf` model (`HFLM`) scores every (context, continuation) pair as one full sequence, so a
TruthfulQA question with 13 choices runs its context, the six-QA primer included, 13 times.
`SharedPrefixLM` is that same model class with only the log-likelihood computation replaced:

1. Contexts whose token lists start alike (TruthfulQA's primer: every MC1/MC2 prompt) are grouped;
   each group's common token prefix runs through the model once, batch size 1.
2. The contexts of a group run in batches of up to `batch_size` on top of that prefix's KV cache
   (`prefix | left padding | rest of context`, padding masked, positions counted over real
   tokens), once per distinct context however many choices it has (and a request repeated
   word for word is scored once).
3. The continuations run in batches of up to `batch_size`, each row on a copy of its context's
   cache. Batches are sorted by length and cut short where padding would fill a fifth of one.

Tokenization, the request order lm-eval sees, the sums and greedy flags are HFLM's (it inherits
`_encode_pair`; float differences only from the different matrix shapes). Where the cache cannot
be used, HFLM's own method scores: seq2seq models, `batch_size="auto"`, prompt-learning PEFT
adapters, attention other than full (sliding windows, recurrent layers), and a pair longer than
`max_length + 1` tokens (HFLM cuts it from the left, which changes its context per choice).
Reads nothing and writes nothing but the model's outputs.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Iterator, Sequence

import torch
import torch.nn.functional as F
from lm_eval.models.huggingface import HFLM
from tqdm import tqdm

from selfalign.generation.transformers_backend import MIN_SHARED_PREFIX
from selfalign.modeling import with_cache

# a batch's positions per real token at most (HHH's contexts range from 20 to 1,000 tokens; on
# CPU, 1.25 ran its helpful subset 1.4x faster than 2 did)
MAX_PADDED = 1.25
# what HFLM._loglikelihood_tokens takes: ((context, continuation) or None, context ids, cont ids)
Request = tuple[tuple[str, str] | None, list[int], list[int]]
Context = tuple[int, ...]


def prefix_groups(contexts: Sequence[Context], minimum: int) -> list[tuple[int, list[Context]]]:
    """Split distinct token contexts into (shared prefix length, contexts) groups.

    Contexts sorted in token order are walked once; a context joins the current group while it
    shares at least `minimum` tokens with all of it. The prefix leaves at least one token of
    every context out, since the context's last position gives the first continuation logits.
    Contexts that share nothing worth a separate forward pass form one group with prefix 0.
    """
    groups: list[tuple[int, list[Context]]] = []
    for ctx in sorted(set(contexts)):
        if groups:
            length, members = groups[-1]
            limit = min(length, len(ctx))  # a shorter ctx that all members start with sorts first
            shared = next((k for k in range(limit) if members[0][k] != ctx[k]), limit)
            if shared >= minimum:
                groups[-1] = (shared, [*members, ctx])
                continue
        groups.append((len(ctx) - 1, [ctx]))
    loners = [g[1][0] for g in groups if len(g[1]) == 1]
    shared_groups = [g for g in groups if len(g[1]) > 1]
    return ([(0, loners)] if loners else []) + shared_groups


def padded_batches(items: list, widths: list[int], batch_size: int) -> Iterator[list]:
    """Consecutive batches of `items` (sorted by `widths`, widest first): at most `batch_size`
    each, and closed early before padding would fill more than a fifth of a batch (contexts of
    500 and 50 tokens are not run as two of 500)."""
    start = 0
    while start < len(items):
        end, real = start + 1, widths[start]
        while end < len(items) and end - start < batch_size:
            if (end - start + 1) * widths[start] > MAX_PADDED * (real + widths[end]):
                break
            real += widths[end]
            end += 1
        yield items[start:end]
        start = end


@functools.cache
def _takes_logits_to_keep(cls: type) -> bool:
    return "logits_to_keep" in inspect.signature(cls.forward).parameters


class SharedPrefixLM(HFLM):
    """lm-eval's HFLM whose `loglikelihood` runs each distinct context once.

    Takes HFLM's arguments (`pretrained=`, `device=`, `dtype=`, `batch_size=`, `peft=`, ...) and
    `shared_prefix` (default True): also run the prefix common to many contexts once.
    """

    def __init__(self, *args, shared_prefix: bool = True, **kwargs):
        super().__init__(*args, **kwargs)
        self.shared_prefix = shared_prefix

    def sharing_applies(self) -> bool:
        """Whether this model can be scored from shared KV caches (else HFLM's method runs)."""
        if self.backend != "causal" or self.batch_size == "auto":
            return False
        peft_config = getattr(self.model, "active_peft_config", None)
        if getattr(peft_config, "is_prompt_learning", False):  # virtual tokens before the input
            return False
        text_config = self.model.config.get_text_config(decoder=True)
        layer_types = getattr(text_config, "layer_types", None) or []
        return all(t == "full_attention" for t in layer_types)

    def _loglikelihood_tokens(
        self,
        requests: list[Request],
        disable_tqdm: bool = False,
        override_bs: int | None = None,
    ) -> list[tuple[float, bool]]:
        if not self.sharing_applies():
            return super()._loglikelihood_tokens(requests, disable_tqdm, override_bs)
        results: list[tuple[float, bool] | None] = [None] * len(requests)
        ours, rest = [], []
        for i, (_, ctx, cont) in enumerate(requests):
            fits = 0 < len(cont) and len(ctx) + len(cont) <= self.max_length + 1
            (ours if fits else rest).append(i)
        if rest:  # truncated from the left by HFLM: its context differs per continuation
            scored = super()._loglikelihood_tokens([requests[i] for i in rest], disable_tqdm)
            for i, answer in zip(rest, scored, strict=True):
                results[i] = answer
        # each distinct context once, each distinct continuation of it once (HHH repeats items)
        by_context: dict[Context, list[int]] = {}
        copies: dict[tuple[Context, Context], list[int]] = {}
        for i in ours:
            ctx, cont = tuple(requests[i][1]), tuple(requests[i][2])
            if (ctx, cont) not in copies:
                by_context.setdefault(ctx, []).append(i)
            copies.setdefault((ctx, cont), []).append(i)
        pbar = tqdm(
            total=len(ours),
            disable=disable_tqdm or self.rank != 0,
            desc="Running loglikelihood requests",
        )
        groups = (
            prefix_groups(list(by_context), MIN_SHARED_PREFIX)
            if self.shared_prefix
            else [(0, list(by_context))]
        )
        for length, contexts in groups:
            prefix = self._prefill(contexts[0][:length]) if length else None
            contexts.sort(key=len, reverse=True)  # like HFLM: longest first (an OOM shows early)
            widths = [len(c) - length for c in contexts]
            for chunk in padded_batches(contexts, widths, self.batch_size):
                rows = [(r, i) for r, ctx in enumerate(chunk) for i in by_context[ctx]]
                for i, answer in self._score_chunk(chunk, length, prefix, rows, requests):
                    for j in copies[tuple(requests[i][1]), tuple(requests[i][2])]:
                        results[j] = answer
                        if requests[j][0] is not None:  # loglikelihood_rolling: per document
                            self.cache_hook.add_partial("loglikelihood", requests[j][0], answer)
                        pbar.update(1)
        pbar.close()
        return results  # type: ignore[return-value]

    # -- the forward passes -----------------------------------------------------------------------

    def _autocast(self):
        return torch.autocast(
            device_type=self.device.type,
            dtype=self.mixed_precision_dtype,
            enabled=self.mixed_precision_dtype is not None,
        )

    def _log_softmax(self, logits: torch.Tensor) -> torch.Tensor:
        return F.log_softmax(logits, dim=-1, dtype=self.softmax_dtype)

    def _forward(self, cache, **inputs):
        """The model over new tokens after `cache` (which it extends); only the last position's
        logits when `last_only` and the model allows it."""
        last_only = inputs.pop("last_only", False)
        base = self.model.get_base_model() if hasattr(self.model, "get_base_model") else self.model
        if last_only and _takes_logits_to_keep(type(base)):
            inputs["logits_to_keep"] = 1
        with torch.no_grad(), self._autocast():
            out = self.model(**inputs, **with_cache(self.model, cache), use_cache=True)
        return out.logits[:, -1] if last_only else out.logits

    def _new_cache(self, layers: list[tuple[torch.Tensor, torch.Tensor]] | None = None):
        from transformers import DynamicCache

        return DynamicCache(ddp_cache_data=layers or None, config=self.model.config)

    def _prefill(self, prefix: Context):
        """The KV cache of `prefix` alone (batch 1)."""
        cache = self._new_cache()
        ids = torch.tensor([prefix], dtype=torch.long, device=self.device)
        self._forward(cache, input_ids=ids, last_only=True)
        return cache

    def _score_chunk(
        self, chunk: list[Context], length: int, prefix, rows: list[tuple[int, int]], requests
    ):
        """Yield (request index, (log-likelihood, is_greedy)) for every request whose context is
        in `chunk`; `rows` pairs each such request with its context's row in `chunk`."""
        cache, mask, last = self._contexts(chunk, length, prefix)
        firsts = {}  # request -> log-probs and greedy flags of its first continuation token
        for r, i in rows:
            token = requests[i][2][0]
            firsts[i] = (last[r, token : token + 1], last[r].argmax(-1, keepdim=True) == token)
        longer = sorted((ri for ri in rows if len(requests[ri[1]][2]) > 1),
                        key=lambda ri: -len(requests[ri[1]][2]))  # fmt: skip
        widths = [len(requests[i][2]) - 1 for _, i in longer]
        for batch in padded_batches(longer, widths, self.batch_size):
            conts = [requests[i][2] for _, i in batch]
            logprobs = self._continuations(cache, mask, [r for r, _ in batch], conts)
            for (_, i), lp, cont in zip(batch, logprobs, conts, strict=True):
                wanted = torch.tensor(cont[1:], dtype=torch.long, device=lp.device)
                lp = lp[: len(wanted)]
                first_lp, first_greedy = firsts.pop(i)
                tokens_lp = torch.cat([first_lp, lp.gather(-1, wanted[:, None])[:, 0]])
                greedy = torch.cat([first_greedy, lp.argmax(-1) == wanted])
                yield i, (float(tokens_lp.sum()), bool(greedy.all()))
        for i, (first_lp, first_greedy) in firsts.items():  # one-token continuations
            yield i, (float(first_lp.sum()), bool(first_greedy.all()))

    def _contexts(self, chunk: list[Context], length: int, prefix):
        """Run the contexts of `chunk` after the shared prefix: (KV cache, attention mask over
        `prefix | left padding | context rest`, log-probs after each context's last token)."""
        rows, width = len(chunk), max(len(ctx) - length for ctx in chunk)
        ids = torch.zeros((rows, width), dtype=torch.long)  # padding: any id, it is masked
        mask = torch.zeros((rows, length + width), dtype=torch.long)
        mask[:, :length] = 1
        for r, ctx in enumerate(chunk):
            rest = ctx[length:]
            ids[r, width - len(rest) :] = torch.tensor(rest)
            mask[r, length + width - len(rest) :] = 1
        positions = (mask.cumsum(-1) - 1).clamp(min=0)[:, length:]
        layers = [(k.expand(rows, -1, -1, -1), v.expand(rows, -1, -1, -1)) for k, v, *_ in prefix or []]  # fmt: skip
        cache = self._new_cache(layers)
        ids, mask, positions = (t.to(self.device) for t in (ids, mask, positions))
        last = self._forward(
            cache, input_ids=ids, attention_mask=mask, position_ids=positions, last_only=True
        )
        return cache, mask, self._log_softmax(last)

    def _continuations(self, cache, mask, rows: list[int], conts: list[list[int]]):
        """Log-probs after each token but the last of each continuation, each on a copy of its
        context's row of `cache`: [len(conts), longest - 1, vocab] (right-padded)."""
        index = torch.tensor(rows, dtype=torch.long, device=self.device)
        copy = self._new_cache([(k[index], v[index]) for k, v, *_ in cache])
        width = max(len(c) for c in conts) - 1
        ids = torch.zeros((len(conts), width), dtype=torch.long)
        cont_mask = torch.zeros((len(conts), width), dtype=torch.long)
        for j, cont in enumerate(conts):
            ids[j, : len(cont) - 1] = torch.tensor(cont[:-1])
            cont_mask[j, : len(cont) - 1] = 1
        ctx_mask = mask[index]
        positions = ctx_mask.sum(-1, keepdim=True) + torch.arange(width, device=self.device)
        full_mask = torch.cat([ctx_mask, cont_mask.to(self.device)], dim=1)
        logits = self._forward(
            copy, input_ids=ids.to(self.device), attention_mask=full_mask, position_ids=positions
        )
        return self._log_softmax(logits)
