"""Benchmark: the ROUGE-L novelty filter against `rouge-score` on the same pool.

Runs the self-instruct novelty loop (each candidate against the seeds and every instruction kept
so far; reject when ROUGE-L F1 > 0.7) twice on the same generated instructions: once with
`selfalign.text.novelty.NoveltyPool`, once with `rouge_score.rouge_scorer._score_lcs` on pre-tokenised
instructions (the fastest use of rouge-score, as the original scripts did, minus their process
pool). Checks that every decision and score agrees, prints both times and the speed ratio, and
adds a table to the "## Novelty filter" section of bench/RESULTS.md.

    python bench/novelty.py [--pool 3000] [--seeds N] [--seed 0] [--no-record]
    python bench/novelty.py --scale 50000,100000,366000 [--all-pairs-up-to 50000]

`--scale` runs the paper-scale merge instead: that many synthetic instructions
(`make_instructions`: formulaic openings, Zipf-distributed words, 5-40 words around 13, 15%
near-duplicates of earlier ones) through the pruned `NoveltyPool(exact_scores=False)`, and through
the all-pairs one up to `--all-pairs-up-to` (every decision and every rejected row's `Match`
compared); at every size, `--sample` rows are checked against rouge-score (rejected: the reported
match's F1; kept: the best entry of an all-pairs search over the pool at its turn). It prints the
machine load, and adds a table to the same section.

The seeds are the bundled seed tasks (or N synthetic ones); the candidates are synthesised from a
word list with a seeded RNG (nothing is downloaded), a share of them near-duplicates of earlier
ones, so that both decisions occur.
"""

from __future__ import annotations

import argparse
import datetime
import itertools
import math
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


OPENERS = [
    "write a", "write a short", "give me a list of", "explain why", "explain how", "how do i",
    "what is the", "what are the", "generate a", "describe the", "create a",
    "classify the following", "suggest some", "summarize the", "translate the following",
    "find the", "tell me about", "rewrite the following", "can you help me", "list",
    "compare the", "identify the", "make a", "provide an example of", "is it possible to",
    "come up with", "design a", "calculate the", "brainstorm", "edit the following",
]  # fmt: skip
FUNCTION = (
    "the a of to and in for with on is that your you this it be as are from how what an by at "
    "or about which can i my some more into not if all one do has have"
).split()


def _zipf(k: int, s: float) -> list[float]:
    return list(itertools.accumulate(1 / (r + 1) ** s for r in range(k)))


def make_instructions(n: int, seed: int, dup_rate: float = 0.15) -> list[str]:
    """Self-instruct-like instructions: an opener, then function words (42%) and content words
    (20,000 pseudo-words, Zipf 1.05); `dup_rate` of them edit an earlier one (1-3 words
    replaced, inserted or dropped)."""
    rng = random.Random(seed)
    syllables = [c + v for c in "bcdfghklmnprstvz" for v in "aeiou"]
    content = ["".join(rng.choices(syllables, k=rng.randint(1, 4))) + str(r) for r in range(20000)]
    cw, fw, ow = _zipf(len(content), 1.05), _zipf(len(FUNCTION), 0.8), _zipf(len(OPENERS), 0.9)
    texts: list[str] = []
    while len(texts) < n:
        if texts and rng.random() < dup_rate:
            words = rng.choice(texts).rstrip(".?").split()
            for _ in range(rng.randint(1, 3)):
                op, word = rng.random(), rng.choices(content, cum_weights=cw)[0]
                if op < 0.6:
                    words[rng.randrange(len(words))] = word
                elif op < 0.8:
                    words.insert(rng.randrange(len(words) + 1), word)
                elif len(words) > 3:
                    del words[rng.randrange(len(words))]
        else:
            length = min(40, max(5, round(rng.lognormvariate(math.log(13), 0.45))))
            words = rng.choices(OPENERS, cum_weights=ow)[0].split()
            words[0] = words[0].capitalize()
            while len(words) < length:
                if rng.random() < 0.42:
                    words.append(rng.choices(FUNCTION, cum_weights=fw)[0])
                else:
                    words.append(rng.choices(content, cum_weights=cw)[0])
        texts.append(" ".join(words) + rng.choice([".", "?", "", "."]))
    return texts


