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

That all-pairs search costs ~23 ns a pair, ~19 minutes on one core at the paper's ~366K
instructions, so `NoveltyPool(exact_scores=False)` makes the same decisions from a fraction of
the pairs. A pair is skipped only when no LCS could push its F1 over the threshold:

- t(m, n), the smallest LCS whose F1 for lengths m, n exceeds the threshold, comes from the same
  float expression as the scores (`required_lcs`), so "LCS >= t" is exactly "F1 > threshold";
  lengths with t > min(m, n) are never paired;
- each token occurrence becomes an item (token, k-th occurrence in its text), so a text is a set
  whose overlap with another is their multiset overlap, an upper bound of the LCS;
- prefix filtering with 2-item signatures (the l-prefix scheme of AdaptJoin / pkwise): items
  have one global order, rarest first (frequencies over the pool and the candidates of the
  `filter` call; everything is rebuilt per call, O(tokens)). If two texts share >= t >= 2 items,
  their first m - t + 2 and n - t + 2 items share >= 2 (the two rarest shared ones), so the pair
  shares a 2-item subset lying in both of those pair-specific prefixes. Every text's subsets of
  its longest such prefix are indexed by (subset, length, text) with the room left (the largest t
  for which the subset is still in the prefix); a candidate reads, per subset, only the lengths
  its subset's position allows, and a pair survives when one hit has room on both sides. Pairs
  with t = 1 (very short texts) use single items the same way;
- survivors get the exact LCS (`rapidfuzz.process.cpdist`, one call per block) and the pairs
  above the threshold (every one of them survives) are resolved in candidate order: a candidate
  is rejected by its best pair with a pool text or a candidate kept before it. Candidates go in
  blocks of `_PRUNED_BLOCK`: the pool's index holds only kept texts, and kept candidates join it
  after their block, so pairs of two rejected candidates are only looked at within a block.

Pruned, a rejected candidate's `Match` is the exact best (earliest on ties: every pair above the
threshold survives); a kept candidate's best score is not computed and its `Match` is
`Match(None, None, None)` (stage 1 writes `max_similarity: null`). `exact_scores="auto"` (the
default) scores all pairs while pool x candidates is at most `AUTO_EXACT_PAIRS` (seconds of
work), so small runs keep every score, and prunes beyond. Nothing is read or written: texts in,
decisions out.
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
    """`_f1_pairs` of one candidate against many pool entries (an empty entry has lcs 0 -> 0)."""
    if cand_len == 0:
        return np.zeros(lcs.shape, dtype=np.float64)
    return _f1_pairs(lcs, cand_len, np.maximum(pool_lens, 1))


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
    """How close a candidate is to the pool: best F1 and which entry (index, text) gave it.
    `score` is None for a candidate kept by the pruned search (its best score is not computed)."""

    score: float | None
    index: int | None
    text: str | None


# "auto" scores every pair up to this many (a few seconds), and prunes beyond.
AUTO_EXACT_PAIRS = 2e8
_NEVER = 1 << 40  # required LCS of lengths no LCS can bring over the threshold
_HITS_PER_CHUNK = 1 << 22  # index entries read at once (memory: ~10 int64 arrays this long)
_PRUNED_BLOCK = 16384  # candidates decided together by the pruned search


def required_lcs(m: np.ndarray, n: np.ndarray, threshold: float) -> np.ndarray:
    """Smallest LCS whose F1 for lengths m, n (broadcast) is > threshold, with `_f1_array`'s
    arithmetic, so "LCS >= t" is exactly "F1 > threshold"; `_NEVER` where no LCS <= min(m, n)
    gets there (empty texts, threshold >= 1 or NaN). Needs threshold >= 0 (F1 0 is never above)."""
    m, n = np.broadcast_arrays(np.asarray(m, np.int64), np.asarray(n, np.int64))
    shortest = np.minimum(m, n)
    if not 0 <= threshold < 1:
        return np.full(m.shape, _NEVER, dtype=np.int64)

    def above(lcs: np.ndarray) -> np.ndarray:
        return (shortest > 0) & (_f1_pairs(lcs, m, n) > threshold)

    # F1 = 2 * LCS / (m + n) up to rounding: start a few below, step up with the exact test
    lcs = np.maximum(np.floor(threshold * (m + n) / 2) - 3, 0).astype(np.int64)
    lcs[above(lcs)] = 0  # (never happens: a start already above would hide a smaller t)
    while True:
        step = ~above(lcs) & (lcs <= shortest)
        if not step.any():
            break
        lcs += step
    return np.where(lcs <= shortest, lcs, _NEVER)


