"""Multiple-choice scoring benchmark: lm-eval's `hf` model vs selfalign's SharedPrefixLM.

    python bench/eval.py                        # CPU, ~34M-parameter model built locally
    python bench/eval.py --device cuda --size large --limit 200

The job: `lm_eval.simple_evaluate` on the package's own task files (`selfalign/evaluation/
lm_tasks`, loaded with `TaskManager(include_path=..., include_defaults=False)`), one timed call per
task of `--tasks` (default TruthfulQA MC1, MC2 and the HHH group), `--limit` items each, batch
size `--batch-size` for both rows:

- `hf`: `lm_eval.models.huggingface.HFLM`, lm-eval's `hf` model used the default way (every
  (context, choice) pair is one sequence; lm-eval's own logits cache on).
- `ours`: `selfalign.evaluation.scorer.SharedPrefixLM`, the same constructor arguments; each
  distinct context runs once and the prefix shared by many contexts (TruthfulQA's QA primer) once.

The model is built locally (`selfalign.tiny.build_tiny_model`, sizes of bench/generation.py) with
a tokenizer trained on the bundled evaluation texts, so prompts tokenize to realistic lengths.
Each (method, task) runs in a subprocess of its own, `--repeats` times; the two methods of a
task run back to back, alternating which goes first, and a task's time is its fastest repeat.
Timed: the whole `simple_evaluate` call (task building and metrics included, model loading not);
each process first runs its task once untimed on 2 items (lazy imports, CUDA kernels).
`--threads N` sets torch's CPU threads: on a machine shared with other work, 1 thread gives
steady timings where torch's default (one per core) stalls whenever another process holds a core.

Reported per task: items (questions) and requests (choices) scored per second, request tokens per
second (the tokens of every context + choice pair, the work asked for, the same for both rows),
the positions each method actually ran through the model (padding included), and whether the
accuracies and every choice's log-likelihood agree. In float32 the accuracies must (MC1 and HHH
exactly, MC2 to float rounding), else the script exits non-zero. A dated section is appended to
bench/RESULTS.md (`--no-record`: not).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(Path(__file__).parent))

from generation import SIZES, versions  # noqa: E402

METHODS = ("ours", "hf")
LABELS = {"hf": "lm-eval hf (HFLM)", "ours": "selfalign SharedPrefixLM"}
DEFAULT_TASKS = "truthfulqa_mc1,truthfulqa_mc2,hhh"


def eval_corpus() -> list[str]:
    """The bundled evaluation texts, to train the bench model's tokenizer on."""
    from selfalign.evaluation import data

    corpus = []
    for item in data.truthfulqa_mc():
        corpus += [item["question"], *item["mc2_targets"]["choices"]]
    for subset in data.HHH_SUBSETS:
        for item in data.hhh(subset):
            corpus += [item["input"], *item["choices"]]
    return corpus


def build_model(path: Path, size: str) -> None:
    from selfalign.tiny import build_tiny_model

    hidden, layers, heads, vocab = SIZES[size]
    build_tiny_model(
        path,
        eval_corpus(),
        vocab_size=vocab,
        hidden_size=hidden,
        layers=layers,
        heads=heads,
        context=4096,
        initializer_range=0.02 if size == "large" else 0.1,
    )


def positions_counter(model) -> list[int]:
    """A one-element list that counts the positions (rows x columns, padding included) every
    forward pass of `model` computes."""
    count = [0]

    def hook(_module, args, kwargs):
        ids = kwargs.get("input_ids", args[0] if args else None)
        count[0] += ids.numel()

    model.register_forward_pre_hook(hook, with_kwargs=True)
    return count


def evaluate_task(lm, task: str, manager, limit: int) -> dict:
    """One timed `simple_evaluate` call; its accuracies, log-likelihoods and request sizes."""
    import lm_eval
    import torch

    cuda = lm.device.type == "cuda"
    start = time.perf_counter()
    out = lm_eval.simple_evaluate(
        model=lm, tasks=[task], task_manager=manager, limit=limit, log_samples=True,
        verbosity="ERROR",
    )  # fmt: skip
    if cuda:
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    samples = [doc for task_docs in out["samples"].values() for doc in task_docs]
    pairs = [pair for doc in samples for pair in doc["arguments"]]
    return {
        "seconds": seconds,
        "items": len(samples),
        "requests": len(pairs),
        "tokens": sum(len(c) + len(x) for c, x in (lm._encode_pair(*p) for p in pairs)),
        "acc": {name: r["acc,none"] for name, r in sorted(out["results"].items())},
        "lls": [r[0] for doc in samples for r in doc["filtered_resps"]],
    }


def run_method(args) -> dict:
    """The tasks of `--tasks` with one method, in this process."""
    import torch
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    import selfalign.evaluation.lm_tasks
    from selfalign.evaluation.scorer import SharedPrefixLM

    torch.manual_seed(0)
    if args.threads:
        torch.set_num_threads(args.threads)
    manager = TaskManager(
        include_path=str(Path(selfalign.evaluation.lm_tasks.__file__).parent),
        include_defaults=False,
    )
    cls = SharedPrefixLM if args.method == "ours" else HFLM
    lm = cls(
        pretrained=args.model, device=args.device, dtype=args.dtype, batch_size=args.batch_size
    )
    tasks = args.tasks.split(",")
    for task in tasks:  # warm-up
        evaluate_task(lm, task, manager, min(args.limit, 2))
    counter = positions_counter(lm.model)
    results = {}
    for task in tasks:
        before = counter[0]
        results[task] = evaluate_task(lm, task, manager, args.limit)
        results[task]["positions"] = counter[0] - before
    params = sum(p.numel() for p in lm.model.parameters())
    return {"tasks": results, "params": params}


