"""Attention over a prompt prefix that every row of a batch shares, computed once for the batch.

Every stage-2 prompt starts with the same ~2K-token constitution. Attending to it row by row
reads the prefix's keys and values once per row and step (and stores a copy per row). As in
Hydragen (Juravsky et al., 2024), the attention splits exactly into two parts joined by their
log-sum-exp:

    prefix part   the queries of ALL rows against the ONE stored prefix K/V: one matrix product
                  per KV head, [rows x queries, dim] @ [dim, prefix]
    suffix part   each row's queries against its own keys (suffix, padding masked, generated)

    softmax over [prefix | suffix] = the two partial softmaxes, each weighted by exp(its lse - lse)

`shared_prefix_attention` is that computation (pure, tested against plain attention);
`prefix_attention(model, prefix_cache)` is a context manager that makes the model's attention
layers use it, through transformers' attention interface, for the forward passes inside it. The
cache the model writes then holds the rows' own tokens only, and the attention mask it is given
is a 4D boolean mask over those (`suffix_mask`).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator

import torch

log = logging.getLogger(__name__)

NAME = "selfalign_shared_prefix"
# Architectures whose attention layers are plain softmax attention reached through the attention
# interface (no soft-capping, sinks or sliding windows): others keep attending row by row.
SUPPORTED = {"llama", "mistral", "qwen2", "qwen3", "phi3"}
STEP_SCORES = 1 << 26  # float32 attention scores computed at once off CPU (256 MiB)

_prefix: list[tuple[torch.Tensor, torch.Tensor]] | None = None
_cuda_fused = True  # cleared when the CUDA kernels refuse the shapes (then step by step)  # per layer: [1, kv heads, P, dim]


def shared_prefix_attention(
    query: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    mask: torch.Tensor | None,
    prefix_keys: torch.Tensor,
    prefix_values: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """softmax(q [Kp | K]^T * scale + mask) [Vp | V] without repeating the prefix per row.

    query [B, H, Lq, D]; keys/values [B, Hkv, Ls, D] (the rows' own); mask [B, 1, Lq, Ls] boolean
    (True = attend) or None (all attend); prefix_keys/values [1, Hkv, P, D] (attended by every
    query). Returns [B, Lq, H, D], the layout attention layers hand to their output projection.
    """
    rows, heads, lq, dim = query.shape
    kv_heads = keys.shape[1]
    group = heads // kv_heads
    # [B, Hkv, group*Lq, D]: the query heads that share a KV head, side by side
    q = query.reshape(rows, kv_heads, group * lq, dim)

    # prefix: every row's queries as one sequence per KV head, against the one prefix
    qp = q.transpose(0, 1).reshape(1, kv_heads, rows * group * lq, dim)
    prefix_out, prefix_lse = _partial(qp, prefix_keys, prefix_values, None, scale)
    prefix_out = prefix_out.reshape(kv_heads, rows, group * lq, dim).transpose(0, 1)
    prefix_lse = prefix_lse.reshape(kv_heads, rows, group * lq, 1).transpose(0, 1)

    # suffix: each row against its own keys
    bias = None
    if mask is not None:  # additive, one row per query of each group
        bias = torch.zeros(mask.shape, dtype=query.dtype, device=query.device)
        bias = bias.masked_fill(~mask, torch.finfo(query.dtype).min).repeat(1, 1, group, 1)
    suffix_out, suffix_lse = _partial(q, keys, values, bias, scale)

    total = torch.logaddexp(prefix_lse, suffix_lse)
    out = prefix_out.float() * (prefix_lse - total).exp()
    out = out + suffix_out.float() * (suffix_lse - total).exp()
    return out.to(query.dtype).reshape(rows, heads, lq, dim).transpose(1, 2)


def _partial(q, k, v, bias, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """softmax(q k^T * scale + bias) v, and its log-sum-exp [..., Lq, 1] in float32, in one fused
    kernel that returns the log-sum-exp (the public SDPA does not): PyTorch's flash attention on
    CPU; on CUDA flash attention (16-bit, no mask) or memory-efficient attention; elsewhere, or
    if the CUDA kernel refuses the shapes, step by step."""
    global _cuda_fused
    if q.device.type == "cpu":
        return _fused(q, k, v, bias, scale)
    if q.device.type == "cuda" and _cuda_fused:
        try:
            return _fused_cuda(q, k, v, bias, scale)
        except RuntimeError as error:  # an unsupported head size or layout: same result, slower
            log.warning("fused CUDA attention unavailable (%s); attending step by step", error)
            _cuda_fused = False
    return _stepwise(q, k, v, bias, scale)


def _fused(q, k, v, bias, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    op = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
    out, lse = op(q, k, v, attn_mask=bias, scale=scale)
    return out, lse.float().unsqueeze(-1)


def _fused_cuda(q, k, v, bias, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    lq = q.shape[-2]
    if bias is None and q.dtype in (torch.float16, torch.bfloat16):
        op = torch.ops.aten._scaled_dot_product_flash_attention
        out, lse = op(q, k, v, scale=scale)[:2]
    else:
        if bias is not None:  # the kernel wants the bias's rows 16-aligned in memory, per head
            keys = bias.shape[-1]
            aligned = bias.new_empty((*bias.shape[:-1], -(-keys // 16) * 16))
            aligned[..., :keys] = bias
            bias = aligned[..., :keys].expand(q.shape[0], q.shape[1], lq, keys)
        op = torch.ops.aten._scaled_dot_product_efficient_attention
        out, lse = op(q, k, v, bias, True, scale=scale)[:2]
    return out, lse[..., :lq].float().unsqueeze(-1)  # the log-sum-exp is padded to 32 queries


def _stepwise(q, k, v, bias, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The same step by step, a slice of the queries at a time so that the float32 scores stay
    under STEP_SCORES (a batch's prefill against a 2K-token prefix would need gigabytes)."""
    per_query = q.shape[0] * q.shape[1] * k.shape[-2]
    step = max(1, STEP_SCORES // per_query)
    outs, lses = [], []
    for start in range(0, q.shape[-2], step):
        rows = slice(start, start + step)
        scores = torch.matmul(q[..., rows, :], k.transpose(-1, -2)).float() * scale
        if bias is not None:
            scores = scores + bias[..., rows, :]
        top = scores.amax(-1, keepdim=True)
        weights = (scores - top).exp()
        total = weights.sum(-1, keepdim=True)
        outs.append(torch.matmul((weights / total).to(v.dtype), v))
        lses.append(top + total.log())
    return torch.cat(outs, dim=-2), torch.cat(lses, dim=-2)


def _attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """The attention interface's signature: (output [B, Lq, H, D], no weights)."""
    for unsupported in ("sliding_window", "softcap", "s_aux", "sinks"):
        if kwargs.get(unsupported) is not None:
            raise NotImplementedError(f"shared-prefix attention with {unsupported}")
    prefix_keys, prefix_values = _prefix[module.layer_idx]
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    out = shared_prefix_attention(
        query, key, value, attention_mask, prefix_keys, prefix_values, scale
    )
    return out, None


def supports(model) -> bool:
    """Whether `model`'s attention can run as shared-prefix attention."""
    config = model.config.get_text_config(decoder=True)
    layer_types = getattr(config, "layer_types", None) or []
    return (
        config.model_type in SUPPORTED
        and getattr(config, "sliding_window", None) is None
        and all(t == "full_attention" for t in layer_types)
    )


@contextlib.contextmanager
def prefix_attention(model, prefix_cache) -> Iterator[None]:
    """Inside: `model`'s attention layers attend to `prefix_cache` (a cache of batch size 1)
    plus the keys in the cache the forward pass is given."""
    from transformers import AttentionInterface

    global _prefix
    AttentionInterface.register(NAME, _attention)
    config = model.config
    before = config._attn_implementation
    _prefix = [(layer.keys, layer.values) for layer in prefix_cache.layers]
    config._attn_implementation = NAME
    try:
        yield
    finally:
        config._attn_implementation = before
        _prefix = None


def suffix_mask(mask: torch.Tensor, queries: int) -> torch.Tensor:
    """The 4D boolean mask [B, 1, queries, L] of the last `queries` positions of 2D padding mask
    `mask` [B, L] (1 = real token): causal, and never onto padding."""
    length = mask.shape[1]
    causal = torch.ones(queries, length, dtype=torch.bool, device=mask.device).tril(
        length - queries
    )
    return causal[None, None] & mask.bool()[:, None, None, :]