def _f1_pairs(lcs: np.ndarray, m: np.ndarray, n: np.ndarray) -> np.ndarray:
    """`f1_from_lcs` elementwise (numpy float64 ops round exactly like Python floats); m, n > 0."""
    with np.errstate(divide="ignore", invalid="ignore"):
        precision, recall = lcs / n, lcs / m
        total = precision + recall
        return np.where(total > 0, 2 * precision * recall / total, 0.0)


def _unique(values: np.ndarray, counts: bool = False):
    """Sorted distinct values (and how many times each occurs, and each value's index among them);
    by sorting: numpy 2's hashing `np.unique` is ~50x slower on large int64 arrays."""
    order = np.argsort(values, kind="stable")
    ordered = values[order]
    new = np.ones(len(ordered), dtype=bool)
    new[1:] = ordered[1:] != ordered[:-1]
    if not counts:
        return ordered[new]
    inverse = np.empty(len(values), dtype=np.int64)
    inverse[order] = np.cumsum(new) - 1
    return ordered[new], np.diff(np.append(np.flatnonzero(new), len(values))), inverse


def _searchsorted(values: np.ndarray, queries: np.ndarray, side: str = "left") -> np.ndarray:
    """`np.searchsorted` with the queries sorted first (several times faster on large arrays:
    each search starts where the previous one ended)."""
    order = np.argsort(queries)
    out = np.empty(len(queries), dtype=np.int64)
    out[order] = np.searchsorted(values, queries[order], side=side)
    return out


