"""Answer filters shared by stage 2 (self-align, paper section 3.2) and stage 4 (verbose cloning,
section 3.4): pure functions on text, nothing is read or written here.

Both stages apply the same families, in this order; each stage decides only what a hit means:

- newlines (`normalise_newlines`): CRLF and lone CR become LF, so no rule below depends on them;
- turn headers (`turn_header_pattern`, `cut_turn`): an answer that goes on with another turn
  ("\\n\\nUser: ...", "\\n### User", "\\n### Dromedary (extensive)") is cut there, exactly
  where a stop string would have cut it (a backend may not honour stops, and raw files outlive
  settings), when what precedes is a complete answer (`is_complete`); otherwise it is rejected
  as `turn_header`. Headers inside closed code blocks do not count;
- repetition (`find_repetition`): a repeated clause, a phrase looping three times in a row, or
  (optionally) an n-gram used too often; stage 2 cuts the answer there (`cut_repetition`), stage 4
  rejects it;
- `tidy_answer`: encyclopedia tail sections ("## See also", "## References", ...) at the end are
  cut (`cut_tail_sections`; an answer that is only a tail: `tail_section`), then the
  constitution's `rewrites` are applied (`Rewrites`, each application counted);
- `answer_rejection`: an apology opener ("Sorry, ..."), too few words or characters, internal
  thoughts, and exemplar leakage (`ExemplarLeakage`, built from the constitution), in that order.

`AnswerRules` carries what the last two need (from the constitution and a stage's config).
`words` is the one word rule of these filters (lower-cased runs of letters, digits and "_"), and
`normalise` the one normal form built on it.
"""

from __future__ import annotations

import re
import unicodedata
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal, NamedTuple

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


class Rejection(NamedTuple):
    """Why an answer is rejected: the funnel's reason, and what triggered it."""

    reason: str
    detail: str = ""  # e.g. the leaked phrase


def normalise_newlines(text: str) -> str:
    """CRLF and lone CR as LF: a completion's line breaks, whatever wrote them."""
    return text.replace("\r\n", "\n").replace("\r", "\n")


# -- turn headers ---------------------------------------------------------------------------------


def turn_header_pattern(headers: Iterable[str]) -> re.Pattern:
    """Matches a line that opens another turn; group 1 is the header.

    A header ending in ':' ("User:", "Orion (auto reply):") opens a line and the turn's text
    follows on it; any other header ("### User", "### Dromedary (extensive)") is a line of its
    own (or followed by a colon), so "### User accounts" is an answer's markdown heading, not a
    turn. Longest first, so "Orion (auto reply):" wins over "Orion:"."""
    ordered = sorted(set(headers), key=len, reverse=True)
    alternatives = "|".join(
        re.escape(h) if h.endswith(":") else re.escape(h) + r"(?=[ \t]*(?::|$))" for h in ordered
    )
    return re.compile(rf"^[ \t]*({alternatives})", re.MULTILINE)


_CLOSED_FENCE = re.compile(r"```.*?```", re.DOTALL)


def _mask_closed_code(text: str) -> str:
    """`text` with closed fenced code blanked out (same length): a header or heading written
    inside code is the code's. An unclosed fence masks nothing: what follows it is suspect."""
    return _CLOSED_FENCE.sub(lambda m: re.sub(r"[^\n]", " ", m.group(0)), text)


def cut_at_turn_header(text: str, headers: re.Pattern) -> tuple[str, bool]:
    """`text` (stripped) up to the first line that opens another turn, and whether it was cut.
    The start of `text` counts as the start of a line; headers inside closed code do not count."""
    m = headers.search(_mask_closed_code(text))
    return (text.strip(), False) if m is None else (text[: m.start()].strip(), True)


_SENTENCE_CLOSED = re.compile(r"(?:[.!?…。！？]|```|\|)[\"'”’)\]*_]*\Z")
_LIST_ITEM = re.compile(r"(?:^|\n)[ \t]*(?:[-*•+]|\d+[.)])[ \t]+\S[^\n]*\Z")
_BARE_NUMBER = re.compile(r"(?:^|\n)[ \t]*(?:\d+|[A-Za-z])[.)]?\Z")


def is_complete(text: str) -> bool:
    """Whether `text` ends where an answer may end: a closed sentence (".", "!", "?", "…", a
    closing quote or bracket after them), a closed code block, a table row, a list item, or an
    emoji. Not: mid-sentence, after a colon, a bare list number ("2."), an open code block."""
    text = text.rstrip()
    if not text or text.count("```") % 2 or _BARE_NUMBER.search(text):
        return False
    if _SENTENCE_CLOSED.search(text) or _LIST_ITEM.search(text):
        return True
    return unicodedata.category(text[-1]) == "So"


def cut_turn(text: str, headers: re.Pattern) -> tuple[str, bool, Rejection | None]:
    """`cut_at_turn_header`, and `turn_header` when the cut leaves no complete answer."""
    answer, cut = cut_at_turn_header(text, headers)
    if cut and not is_complete(answer):
        return answer, cut, Rejection("turn_header")
    return answer, cut, None


