"""Generation benchmark: a stage-2-shaped job, plain `model.generate` vs selfalign's backend.

    .venv/bin/python bench/generation.py            # CPU, ~30M-parameter model built locally
    .venv/bin/python bench/generation.py --device cuda --dtype bfloat16 --size large

The job: one shared prefix of >= 1,500 tokens (like the constitution + exemplars), a short
suffix of 20-80 tokens per prompt (the instruction), 64 new tokens, greedy, EOS suppressed so
every row decodes the same number of tokens. Each method runs in its own subprocess so its peak
RSS is its own; both run in this one invocation and the table prints their ratio. The greedy
texts of both methods must be identical in float32 (bf16: see `same`). A dated section is
appended to bench/RESULTS.md. On CUDA each method runs the job once untimed first (warm-up).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import resource
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

SIZES = {
    # name: (hidden, layers, heads, vocab) -> ~30M and ~1B parameters
    "small": (512, 8, 8, 8000),
    "large": (2048, 16, 16, 32000),
}
WORDS = (
    "assistant principle ethical helpful honest answer question user reason careful knowledge "
    "date unknown private person program code clarify harmful redirect step think internal "
    "thought because therefore consider example response world science history river mountain "
    "city music number water energy friend learn teach write explain list describe compare"
).split()


def sentence(rng: random.Random, n: int) -> str:
    words = [rng.choice(WORDS) for _ in range(n)]
    return " ".join(words).capitalize() + "."


def make_job(tokenizer, n_prompts: int, prefix_tokens: int, seed: int = 0) -> tuple[str, list[str]]:
    rng = random.Random(seed)
    prefix = "# Principles\n"
    while len(tokenizer(prefix)["input_ids"]) < prefix_tokens:
        prefix += sentence(rng, rng.randint(8, 20)) + " "
    prefix += "\n\n### User\n"
    prompts = []
    for _ in range(n_prompts):
        target = rng.randint(20, 80)
        suffix = ""
        while (
            len(tokenizer(prefix + suffix)["input_ids"]) - len(tokenizer(prefix)["input_ids"])
            < target
        ):
            suffix += rng.choice(WORDS) + " "
        prompts.append(prefix + suffix.strip() + "\n\n### Assistant\n")
    return prefix, prompts


def build_model(path: Path, size: str) -> None:
    from selfalign.tiny import build_tiny_model

    hidden, layers, heads, vocab = SIZES[size]
    rng = random.Random(1)
    corpus = [sentence(rng, 30) for _ in range(3000)]
    build_tiny_model(
        path,
        corpus,
        vocab_size=vocab,
        hidden_size=hidden,
        layers=layers,
        heads=heads,
        context=4096,
        initializer_range=0.02 if size == "large" else 0.1,
    )


def run_method(args) -> dict:
    """One method in this process: returns throughput, peak RSS and the texts."""
    import torch

    from selfalign.generation import SamplingParams
    from selfalign.generation.transformers_backend import TransformersBackend
    from selfalign.modeling import load_model

    torch.manual_seed(0)
    model, tok, device = load_model(args.model, args.device, args.dtype)
    _, prompts = make_job(tok, args.prompts, args.prefix_tokens)
    eos = tok.eos_token_id
    n_params = sum(p.numel() for p in model.parameters())
    if args.method == "plain":
        tok.padding_side = "left"

        def run() -> list[str]:
            texts = []
            for i in range(0, len(prompts), args.batch_size):
                batch = tok(prompts[i : i + args.batch_size], return_tensors="pt", padding=True).to(
                    device
                )
                out = model.generate(
                    **batch,
                    max_new_tokens=args.new_tokens,
                    do_sample=False,
                    suppress_tokens=[eos],
                    pad_token_id=tok.pad_token_id,
                )
                texts += tok.batch_decode(
                    out[:, batch["input_ids"].shape[1] :], skip_special_tokens=True
                )
            return texts
    else:
        params = SamplingParams(temperature=0, max_tokens=args.new_tokens, logit_bias={eos: -1e9})

        def run() -> list[str]:  # a fresh backend: the timed run computes its shared prefix too
            backend = TransformersBackend(model, tok, batch_size=args.batch_size)
            return [c.text for c in backend.generate(prompts, params)]

    if device.startswith("cuda"):
        # CUDA builds kernels and attention plans on first use of each shape: time the second run
        run()
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    texts = run()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    peak_gpu = torch.cuda.max_memory_allocated() / 2**20 if device.startswith("cuda") else 0
    return {
        "seconds": seconds,
        "tokens_per_s": len(prompts) * args.new_tokens / seconds,
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "peak_gpu_mib": peak_gpu,
        "texts": texts,
        "params": n_params,
        "prompt_tokens": [len(tok(p)["input_ids"]) for p in prompts[:1]],
    }


def child(args, method: str, batch_size: int) -> dict:
    cmd = [
        sys.executable,
        __file__,
        "--child",
        method,
        "--model",
        args.model,
        "--device",
        args.device,
        "--dtype",
        args.dtype,
        "--prompts",
        str(args.prompts),
        "--prefix-tokens",
        str(args.prefix_tokens),
        "--new-tokens",
        str(args.new_tokens),
        "--batch-size",
        str(batch_size),
    ]
    out = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if out.returncode != 0:
        raise SystemExit(f"{method} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def same(plain: dict, ours: dict) -> str:
    """'yes' when every greedy text is identical, else how many rows are.

    In float32 they must all be identical. In bf16 the two methods multiply matrices of different
    shapes (full prompts vs prefix + suffix), so rounding differs and near-tied logits of a
    randomly initialised model can flip; tests/test_gpu.py checks exactness on CUDA in float32.
    """
    pairs = list(zip(plain["texts"], ours["texts"], strict=True))
    hits = sum(a == b for a, b in pairs)
    return "yes" if hits == len(pairs) else f"{hits}/{len(pairs)} rows"


def versions() -> str:
    import torch
    import transformers

    return f"torch {torch.__version__}, transformers {transformers.__version__}, Python {platform.python_version()}"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--child", choices=["plain", "ours"])
    p.add_argument("--model", default="")
    p.add_argument("--size", choices=sorted(SIZES), default="small")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--prompts", type=int, default=32)
    p.add_argument("--prefix-tokens", type=int, default=1500)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--batch-sizes", default="8,16")
    p.add_argument("--no-record", action="store_true", help="do not append to bench/RESULTS.md")
    args = p.parse_args()
    if args.child:
        args.method = args.child
        print(json.dumps(run_method(args)))
        return

    with tempfile.TemporaryDirectory() as tmp:
        if not args.model:
            args.model = str(Path(tmp) / "model")
            build_model(Path(args.model), args.size)
        rows = []
        for bs in [int(b) for b in args.batch_sizes.split(",")]:
            plain, ours = child(args, "plain", bs), child(args, "ours", bs)
            rows.append((bs, plain, ours))
            print(
                f"batch {bs}: plain {plain['tokens_per_s']:.1f} tok/s, ours {ours['tokens_per_s']:.1f} tok/s, "
                f"x{ours['tokens_per_s'] / plain['tokens_per_s']:.2f}, identical: {same(plain, ours)}",
                flush=True,
            )
    params = rows[0][1]["params"]
    gpu = args.device.startswith("cuda")
    header = (
        "| batch | plain generate tok/s | selfalign tok/s | speed-up | peak RSS plain / ours (MiB) |"
        + (" peak GPU plain / ours (MiB) |" if gpu else "")
        + " greedy identical |"
    )
    lines = [header, "|" + "---|" * (header.count("|") - 1)]
    for bs, plain, ours in rows:
        line = (
            f"| {bs} | {plain['tokens_per_s']:.1f} | {ours['tokens_per_s']:.1f} | "
            f"**{ours['tokens_per_s'] / plain['tokens_per_s']:.2f}x** | "
            f"{plain['peak_rss_mib']:.0f} / {ours['peak_rss_mib']:.0f} |"
        )
        if gpu:
            line += f" {plain['peak_gpu_mib']:.0f} / {ours['peak_gpu_mib']:.0f} |"
        line += f" {same(plain, ours)} |"
        lines.append(line)
    table = "\n".join(lines)
    print(table)
    section = (
        f"\n## Generation, {date.today().isoformat()} ({args.device}, {args.dtype})\n\n"
        f"`python bench/generation.py {' '.join(sys.argv[1:])}`: {args.prompts} prompts, shared prefix "
        f"{args.prefix_tokens}+ tokens, suffixes 20-80 tokens, {args.new_tokens} new tokens, greedy; model "
        f"{params / 1e6:.0f}M parameters. Machine: {platform.machine()}, {os.cpu_count()} CPUs; {versions()}.\n\n"
        f"{table}\n"
    )
    if not args.no_record:
        results = Path(__file__).with_name("RESULTS.md")
        if not results.exists():
            results.write_text(
                "# Benchmark results\n\nAppended by the scripts in `bench/`; newest last.\n"
            )
        with results.open("a") as f:
            f.write(section)
    if args.dtype == "float32" and any(plain["texts"] != ours["texts"] for _, plain, ours in rows):
        raise SystemExit("greedy outputs differ between plain generate and selfalign")


if __name__ == "__main__":
    main()