def _ranges(starts: np.ndarray, ends: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The positions of every range [start, end), and which range each came from."""
    sizes = np.maximum(ends - starts, 0)
    which = np.repeat(np.arange(len(sizes)), sizes)
    first = np.cumsum(sizes) - sizes
    return which, np.arange(int(sizes.sum())) - (first - starts)[which]


def _ranked_items(codes: Sequence[str]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Each text's tokens as items (token, k-th occurrence in the text), ranked in one global
    order, rarest first; each text's ranks sorted ascending, texts concatenated.
    Returns (ranks, owner text of each, position of each in its text)."""
    lens = np.fromiter(map(len, codes), dtype=np.int64, count=len(codes))
    # code points are never surrogates, so UTF-32 is one uint32 per token
    tokens = np.frombuffer("".join(codes).encode("utf-32-le"), dtype=np.uint32).astype(np.int64)
    owner = np.repeat(np.arange(len(codes), dtype=np.int64), lens)
    if not len(tokens):
        return tokens, owner, owner
    order = np.argsort(owner * (int(tokens.max()) + 1) + tokens, kind="stable")
    toks, own = tokens[order], owner[order]
    starts = np.ones(len(toks), dtype=bool)
    starts[1:] = (toks[1:] != toks[:-1]) | (own[1:] != own[:-1])
    index = np.arange(len(toks))
    occurrence = index - np.maximum.accumulate(np.where(starts, index, 0))
    items, counts, inverse = _unique(toks * (int(occurrence.max()) + 1) + occurrence, counts=True)
    rank_of = np.empty(len(items), dtype=np.int64)
    rank_of[np.argsort(counts, kind="stable")] = np.arange(len(items))
    # `own` is already grouped by text: sorting text * |items| + rank sorts within each text
    ranks = np.sort(own * len(items) + rank_of[inverse]) - own * len(items)
    offsets = np.concatenate([[0], np.cumsum(lens)])
    return ranks, own, index - offsets[own]


class _PrunedSearch:
    """One `filter` call's pruned search (see the module docstring): texts 0..P-1 are the pool,
    P.. the candidates, decided in blocks; `position` maps a text to its pool index (-1: not in
    the pool)."""

    def __init__(self, codes: Sequence[str], pool_size: int, threshold: float, workers: int):
        self.size, self.threshold, self.workers = pool_size, threshold, workers
        self.count = len(codes)
        lens = np.fromiter(map(len, codes), dtype=np.int64, count=self.count)
        self.lengths, _, self.len_rank = _unique(lens, counts=True)
        self.t = required_lcs(self.lengths[:, None], self.lengths[None, :], threshold)
        self.ranks, self.owner, self.pos = _ranked_items(codes)
        self.items = int(self.ranks.max()) + 1 if len(self.ranks) else 1
        self.code_array = np.empty(self.count, dtype=object)
        self.code_array[:] = codes
        self.position = np.full(self.count, -1, dtype=np.int64)
        self.position[:pool_size] = np.arange(pool_size)
        self.stats = {"pairs": 0, "hits": 0, "pairs_hit": 0, "lcs": 0, "above": 0}
        self.stats["pairs"] = pool_size * (self.count - pool_size) + (
            (self.count - pool_size) * (self.count - pool_size - 1) // 2
        )
        # pairs needing an LCS >= 2 share >= 2 items of their prefixes; those needing 1, any item
        self.kinds = [_Signatures(self, 2, 2, _NEVER - 1), _Signatures(self, 1, 1, 1)]

    def fits(self) -> bool:
        """Whether the index keys (subset, length, text) fit in an int64 (far beyond any
        realistic pool when they do not)."""
        return all(k.fits() for k in self.kinds)

    def subsets(self, prefix: np.ndarray, ell: int):
        """The ell-subsets (ell = 1 or 2) of each text's first `prefix[length rank]` items:
        (subset id, text, position of its last item), grouped by text."""
        last = np.flatnonzero(self.pos < prefix[self.len_rank[self.owner]])
        if ell == 1:
            return self.ranks[last], self.owner[last], self.pos[last]
        # every prefix item with each item before it (ranks ascend within a text)
        which, first = _ranges(last - self.pos[last], last)
        last = last[which]
        return self.ranks[first] * self.items + self.ranks[last], self.owner[last], self.pos[last]

    def above(self, lo: int, hi: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Candidates lo..hi-1 against the pool and each other: every pair whose F1 exceeds the
        threshold, as (later text, earlier text, F1)."""
        found = [k.pairs(lo, hi) for k in self.kinds]
        a, b = (np.concatenate([f[i] for f in found]) for i in (0, 1))
        lcs = process.cpdist(
            self.code_array[a], self.code_array[b], scorer=LCSseq.similarity, dtype=np.int32,
            workers=self.workers,
        ) if len(a) else np.zeros(0, np.int32)  # fmt: skip
        f1 = _f1_pairs(lcs, self.lengths[self.len_rank[a]], self.lengths[self.len_rank[b]])
        hot = f1 > self.threshold
        self.stats["lcs"] += len(a)
        self.stats["above"] += int(hot.sum())
        return np.maximum(a, b)[hot], np.minimum(a, b)[hot], f1[hot]

    def add(self, texts: np.ndarray, first_position: int) -> None:
        """Kept candidates join the pool (and its index), in order."""
        self.position[texts] = first_position + np.arange(len(texts))
        for kind in self.kinds:
            kind.add(texts)


class _Signatures:
    """The pruned search's index for pairs whose required LCS t lies in [t_low, t_high]: each
    text's ell-item subsets of its first m - t_min + ell items (t_min over all partner lengths),
    as dense ids, grouped by text; the pool's, sorted by (subset, length rank, text)."""

    def __init__(self, search: _PrunedSearch, ell: int, t_low: int, t_high: int):
        self.search, self.ell = search, ell
        self.t = np.where((search.t >= t_low) & (search.t <= t_high), search.t, _NEVER)
        self.t_from = np.minimum.accumulate(self.t[:, ::-1], axis=1)[:, ::-1]  # min t[u, v:]
        lengths = search.lengths
        pre_any = np.clip(lengths - self.t.min(axis=1) + ell, 0, lengths)
        # within a block, a candidate is indexed for the candidates at least as long (they probe)
        self.pre_longer = np.clip(lengths - np.diagonal(self.t_from) + ell, 0, lengths)
        sig, self.text, self.last = search.subsets(pre_any, ell)
        self.n_sigs = 0
        if len(sig):
            _, _, self.sig = _unique(sig, counts=True)
            self.n_sigs = int(self.sig.max()) + 1
        else:
            self.sig = sig
        self.rank = search.len_rank[self.text]
        self.rows = np.searchsorted(self.text, np.arange(search.count + 1))  # text i: rows[i]..
        # the pool's subsets within its texts' shorter prefix serve every candidate, the others
        # only candidates shorter than the text (for which its own prefix is longer)
        self.pool = [self._index(part) for part in self._split(np.arange(self.rows[search.size]))]

    def fits(self) -> bool:
        n_len, count = len(self.search.lengths), self.search.count
        return (self.n_sigs + 1) * (n_len + 1) * (count + 1) < 2**62

    def _index(self, rows: np.ndarray) -> tuple[np.ndarray, ...]:
        """(keys, text, length rank, room) of these rows, in key order; room: the largest
        required LCS t for which the subset lies in the text's first length - t + ell items."""
        n_len, count = len(self.search.lengths), self.search.count
        keys = (self.sig[rows] * n_len + self.rank[rows]) * count + self.text[rows]
        order = np.argsort(keys, kind="stable")
        rows = rows[order]
        room = self.search.lengths[self.rank[rows]] - self.last[rows] + self.ell - 1
        return keys[order], self.text[rows], self.rank[rows], room

    def _split(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        short = self.last[rows] < self.pre_longer[self.rank[rows]]
        return rows[short], rows[~short]

    def add(self, texts: np.ndarray) -> None:
        rows = self._split(_ranges(self.rows[texts], self.rows[texts + 1])[1])
        for i, part in enumerate(rows):
            part = self._index(part)
            merged = [np.concatenate([a, b]) for a, b in zip(self.pool[i], part, strict=True)]
            order = np.argsort(merged[0], kind="stable")  # two sorted runs: a linear merge
            self.pool[i] = tuple(m[order] for m in merged)

    def pairs(self, lo: int, hi: int) -> tuple[np.ndarray, np.ndarray]:
        """Pairs (candidate in lo..hi-1, pool text or earlier-probed candidate of the block) that
        share a subset in both pair-specific prefixes."""
        lengths, n_len, count = self.search.lengths, len(self.search.lengths), self.search.count
        rows = np.arange(self.rows[lo], self.rows[hi])
        sig, text, last, u = self.sig[rows], self.text[rows], self.last[rows], self.rank[rows]
        block = self._index(self._split(rows)[0])
        low = np.argmax(self.t < _NEVER, axis=1)[u]  # (0 when no length fits: `high` is -1 then)
        high = _reach(self.t_from, u, lengths[u] - last + self.ell - 1, lengths[-1] + self.ell + 2)
        base = sig * n_len
        lo_key, hi_key = (base + low) * count, (base + high + 1) * count
        longer_key = (base + np.maximum(low, u + 1)) * count
        # a candidate reads the block's candidates shorter than it, and those as long and earlier
        block_end = np.where(high >= u, (base + u) * count + text, hi_key)
        parts = [*self.pool, block]
        starts = np.stack([_searchsorted(part[0], key) for part, key in
                           zip(parts, (lo_key, longer_key, lo_key), strict=True)])  # fmt: skip
        ends = np.stack([_searchsorted(part[0], key) for part, key in
                         zip(parts, (hi_key, hi_key, block_end), strict=True)])  # fmt: skip
        ends = np.where(high >= low, np.maximum(ends, starts), starts)
        offset = np.cumsum([0] + [len(part[0]) for part in parts[:-1]])
        starts += offset[:, None]
        ends += offset[:, None]
        index = [np.concatenate([part[i] for part in parts]) for i in (1, 2, 3)]
        room = lengths[u] - last + self.ell - 1  # the largest t that keeps the subset in prefix
        found = [
            self._near(text[c], u[c] * n_len, room[c], starts[:, c], ends[:, c], *index)
            for c in _chunks(text, (ends - starts).sum(axis=0))
        ]
        empty = (np.zeros(0, np.int64), np.zeros(0, np.int64))
        return tuple(np.concatenate([f[i] for f in [*found, empty]]) for i in range(2))

    def _near(self, text, row, room, starts, ends, partner, rank, partner_room):
        """The distinct pairs among a chunk's index hits whose subset lies in both pair-specific
        prefixes (the first length - t + ell items): t <= the room on both sides."""
        which, at = _ranges(starts.ravel(), ends.ravel())
        which %= len(text)
        t = self.t.ravel()[row[which] + rank[at]]
        near = (t <= room[which]) & (t <= partner_room[at])
        pair = _unique(text[which[near]] * self.search.count + partner[at[near]])
        self.search.stats["hits"] += len(at)
        self.search.stats["pairs_hit"] += len(pair)
        return pair // self.search.count, pair % self.search.count


def _reach(t_from: np.ndarray, u: np.ndarray, most: np.ndarray, width: int) -> np.ndarray:
    """Highest length rank v with t[u, v] <= most (-1 when none), elementwise, from `t_from`
    (row-wise suffix minima of t, so rising along each row); `width` > every `most` + 1."""
    n_len = t_from.shape[1]
    flat = np.arange(t_from.shape[0])[:, None] * width + np.minimum(t_from, width - 1)
    queries = u * width + np.clip(most, -1, width - 2)
    return _searchsorted(flat.ravel(), queries, side="right") - 1 - u * n_len


def _chunks(text: np.ndarray, hits: np.ndarray) -> list[slice]:
    """Consecutive probes in slices of about `_HITS_PER_CHUNK` hits, never splitting a text."""
    if not len(text):
        return []
    first = np.flatnonzero(np.concatenate([[True], text[1:] != text[:-1]]))
    group = (np.cumsum(hits) - hits)[first] // _HITS_PER_CHUNK
    bounds = [0, *first[1:][np.diff(group) != 0].tolist(), len(text)]
    return [slice(a, b) for a, b in zip(bounds[:-1], bounds[1:], strict=True) if b > a]


class NoveltyPool:
    """A growing set of texts; `filter` keeps a candidate when its best ROUGE-L F1 <= threshold.

    Ties pick the earliest pool entry, as `numpy.argmax` does in `rouge-score`'s `score_multi`.

    `exact_scores`: True scores every pair (every `Match` is the exact best); False prunes (same
    decisions; kept candidates get `Match(None, None, None)`, see the module docstring); "auto"
    scores every pair while pool x candidates of a `filter` call is at most `AUTO_EXACT_PAIRS`.
    A negative threshold (every pair is above it) always scores every pair. `block`,
    `pool_chunk` and `workers` tune the work; decisions never depend on them. `stats` holds the
    pruned search's counts of the last pruned `filter` call (pairs, index hits, pairs hit, exact
    LCS, pairs above the threshold).
    """

    def __init__(
        self,
        threshold: float = 0.7,
        texts: Iterable[str] = (),
        block: int = 64,
        pool_chunk: int = 65536,
        workers: int = 1,
        exact_scores: bool | str = "auto",
    ):
        if exact_scores not in (True, False, "auto"):
            raise ValueError(f"exact_scores must be True, False or 'auto', not {exact_scores!r}")
        self.threshold = threshold
        self.block = block
        self.pool_chunk = pool_chunk
        self.workers = workers
        self.exact_scores = exact_scores
        self.stats: dict[str, int] = {}
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
        if self._prunes(len(candidates)):
            return self._filter_pruned(candidates)
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

    def _prunes(self, count: int) -> bool:
        if self.threshold < 0:
            return False  # every pair, even of empty texts, is above it: nothing to prune
        if self.exact_scores == "auto":
            return len(self.texts) * count + count * (count - 1) / 2 > AUTO_EXACT_PAIRS
        return not self.exact_scores

    def _filter_pruned(self, texts: Sequence[str]) -> list[tuple[bool, Match]]:
        codes = [self.vocab.encode(tokenize(t)) for t in texts]
        size = len(self.texts)
        search = _PrunedSearch(self._codes + codes, size, self.threshold, self.workers)
        if not search.fits():  # (far beyond any realistic pool) the all-pairs search is exact too
            return [d for i in range(0, len(texts), self.block)
                    for d in self._filter_block(texts[i : i + self.block])]  # fmt: skip
        out: list[tuple[bool, Match]] = []
        # blocks keep the pairs of two candidates that both end up rejected (wasted work) few
        for lo in range(size, search.count, _PRUNED_BLOCK):
            hi = min(lo + _PRUNED_BLOCK, search.count)
            block = texts[lo - size : hi - size]
            decided = self._resolve(block, lo, search.position, *search.above(lo, hi))
            kept = [j for j, (keep, _) in enumerate(decided) if keep]
            search.add(np.array(kept, dtype=np.int64) + lo, len(self.texts))
            self._append([(block[j], codes[lo - size + j]) for j in kept])
            out.extend(decided)
        self.stats = search.stats
        return out

    def _resolve(self, texts, lo, position, later, earlier, f1) -> list[tuple[bool, Match]]:
        """Decide a block of candidates (text ids lo..) in order from their pairs above the
        threshold: rejected by the best pair with a pool text or an earlier kept candidate."""
        size = len(self.texts)
        # best pair first: highest F1, then the earliest partner (pool order follows text order)
        order = np.lexsort((earlier, -f1, later))
        later, earlier, f1 = later[order].tolist(), earlier[order].tolist(), f1[order].tolist()
        kept = [True] * len(texts)
        best: dict[int, int] = {}  # rejected candidate -> its best pair
        for e, (text, partner) in enumerate(zip(later, earlier, strict=True)):
            # candidates come in order, so an earlier candidate's fate is already known, and
            # texts before the block are in the index only when in the pool
            j = text - lo
            if j not in best and (partner < lo or kept[partner - lo]):
                kept[j] = False
                best[j] = e
        index = np.cumsum(kept) - 1 + size  # the pool index a kept candidate gets
        out = []
        for j, keep in enumerate(kept):
            if keep:
                out.append((True, Match(None, None, None)))
                continue
            partner = earlier[best[j]]
            if partner < lo:
                at = int(position[partner])
                out.append((False, Match(f1[best[j]], at, self.texts[at])))
            else:
                at = int(index[partner - lo])
                out.append((False, Match(f1[best[j]], at, texts[partner - lo])))
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
