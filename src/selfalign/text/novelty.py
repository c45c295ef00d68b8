"""ROUGE-L novelty filter: exact `rouge-score` decisions, at C++ speed.

Self-instruct keeps a machine-written instruction only when its ROUGE-L F1 against every seed and
every instruction kept so far is at most a threshold (0.7 in the paper, Sec. 3.1 / Appendix A).
The reference implementation (`rouge_score.rouge_scorer._score_lcs`) runs a pure-Python dynamic
programme per pair, which takes hours at the paper's scale. Here:

- tokens come from the same rule as `rouge-score`'s default tokenizer without stemming
  (lower-case, every run of characters outside [a-z0-9] is a separator);
- each distinct token gets an integer id, and a token sequence becomes a string with one code
  point per id, so `rapidfuzz.distance.LCSseq` (bit-parallel C++) returns the exact LCS length;
- F1 is computed from that length with the very same floating-point expression as `rouge-score`
  (precision, recall, `2 * p * r / (p + r)`), so scores are bit-identical and every keep/reject
  decision is the same;
- the pool is incremental: candidates are scored against the pool in blocks (one `cdist` call),
  then against the candidates kept earlier in the same block, which gives exactly the decisions
  of checking one candidate at a time.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np
from rapidfuzz import process
from rapidfuzz.distance import LCSseq

# rouge_score/tokenize.py: lower-case, replace [^a-z0-9]+ by a space, split, keep [a-z0-9]+ tokens.
_TOKEN_RE = re.compile(r"[a-z0-9]+")

# Surrogate code points (U+D800..U+DFFF) are skipped so every id maps to an ordinary character.
_SURROGATES = 0xD800
_SURROGATE_SPAN = 0x800


def tokenize(text: str) -> list[str]:
    """Tokens exactly as `rouge_score.tokenizers.DefaultTokenizer(use_stemmer=False)` makes them."""
    return _TOKEN_RE.findall(text.lower())


def f1_from_lcs(lcs: int, target_len: int, prediction_len: int) -> float:
    """ROUGE-L F1 with `rouge_score._score_lcs`'s arithmetic (it is symmetric in the two lengths)."""
    if not target_len or not prediction_len:
        return 0.0
    precision = lcs / prediction_len
    recall = lcs / target_len
    if precision + recall > 0:
        return 2 * precision * recall / (precision + recall)
    return 0.0


def _f1_array(lcs: np.ndarray, cand_len: int, pool_lens: np.ndarray) -> np.ndarray:
    """Vectorised `f1_from_lcs`: numpy float64 ops round exactly like Python floats."""
    if cand_len == 0:
        return np.zeros(lcs.shape, dtype=np.float64)
    lcs = lcs.astype(np.float64)
    precision = lcs / np.maximum(pool_lens, 1)  # an empty pool entry has lcs 0 -> score 0
    recall = lcs / cand_len
    total = precision + recall
    with np.errstate(divide="ignore", invalid="ignore"):
        f1 = 2 * precision * recall / total
    return np.where(total > 0, f1, 0.0)


class Vocabulary:
    """Token -> one code point, so a token sequence is a string rapidfuzz compares exactly."""

    def __init__(self) -> None:
        self._ids: dict[str, str] = {}

    def encode(self, tokens: Iterable[str]) -> str:
        chars = []
        for token in tokens:
            char = self._ids.get(token)
            if char is None:
                n = len(self._ids) + 1
                char = chr(n if n < _SURROGATES else n + _SURROGATE_SPAN)
                self._ids[token] = char
            chars.append(char)
        return "".join(chars)


def rouge_l(a: str, b: str) -> float:
    """ROUGE-L F1 of two texts (one-off; use `NoveltyPool` for many)."""
    vocab = Vocabulary()
    x, y = vocab.encode(tokenize(a)), vocab.encode(tokenize(b))
    return f1_from_lcs(LCSseq.similarity(x, y), len(x), len(y))


@dataclass(frozen=True)
class Match:
    """How close a candidate is to the pool: best F1 and which entry (index, text) gave it."""

    score: float
    index: int | None
    text: str | None


