"""Generation benchmark: one stage-2-shaped job through every engine a user can pick.

    python bench/generation.py                       # CPU, ~30M-parameter model built locally
    python bench/generation.py --device cuda --dtype bfloat16 --size large

Run it with the Python of an environment that has selfalign (and vLLM, for the vLLM rows: `make
vllm` installs vLLM's CPU build; on a GPU machine `pip install 'selfalign[vllm]'`).

The job: one shared prefix of >= 1,500 tokens (like the constitution + exemplars), a short
suffix of 20-80 tokens per prompt (the instruction), 64 new tokens, greedy, EOS suppressed so
every row decodes the same number of tokens. The rows (`--methods`, default: all installed):

- `plain`: Hugging Face `model.generate`, prompts left-padded in batches of `--batch-sizes`.
- `ours`: selfalign's transformers backend (`model.backend: transformers`), same batches; the
  shared prefix is prefilled once.
- `vllm`: selfalign's in-process vLLM backend (`model.backend: vllm`), prefix caching on.
- `vllm-server`: a vLLM OpenAI-compatible server that selfalign starts itself (`model.backend:
  openai`, `model.serve: auto`), `--concurrency` requests in flight (default: all prompts).

The vLLM engines take every prompt at once and batch on their own, so their rows appear once,
not per batch size, and their speed-up is against the fastest `plain` row (named in the cell).
If `import vllm` fails their rows are skipped with a note. vLLM picks its device itself: the
CUDA build uses the first visible GPU(s) (pass `--device cuda`), the CPU build the CPU (its KV
cache takes VLLM_CPU_KVCACHE_SPACE GiB, 4 unless set).

Each row runs in its own subprocess. Timed: the generation only; "start-up" is loading the model,
or starting the engine or server (imports in the benchmark's own process excluded). Peak RSS is
the peak of the summed RSS of the subprocess and every process it started (vLLM's engine and
server run in their own processes), sampled every 0.1 s; pages shared between processes count
once per process. On CPU vLLM's rows include its whole KV cache (VLLM_CPU_KVCACHE_SPACE, zeroed
at start-up). On CUDA every row first runs untimed once (warm-up); the vLLM rows warm up on
another job with the same shapes, so their prefix cache does not serve the timed run. Peak GPU
memory is not measured for vLLM (it reserves `gpu_memory_utilization`, 90%, of the card).

In float32 every row's greedy texts must equal plain generate's, else the script exits non-zero
(bf16: see `same`). A dated section is appended to bench/RESULTS.md (`--no-record`: not).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import os
import platform
import random
import resource
import subprocess
import sys
import tempfile
import threading
import time
from datetime import date
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "4")  # GiB; vLLM's CPU build only

SIZES = {
    # name: (hidden, layers, heads, vocab) -> ~30M and ~1B parameters
    "small": (512, 8, 8, 8000),
    "large": (2048, 16, 16, 32000),
}
METHODS = ("plain", "ours-copy", "ours", "vllm", "vllm-server")
VLLM_METHODS = ("vllm", "vllm-server")
LABELS = {
    "plain": "plain generate",
    "ours-copy": "selfalign transformers, prefix copied per row",
    "ours": "selfalign transformers",
    "vllm": "selfalign vllm (in-process)",
    "vllm-server": "vLLM server (openai, serve=auto)",
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


class TreePeak:
    """Peak summed RSS (MiB) of this process and its descendants, sampled in a thread.

    Without psutil (`sees_tree` False) only this process is seen: its exact peak (getrusage)."""

    def __init__(self, every: float = 0.1):
        self.peak, self._every, self._done = 0, every, threading.Event()
        try:
            import psutil
        except ImportError:
            self.sees_tree = False
            return
        self.sees_tree, self._me, self._error = True, psutil.Process(), psutil.Error
        threading.Thread(target=self._run, daemon=True).start()

    def _run(self) -> None:
        while not self._done.wait(self._every):
            self._sample()

    def _sample(self) -> None:
        total = 0
        for proc in [self._me, *self._me.children(recursive=True)]:
            with contextlib.suppress(self._error):  # a process that ended meanwhile
                total += proc.memory_info().rss
        self.peak = max(self.peak, total)

    def stop(self) -> float:
        """The peak so far, in MiB; stops sampling."""
        self._done.set()
        if self.sees_tree:
            self._sample()
        own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        return max(self.peak, own) / 2**20


def greedy_params(eos: int, new_tokens: int):
    from selfalign.generation import SamplingParams

    return SamplingParams(temperature=0, max_tokens=new_tokens, logit_bias={eos: -100})


def texts_and_tokens(completions) -> tuple[list[str], int]:
    return [c.text for c in completions], sum(c.completion_tokens for c in completions)


def plain_runner(model, tok, device: str, args):
    tok.padding_side = "left"

    def run(prompts: list[str]) -> tuple[list[str], int]:
        texts = []
        for i in range(0, len(prompts), args.batch_size):
            batch = tok(prompts[i : i + args.batch_size], return_tensors="pt", padding=True)
            batch = batch.to(device)
            out = model.generate(
                **batch,
                max_new_tokens=args.new_tokens,
                do_sample=False,
                suppress_tokens=[tok.eos_token_id],
                pad_token_id=tok.pad_token_id,
            )
            texts += tok.batch_decode(
                out[:, batch["input_ids"].shape[1] :], skip_special_tokens=True
            )
        return texts, len(prompts) * args.new_tokens

    return run


def run_torch(args, tree: TreePeak) -> dict:
    """plain or ours in this process."""
    import torch

    from selfalign.generation.transformers_backend import TransformersBackend
    from selfalign.modeling import load_model

    torch.manual_seed(0)
    start = time.perf_counter()
    model, tok, device = load_model(args.model, args.device, args.dtype)
    startup = time.perf_counter() - start
    _, prompts = make_job(tok, args.prompts, int(args.prefix_tokens))
    if args.method == "plain":
        run = plain_runner(model, tok, device, args)
    else:
        params = greedy_params(tok.eos_token_id, args.new_tokens)

        def run(prompts: list[str]) -> tuple[list[str], int]:
            # a fresh backend: the timed run computes its shared prefix too
            backend = TransformersBackend(model, tok, batch_size=args.batch_size)
            backend.shared_attention &= args.method == "ours"  # ours-copy: the row-by-row way
            return texts_and_tokens(backend.generate(prompts, params))

    cuda = device.startswith("cuda")
    if cuda:
        # CUDA builds kernels and attention plans on first use of each shape: time the second run
        run(prompts)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    texts, tokens = run(prompts)
    if cuda:
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    return {
        "seconds": seconds,
        "tokens_per_s": tokens / seconds,
        "startup_s": startup,
        "peak_rss_mib": tree.stop(),
        "peak_gpu_mib": torch.cuda.max_memory_allocated() / 2**20 if cuda else None,
        "texts": texts,
        "params": sum(p.numel() for p in model.parameters()),
    }


def run_vllm(args, tree: TreePeak) -> dict:
    """vllm or vllm-server, driven from this process through selfalign's backends."""
    try:
        import vllm
    except ImportError as e:
        return {"skipped": f"import vllm failed ({e})"}
    import torch

    if not args.device.startswith("cuda") and torch.cuda.is_available():
        return {"skipped": "this vLLM build runs on the GPU here: pass --device cuda"}
    from selfalign.generation import BackendConfig, load_backend
    from selfalign.modeling import load_tokenizer

    tok = load_tokenizer(args.model)
    _, prompts = make_job(tok, args.prompts, int(args.prefix_tokens))
    params = greedy_params(tok.eos_token_id, args.new_tokens)
    if args.method == "vllm":
        cfg = BackendConfig(model=args.model, backend="vllm", dtype=args.dtype)
    else:
        concurrency = args.concurrency or args.prompts
        cfg = BackendConfig(
            model=args.model, backend="openai", serve="auto", dtype=args.dtype,
            concurrency=concurrency,
        )  # fmt: skip
    start = time.perf_counter()
    backend = load_backend(cfg)
    startup = time.perf_counter() - start
    try:
        if args.device.startswith("cuda"):
            # warm-up on another job of the same shapes: the prefix cache must not serve the
            # timed run
            backend.generate(
                make_job(tok, args.prompts, int(args.prefix_tokens), seed=1)[1], params
            )
        start = time.perf_counter()
        texts, tokens = texts_and_tokens(backend.generate(prompts, params))
        seconds = time.perf_counter() - start
        # before close, which ends the engine's processes; without psutil they are not seen
        peak = tree.stop() if tree.sees_tree else None
    finally:
        backend.close()
    return {
        "seconds": seconds,
        "tokens_per_s": tokens / seconds,
        "startup_s": startup,
        "peak_rss_mib": peak,
        "peak_gpu_mib": None,
        "texts": texts,
        "params": None,
        "vllm": vllm.__version__,
    }