def child(args, method: str, task: str) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "result.json"
        cmd = [sys.executable, __file__, "--child", method, "--out", str(out),
               "--model", args.model, "--device", args.device, "--dtype", args.dtype,
               "--tasks", task, "--limit", str(args.limit),
               "--batch-size", str(args.batch_size), "--threads", str(args.threads)]  # fmt: skip
        done = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if done.returncode != 0 or not out.exists():
            raise SystemExit(f"{method} failed:\n{done.stderr[-3000:]}")
        return json.loads(out.read_text())


def run_all(args) -> dict[str, dict]:
    """{method: {"tasks": {task: result}, "params": n}}: per repeat and task, both methods back
    to back (alternating which goes first), each task's time the fastest of its repeats."""
    best: dict[str, dict] = {m: {"tasks": {}} for m in METHODS}
    for repeat in range(args.repeats):
        for task in args.tasks.split(","):
            for method in METHODS if repeat % 2 == 0 else reversed(METHODS):
                result = child(args, method, task)
                r = result["tasks"][task]
                print(f"{method} {task} (run {repeat + 1}): {r['seconds']:.1f} s", flush=True)
                best[method]["params"] = result["params"]
                kept = best[method]["tasks"].setdefault(task, r)
                kept["seconds"] = min(kept["seconds"], r["seconds"])
    return best


def agreement(ours: dict, hf: dict) -> tuple[bool, float]:
    """(accuracies equal, largest relative log-likelihood difference). MC1/HHH accuracies are
    counts of argmax hits and must be equal; MC2's is a sum of probabilities, equal to float
    rounding. Relative, since a long answer's log-likelihood is a sum in the hundreds."""
    diff = max(
        (abs(a - b) / max(abs(b), 1.0) for a, b in zip(ours["lls"], hf["lls"], strict=True)),
        default=0.0,
    )
    same = ours["acc"].keys() == hf["acc"].keys() and all(
        abs(ours["acc"][k] - hf["acc"][k]) <= 1e-6 for k in hf["acc"]
    )
    return same, diff


def table(best: dict[str, dict]) -> tuple[str, bool]:
    header = (
        "| task | items | requests | method | items/s | requests/s | request tok/s | "
        "positions run | speed-up | same acc | max rel. Δ log-lik |"
    )
    lines = [header, "|" + "---|" * (header.count("|") - 1)]
    all_same = True
    for task, hf in best["hf"]["tasks"].items():
        ours = best["ours"]["tasks"][task]
        same, diff = agreement(ours, hf)
        all_same &= same
        acc = ", ".join(f"{k} {v:.4f}" for k, v in hf["acc"].items())
        for method, r in (("hf", hf), ("ours", ours)):
            rate = lambda n, r=r: f"{n / r['seconds']:.1f}"  # noqa: E731
            speed = "1.00x" if method == "hf" else f"**{hf['seconds'] / r['seconds']:.2f}x**"
            verdict = f"yes ({acc})" if same else "**no**"
            lines.append(
                f"| {task} | {r['items']} | {r['requests']} | {LABELS[method]} | "
                f"{rate(r['items'])} | {rate(r['requests'])} | {rate(r['tokens'])} | "
                f"{r['positions']:,} | {speed} | {verdict if method == 'ours' else ''} | "
                f"{f'{diff:.1e}' if method == 'ours' else ''} |"
            )
    return "\n".join(lines), all_same


def record(args, best, text: str) -> None:
    import lm_eval

    gpu = args.device.startswith("cuda")
    params = best["hf"]["params"]
    section = (
        f"\n## MC scoring (lm-eval), {date.today().isoformat()} ({args.device}, {args.dtype})\n\n"
        f"`python bench/eval.py {' '.join(sys.argv[1:])}`: the package's lm-eval task files, "
        f"limit {args.limit} per task, batch size {args.batch_size}, fastest of {args.repeats} "
        f"back-to-back runs per method, torch CPU threads: {args.threads or 'default'}; model "
        f"{params / 1e6:.0f}M parameters (build_tiny_model, size {args.size}, tokenizer trained "
        f"on the evaluation texts). Machine: "
        f"{versions([], gpu)}, lm-eval {lm_eval.__version__}.\n\n{text}\n"
    )
    with Path(__file__).with_name("RESULTS.md").open("a") as f:
        f.write(section)


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--child", choices=METHODS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    p.add_argument("--model", default="", help="a local model directory (default: build one)")
    p.add_argument("--size", choices=sorted(SIZES), default="small")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--tasks", default=DEFAULT_TASKS, help="comma-separated lm-eval task names")
    p.add_argument("--limit", type=int, default=50, help="items per task")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    p.add_argument("--repeats", type=int, default=3, help="runs per method and task")
    p.add_argument("--no-record", action="store_true", help="do not append to bench/RESULTS.md")
    return p.parse_args()


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
        best = run_all(args)
    text, same = table(best)
    print(text)
    if not args.no_record:
        record(args, best, text)
    if args.dtype == "float32" and not same:
        raise SystemExit("SharedPrefixLM's accuracies differ from HFLM's")


if __name__ == "__main__":
    main()