# -- tail sections --------------------------------------------------------------------------------

# Section titles that close an encyclopedia article, not an answer (matched without case).
TAIL_TITLES = frozenset(
    ["see also", "references", "external links", "notes", "further reading", "sources",
     "bibliography", "footnotes", "citations", "notes and references", "references and notes",
     "related articles", "related topics", "related pages", "links"]
)  # fmt: skip
_HEADING = re.compile(
    r"^[ \t]*(?:#{1,6}[ \t]+(?P<md>[^\n]*?)[ \t#]*|\*\*(?P<bold>[^*\n]+?)\*\*:?"
    r"|=+[ \t]*(?P<wiki>[^=\n]+?)[ \t]*=+"
    r"|(?P<plain>(?i:see also|external links|further reading|references|bibliography)):)[ \t]*$",
    re.MULTILINE,
)


def cut_tail_sections(text: str) -> tuple[str, bool]:
    """`text` without the run of tail sections ("## See also", "**References**", "External
    links:", "== Notes ==") it ends with, and whether it had one. A tail section followed by
    another kind of section is part of the answer; headings inside closed code do not count."""
    start = None
    for m in reversed(list(_HEADING.finditer(_mask_closed_code(text)))):
        title = next(g for g in m.groups() if g is not None)
        if title.strip(" :*").lower() not in TAIL_TITLES:
            break
        start = m.start()
    return (text, False) if start is None else (text[:start].rstrip(), True)


# -- rewrites -------------------------------------------------------------------------------------


class Rewrites:
    """A constitution's `rewrites` (pattern -> replacement, multi-line regular expressions),
    applied in order; `apply` counts each pattern's applications."""

    def __init__(self, rules: Mapping[str, str] | None = None):
        self.rules = [(p, re.compile(p, re.MULTILINE), r) for p, r in (rules or {}).items()]

    def apply(self, text: str) -> tuple[str, Counter[str]]:
        counts: Counter[str] = Counter()
        for key, pattern, replacement in self.rules:
            text, n = pattern.subn(replacement, text)
            counts[key] += n
        return text, +counts


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


_SENTENCE = re.compile(r"[^.!?\n]+[.!?]*")


def sentences(text: str) -> list[str]:
    """The normalised sentences (and lines) of `text` that have words."""
    return [key for m in _SENTENCE.finditer(text) if (key := normalise(m.group(0)))]


