"""`NoveltyPool(exact_scores=False)`, the pruned search, against the all-pairs `NoveltyPool` (itself
checked against rouge-score in test_novelty.py): the same decisions, and the same `Match` for every
rejected row, on corpora full of near-duplicates, repeated tokens, empty and identical texts, at
several thresholds, block sizes and `filter` call splits; plus the required-LCS table, ties, and
the "auto" switch."""

from __future__ import annotations

import random

import numpy as np
import pytest

from selfalign.text import novelty
from selfalign.text.novelty import Match, NoveltyPool, f1_from_lcs, required_lcs

rouge_scorer = pytest.importorskip("rouge_score.rouge_scorer")

WORDS = (
    "the a of to and in write list explain poem story river city code recipe why how best "
    "three your my quick ancient Paris x1 2nd the the a"
).split()


def near_duplicates(n: int, seed: int, vocab: list[str] = WORDS) -> list[str]:
    """Texts of 0-20 words, many of them one or two edits from an earlier one, some empty,
    some repeated verbatim, many with repeated tokens."""
    rng = random.Random(seed)
    texts: list[str] = []
    for _ in range(n):
        roll = rng.random()
        if texts and roll < 0.45:
            words = rng.choice(texts).split() or ["x"]
            for _ in range(rng.randint(1, 2)):
                op, i = rng.random(), rng.randrange(len(words))
                if op < 0.5:
                    words[i] = rng.choice(vocab)
                elif op < 0.8:
                    words.insert(i, rng.choice(vocab))
                elif len(words) > 1:
                    del words[i]
            texts.append(" ".join(words) + rng.choice(["", "?", "!", " ..."]))
        elif texts and roll < 0.5:
            texts.append(rng.choice(texts).upper())
        elif roll < 0.55:
            texts.append(rng.choice(["", "?!", "..."]))
        else:
            texts.append(" ".join(rng.choice(vocab) for _ in range(rng.randint(1, 20))))
    return texts


def assert_same(pruned, exact):
    assert [k for k, _ in pruned] == [k for k, _ in exact]
    for (keep, match), (_, reference) in zip(pruned, exact, strict=True):
        # a rejected row's Match is exact (score, earliest index on ties, text); kept: not computed
        assert match == (Match(None, None, None) if keep else reference)


@pytest.mark.parametrize("threshold", [0.0, 0.3, 0.5, 0.7, 0.9, 1.0])
@pytest.mark.parametrize("seed", [1, 2, 3])
def test_pruned_decisions_identical_to_all_pairs(threshold, seed, monkeypatch):
    texts = near_duplicates(400, seed)
    seeds, candidates = texts[:30], texts[30:]
    exact = NoveltyPool(threshold, seeds, exact_scores=True).filter(candidates)
    monkeypatch.setattr(novelty, "_PRUNED_BLOCK", 1 + seed * 40)  # several blocks
    pruned = NoveltyPool(threshold, seeds, exact_scores=False).filter(candidates)
    assert_same(pruned, exact)
    if 0 < threshold < 1:
        assert 0 < sum(k for k, _ in exact) < len(exact)  # both decisions occur


def test_pool_grows_across_calls_and_workers_do_not_matter():
    texts = near_duplicates(600, 7)
    exact_pool = NoveltyPool(0.7, texts[:10], exact_scores=True)
    pruned_pool = NoveltyPool(0.7, texts[:10], exact_scores=False, workers=2)
    for start in range(10, 600, 97):
        chunk = texts[start : start + 97]
        assert_same(pruned_pool.filter(chunk), exact_pool.filter(chunk))
    assert pruned_pool.texts == exact_pool.texts
    assert 0 < pruned_pool.stats["lcs"] < pruned_pool.stats["pairs"]  # pairs were pruned


def test_long_texts_and_a_large_vocabulary():
    rng = random.Random(11)
    vocab = [f"w{i}" for i in range(300)] + WORDS
    base = [" ".join(rng.choice(vocab) for _ in range(rng.randint(20, 60))) for _ in range(40)]
    texts = near_duplicates(300, 12, vocab) + base + near_duplicates(100, 13, vocab)
    for threshold in (0.5, 0.7, 0.9):
        exact = NoveltyPool(threshold, exact_scores=True).filter(texts)
        assert_same(NoveltyPool(threshold, exact_scores=False).filter(texts), exact)


def test_ties_go_to_the_earliest_entry_in_the_pool():
    seeds = ["red green blue", "green blue red", "red green blue"]
    candidates = [
        "red green blue yellow",  # ties: seeds 0 and 2 (0.857), seed 1 lower
        "one two three four",
        "one two three four five",  # only the kept candidate above: pool index 3
        "red green blue yellow",  # ties: seeds 0, 2 (0.857); candidate 0 was rejected
    ]
    for exact_scores in (True, False):
        out = NoveltyPool(0.7, seeds, exact_scores=exact_scores).filter(candidates)
        assert [k for k, _ in out] == [False, True, False, False]
        assert out[0][1] == Match(f1_from_lcs(3, 4, 3), 0, "red green blue")
        assert out[2][1] == Match(f1_from_lcs(4, 4, 5), 3, "one two three four")
        assert out[3][1].index == 0


def test_kept_rows_report_no_score_and_rejected_rows_match_rouge_score():
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)
    texts = near_duplicates(300, 5)
    out = NoveltyPool(0.7, exact_scores=False).filter(texts)
    for text, (keep, match) in zip(texts, out, strict=True):
        if keep:
            assert match == Match(None, None, None)
        else:
            reference = scorer.score(match.text, text)["rougeL"].fmeasure
            assert match.score == reference > 0.7


def test_auto_scores_all_pairs_while_small(monkeypatch):
    texts = near_duplicates(200, 9)
    auto = NoveltyPool(0.7, texts[:5]).filter(texts[5:])
    assert auto == NoveltyPool(0.7, texts[:5], exact_scores=True).filter(texts[5:])
    assert all(m.score is not None for _, m in auto)
    monkeypatch.setattr(novelty, "AUTO_EXACT_PAIRS", 100)  # now too many pairs: pruned
    pruned = NoveltyPool(0.7, texts[:5]).filter(texts[5:])
    assert_same(pruned, auto)
    assert any(m.score is None for _, m in pruned)


def test_negative_threshold_always_scores_all_pairs():
    texts = ["", "a b", "c d"]
    out = NoveltyPool(-0.1, ["x"], exact_scores=False).filter(texts)
    assert out == NoveltyPool(-0.1, ["x"], exact_scores=True).filter(texts)
    assert [k for k, _ in out] == [False, False, False]


def test_bad_exact_scores_value():
    with pytest.raises(ValueError, match="exact_scores"):
        NoveltyPool(0.7, exact_scores="yes")


@pytest.mark.parametrize("threshold", [0.0, 0.3, 0.5, 0.65, 0.7, 0.9, 0.99, 1.0, float("nan")])
def test_required_lcs_is_the_smallest_lcs_above_the_threshold(threshold):
    lengths = np.arange(0, 45)
    table = required_lcs(lengths[:, None], lengths[None, :], threshold)
    for m in lengths.tolist():
        for n in lengths.tolist():
            above = [lcs for lcs in range(min(m, n) + 1) if f1_from_lcs(lcs, m, n) > threshold]
            assert table[m, n] == (above[0] if above else novelty._NEVER), (m, n)
