"""Shared-prefix attention (Hydragen-style) against plain attention, on random tensors and in the
transformers backend against `model.generate`."""

from __future__ import annotations

import pytest
import torch

from selfalign.generation import SamplingParams, prefix_attention
from selfalign.generation.prefix_attention import shared_prefix_attention, suffix_mask


def plain_attention(query, keys, values, mask, prefix_keys, prefix_values, scale):
    """softmax over [prefix | own keys] with the prefix copied into every row (the reference)."""
    rows, heads = query.shape[:2]
    group = heads // keys.shape[1]
    k = torch.cat([prefix_keys.expand(rows, -1, -1, -1), keys], dim=2)
    v = torch.cat([prefix_values.expand(rows, -1, -1, -1), values], dim=2)
    k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    full = torch.ones(rows, 1, query.shape[2], prefix_keys.shape[2], dtype=torch.bool)
    if mask is not None:
        full = torch.cat([full, mask], dim=-1)
    out = torch.nn.functional.scaled_dot_product_attention(
        query, k, v, attn_mask=full if mask is not None else None, scale=scale
    )
    return out.transpose(1, 2)


def padding_mask(rows: int, length: int, pads: list[int]) -> torch.Tensor:
    mask = torch.ones(rows, length, dtype=torch.long)
    for r, pad in enumerate(pads):
        mask[r, :pad] = 0
    return mask


@pytest.mark.parametrize("prefix", [1, 7, 64])
@pytest.mark.parametrize("rows", [1, 3, 8])
@pytest.mark.parametrize(("heads", "kv_heads"), [(4, 4), (4, 2), (6, 1)])
@pytest.mark.parametrize("queries", ["prefill", "decode"])
@pytest.mark.parametrize("kernel", ["_fused", "_stepwise"])  # CPU's, and the one GPUs run
def test_equals_plain_attention_on_random_tensors(
    prefix, rows, heads, kv_heads, queries, kernel, monkeypatch
):
    monkeypatch.setattr(prefix_attention, "_partial", getattr(prefix_attention, kernel))
    monkeypatch.setattr(prefix_attention, "STEP_SCORES", 64)  # the step-by-step path in slices
    g = torch.Generator().manual_seed(prefix * 100 + rows * 10 + heads + kv_heads)
    dim, own = 8, 11
    pads = [(r * 3) % own for r in range(rows)]  # left padding, different per row, row 0 none
    lq = own if queries == "prefill" else 1
    q = torch.randn(rows, heads, lq, dim, generator=g)
    k, v = (torch.randn(rows, kv_heads, own, dim, generator=g) for _ in range(2))
    pk, pv = (torch.randn(1, kv_heads, prefix, dim, generator=g) for _ in range(2))
    mask = suffix_mask(padding_mask(rows, own, pads), lq)
    got = shared_prefix_attention(q, k, v, mask, pk, pv, scale=dim**-0.5)
    want = plain_attention(q, k, v, mask, pk, pv, scale=dim**-0.5)
    # padded query positions of the prefill see the prefix only: their outputs are defined too
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_without_a_mask_every_key_is_attended():
    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 2, 1, 4, generator=g)
    k, v = (torch.randn(2, 2, 5, 4, generator=g) for _ in range(2))
    pk, pv = (torch.randn(1, 2, 3, 4, generator=g) for _ in range(2))
    got = shared_prefix_attention(q, k, v, None, pk, pv, scale=0.5)
    torch.testing.assert_close(got, plain_attention(q, k, v, None, pk, pv, scale=0.5))


def test_suffix_mask_is_causal_and_skips_padding():
    mask = suffix_mask(torch.tensor([[0, 1, 1], [1, 1, 1]]), 3)
    assert mask.shape == (2, 1, 3, 3)
    assert mask[0, 0].tolist() == [[False, False, False], [False, True, False], [False, True, True]]
    assert mask[1, 0].tolist() == [[True, False, False], [True, True, False], [True, True, True]]
    decode = suffix_mask(torch.tensor([[0, 1, 1, 1]]), 1)
    assert decode[0, 0].tolist() == [[False, True, True, True]]


# -- in the backend ----------------------------------------------------------------------------------


def shared_job(tokenizer) -> list[str]:
    prefix = "The principles: be helpful, be honest, be harmless. " * 6
    tails = ["Tell me about rivers.", "Hi", "What is 2 + 2 and why is it so?", "Write a poem."]
    prompts = [prefix + t for t in tails * 2]
    assert len(tokenizer(prefix)["input_ids"]) > 40
    return prompts


@pytest.mark.parametrize("batch_size", [1, 3, 8])
def test_backend_with_shared_attention_matches_generate_and_the_copied_prefix(
    tiny_backend, batch_size, monkeypatch
):
    backend = tiny_backend
    monkeypatch.setattr(backend, "batch_size", batch_size)
    prompts = shared_job(backend.tokenizer)
    params = SamplingParams(temperature=0, max_tokens=12)
    assert backend.shared_attention  # the tiny Llama is a supported architecture
    ours = [c.text for c in backend.generate(prompts, params)]
    assert backend.last_shared_prefix > 40
    with monkeypatch.context() as m:
        m.setattr(backend, "shared_attention", False)
        copied = [c.text for c in backend.generate(prompts, params)]
    assert ours == copied
    model = backend.model
    for prompt, text in zip(prompts, ours, strict=True):
        ids = backend.tokenizer(prompt, return_tensors="pt")
        out = model.generate(**ids, max_new_tokens=12, do_sample=False,
                             pad_token_id=backend.tokenizer.pad_token_id)  # fmt: skip
        tokens = out[0, ids["input_ids"].shape[1] :].tolist()
        eos = [i for i, t in enumerate(tokens) if t in backend.eos_token_ids]
        expected = backend.tokenizer.decode(tokens[: eos[0]] if eos else tokens,
                                            skip_special_tokens=True)  # fmt: skip
        assert text == expected


def test_the_batch_cache_holds_no_copy_of_the_prefix(tiny_backend, monkeypatch):
    from selfalign.generation import transformers_backend

    capacities = []
    allocate = transformers_backend.InPlaceLayer._allocate

    def spy(self, keys, values):
        capacities.append((keys.shape[0], self.capacity))
        return allocate(self, keys, values)

    monkeypatch.setattr(transformers_backend.InPlaceLayer, "_allocate", spy)
    prompts = shared_job(tiny_backend.tokenizer)
    tiny_backend.generate(prompts, SamplingParams(temperature=0, max_tokens=5))
    shared = tiny_backend.last_shared_prefix
    longest = max(len(tiny_backend.tokenizer(p)["input_ids"]) for p in prompts)
    assert capacities and all(c <= longest - shared + 5 for _, c in capacities), capacities
    # the prefix's own cache has one row
    assert tiny_backend._prefix[1].layers[0].keys.shape[0] == 1