class ExemplarLeakage:
    """Finds answers that copy an exemplar instead of answering their own question.

    Two ways to copy, both forgiven when the question is on that exemplar's topic (it shares a
    name or number of the exemplar's user turns, or half of their distinctive words):

    - a distinctive passage: `n` words in a row shared with an exemplar that contain at least
      `min_distinctive` words distinctive of it that the question does not contain. The
      distinctive words of an exemplar are its topic (the words of its user turns), its names
      and its numbers, less every word that another exemplar or the rest of the constitution
      (principles, preamble, identity) also uses, and less function words: "Rosetta", "1799",
      "Kowalczyk", "weather". So an answer that merely mentions a president or the weather is
      kept, and so is one that reuses an exemplar's generic phrasing ("my knowledge ends in ...");
    - a canned reply: the answer's main content (at least `canned_share` of its words) is
      sentences of `min_sentence_words` words or more copied whole from the exemplars' replies
      (answers and auto replies), distinctive or not: the watson exemplar's "Could you please
      provide more details or context ..." given as the answer to a clear instruction.

    `thoughts` finds the internal thoughts' own sentences in an answer. Both stages build it
    with `from_constitution` (a hand list of words, as in the original, also drops good answers).
    """

    def __init__(
        self,
        texts: Sequence[Sequence[str]],
        topics: Sequence[str] | None = None,
        background: Iterable[str] = (),
        n: int = 8,
        min_distinctive: int = 1,
        replies: Sequence[Sequence[str]] = (),
        thoughts: Sequence[str] = (),
        citation: str = "",
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
        self.canned: dict[str, set[int]] = {}  # a reply's sentence -> the exemplars that say it
        for i, group in enumerate(replies):
            for text in group:
                for key in sentences(text):
                    if len(key.split()) >= self.min_sentence_words:
                        self.canned.setdefault(key, set()).add(i)
        # the thoughts' own sentences, and the words that open their citation of a principle
        self.thought_sentences = [k for k in (normalise(t) for t in thoughts) if k]
        opener = normalise(citation)
        self.citation = re.compile(rf"(?:^| ){re.escape(opener)} \d+(?: |$)") if opener else None

    min_sentence_words = 5
    canned_share = 0.5

    @classmethod
    def from_constitution(
        cls, c: Constitution, n: int = 8, min_distinctive: int = 1
    ) -> ExemplarLeakage:
        """One group per exemplar, its user turns as its topic, its answers and auto replies as
        its replies; the rest of the constitution (preamble, principles, labels, identity) is
        background, never distinctive. The thoughts' markers: the self-identification sentence
        and the citation's opening words ("I should follow principles")."""
        texts = [[c.fill(t) for t in ex.texts()] for ex in c.exemplars]
        topics = [" ".join(c.fill(t.user) for t in ex.turns) for ex in c.exemplars]
        replies = [[c.fill(t.answer or t.auto_reply or "") for t in ex.turns] for ex in c.exemplars]
        background = [
            c.fill(c.preamble), c.fill(c.examples_intro), c.fill(c.self_identification),
            c.fill(c.citation.replace("{cited}", "")), *c.turn_labels(),
            *(f"{p.name} {c.fill(p.text)}" for p in c.principles),
            *c.identity.model_dump().values(), c.fill("{knowledge_cutoff}"),
        ]  # fmt: skip
        opener = c.fill(c.citation.split("{cited}")[0])
        return cls(
            texts, topics, background, n, min_distinctive, replies,
            [c.fill(c.self_identification)], opener,
        )  # fmt: skip

    def _on_topic(self, question: str) -> tuple[set[str], set[int]]:
        """(the question's stemmed words, the exemplars it is on the topic of)."""
        asked = {_stem(w) for w in words(question)}
        on_topic = {
            i
            for i, (topic, names) in enumerate(self.topics)
            if names & asked or (topic and 2 * len(topic & asked) >= len(topic))
        }
        return asked, on_topic

    def find(self, answer: str, question: str = "") -> str | None:
        """The first copied phrase of `answer` (its words joined by spaces), or None."""
        if not self.grams and not self.canned:
            return None
        asked, on_topic = self._on_topic(question)
        for gram in ngrams(words(answer), self.n):
            hit = self.grams.get(gram)
            if hit and hit[0] not in on_topic and len(hit[1] - asked) >= self.min_distinctive:
                return " ".join(gram)
        copied = [k for k in sentences(answer) if self.canned.get(k, set()) - on_topic]
        total = len(words(answer))
        if copied and sum(len(k.split()) for k in copied) >= self.canned_share * total:
            return copied[0]
        return None

    def thoughts(self, answer: str) -> str | None:
        """The internal thoughts' marker `answer` contains (normalised), or None: their
        self-identification sentence, or their citation of a principle by number."""
        said = normalise(answer)
        for sentence in self.thought_sentences:
            if f" {sentence} " in f" {said} ":
                return sentence
        m = self.citation.search(said) if self.citation else None
        return m.group(0).strip() if m else None


# -- the filters both stages apply to a finished answer ------------------------------------------


@dataclass(frozen=True)
class AnswerRules:
    """What stages 2 and 4 check in every answer, built once per run (`from_constitution`)."""

    leakage: ExemplarLeakage
    rewrites: Rewrites = field(default_factory=Rewrites)
    min_words: int = 1
    min_chars: int = 0
    tails: Literal["cut", "drop"] = "cut"

    @classmethod
    def from_constitution(
        cls,
        c: Constitution,
        *,
        min_words: int = 1,
        min_chars: int = 0,
        tails: Literal["cut", "drop"] = "cut",
        leak_ngram: int = 8,
        leak_min_distinctive: int = 1,
    ) -> AnswerRules:
        leakage = ExemplarLeakage.from_constitution(c, leak_ngram, leak_min_distinctive)
        return cls(leakage, Rewrites(c.rewrites), min_words, min_chars, tails)


class Tidied(NamedTuple):
    text: str
    cuts: list[str]  # "tail_section" when one was cut
    rewrites: Counter[str]  # pattern -> applications
    rejection: Rejection | None


def tidy_answer(answer: str, rules: AnswerRules) -> Tidied:
    """Cut the tail sections the answer ends with (`tail_section` when nothing else is left, or
    when `rules.tails` is "drop", as the original did), then apply the rewrites."""
    text, cut = cut_tail_sections(answer)
    if cut and (rules.tails == "drop" or not text.strip()):
        return Tidied(answer, [], Counter(), Rejection("tail_section"))
    text, counts = rules.rewrites.apply(text)
    return Tidied(text.strip(), ["tail_section"] if cut else [], counts, None)


def answer_rejection(answer: str, question: str, rules: AnswerRules) -> Rejection | None:
    """Why `answer` (to `question`) is rejected, or None: `apology` (it opens with one),
    `too_short` (fewer than `rules.min_words` words, at least 1, or `rules.min_chars`
    characters), `internal_thoughts` (their self-identification sentence or citation, detail:
    which), `exemplar_leakage` (detail: the copied phrase)."""
    if opens_with_apology(answer):
        return Rejection("apology")
    if len(words(answer)) < max(rules.min_words, 1):
        return Rejection("too_short", f"fewer than {max(rules.min_words, 1)} words")
    if len(answer.strip()) < rules.min_chars:
        return Rejection("too_short", f"fewer than {rules.min_chars} characters")
    if marker := rules.leakage.thoughts(answer):
        return Rejection("internal_thoughts", marker)
    if phrase := rules.leakage.find(answer, question):
        return Rejection("exemplar_leakage", phrase)
    return None
