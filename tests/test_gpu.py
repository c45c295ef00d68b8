"""The CUDA code paths (skipped without a GPU; CI has none, the CPU tests cover the same logic).

Run on a GPU machine with `pytest -m gpu`.
"""

from __future__ import annotations

import json

import pytest

torch = pytest.importorskip("torch")

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]

PROMPTS = [
    "Instruction: Write a short poem about the sea.\nInput:",
    "User: What is the capital of France?\nAssistant:",
    "def add(a, b):",
    "Science explains the world: water boils at",
    "?",
]
PREFIX = "Consider the following principles carefully before you answer. " * 30


def cuda_backend(model_dir, dtype, batch_size=4, share_prefix=True):
    from selfalign.generation.transformers_backend import TransformersBackend

    backend = TransformersBackend.load(str(model_dir), device="cuda", dtype=dtype, batch_size=1)
    return TransformersBackend(backend.model, backend.tokenizer, batch_size, share_prefix)


@pytest.mark.parametrize("batch_size", [1, 3, 8])
def test_shared_prefix_greedy_is_exact_on_cuda(tiny_model_dir, batch_size):
    from selfalign.generation import SamplingParams

    greedy = SamplingParams(temperature=0, max_tokens=16)
    prompts = [PREFIX + p for p in PROMPTS]
    shared = cuda_backend(tiny_model_dir, "float32", batch_size)
    got = shared.generate(prompts, greedy)
    assert shared.last_shared_prefix >= 100 and shared.shared_attention  # step-by-step kernel
    plain = cuda_backend(tiny_model_dir, "float32", 1, share_prefix=False).generate(prompts, greedy)
    assert [c.text for c in got] == [c.text for c in plain]


def test_bf16_generation_with_every_control(tiny_model_dir):
    """The CPU test's checks (test_transformers_backend.check_every_control) in half precision."""
    from test_transformers_backend import check_every_control

    backend = cuda_backend(tiny_model_dir, "auto")
    assert backend.model.dtype in (torch.bfloat16, torch.float16)
    check_every_control(backend, [PREFIX + p for p in PROMPTS])


def test_engrave_on_cuda_trains_in_half_precision(tiny_model_dir, tmp_path):
    from test_engrave import IDENTITY, sft_rows, tiny_config

    from selfalign.jsonl import write_jsonl_atomic
    from selfalign.stages.stage3_engrave import run_engrave

    write_jsonl_atomic(tmp_path / "sft.jsonl", sft_rows(16))
    run_engrave(
        tiny_config(tiny_model_dir, max_steps=20),
        tmp_path / "sft.jsonl",
        tmp_path / "model",
        IDENTITY,
    )
    log = [json.loads(line) for line in (tmp_path / "model/training_log.jsonl").open()]
    losses = [r["loss"] for r in log if "loss" in r]
    assert losses[-1] < losses[0]
    stats = json.loads((tmp_path / "model/train_stats.json").read_text())
    assert stats["precision"] in ("bf16", "fp16"), stats
    assert (tmp_path / "model/model.safetensors").is_file()


@pytest.mark.parametrize("distributed", ["ddp", "fsdp"])
@pytest.mark.parametrize("method", ["lora", "full"])
def test_launched_training_on_cuda_in_bf16(tiny_model_dir, tmp_path, distributed, method):
    """One process under `accelerate launch` (FSDP from the shipped config), as processes: N
    starts them: the model is gathered, saved once and loads."""
    from test_engrave import IDENTITY, sft_rows, tiny_config
    from transformers import AutoModelForCausalLM

    from selfalign.jsonl import write_jsonl_atomic
    from selfalign.training import launch

    write_jsonl_atomic(tmp_path / "sft.jsonl", sft_rows(16))
    cfg = tiny_config(tiny_model_dir, max_steps=6, method=method, precision="bf16",
                      distributed=distributed)  # fmt: skip
    job = launch.make_job(cfg, tmp_path / "sft.jsonl", tmp_path / "model", IDENTITY)
    launch.train_launched(cfg, 1, job, tmp_path / "model")
    stats = json.loads((tmp_path / "model/train_stats.json").read_text())
    assert stats["steps"] == 6 and stats["precision"] == "bf16"
    AutoModelForCausalLM.from_pretrained(tmp_path / "model", use_safetensors=True)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("queries", ["prefill", "decode"])
def test_shared_prefix_attention_uses_the_fused_cuda_kernels(dtype, queries):
    """Flash / memory-efficient attention with their log-sum-exp, equal to the copied prefix,
    and no fall-back to the step-by-step path (it was 2x slower than copying on an H200)."""
    from test_prefix_attention import padding_mask, plain_attention

    from selfalign.generation import prefix_attention
    from selfalign.generation.prefix_attention import shared_prefix_attention, suffix_mask

    g = torch.Generator(device="cuda").manual_seed(0)
    kind = getattr(torch, dtype)
    rows, heads, kv_heads, dim, own, prefix = 5, 8, 2, 64, 37, 301
    lq = own if queries == "prefill" else 1
    q = torch.randn(rows, heads, lq, dim, generator=g, device="cuda", dtype=kind)
    k, v = (torch.randn(rows, kv_heads, own, dim, generator=g, device="cuda", dtype=kind)
            for _ in range(2))  # fmt: skip
    pk, pv = (torch.randn(1, kv_heads, prefix, dim, generator=g, device="cuda", dtype=kind)
              for _ in range(2))  # fmt: skip
    mask = suffix_mask(padding_mask(rows, own, [0, 3, 5, 9, 30]), lq).cuda()
    got = shared_prefix_attention(q, k, v, mask, pk, pv, scale=dim**-0.5)
    want = plain_attention(q.cpu().float(), k.cpu().float(), v.cpu().float(), mask.cpu(),
                           pk.cpu().float(), pv.cpu().float(), scale=dim**-0.5)  # fmt: skip
    tol = 2e-3 if dtype == "float32" else 2e-2  # fp32 on CUDA: TF32-level sums (8e-4 seen)
    torch.testing.assert_close(got.cpu().float(), want, atol=tol, rtol=tol)
    assert prefix_attention._cuda_fused, "fell back to the step-by-step kernel"