def run_method(args) -> dict:
    """One method in this process: throughput, start-up, peak RSS and the texts."""
    tree = TreePeak()
    return (run_vllm if args.method in VLLM_METHODS else run_torch)(args, tree)


def child(args, method: str, prefix: int, batch_size: int) -> dict:
    """`method` in a subprocess of its own (its memory is its own); its result comes back in a
    file, as vLLM's processes may write to stdout."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "result.json"
        cmd = [sys.executable, __file__, "--child", method, "--out", str(out),
               "--model", args.model, "--device", args.device, "--dtype", args.dtype,
               "--prompts", str(args.prompts), "--prefix-tokens", str(prefix),
               "--new-tokens", str(args.new_tokens), "--batch-size", str(batch_size),
               "--concurrency", str(args.concurrency)]  # fmt: skip
        done = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if done.returncode != 0 or not out.exists():
            raise SystemExit(f"{method} failed:\n{done.stderr[-3000:]}")
        return json.loads(out.read_text())


def same(reference: dict, other: dict) -> str:
    """'yes' when every greedy text is identical, else how many rows are.

    In float32 they must all be identical. In bf16 the methods multiply matrices of different
    shapes (full prompts vs prefix + suffix, other kernels in vLLM), so rounding differs and
    near-tied logits of a randomly initialised model can flip; tests/test_gpu.py checks
    exactness on CUDA in float32.
    """
    pairs = list(zip(reference["texts"], other["texts"], strict=True))
    hits = sum(a == b for a, b in pairs)
    return "yes" if hits == len(pairs) else f"{hits}/{len(pairs)} rows"


def versions(rows: list[tuple[str, int | None, dict]], gpu: bool) -> str:
    import torch
    import transformers

    parts = [f"torch {torch.__version__}", f"transformers {transformers.__version__}"]
    vllm = next((r["vllm"] for *_, r in rows if r.get("vllm")), None)
    if vllm:
        parts.append(f"vLLM {vllm}")
    parts.append(f"Python {platform.python_version()}")
    card = f", {torch.cuda.get_device_name()}" if gpu else ""
    return f"{platform.machine()}, {os.cpu_count()} CPUs{card}; {', '.join(parts)}"


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--child", choices=METHODS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    p.add_argument("--model", default="", help="a local model directory (default: build one)")
    p.add_argument("--size", choices=sorted(SIZES), default="small")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--prompts", type=int, default=32)
    p.add_argument("--prefix-tokens", default="1500", help="shared prefix; a list sweeps")
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--batch-sizes", default="8,16", help="plain and ours: one row per size")
    p.add_argument("--methods", help=f"comma-separated, of {','.join(METHODS)} (default: all)")
    p.add_argument(
        "--concurrency", type=int, default=0, help="vllm-server: requests in flight (0: all)"
    )
    p.add_argument("--no-record", action="store_true", help="do not append to bench/RESULTS.md")
    args = p.parse_args()
    if args.methods:
        args.methods = args.methods.split(",")
        bad = [m for m in args.methods if m not in METHODS]
        if bad:
            p.error(f"--methods: unknown {', '.join(bad)}; choose from {', '.join(METHODS)}")
    elif importlib.util.find_spec("vllm") is None:
        print("note: vLLM is not installed here: no vllm, vllm-server rows", flush=True)
        args.methods = [m for m in METHODS if m not in VLLM_METHODS]
    else:
        args.methods = list(METHODS)
    return args


def run_all(args) -> list[tuple[str, int, int | None, dict]]:
    """(method, prefix tokens, batch size or None, result) per row: per prefix length, plain and
    ours per batch size, then the vLLM rows once."""
    jobs = []
    for prefix in [int(p) for p in str(args.prefix_tokens).split(",")]:
        jobs += [
            (m, prefix, bs)
            for bs in [int(b) for b in args.batch_sizes.split(",")]
            for m in METHODS
            if m in args.methods and m not in VLLM_METHODS
        ]
        jobs += [(m, prefix, None) for m in VLLM_METHODS if m in args.methods]
    rows = []
    for method, prefix, bs in jobs:
        result = child(args, method, prefix, bs or args.batch_size)
        if "skipped" in result:
            print(f"note: {method} skipped: {result['skipped']}", flush=True)
            continue
        rows.append((method, prefix, bs, result))
        print(
            f"{method} prefix {prefix}{f' batch {bs}' if bs else ''}: "
            f"{result['tokens_per_s']:.1f} tok/s, start-up {result['startup_s']:.1f} s",
            flush=True,
        )
    return rows


def reference_of(rows, method: str, prefix: int, bs: int | None) -> tuple[dict | None, str]:
    """The plain row a row is compared with, and how the speed-up cell names it: plain at the
    same prefix and batch size, or for the vLLM rows the fastest plain row of its prefix."""
    plain = {b: r for m, p, b, r in rows if m == "plain" and p == prefix}
    if bs is not None:
        return plain.get(bs), ""
    if not plain:
        return None, ""
    best = max(plain, key=lambda b: plain[b]["tokens_per_s"])
    return plain[best], f" (vs plain batch {best})"


def table(rows, gpu: bool) -> str:
    def mib(value: float | None) -> str:
        return "n/a" if value is None else f"{value:.0f}"

    header = (
        "| method | prefix | batch | tok/s | speed-up vs plain | start-up (s) | peak RSS (MiB) |"
        + (" peak GPU (MiB) |" if gpu else "")
        + " greedy identical |"
    )
    lines = [header, "|" + "---|" * (header.count("|") - 1)]
    for method, prefix, bs, r in rows:
        ref, vs = reference_of(rows, method, prefix, bs)
        if method == "plain":
            speed, identical = "1.00x", "(reference)"
        elif ref is None:
            speed, identical = "n/a (no plain row)", "n/a"
        else:
            speed = f"**{r['tokens_per_s'] / ref['tokens_per_s']:.2f}x**{vs}"
            identical = same(ref, r)
        line = (
            f"| {LABELS[method]} | {prefix} | {bs or 'all'} | {r['tokens_per_s']:.1f} | {speed} | "
            f"{r['startup_s']:.1f} | {mib(r['peak_rss_mib'])} |"
        )
        if gpu:
            line += f" {mib(r['peak_gpu_mib'])} |"
        lines.append(line + f" {identical} |")
    return "\n".join(lines)


def kv_cache_note(rows, gpu: bool) -> str:
    """vLLM's CPU build fills its whole KV cache when it starts: it is in the vLLM rows' RSS."""
    if gpu or not any(m in VLLM_METHODS for m, *_ in rows):
        return ""
    space = os.environ["VLLM_CPU_KVCACHE_SPACE"]
    return f" vLLM KV cache: VLLM_CPU_KVCACHE_SPACE={space} GiB, part of the vLLM rows' peak RSS."


def record(args, rows, text: str) -> None:
    gpu = args.device.startswith("cuda")
    params = next((r["params"] for *_, r in rows if r["params"]), None)
    size = f"{params / 1e6:.0f}M parameters" if params else f"size {args.size}"
    section = (
        f"\n## Generation, {date.today().isoformat()} ({args.device}, {args.dtype})\n\n"
        f"`python bench/generation.py {' '.join(sys.argv[1:])}`: {args.prompts} prompts, shared prefix "
        f"{args.prefix_tokens}+ tokens, suffixes 20-80 tokens, {args.new_tokens} new tokens, greedy; model "
        f"{size}. Machine: {versions(rows, gpu)}.{kv_cache_note(rows, gpu)}\n\n"
        f"{text}\n"
    )
    results = Path(__file__).with_name("RESULTS.md")
    if not results.exists():
        results.write_text(
            "# Benchmark results\n\nAppended by the scripts in `bench/`; newest last.\n"
        )
    with results.open("a") as f:
        f.write(section)


def main() -> None:
    args = parse_args()
    if args.child:
        args.method = args.child
        Path(args.out).write_text(json.dumps(run_method(args)))
        return

    with tempfile.TemporaryDirectory() as tmp:
        if not args.model:
            args.model = str(Path(tmp) / "model")
            build_model(Path(args.model), args.size)
        rows = run_all(args)
    if not rows:
        raise SystemExit("no method ran")
    text = table(rows, args.device.startswith("cuda"))
    print(text)
    if not args.no_record:
        record(args, rows, text)
    if args.dtype == "float32":
        differ = [
            f"{m} prefix {p}{f' batch {bs}' if bs else ''}"
            for m, p, bs, r in rows
            if (ref := reference_of(rows, m, p, bs)[0]) is not None and r["texts"] != ref["texts"]
        ]
        if differ:
            raise SystemExit(f"greedy outputs differ from plain generate: {', '.join(differ)}")


if __name__ == "__main__":
    main()
