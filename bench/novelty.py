"""Benchmark: the ROUGE-L novelty filter against `rouge-score` on the same pool.

Runs the self-instruct novelty loop (each candidate against the seeds and every instruction kept
so far; reject when ROUGE-L F1 > 0.7) twice on the same generated instructions: once with
`selfalign.text.novelty.NoveltyPool`, once with `rouge_score.rouge_scorer._score_lcs` on pre-tokenised
instructions (the fastest use of rouge-score, as the original scripts did, minus their process
pool). Checks that every decision and score agrees, prints both times and the speed ratio, and
adds a table to the "## Novelty filter" section of bench/RESULTS.md.

    python bench/novelty.py [--pool 3000] [--seeds N] [--seed 0] [--no-record]

The seeds are the bundled seed tasks (or N synthetic ones); the candidates are synthesised from a
word list with a seeded RNG (nothing is downloaded), a share of them near-duplicates of earlier
ones, so that both decisions occur.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import random
import sys
import time
from importlib.metadata import version
from pathlib import Path

VERBS = "write explain describe list compare summarize suggest classify translate rewrite find give create plan estimate".split()
NOUNS = (
    "poem story recipe budget essay email river planet city garden function algorithm theorem "
    "painting symphony election vaccine volcano bridge novel market engine habit diet holiday "
    "museum protein galaxy bicycle contract debate sonnet"
).split()
FILLER = "the a of to and in for with about on your my three five short simple best main".split()
ADJ = "quick detailed funny formal simple modern ancient healthy cheap famous strange".split()


def make_pool(n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    texts: list[str] = []
    while len(texts) < n:
        if texts and rng.random() < 0.3:  # a near-duplicate: one or two words changed, new case
            words = rng.choice(texts).rstrip(".?").split()
            for _ in range(rng.randint(1, 2)):
                words[rng.randrange(len(words))] = rng.choice(NOUNS + ADJ)
            text = " ".join(words)
            text = text.upper() if rng.random() < 0.1 else text
        else:
            length = rng.randint(5, 25)
            words = [rng.choice(VERBS).capitalize()]
            while len(words) < length:
                words.append(rng.choice(FILLER + ADJ + NOUNS + NOUNS))
            text = " ".join(words)
        texts.append(text + rng.choice([".", "?", ""]))
    return texts


def run_ours(seeds, candidates, threshold):
    from selfalign.text.novelty import NoveltyPool

    start = time.perf_counter()
    pool = NoveltyPool(threshold, seeds)
    decisions = [(keep, match.score) for keep, match in pool.filter(candidates)]
    return decisions, time.perf_counter() - start


def run_reference(seeds, candidates, threshold):
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)
    start = time.perf_counter()
    pool = [scorer._tokenizer.tokenize(s) for s in seeds]
    decisions = []
    for text in candidates:
        tokens = scorer._tokenizer.tokenize(text)
        scores = [rouge_scorer._score_lcs(tokens, p).fmeasure for p in pool]
        best = max(scores) if scores else 0.0
        keep = not best > threshold
        decisions.append((keep, best))
        if keep:
            pool.append(tokens)
    return decisions, time.perf_counter() - start


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} logical CPUs, {platform.system()} {platform.release()}"


SECTION = "## Novelty filter"
INTRO = (
    "`bench/novelty.py`: the self-instruct novelty loop (each candidate against the seeds and every "
    "instruction kept so far; rejected when ROUGE-L F1 > 0.7) run by `selfalign.text.novelty.NoveltyPool` "
    "and by `rouge_score.rouge_scorer._score_lcs` on pre-tokenised instructions (one process), on "
    "the same synthetic pool. Every decision and every max F1 must be identical. Newest last."
)
COLUMNS = (
    "date", "machine", "versions", "seeds + candidates", "pairs", "kept", "identical decisions",
    "rouge-score (s)", "selfalign (s)", "speed-up",
)  # fmt: skip


def record(path: Path, row: list[str], command: str) -> None:
    """Add a table to the `## Novelty filter` section (created at the end when absent), after
    what is already there; other sections are left as they are."""
    text = path.read_text(encoding="utf-8") if path.exists() else (
        "# Benchmark results\n\nAppended by the scripts in `bench/`; newest last.\n"
    )  # fmt: skip
    lines = text.rstrip("\n").split("\n")
    if SECTION not in lines:
        lines += ["", SECTION, "", INTRO]
    start = lines.index(SECTION)
    end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith("## ")), len(lines))
    while end > start + 1 and not lines[end - 1].strip():
        end -= 1  # insert before the blank lines that precede the next section
    table = [
        "",
        f"`{command}`:",
        "",
        "| " + " | ".join(COLUMNS) + " |",
        "|" + "---|" * len(COLUMNS),
        "| " + " | ".join(row) + " |",
    ]
    lines[end:end] = table
    tmp = path.with_suffix(".md.tmp")
    tmp.write_text("\n".join(lines) + "\n", encoding="utf-8")
    tmp.replace(path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pool", type=int, default=3000, help="candidate instructions")
    parser.add_argument(
        "--seeds", type=int, default=None, help="synthetic seeds (default: the bundled seed tasks)"
    )
    parser.add_argument("--threshold", type=float, default=0.7)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-record", action="store_true", help="do not write bench/RESULTS.md")
    args = parser.parse_args()

    if args.seeds is None:
        from selfalign.stages.stage1_instructions import load_seed_tasks

        seeds = [t["instruction"] for t in load_seed_tasks()]
        candidates = make_pool(args.pool, args.seed)
    else:
        texts = make_pool(args.seeds + args.pool, args.seed)
        seeds, candidates = texts[: args.seeds], texts[args.seeds :]
    ours, t_ours = run_ours(seeds, candidates, args.threshold)
    ref, t_ref = run_reference(seeds, candidates, args.threshold)
    same_decisions = sum(a[0] == b[0] for a, b in zip(ours, ref, strict=True))
    same_scores = sum(a[1] == b[1] for a, b in zip(ours, ref, strict=True))
    kept_before = 0
    pairs = 0
    for keep, _ in ours:
        pairs += len(seeds) + kept_before
        kept_before += keep
    ratio = t_ref / t_ours
    versions = (
        f"python {platform.python_version()}, rapidfuzz {version('rapidfuzz')}, "
        f"rouge-score {version('rouge-score')}, numpy {version('numpy')}"
    )
    row = [
        datetime.date.today().isoformat(),
        machine(),
        versions,
        f"{len(seeds)} + {len(candidates)}",
        f"{pairs:,}",
        str(kept_before),
        f"{same_decisions}/{len(ours)} (max F1 bit-identical: {same_scores}/{len(ours)})",
        f"{t_ref:.2f}",
        f"{t_ours:.3f}",
        f"**{ratio:.0f}x**",
    ]
    command = "python bench/novelty.py" + "".join(
        f" {a}" for a in sys.argv[1:] if a != "--no-record"
    )
    for name, value in zip(COLUMNS, row, strict=True):
        print(f"{name:>20}: {value}")
    print(f"{'target':>20}: >= 100x")
    if same_decisions != len(ours) or same_scores != len(ours):
        raise SystemExit("MISMATCH between selfalign.text.novelty and rouge-score")
    if not args.no_record:
        record(Path(__file__).with_name("RESULTS.md"), row, command)


if __name__ == "__main__":
    main()
