"""The ROUGE-L novelty filter must agree with `rouge-score` exactly, pair by pair and decision by
decision (rouge-score is the reference; it is only a test dependency)."""

from __future__ import annotations

import random

import numpy as np
import pytest

from selfalign.text.novelty import NoveltyPool, Vocabulary, f1_from_lcs, rouge_l, tokenize

rouge_scorer = pytest.importorskip("rouge_score.rouge_scorer")
SCORER = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)

WORDS = (
    "the a of to and is what how why write list give explain describe Paris paris PARIS "
    "x1 2nd 3.5 e-mail don't café naïve İstanbul straße Ωmega it's co-op U.S.A. the the the"
).split()
PUNCT = ["", "?", "!!", " ...", ",", " -- ", "\n", "\t", "  "]


def random_text(rng: random.Random) -> str:
    parts = []
    for _ in range(rng.randint(0, 18)):
        parts.append(rng.choice(WORDS) + rng.choice(PUNCT))
    return " ".join(parts)


def reference_f1(a: str, b: str) -> float:
    return SCORER.score(a, b)["rougeL"].fmeasure


def test_tokenizer_matches_rouge_score():
    rng = random.Random(1)
    texts = [random_text(rng) for _ in range(2000)]
    texts += ["", "   ", "!!!", "ÀÉÎ Õü", "İ", "ﬁne", "ABC123def", "tab\there", "x_y-z"]
    for text in texts:
        assert tokenize(text) == SCORER._tokenizer.tokenize(text), text


def test_f1_equals_rouge_score_on_random_pairs():
    rng = random.Random(2)
    for _ in range(5000):
        a, b = random_text(rng), random_text(rng)
        if rng.random() < 0.2:  # near-duplicates: the interesting region around the threshold
            b = a.replace(rng.choice(WORDS), rng.choice(WORDS), 1)
        ours, ref = rouge_l(a, b), reference_f1(a, b)
        assert abs(ours - ref) <= 1e-12, (a, b)
        assert ours == ref  # in fact bit-identical: same float expression


def test_f1_is_symmetric_and_handles_empty():
    assert rouge_l("", "anything here") == 0.0 == reference_f1("", "anything here")
    assert rouge_l("?!", "...") == 0.0
    assert rouge_l("Write a poem.", "write A POEM") == 1.0
    assert f1_from_lcs(3, 5, 7) == f1_from_lcs(3, 7, 5)


def test_vocabulary_skips_surrogates():
    vocab = Vocabulary()
    codes = vocab.encode(f"t{i}" for i in range(0xD800 + 10))
    assert len(set(codes)) == len(codes)
    assert not any(0xD800 <= ord(c) <= 0xDFFF for c in codes)


def _pool_texts(n: int, seed: int) -> list[str]:
    """Instructions with many near-duplicates (case, punctuation, one word changed)."""
    rng = random.Random(seed)
    vocab = "what is the a how to write list explain why of in and your best city river code poem recipe".split()
    texts: list[str] = []
    for _ in range(n):
        if texts and rng.random() < 0.6:
            base = rng.choice(texts).split()
            base[rng.randrange(len(base))] = rng.choice(vocab).upper()
            texts.append(" ".join(base) + rng.choice(["?", ".", "!", "", " !!"]))
        else:
            texts.append(" ".join(rng.choice(vocab) for _ in range(rng.randint(3, 12))))
    return texts


def _reference_filter(texts, seeds, threshold=0.7, full=False):
    """The original self-instruct loop on rouge-score. Without `full`, pairs whose lengths cannot
    reach the threshold are skipped (F1 <= 2*min/(la+lb)), which leaves decisions unchanged."""
    pool = [SCORER._tokenizer.tokenize(s) for s in seeds]
    out = []
    for text in texts:
        tokens = SCORER._tokenizer.tokenize(text)
        if full:
            scores = [rouge_scorer._score_lcs(tokens, p).fmeasure for p in pool]
            best = int(np.argmax(scores)) if scores else None
            score = scores[best] if scores else 0.0
        else:
            n = len(tokens)
            score, best = 0.0, None
            for p in pool:
                if n and 2 * min(n, len(p)) / (n + len(p)) > threshold - 0.01:
                    s = rouge_scorer._score_lcs(tokens, p).fmeasure
                    if s > threshold:
                        score = s
                        break
        keep = not score > threshold
        out.append((keep, score, best))
        if keep:
            pool.append(tokens)
    return out


def test_decisions_identical_on_2000_instructions():
    texts = _pool_texts(2000, seed=3)
    seeds = texts[:5]
    ours = NoveltyPool(0.7, seeds).filter(texts[5:])
    ref = _reference_filter(texts[5:], seeds)
    assert [k for k, _ in ours] == [k for k, _, _ in ref]
    assert 0 < sum(k for k, _ in ours) < len(ours)  # both decisions happen


def test_scores_and_most_similar_identical_to_rouge_score():
    texts = _pool_texts(400, seed=4)
    ours = NoveltyPool(0.7, texts[:3], block=7).filter(texts[3:])
    ref = _reference_filter(texts[3:], texts[:3], full=True)
    for (keep, match), (ref_keep, ref_score, ref_best) in zip(ours, ref, strict=True):
        assert keep == ref_keep
        assert match.score == ref_score
        assert match.index == ref_best  # earliest entry wins ties, as numpy.argmax


def test_block_and_chunk_sizes_do_not_change_results():
    texts = _pool_texts(300, seed=5)
    base = NoveltyPool(0.7, texts[:2]).filter(texts[2:])
    for block, chunk, workers in ((1, 65536, 1), (5, 3, 2), (1000, 1, -1)):
        pool = NoveltyPool(0.7, texts[:2], block=block, pool_chunk=chunk, workers=workers)
        assert pool.filter(texts[2:]) == base


def test_pool_grows_with_kept_only():
    pool = NoveltyPool(0.7, ["Write a poem about the sea."])
    decisions = pool.filter(
        ["Write a poem about the sea!", "List three prime numbers.", "list three PRIME numbers"]
    )
    assert [k for k, _ in decisions] == [False, True, False]
    assert decisions[2][1].text == "List three prime numbers."
    assert decisions[2][1].index == 1
    assert len(pool) == 2
    assert pool.best("write a poem about the sea").score == 1.0


def test_empty_pool_keeps_everything_at_zero():
    decisions = NoveltyPool(0.7).filter(["one two three"])
    assert decisions[0][0] and decisions[0][1].score == 0.0 and decisions[0][1].index is None
