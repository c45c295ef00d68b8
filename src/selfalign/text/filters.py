"""Answer filters shared by stage 2 (self-align, paper section 3.2) and stage 4 (verbose cloning,
section 3.4): pure functions on text, nothing is read or written here.

Both stages apply the same families; each stage decides only what a hit means for it:

- turn headers (`turn_header_pattern`, `cut_at_turn_header`): an answer that goes on with a
  made-up next turn ("\\n\\nUser: ...", "\\n\\n### User\\n...") is cut there, exactly where the stop
  string would have cut it (a backend may not honour stops, and raw files outlive settings);
- repetition (`find_repetition`): a repeated clause, a phrase looping three times in a row, or
  (optionally) an n-gram used too often; stage 2 cuts the answer there (`cut_repetition`), stage 4
  rejects it;
- `answer_rejection`: an apology opener ("Sorry, ..."), too few words, and exemplar leakage
  (`ExemplarLeakage`, built from the constitution), in that order, in both stages.

`words` is the one word rule of these filters (lower-cased runs of letters, digits and "_"), and
`normalise` the one normal form built on it.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterable, Sequence
from typing import NamedTuple

from selfalign.text.constitution import Constitution

_WORD = re.compile(r"\w+")


def words(text: str) -> list[str]:
    """The lower-cased words of `text` (runs of letters, digits and underscores)."""
    return _WORD.findall(text.lower())


def normalise(text: str) -> str:
    """`text` as its words joined by single spaces: case, punctuation and spacing ignored."""
    return " ".join(words(text))


def ngrams(tokens: Sequence[str], n: int) -> list[tuple[str, ...]]:
    return [tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1)]


# -- turn headers ---------------------------------------------------------------------------------


def turn_header_pattern(headers: Iterable[str]) -> re.Pattern:
    """Matches a line that opens with one of `headers` ("User:", "### Assistant"); group 1 is
    the header. Longest first, so "Orion (auto reply):" wins over "Orion:"; a header ending in a
    letter must end there ("### User" does not match "### Username")."""
    ordered = sorted(set(headers), key=len, reverse=True)
    alternatives = "|".join(re.escape(h) + (r"(?!\w)" if h[-1:].isalnum() else "") for h in ordered)
    return re.compile(rf"^[ \t]*({alternatives})", re.MULTILINE)


def cut_at_turn_header(text: str, headers: re.Pattern) -> tuple[str, bool]:
    """`text` (stripped) up to the first line that opens another turn, and whether it was cut.
    The start of `text` counts as the start of a line."""
    m = headers.search(text)
    return (text.strip(), False) if m is None else (text[: m.start()].strip(), True)


# -- repetition -----------------------------------------------------------------------------------

_FENCE = re.compile(r"```.*?(?:```|\Z)", re.DOTALL)
_CLAUSE = re.compile(r"[^.!?;\n]+")


def _mask_code(text: str) -> str:
    """`text` with fenced code blanked out (same length): code repeats lines legitimately."""
    return _FENCE.sub(lambda m: " " * len(m.group(0)), text)


def find_repetition(
    text: str, min_clause_words: int = 4, max_period: int = 8, ngram: int = 0, max_repeats: int = 2
) -> int | None:
    """Where `text` starts repeating itself (a character offset), or None: the earliest of
    - a clause (sentence, line or ';' part) of at least `min_clause_words` words seen before,
    - a phrase of up to `max_period` words repeated three times in a row ("I like cats, I like
      cats, I like cats"),
    - with `ngram` > 0, the occurrence of an `ngram`-word phrase past its first `max_repeats`.
    Fenced code is not looked at."""
    masked = _mask_code(text)
    hits = []
    seen: set[str] = set()
    for m in _CLAUSE.finditer(masked):
        clause = words(m.group(0))
        key = " ".join(clause)
        if len(clause) >= min_clause_words:
            if key in seen:
                hits.append(m.start() + len(m.group(0)) - len(m.group(0).lstrip()))
                break
            seen.add(key)
    spans = [(m.start(), m.group(0).lower()) for m in _WORD.finditer(masked)]
    tokens = [w for _, w in spans]
    for index in (_first_tandem(tokens, max_period), _overused(tokens, ngram, max_repeats)):
        if index is not None:
            hits.append(spans[index][0])
    return min(hits) if hits else None


def cut_repetition(text: str, min_clause_words: int = 4, max_period: int = 8) -> tuple[str, bool]:
    """`text` cut where it starts repeating itself (`find_repetition`), and whether it was cut."""
    at = find_repetition(text, min_clause_words, max_period)
    return (text, False) if at is None else (text[:at].rstrip(" \t\n,;:-"), True)


def _first_tandem(tokens: list[str], max_period: int, times: int = 3, min_span: int = 6):
    """Index of the word where the first repeat starts, for a phrase repeated `times` in a row
    covering at least `min_span` words (so '1, 1, 1' in a list is not a loop)."""
    for i in range(len(tokens)):
        for p in range(1, max_period + 1):
            if p * times < min_span or i + p * times > len(tokens):
                continue
            phrase = tokens[i : i + p]
            if all(w.isdigit() for w in phrase):  # "0, 1, 0, 1, 0, 1" is data, not a loop
                continue
            if all(tokens[i + k * p : i + (k + 1) * p] == phrase for k in range(1, times)):
                return i + p
    return None


def _overused(tokens: list[str], n: int, max_repeats: int) -> int | None:
    """Index of the first word of an `n`-gram's occurrence number `max_repeats + 1`."""
    if n <= 0:
        return None
    counts: Counter[tuple[str, ...]] = Counter()
    for i, gram in enumerate(ngrams(tokens, n)):
        counts[gram] += 1
        if counts[gram] > max_repeats:
            return i
    return None


# -- apology --------------------------------------------------------------------------------------

_APOLOGY = re.compile(
    r"^\W*(?:sorry|(?:i\s*['’]?\s*a?m|i\s+am)\s+(?:\w+\s+)?sorry|(?:my\s+)?apologies|"
    r"i\s+(?:do\s+)?apologi[sz]e)\b",
    re.IGNORECASE,
)


def opens_with_apology(text: str) -> bool:
    """'Sorry, ...', "I'm sorry", 'I am so sorry', 'My apologies', 'I apologize' ..."""
    return bool(_APOLOGY.match(text))


# -- exemplar leakage -----------------------------------------------------------------------------

# Function words never make a phrase distinctive (a grammar list, not a list of topics).
STOPWORDS = frozenset(
    """a about above after again against all also am an and any are as at be because been before
    being below between both but by can could did do does doing down during each few for from
    further had has have having he her here hers him his how i if in into is it its itself just
    me more most my no nor not now of off on once only or other our ours out over own same she
    should so some such than that the their theirs them then there these they this those through
    to too under until up very was we were what when where which while who whom why will with
    would you your yours""".split()
)


def _stem(word: str) -> str:
    """Plural-blind comparison ("presidents" asks about "president")."""
    return word[:-1] if len(word) > 3 and word.endswith("s") and not word.endswith("ss") else word


def _names_and_numbers(text: str) -> set[str]:
    """Capitalised words not opening a sentence ("Rosetta", "Kowalczyk") and numbers of three
    digits or more ("1799"): what makes a passage specific to one conversation."""
    out = set()
    for m in _WORD.finditer(text):
        word = m.group(0)
        if word.isdigit():
            if len(word) >= 3:
                out.add(word)
            continue
        before = text[: m.start()].rstrip(" \t\"'(*`[#-")
        if word[0].isupper() and before and before[-1] not in ".!?:\n":
            out.add(word.lower())
    return out


class ExemplarLeakage:
    """Finds answers that copy an exemplar instead of answering their own question.

    The distinctive words of an exemplar are its topic (the words of its user turns), its names
    and its numbers, less every word that another exemplar or the rest of the constitution
    (principles, preamble, identity) also uses, and less function words: "Rosetta", "1799",
    "Kowalczyk", "weather". An answer leaks when it shares `n` words in a row with an exemplar
    that contain at least `min_distinctive` distinctive words the question does not contain,
    unless the question is on that exemplar's topic: it shares a name or number of the
    exemplar's user turns, or half of their distinctive words.
    So an answer that merely mentions a president or the weather is kept, so is one that reuses
    an exemplar's generic phrasing ("my knowledge ends in ..."), and so is a weather answer that
    borrows from the weather exemplar; a distinctive sentence copied into another topic is not.
    Both stages build it with `from_constitution` (a hand list of words, as in the original,
    also drops good answers).
    """

    def __init__(
        self,
        texts: Sequence[Sequence[str]],
        topics: Sequence[str] | None = None,
        background: Iterable[str] = (),
        n: int = 8,
        min_distinctive: int = 1,
    ):
        self.n, self.min_distinctive = n, min_distinctive
        topics = topics if topics is not None else [""] * len(texts)
        vocab = [{_stem(w) for t in group for w in words(t)} for group in texts]
        common = {_stem(w) for w in STOPWORDS} | {_stem(w) for t in background for w in words(t)}
        # n-gram -> (its exemplar, its distinctive words); a distinctive word belongs to one
        # exemplar only, so every such n-gram does too
        self.grams: dict[tuple[str, ...], tuple[int, frozenset[str]]] = {}
        # per exemplar: the distinctive words of its user turns, and the names/numbers among them
        self.topics: list[tuple[frozenset[str], frozenset[str]]] = []
        for i, group in enumerate(texts):
            others = set().union(*(v for j, v in enumerate(vocab) if j != i))
            topic = {_stem(w) for w in words(topics[i])}
            names = {_stem(w) for t in group for w in _names_and_numbers(t)}
            distinctive = {w for w in (topic | names) - others - common if len(w) >= 3}
            topic_names = {_stem(w) for w in _names_and_numbers(topics[i])}
            self.topics.append(
                (frozenset(distinctive & topic), frozenset(distinctive & topic_names))
            )
            for text in group:
                for gram in ngrams(words(text), n):
                    found = distinctive.intersection(_stem(w) for w in gram)
                    if found:
                        self.grams[gram] = (i, frozenset(found))

    @classmethod
    def from_constitution(
        cls, c: Constitution, n: int = 8, min_distinctive: int = 1
    ) -> ExemplarLeakage:
        """One group per exemplar, its user turns as its topic; the rest of the constitution
        (preamble, principles, labels, identity) is background, never distinctive."""
        texts = [[c.fill(t) for t in ex.texts()] for ex in c.exemplars]
        topics = [" ".join(c.fill(t.user) for t in ex.turns) for ex in c.exemplars]
        background = [
            c.fill(c.preamble), c.fill(c.examples_intro), c.fill(c.self_identification),
            c.fill(c.citation.replace("{cited}", "")), *c.turn_labels(),
            *(f"{p.name} {c.fill(p.text)}" for p in c.principles),
            *c.identity.model_dump().values(), c.fill("{knowledge_cutoff}"),
        ]  # fmt: skip
        return cls(texts, topics, background, n, min_distinctive)

    def find(self, answer: str, question: str = "") -> str | None:
        """The first copied phrase of `answer` (its words joined by spaces), or None."""
        if not self.grams:
            return None
        asked = {_stem(w) for w in words(question)}
        on_topic = {
            i
            for i, (topic, names) in enumerate(self.topics)
            if names & asked or (topic and 2 * len(topic & asked) >= len(topic))
        }
        for gram in ngrams(words(answer), self.n):
            hit = self.grams.get(gram)
            if hit and hit[0] not in on_topic and len(hit[1] - asked) >= self.min_distinctive:
                return " ".join(gram)
        return None


# -- the filters both stages apply to a finished answer ------------------------------------------


class Rejection(NamedTuple):
    reason: str
    detail: str = ""  # e.g. the leaked phrase


def answer_rejection(
    answer: str, question: str, min_words: int, leakage: ExemplarLeakage
) -> Rejection | None:
    """Why `answer` (to `question`) is rejected, or None: `apology` (it opens with one),
    `too_short` (fewer than `min_words` words, at least 1), `exemplar_leakage` (detail: the
    copied phrase)."""
    if opens_with_apology(answer):
        return Rejection("apology")
    if len(words(answer)) < max(min_words, 1):
        return Rejection("too_short")
    if phrase := leakage.find(answer, question):
        return Rejection("exemplar_leakage", phrase)
    return None