def check_sample(seeds, texts, decisions, threshold, size: int, seed: int) -> str:
    """rouge-score on `size` random rows: a rejected row's reported F1 against its reported match;
    a kept row's best F1 over the pool at its turn (the entry an all-pairs search finds)."""
    from rouge_score import rouge_scorer

    from selfalign.text.novelty import NoveltyPool

    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)
    rows = sorted(random.Random(seed).sample(range(len(texts)), min(size, len(texts))))
    pool, added, agree = NoveltyPool(threshold, seeds, exact_scores=True), 0, 0
    for i in rows:
        keep, match = decisions[i]
        if keep:  # the pool at row i: seeds and the rows kept before it
            pool.add(t for t, (k, _) in zip(texts[added:i], decisions[added:i], strict=True) if k)
            added = i
            match = pool.best(texts[i])
        ref = scorer.score(match.text, texts[i])["rougeL"].fmeasure if match.text else 0.0
        agree += ref == match.score and keep == (not ref > threshold)
    return f"{agree}/{len(rows)}"


def run_scale(sizes, all_pairs_up_to, threshold, seed, sample) -> list[list[str]]:
    """One row per size: the pruned filter, the all-pairs one up to `all_pairs_up_to`."""
    from selfalign.stages.stage1_instructions import load_seed_tasks
    from selfalign.text.novelty import NoveltyPool

    seeds = [t["instruction"] for t in load_seed_tasks()]
    rows = []
    for size in sizes:
        texts = make_instructions(size, seed)
        load = f"{os.getloadavg()[0]:.1f}"
        start, cpu = time.perf_counter(), time.process_time()
        pool = NoveltyPool(threshold, seeds, exact_scores=False, workers=2)
        ours = pool.filter(texts)
        wall, cpu = time.perf_counter() - start, time.process_time() - cpu
        st, kept = pool.stats, sum(k for k, _ in ours)
        same, t_all = "not run", ""
        if size <= all_pairs_up_to:
            start = time.perf_counter()
            old = NoveltyPool(threshold, seeds, exact_scores=True, workers=2).filter(texts)
            t_all = f"{time.perf_counter() - start:.1f}"
            agree = sum(
                a[0] == b[0] and (a[0] or a[1] == b[1]) for a, b in zip(ours, old, strict=True)
            )
            same = f"{agree}/{size}"
        row = [
            f"{len(seeds)} + {size:,}", f"{st['pairs']:,}", f"{st['hits']:,}",
            f"{st['lcs']:,} ({st['lcs'] / st['pairs']:.4%})", f"{st['above']:,}", f"{kept:,}",
            same, check_sample(seeds, texts, ours, threshold, sample, seed), t_all,
            f"**{wall:.1f}**", f"{cpu:.1f}", f"{load} / {os.getloadavg()[0]:.1f}",
        ]  # fmt: skip
        print(" | ".join(row), flush=True)
        rows.append(row)
    return rows


SCALE_COLUMNS = (
    "seeds + candidates", "pairs", "index entries read", "exact LCS (share of pairs)",
    "pairs above 0.7", "kept", "decisions + rejected rows' Match = all pairs",
    "sample = rouge-score", "all pairs (s)", "pruned (s)", "pruned CPU (s)", "load before / after",
)  # fmt: skip


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


def record(path: Path, columns, rows, command: str, note: str = "") -> None:
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
        f"`{command}`{note}:",
        "",
        "| " + " | ".join(columns) + " |",
        "|" + "---|" * len(columns),
        *("| " + " | ".join(row) + " |" for row in rows),
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
    parser.add_argument("--scale", default=None, help="comma-separated candidate counts")
    parser.add_argument("--all-pairs-up-to", type=int, default=50000)
    parser.add_argument("--sample", type=int, default=300, help="rows checked with rouge-score")
    args = parser.parse_args()
    command = "python bench/novelty.py" + "".join(
        f" {a}" for a in sys.argv[1:] if a != "--no-record"
    )
    if args.scale:
        sizes = [int(x) for x in args.scale.split(",")]
        rows = run_scale(sizes, args.all_pairs_up_to, args.threshold, args.seed, args.sample)
        note = (
            f" ({datetime.date.today().isoformat()}; {machine()}; python "
            f"{platform.python_version()}, rapidfuzz {version('rapidfuzz')}, numpy "
            f"{version('numpy')}; pruned `NoveltyPool(exact_scores=False, workers=2)`, threshold "
            f"{args.threshold}; other jobs shared the 2 cores: see the load column)"
        )
        if not args.no_record:
            record(Path(__file__).with_name("RESULTS.md"), SCALE_COLUMNS, rows, command, note)
        return

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
    for name, value in zip(COLUMNS, row, strict=True):
        print(f"{name:>20}: {value}")
    print(f"{'target':>20}: >= 100x")
    if same_decisions != len(ours) or same_scores != len(ours):
        raise SystemExit("MISMATCH between selfalign.text.novelty and rouge-score")
    if not args.no_record:
        record(Path(__file__).with_name("RESULTS.md"), COLUMNS, [row], command)


if __name__ == "__main__":
    main()
