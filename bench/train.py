"""SFT benchmark: the engraving recipe with and without length-grouped batching, or over
several training processes.

    .venv/bin/python bench/train.py                 # CPU, ~30M-parameter model built locally
    .venv/bin/python bench/train.py --processes 1,2 # the same run in 1 and in 2 processes

Runs `selfalign.stages.stage3_engrave.run_engrave` twice on the same synthetic SFT file (answers of very
different lengths, as stage 2 produces) with the same settings except `group_by_length`, and
reports real (non-padding) tokens per second from the training log, and the share of padding
tokens in the micro-batches each sampler forms over the dataset's tokenised lengths (the same
samplers the trainer uses: random order, or transformers' LengthGroupedSampler).
With --processes, each count trains the same steps at the same effective batch (micro batch x
processes x accumulation), each in a fresh subprocess (several under `accelerate launch`, as
`processes: N` does): real tokens/s of all processes together, and the peak RSS of one training
process (the largest). A dated section is appended to bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile
from datetime import date
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("SELFALIGN_PROGRESS", "0")
sys.path.insert(0, str(Path(__file__).parent))

from generation import build_model, sentence, versions  # noqa: E402


def sft_rows(n: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        answer = " ".join(
            sentence(rng, rng.randint(6, 14)) for _ in range(rng.choice([1, 2, 4, 8, 16]))
        )
        question = sentence(rng, rng.randint(5, 25)).rstrip(".") + "?"
        rows.append({"id": f"b{i}", "instruction": question, "input": "", "output": answer})
    return rows


def padding_share(lengths: list[int], batch: int, grouped: bool, seed: int) -> float:
    """Padding tokens / all tokens over the micro-batches of one epoch."""
    import torch
    from transformers.trainer_pt_utils import LengthGroupedSampler

    g = torch.Generator().manual_seed(seed)
    if grouped:
        order = list(LengthGroupedSampler(batch, lengths=lengths, generator=g))
    else:
        order = torch.randperm(len(lengths), generator=g).tolist()
    real = padded = 0
    for k in range(0, len(order), batch):
        chunk = [lengths[i] for i in order[k : k + batch]]
        real += sum(chunk)
        padded += max(chunk) * len(chunk)
    return 1 - real / padded


def run(model: Path, data: Path, out: Path, grouped: bool, args, processes: int = 1) -> dict:
    from selfalign.stages.stage3_engrave import TrainConfig, run_engrave
    from selfalign.text.constitution import Identity

    cfg = TrainConfig(
        model=str(model), method="lora", max_steps=args.steps, micro_batch_size=args.batch,
        effective_batch_size=args.effective or args.batch, max_length=512, warmup_steps=0,
        logging_steps=1, save_steps=10_000, gradient_checkpointing=False, merge=False,
        group_by_length=grouped, resume=False, seed=0, processes=processes,
    )  # fmt: skip
    stats = run_engrave(cfg, data, out, Identity())
    log = [json.loads(line) for line in (out / "training_log.jsonl").read_text().splitlines()]
    rates = [r["tokens_per_second"] for r in log[1:]]  # the first step includes warm-up costs
    return {"tokens_per_second": sum(rates) / len(rates), "seconds": stats.get("seconds")}


def one_run(args) -> None:
    """In a fresh process (--one N): train with N processes, print the figures as JSON."""
    import resource

    model, data, out = (Path(p) for p in args.one_paths)
    result = run(model, data, out, False, args, processes=args.one)
    peak = max(resource.getrusage(who).ru_maxrss for who in
               (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN))  # fmt: skip
    print(json.dumps({**result, "peak_rss_mib": peak / 1024}))


def compare_processes(args) -> None:
    import subprocess

    from selfalign.jsonl import write_jsonl_atomic

    counts = [int(n) for n in args.processes.split(",")]
    args.effective = args.batch * max(counts)  # every count makes the same optimizer steps
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        build_model(tmp / "model", "small")
        write_jsonl_atomic(tmp / "sft.jsonl", sft_rows(args.rows))
        for n in counts:
            child = subprocess.run(
                [sys.executable, __file__, "--one", str(n), "--rows", str(args.rows),
                 "--steps", str(args.steps), "--batch", str(args.batch),
                 "--effective", str(args.effective), "--one-paths", str(tmp / "model"),
                 str(tmp / "sft.jsonl"), str(tmp / f"out{n}")],
                capture_output=True, text=True, check=False,
            )  # fmt: skip
            if child.returncode:
                sys.exit(f"{n} processes failed:\n{child.stderr[-3000:]}")
            rows.append((n, json.loads(child.stdout.strip().splitlines()[-1])))
    base = rows[0][1]["tokens_per_second"]
    table = (
        "| processes | accumulation | real tokens/s | vs 1st row | peak RSS per process (MiB) |\n"
    )
    table += "|---|---|---|---|---|\n"
    for n, r in rows:
        accumulation = args.effective // (args.batch * n)
        table += (f"| {n} | {accumulation} | {r['tokens_per_second']:.0f} | "
                  f"{r['tokens_per_second'] / base:.2f}x | {r['peak_rss_mib']:.0f} |\n")  # fmt: skip
    print(table)
    record(
        args,
        table,
        f"--processes {args.processes} ",
        "SFT in several processes",
        f"effective batch {args.effective} (micro batch {args.batch}), DDP over gloo",
    )


def record(args, table: str, flags: str, title: str, what: str) -> None:
    section = (
        f"\n## {title} ({date.today().isoformat()})\n\n"
        f"`bench/train.py {flags}--rows {args.rows} --steps {args.steps} --batch {args.batch}`: LoRA "
        f"r=16 on q,k,v,o of the ~30M-parameter bench model, CPU fp32, answers of 6-224 words, "
        f"{what}. Machine: {versions([], gpu=False)}.\n\n{table}"
    )
    if not args.no_record:
        with Path(__file__).with_name("RESULTS.md").open("a") as f:
            f.write(section)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--rows", type=int, default=256)
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--batch", type=int, default=8, help="micro batch per process")
    p.add_argument("--processes", help="compare these process counts (e.g. 1,2)")
    p.add_argument("--no-record", action="store_true", help="do not append to bench/RESULTS.md")
    p.add_argument("--one", type=int, help=argparse.SUPPRESS)  # a child of --processes
    p.add_argument("--one-paths", nargs=3, help=argparse.SUPPRESS)
    p.add_argument("--effective", type=int, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.one:
        return one_run(args)
    if args.processes:
        return compare_processes(args)

    from transformers import AutoTokenizer

    from selfalign.jsonl import write_jsonl_atomic

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        build_model(tmp / "model", "small")
        rows = sft_rows(args.rows)
        write_jsonl_atomic(tmp / "sft.jsonl", rows)
        tok = AutoTokenizer.from_pretrained(tmp / "model")
        lengths = [min(512, len(tok(r["instruction"] + "\n" + r["output"])["input_ids"]) + 40)
                   for r in rows]  # fmt: skip
        results = {}
        for grouped in (False, True):
            results[grouped] = run(
                tmp / "model", tmp / "sft.jsonl", tmp / f"out{grouped}", grouped, args
            )
            results[grouped]["padding"] = padding_share(lengths, args.batch, grouped, seed=0)

    plain, grouped = results[False], results[True]
    table = (
        "| batching | real tokens/s | padding share |\n|---|---|---|\n"
        f"| random order | {plain['tokens_per_second']:.0f} | {plain['padding']:.0%} |\n"
        f"| length-grouped | {grouped['tokens_per_second']:.0f} | {grouped['padding']:.0%} |\n"
        f"| ratio | **{grouped['tokens_per_second'] / plain['tokens_per_second']:.2f}x** | |\n"
    )
    print(table)
    record(args, table, "", "SFT throughput", "random order against length-grouped batching")


if __name__ == "__main__":
    main()