class NoveltyPool:
    """A growing set of texts; `filter` keeps a candidate when its best ROUGE-L F1 <= threshold.

    Ties pick the earliest pool entry, as `numpy.argmax` does in `rouge-score`'s `score_multi`.
    """

    def __init__(
        self,
        threshold: float = 0.7,
        texts: Iterable[str] = (),
        block: int = 64,
        pool_chunk: int = 65536,
        workers: int = 1,
    ):
        self.threshold = threshold
        self.block = block
        self.pool_chunk = pool_chunk
        self.workers = workers
        self.vocab = Vocabulary()
        self.texts: list[str] = []
        self._codes: list[str] = []
        self._lens = np.zeros(0, dtype=np.float64)
        self.add(texts)

    def __len__(self) -> int:
        return len(self.texts)

    def add(self, texts: Iterable[str]) -> None:
        """Add texts unconditionally (seeds, or records kept elsewhere)."""
        self._append([(t, self.vocab.encode(tokenize(t))) for t in texts])

    def best(self, text: str) -> Match:
        """Best match of one text in the pool, without adding it."""
        return self._best_against_pool([self.vocab.encode(tokenize(text))])[0]

    def filter(self, candidates: Sequence[str]) -> list[tuple[bool, Match]]:
        """Decide each candidate in order; kept ones join the pool before the next is decided."""
        out: list[tuple[bool, Match]] = []
        for start in range(0, len(candidates), self.block):
            out.extend(self._filter_block(candidates[start : start + self.block]))
        return out

    def _filter_block(self, texts: Sequence[str]) -> list[tuple[bool, Match]]:
        codes = [self.vocab.encode(tokenize(t)) for t in texts]
        pool_size = len(self.texts)
        vs_pool = self._best_against_pool(codes)
        # candidates of this block against each other: later ones must see earlier kept ones
        inner = process.cdist(
            codes, codes, scorer=LCSseq.similarity, dtype=np.int32, workers=self.workers
        )
        lens = np.array([len(c) for c in codes], dtype=np.float64)
        kept: list[int] = []
        out = []
        for j, code in enumerate(codes):
            match = vs_pool[j]
            if kept:
                f1 = _f1_array(inner[j, kept], len(code), lens[kept])
                k = int(np.argmax(f1))
                if f1[k] > match.score or match.index is None:
                    # kept candidates join the pool in order, right after its current entries
                    match = Match(float(f1[k]), pool_size + k, texts[kept[k]])
            keep = not match.score > self.threshold
            if keep:
                kept.append(j)
            out.append((keep, match))
        self._append([(texts[j], codes[j]) for j in kept])
        return out

    def _append(self, items: Sequence[tuple[str, str]]) -> None:
        if items:
            self.texts.extend(t for t, _ in items)
            self._codes.extend(c for _, c in items)
            self._lens = np.concatenate([self._lens, [len(c) for _, c in items]])

    def _best_against_pool(self, codes: Sequence[str]) -> list[Match]:
        best_score = np.zeros(len(codes), dtype=np.float64)
        best_index = np.full(len(codes), -1, dtype=np.int64)
        cand_lens = [len(c) for c in codes]
        for start in range(0, len(self._codes), self.pool_chunk):
            chunk = self._codes[start : start + self.pool_chunk]
            lcs = process.cdist(
                codes, chunk, scorer=LCSseq.similarity, dtype=np.int32, workers=self.workers
            )
            lens = self._lens[start : start + len(chunk)]
            for j, cand_len in enumerate(cand_lens):
                f1 = _f1_array(lcs[j], cand_len, lens)
                k = int(np.argmax(f1))
                # strictly greater: the earliest entry wins ties, across chunks too
                if best_index[j] < 0 or f1[k] > best_score[j]:
                    best_score[j], best_index[j] = f1[k], start + k
        return [
            Match(float(s), int(i), self.texts[i]) if i >= 0 else Match(0.0, None, None)
            for s, i in zip(best_score, best_index, strict=True)
        ]
