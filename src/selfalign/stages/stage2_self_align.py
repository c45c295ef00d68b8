"""Stage 2: principle-driven self-alignment (SELF-ALIGN paper, section 3.2).

The base model answers every stage-1 instruction while reading the constitution: the principles
and exemplar conversations in which the assistant first writes internal thoughts citing the
principles it applies, then its answer. The prompt (`selfalign.text.constitution.render_prompt`) ends
at the thoughts cue, so every completion is "thoughts, answer label, answer". Every prompt starts
with the same constitution text, which the transformers backend prefills once.

Reads:  instructions.jsonl (stage 1: id, instruction, input, source), a constitution (YAML, a
        bundled name, or a raw prompt text such as the original watson prompt), identity
        questions (bundled YAML) and optionally ShareGPT-style identity conversations.
Writes (in `out_dir`):
        self_align[.shardIofN].raw.jsonl  every completion (resume: ids there are not redone)
        aligned.jsonl    id, instruction, input, output, thoughts, principles, source
        identity.jsonl   identity questions answered from the constitution's identity (same fields)
        rejected.jsonl   every rejected completion with its `reason` (and the raw completion)
        sft.jsonl        aligned + identity, seeded shuffle (stage 3 trains on it)
        stats.json       counts by reason, cuts, principle-citation histogram

Generation uses the paper's sampling (temperature 0.5, top-p 0.95, 256 new tokens), stops at the
next user turn and biases against every token that can start "Sorry" / "I'm sorry". Parsing and
filtering are pure functions; each rejection has a reason:

    no_answer, no_thoughts, no_self_identification   the completion does not follow the format
    empty, truncated, apology, too_short, no_citation, exemplar_leakage

Cuts that keep an answer: at the next turn marker, at the first repeated clause, and (opt-in)
back to the last complete sentence of an answer stopped by the length limit. Defects of the
original avoided here (each has a test): only the first token of one spelling of "Sorry" biased;
answers cut by the length limit kept with a dangling partial word; exemplar leakage found with a
hand list of words ("president", "weather") that also dropped good answers; identity rows
without the fields training needs.

Sharding (`shard="i/n"`, 0-based): shard i answers instructions i, i+n, i+2n, ... into its own
raw file. Every call then parses ALL raw files; once every instruction has a completion it writes
the final files (the last shard to finish does it, and the files are the same whichever it is).
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
import re
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from selfalign.config import read_yaml, validate
from selfalign.errors import UserError
from selfalign.generation import Backend, SamplingParams, row_seed
from selfalign.generation.records import generate_records, verdicts
from selfalign.jsonl import read_jsonl, read_records, write_jsonl_atomic, write_text_atomic
from selfalign.shards import Shard, parse_shard
from selfalign.text.constitution import (
    Constitution,
    Identity,
    bundled_dir,
    fill_identity,
    find_citations,
    load_constitution,
    render_prefix,
    render_prompt,
    user_message,
)

log = logging.getLogger(__name__)

RAW, ALIGNED, IDENTITY, REJECTED, SFT, STATS = (
    "self_align", "aligned.jsonl", "identity.jsonl", "rejected.jsonl", "sft.jsonl", "stats.json"
)  # fmt: skip
# Every row of aligned.jsonl, identity.jsonl and sft.jsonl has exactly these fields.
ROW_FIELDS = ("id", "instruction", "input", "output", "thoughts", "principles", "source")
# Rejections meaning the completion did not follow the thoughts/answer format at all.
FORMAT_REASONS = ("no_answer", "no_thoughts", "no_self_identification")

# FastChat's identity data (ShareGPT format) names its own model and team; these become ours.
DEFAULT_IDENTITY_REPLACE = {
    "Large Model Systems Organization (LMSYS)": "{developer}",
    "LMSYS": "{developer}",
    "Vicuna": "{name}",
}


def _paper_sampling() -> SamplingParams:
    return SamplingParams(temperature=0.5, top_p=0.95, max_tokens=256)


class SelfAlignConfig(BaseModel):
    """Stage 2: principle-driven self-alignment (defaults: the paper's)."""

    model_config = ConfigDict(extra="forbid")

    constitution: str = Field(
        "default",
        description="Constitution: a YAML file, a raw prompt text (.txt/.md, e.g. the original "
        "watson prompt) or a bundled name ('default').",
    )
    identity: Identity | None = Field(
        None, description="The released assistant; unset = the constitution's identity."
    )
    sampling: SamplingParams = Field(
        default_factory=_paper_sampling,
        description="Paper defaults: temperature 0.5, top-p 0.95, 256 new tokens. The stop at the "
        "next user turn is added; ngram_penalties {n: alpha} are optional.",
    )
    seed: int = Field(
        42, description="Seeds each row's sampling stream, identity answers, shuffle."
    )
    apology_bias: float = Field(
        -100.0,
        le=0.0,
        description="Logit bias on every token that can start 'Sorry' / 'I'm sorry' (0: none).",
    )
    max_instructions: int | None = Field(
        None, ge=1, description="Answer only the first N instructions (unset: all)."
    )
    truncated: Literal["drop", "cut"] = Field(
        "drop",
        description="An answer stopped by the length limit: drop it, or cut it back to its last "
        "complete sentence (it is never kept with a dangling partial word).",
    )
    min_words: int = Field(3, ge=1, description="Answers with fewer words: too_short.")
    min_clause_words: int = Field(
        4, ge=2, description="A repeated clause (sentence or line) this long cuts the answer there."
    )
    require_citation: bool = Field(
        False, description="Reject answers whose thoughts cite no principle (no_citation)."
    )
    leak_ngram: int = Field(
        8, ge=3, description="Words in a row shared with an exemplar that may count as leakage."
    )
    leak_min_distinctive: int = Field(
        1,
        ge=1,
        description="...if they contain this many words distinctive of that exemplar that the "
        "instruction does not contain.",
    )
    identity_questions: str | None = Field(
        "default",
        description="Identity questions YAML (bundled 'default'); null: no identity questions.",
    )
    identity_conversations: str | None = Field(
        None, description="ShareGPT-style identity conversations (JSON or JSONL) to add."
    )
    identity_replace: dict[str, str] = Field(
        default_factory=lambda: dict(DEFAULT_IDENTITY_REPLACE),
        description="Names replaced in identity conversations (values may use {name}, "
        "{developer}, {knowledge_cutoff}).",
    )
    chunk_size: int = Field(
        8192,
        ge=1,
        description="Instructions handed to the backend at a time (bounds the memory that "
        "long prompts and their tokens take).",
    )
    allow_missing: bool = Field(
        False,
        description="Write the final files even if some instructions have no completion yet.",
    )


# ----------------------------------------------------------------------------- constitution


def stage_constitution(cfg: SelfAlignConfig) -> Constitution:
    """The constitution of `cfg`, with `cfg.identity` (if set) as the released identity."""
    c = load_constitution(cfg.constitution)
    return c.with_identity(cfg.identity) if cfg.identity is not None else c


def turn_labels(c: Constitution) -> list[str]:
    """The labels that open a turn in the prompt ('User', 'Orion (internal thoughts)', ...)."""
    return [c.label(kind) for kind in ("user", "thoughts", "auto_reply", "answer")]


def turn_stops(c: Constitution) -> list[str]:
    """Generation stops where the model starts the next user turn."""
    return [f"\n{c.label('user')}:"]


# ----------------------------------------------------------------------------- apology bias

_SORRY = "sorry"


def apology_token_ids(tokenizer) -> list[int]:
    """Every token that can begin "Sorry"/"sorry" as a word: the whole word with or without a
    leading space ("Sorry", " sorry", "Sorry,", ...) and, after a space, its longer prefixes
    (" Sor", " sorr"), so no spelling or tokenization of an apology opening gets through.

    A prefix without a leading space ("sor") is left alone: it continues other words
    ("professor"). Prefixes shorter than three letters ("S", " so") are far too common to bias;
    the apology filter still catches what gets through.
    """
    vocab = tokenizer.get_vocab()
    out = []
    for token, index in vocab.items():
        if "sor" not in token.lower():  # cheap pre-filter before decoding
            continue
        text = tokenizer.decode([index])
        word = text.lstrip().lower()
        # a word-initial piece: a space in its text, or the tokenizer's marker for one
        # (sentencepiece "▁", byte-level "Ġ"; decoding a lone token may drop the space)
        spaced = text[:1].isspace() or token[:1] in ("▁", "Ġ")
        if word.startswith(_SORRY) or (spaced and len(word) >= 3 and _SORRY.startswith(word)):
            out.append(index)
    return sorted(out)


def apology_bias(cfg: SelfAlignConfig, backend: Backend) -> dict[int, float]:
    """{token id: cfg.apology_bias} from the backend's tokenizer; {} when it has none (a
    scripted backend, an HTTP server): the apology filter still rejects such answers."""
    tokenizer = getattr(backend, "tokenizer", None)
    if not cfg.apology_bias:
        return {}
    if tokenizer is None:
        log.info("backend has no tokenizer: no apology bias (the apology filter still applies)")
        return {}
    return {i: cfg.apology_bias for i in apology_token_ids(tokenizer)}


def sampling_params(
    cfg: SelfAlignConfig, c: Constitution, bias: dict[int, float] | None = None
) -> SamplingParams:
    """cfg.sampling plus the stop at the next user turn and `bias` (see `apology_bias`); biases
    given in cfg.sampling.logit_bias win."""
    stops = list(dict.fromkeys([*cfg.sampling.stop, *turn_stops(c)]))
    return cfg.sampling.model_copy(
        update={"stop": stops, "logit_bias": {**(bias or {}), **cfg.sampling.logit_bias}}
    )


# ----------------------------------------------------------------------------- parsing


@dataclass
class Parsed:
    """A completion split into thoughts and answer, before the answer filters."""

    thoughts: str = ""
    answer: str = ""
    principles: list[int] = field(default_factory=list)
    truncated: bool = False  # the answer still ends where the length limit stopped it
    cuts: list[str] = field(default_factory=list)  # turn_marker, repetition, truncated_to_sentence
    reason: str | None = None  # set when the completion does not follow the format


def _norm(text: str) -> str:
    return " ".join(text.split()).casefold()


def _words(text: str) -> list[str]:
    return re.findall(r"\w+", text.lower())


def _marker_re(c: Constitution) -> re.Pattern:
    labels = sorted(turn_labels(c), key=len, reverse=True)  # longest first: "Orion (auto reply)"
    return re.compile(r"^[ \t]*(" + "|".join(re.escape(x) for x in labels) + r"):", re.MULTILINE)


def parse_completion(
    c: Constitution, completion: str, finish_reason: str = "stop", min_clause_words: int = 4
) -> Parsed:
    """Split what follows the thoughts cue into thoughts and answer.

    The answer starts after the answer label and ends at the next turn marker (a user turn, new
    thoughts, an auto reply, another answer); the thoughts must open with the constitution's
    self-identification sentence. The answer gets the repetition cut here too.
    """
    answer_label = c.label("answer")
    markers = list(_marker_re(c).finditer(completion))
    first = markers[0] if markers else None
    thoughts = completion[: first.start() if first else len(completion)].strip()
    if first is None or first.group(1) != answer_label:
        return Parsed(thoughts=thoughts, reason="no_answer" if thoughts else "no_thoughts")
    parsed = Parsed(thoughts=thoughts, truncated=finish_reason == "length")
    end = markers[1].start() if len(markers) > 1 else len(completion)
    if len(markers) > 1:
        parsed.cuts.append("turn_marker")
        parsed.truncated = False  # the length limit struck after the turn ended
    parsed.answer = completion[first.end() : end].strip()
    if not thoughts:
        parsed.reason = "no_thoughts"
        return parsed
    if not _norm(thoughts).startswith(_norm(c.fill(c.self_identification))):
        parsed.reason = "no_self_identification"
        return parsed
    parsed.principles = find_citations(thoughts, c.principles)
    answer, cut = cut_repetition(parsed.answer, min_clause_words)
    if cut:
        parsed.answer, parsed.truncated = answer, False
        parsed.cuts.append("repetition")
    return parsed


_FENCE = re.compile(r"```.*?(?:```|\Z)", re.DOTALL)


def _mask_code(text: str) -> str:
    """`text` with fenced code blanked out (same length): code repeats lines legitimately."""
    return _FENCE.sub(lambda m: " " * len(m.group(0)), text)


def cut_repetition(text: str, min_clause_words: int = 4, max_period: int = 8) -> tuple[str, bool]:
    """Cut `text` at the first repetition: a clause (sentence or line) of at least
    `min_clause_words` words seen before, or a phrase of up to `max_period` words repeated three
    times in a row ("I like cats, I like cats, I like cats"). Returns (text, whether cut)."""
    masked = _mask_code(text)
    cuts = []
    seen: set[str] = set()
    for m in re.finditer(r"[^.!?;\n]+", masked):
        words = _words(m.group(0))
        key = " ".join(words)
        if len(words) >= min_clause_words:
            if key in seen:
                cuts.append(m.start() + len(m.group(0)) - len(m.group(0).lstrip()))
                break
            seen.add(key)
    spans = [(m.start(), m.group(0).lower()) for m in re.finditer(r"\w+", masked)]
    words = [w for _, w in spans]
    tandem = _first_tandem(words, max_period)
    if tandem is not None:
        cuts.append(spans[tandem][0])
    if not cuts:
        return text, False
    return text[: min(cuts)].rstrip(" \t\n,;:-"), True


def _first_tandem(words: list[str], max_period: int, times: int = 3, min_span: int = 6):
    """Index of the word where the first repeat starts, for a phrase repeated `times` in a row
    covering at least `min_span` words (so '1, 1, 1' in a list is not a loop)."""
    for i in range(len(words)):
        for p in range(1, max_period + 1):
            if p * times < min_span or i + p * times > len(words):
                continue
            phrase = words[i : i + p]
            if all(w.isdigit() for w in phrase):  # "0, 1, 0, 1, 0, 1" is data, not a loop
                continue
            if all(words[i + k * p : i + (k + 1) * p] == phrase for k in range(1, times)):
                return i + p
    return None


_SENTENCE_END = re.compile(r"[.!?][\"'”’)\]]*(?=\s|\Z)")
_LIST_NUMBER = re.compile(r"(?:^|\n)[ \t]*(?:\d+|[A-Za-z])\Z")


def cut_to_last_sentence(text: str) -> str | None:
    """`text` up to its last complete sentence, or None when there is none. A list number
    ("2.") is not a sentence end, and a cut inside an unclosed code block moves before it."""
    fence = [m.start() for m in re.finditer(r"```", text)]
    if len(fence) % 2:  # an unclosed code block: nothing after its start is complete
        text = text[: fence[-1]]
    ends = [
        m.end() for m in _SENTENCE_END.finditer(text) if not _LIST_NUMBER.search(text[: m.start()])
    ]
    if not ends:
        return None
    out = text[: ends[-1]].rstrip()
    return out or None


_APOLOGY = re.compile(
    r"^\W*(?:sorry|(?:i\s*['’]?\s*a?m|i\s+am)\s+(?:\w+\s+)?sorry|(?:my\s+)?apologies|"
    r"i\s+(?:do\s+)?apologi[sz]e)\b",
    re.IGNORECASE,
)


def opens_with_apology(text: str) -> bool:
    """'Sorry, ...', "I'm sorry", 'I am so sorry', 'My apologies', 'I apologize' ..."""
    return bool(_APOLOGY.match(text))


def replace_name(text: str, old: str, new: str) -> str:
    """Replace the whole word `old` (e.g. the prompt's codename) with `new`."""
    if not old or old == new:
        return text
    return re.sub(rf"(?<!\w){re.escape(old)}(?!\w)", new, text)


# ----------------------------------------------------------------------------- exemplar leakage

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
    for m in re.finditer(r"\w+", text):
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
    Usable by other stages (stage 4 checks verbose answers) through `from_constitution`.
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
        vocab = [{_stem(w) for t in group for w in _words(t)} for group in texts]
        common = {_stem(w) for w in STOPWORDS} | {_stem(w) for t in background for w in _words(t)}
        # n-gram -> (its exemplar, its distinctive words); a distinctive word belongs to one
        # exemplar only, so every such n-gram does too
        self.grams: dict[tuple[str, ...], tuple[int, frozenset[str]]] = {}
        # per exemplar: the distinctive words of its user turns, and the names/numbers among them
        self.topics: list[tuple[frozenset[str], frozenset[str]]] = []
        for i, group in enumerate(texts):
            others = set().union(*(v for j, v in enumerate(vocab) if j != i))
            topic = {_stem(w) for w in _words(topics[i])}
            names = {_stem(w) for t in group for w in _names_and_numbers(t)}
            distinctive = {w for w in (topic | names) - others - common if len(w) >= 3}
            topic_names = {_stem(w) for w in _names_and_numbers(topics[i])}
            self.topics.append(
                (frozenset(distinctive & topic), frozenset(distinctive & topic_names))
            )
            for text in group:
                words = _words(text)
                for k in range(len(words) - n + 1):
                    gram = tuple(words[k : k + n])
                    found = distinctive.intersection(_stem(w) for w in gram)
                    if found:
                        self.grams[gram] = (i, frozenset(found))

    @classmethod
    def from_constitution(
        cls, c: Constitution, n: int = 8, min_distinctive: int = 1
    ) -> ExemplarLeakage:
        texts = [[c.fill(t) for t in ex.texts()] for ex in c.exemplars]
        topics = [" ".join(c.fill(t.user) for t in ex.turns) for ex in c.exemplars]
        background = [
            c.fill(c.preamble), c.fill(c.examples_intro), c.fill(c.self_identification),
            c.fill(c.citation.replace("{cited}", "")), *turn_labels(c),
            *(f"{p.name} {c.fill(p.text)}" for p in c.principles),
            *c.identity.model_dump().values(), c.fill("{knowledge_cutoff}"),
        ]  # fmt: skip
        return cls(texts, topics, background, n, min_distinctive)

    def find(self, answer: str, question: str = "") -> str | None:
        """The first copied phrase of `answer` (its words joined by spaces), or None."""
        if not self.grams:
            return None
        asked = {_stem(w) for w in _words(question)}
        on_topic = {
            i
            for i, (topic, names) in enumerate(self.topics)
            if names & asked or (topic and 2 * len(topic & asked) >= len(topic))
        }
        words = _words(answer)
        for k in range(len(words) - self.n + 1):
            gram = tuple(words[k : k + self.n])
            hit = self.grams.get(gram)
            if hit and hit[0] not in on_topic and len(hit[1] - asked) >= self.min_distinctive:
                return " ".join(gram)
        return None


# ----------------------------------------------------------------------------- filtering


@dataclass
class Verdict:
    """What became of one completion: a kept answer, or a rejection with its reason."""

    reason: str | None
    parsed: Parsed
    output: str = ""
    detail: str = ""  # e.g. the leaked phrase
    renamed: bool = False  # the codename was replaced by the released name


def judge(
    c: Constitution,
    cfg: SelfAlignConfig,
    leakage: ExemplarLeakage | None,
    completion: str,
    finish_reason: str,
    question: str = "",
) -> Verdict:
    """Parse one completion and apply every answer filter; the kept answer has the codename
    replaced by the released name."""
    parsed = parse_completion(c, completion, finish_reason, cfg.min_clause_words)
    if parsed.reason:
        return Verdict(parsed.reason, parsed)
    answer = parsed.answer
    if not answer:
        return Verdict("empty", parsed)
    if parsed.truncated:
        shorter = cut_to_last_sentence(answer) if cfg.truncated == "cut" else None
        if shorter is None:
            return Verdict("truncated", parsed)
        answer = shorter
        parsed.cuts.append("truncated_to_sentence")
    if opens_with_apology(answer):
        return Verdict("apology", parsed)
    if len(_words(answer)) < cfg.min_words:
        return Verdict("too_short", parsed)
    if cfg.require_citation and not parsed.principles:
        return Verdict("no_citation", parsed)
    if leakage is not None and (phrase := leakage.find(answer, question)):
        return Verdict("exemplar_leakage", parsed, detail=phrase)
    output = replace_name(answer, c.codename or "", c.identity.name)
    return Verdict(None, parsed, output=output, renamed=output != answer)


def filter_completions(
    c: Constitution, cfg: SelfAlignConfig, raw: Sequence[dict[str, Any]]
) -> tuple[list[dict], list[dict], dict[str, Any]]:
    """Raw generation records -> (aligned rows, rejected rows, counts)."""
    leakage = ExemplarLeakage.from_constitution(c, cfg.leak_ngram, cfg.leak_min_distinctive)
    kept, rejected = [], []
    cuts: Counter[str] = Counter()
    renamed = 0
    for r in raw:
        question = user_message(r["instruction"], r.get("input") or "")
        v = judge(c, cfg, leakage, r["completion"], r.get("finish_reason", "stop"), question)
        if v.reason:
            rejected.append(
                {
                    "id": r["id"], "instruction": r["instruction"], "input": r.get("input") or "",
                    "source": r.get("source"), "reason": v.reason, "detail": v.detail,
                    "thoughts": v.parsed.thoughts, "answer": v.parsed.answer,
                    "completion": r["completion"], "finish_reason": r.get("finish_reason"),
                }
            )  # fmt: skip
            continue
        cuts.update(v.parsed.cuts)
        renamed += v.renamed
        kept.append(
            sft_row(r["id"], r["instruction"], r.get("input") or "", v.output,
                    v.parsed.thoughts, v.parsed.principles, r.get("source") or "self_align")
        )  # fmt: skip
    counts = {
        "generated": len(raw),
        "parsed": len(raw) - sum(1 for r in rejected if r["reason"] in FORMAT_REASONS),
        "kept": len(kept),
        "rejected": dict(Counter(r["reason"] for r in rejected).most_common()),
        "cuts": dict(cuts.most_common()),
        "renamed": renamed,
        "citations": citation_histogram(c, kept),
        "no_citation": sum(1 for r in kept if not r["principles"]),
    }
    return kept, rejected, counts


def citation_histogram(c: Constitution, rows: Iterable[dict[str, Any]]) -> dict[str, int]:
    """'3 (helpful)' -> how many kept answers' thoughts cite it, every principle listed."""
    counts = Counter(pid for r in rows for pid in r["principles"])
    return {f"{p.id} ({p.name})": counts.get(p.id, 0) for p in c.principles}


def sft_row(
    id: Any,
    instruction: str,
    input: str,
    output: str,
    thoughts: str = "",
    principles: Sequence[int] = (),
    source: str = "self_align",
) -> dict[str, Any]:
    """One row of aligned/identity/sft.jsonl: the same fields everywhere (ROW_FIELDS)."""
    return {
        "id": id, "instruction": instruction.strip(), "input": (input or "").strip(),
        "output": output.strip(), "thoughts": thoughts.strip(), "principles": list(principles),
        "source": source,
    }  # fmt: skip


# ----------------------------------------------------------------------------- identity data


class IdentityQuestion(BaseModel):
    model_config = ConfigDict(extra="forbid")

    id: str = Field(..., min_length=1, description="Stable id; the row id is 'identity-<id>'.")
    question: str = Field(..., min_length=1, description="What the user asks.")
    answers: list[str] = Field(..., min_length=1, description="Answers; one is picked, seeded.")


class IdentityQuestions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    questions: list[IdentityQuestion] = Field(..., min_length=1)


def load_identity_questions(path_or_name: str = "default") -> list[IdentityQuestion]:
    """Identity questions from a YAML file, or the bundled set ('default')."""
    if path_or_name == "default" and not Path(path_or_name).exists():
        with resources.as_file(bundled_dir() / "identity_questions.yaml") as real:
            return load_identity_questions(str(real))
    path = Path(path_or_name)
    if not path.is_file():
        raise UserError(f"{path}: identity questions file not found (or use 'default')")
    data = validate(IdentityQuestions, read_yaml(path), str(path))
    seen: set[str] = set()
    for n, q in enumerate(data.questions):
        if q.id in seen:
            raise UserError(f"{path}: questions[{n}]: duplicate id {q.id!r}")
        seen.add(q.id)
    return data.questions


def identity_rows(
    questions: Sequence[IdentityQuestion], identity: Identity, seed: int
) -> list[dict[str, Any]]:
    """One SFT row per question, its answer chosen by (seed, question id), filled with the
    released identity (never the prompt's codename)."""
    rows = []
    for q in questions:
        answer = random.Random(row_seed(seed, f"identity:{q.id}")).choice(q.answers)
        rows.append(
            sft_row(f"identity-{q.id}", fill_identity(q.question, identity),
                    "", fill_identity(answer, identity), source="identity")
        )  # fmt: skip
    return rows


_HUMAN, _BOT = {"human", "user"}, {"gpt", "assistant", "bot", "chatgpt", "model"}


def load_identity_conversations(
    path: str | Path, identity: Identity, replace: dict[str, str] | None = None
) -> list[dict[str, Any]]:
    """ShareGPT-style conversations (`[{id, conversations: [{from, value}, ...]}]` as JSON, or
    one per JSONL line) as SFT rows: each user turn and the reply after it, names replaced
    (`replace`: old name -> template with {name}/{developer}/...), exact duplicates dropped."""
    path = Path(path)
    records = read_records(path)
    swaps = sorted((replace or {}).items(), key=lambda kv: -len(kv[0]))
    swaps = [
        (re.compile(rf"(?<!\w){re.escape(o)}(?!\w)"), fill_identity(n, identity)) for o, n in swaps
    ]

    def rename(text: str) -> str:
        for pattern, new in swaps:
            text = pattern.sub(lambda _, new=new: new, text)
        return text.strip()

    rows, seen = [], set()
    for n, rec in enumerate(records, start=1):
        turns = rec.get("conversations") if isinstance(rec, dict) else None
        if not isinstance(turns, list):
            raise UserError(f"{path}: record {n} has no 'conversations' list")
        key = rec.get("id", n)
        pairs = _pairs(turns, f"{path}: record {n}")
        for k, (question, reply) in enumerate(pairs):
            question, reply = rename(question), rename(reply)
            if not question or not reply or (question, reply) in seen:
                continue
            seen.add((question, reply))
            suffix = f"-{k}" if len(pairs) > 1 else ""
            rows.append(sft_row(f"identity-conv-{key}{suffix}", question, "", reply,
                                source="identity_conversations"))  # fmt: skip
    return rows


def _pairs(turns: list[Any], where: str) -> list[tuple[str, str]]:
    pairs = []
    for i, turn in enumerate(turns):
        if not isinstance(turn, dict) or not isinstance(turn.get("value"), str):
            raise UserError(f"{where}: conversations[{i}] needs 'from' and a string 'value'")
        role = str(turn.get("from", "")).lower()
        if role not in _HUMAN | _BOT | {"system"}:
            raise UserError(f"{where}: conversations[{i}]: unknown speaker {turn.get('from')!r}")
        nxt = turns[i + 1] if i + 1 < len(turns) else None
        if role in _HUMAN and isinstance(nxt, dict) and str(nxt.get("from", "")).lower() in _BOT:
            pairs.append((turn["value"], str(nxt.get("value", ""))))
    return pairs


# ----------------------------------------------------------------------------- shell


def load_instructions(path: str | Path, limit: int | None = None) -> list[dict[str, Any]]:
    """Stage-1 records (id, instruction, input, source), checked; the first `limit` of them."""
    records = read_jsonl(path)
    seen: set[Any] = set()
    out = []
    for n, r in enumerate(records, start=1):
        if r.get("id") is None:
            raise UserError(f"{path}: record {n} has no 'id'")
        if r["id"] in seen:
            raise UserError(f"{path}: record {n}: duplicate id {r['id']!r}")
        seen.add(r["id"])
        if not isinstance(r.get("instruction"), str) or not r["instruction"].strip():
            raise UserError(f"{path}: record {n} (id {r['id']!r}) has no 'instruction' text")
        if not isinstance(r.get("input") or "", str):
            raise UserError(f"{path}: record {n} (id {r['id']!r}): 'input' must be a string")
        out.append(r)
    if not out:
        raise UserError(f"{path}: no instructions")
    return out[:limit] if limit else out


def prompt_shas(c: Constitution, rows: Sequence[dict[str, Any]]) -> list[str]:
    """A short hash of each row's `render_prompt` text, kept in the raw file so a resumed or
    finalized run notices completions made from another constitution. The shared prefix is
    hashed once, so this stays cheap for hundreds of thousands of rows."""
    prefix = render_prefix(c)
    base = hashlib.sha256(prefix.encode())
    out = []
    for r in rows:
        rest = render_prompt(c, r["instruction"], r.get("input") or "", prefix=prefix)[
            len(prefix) :
        ]
        h = base.copy()
        h.update(rest.encode())
        out.append(h.hexdigest()[:16])
    return out


def prompt_records(c: Constitution, rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Generation records: every prompt starts with the same `render_prefix` text, which the
    backend prefills once; `prompt_sha` stays in the raw file (the prompt itself does not)."""
    prefix = render_prefix(c)
    return [
        {"id": r["id"], "instruction": r["instruction"], "input": r.get("input") or "",
         "source": r.get("source") or "self_align",
         "prompt": render_prompt(c, r["instruction"], r.get("input") or "", prefix=prefix),
         "prompt_sha": sha}
        for r, sha in zip(rows, prompt_shas(c, rows), strict=True)
    ]  # fmt: skip


def _raw_path(out_dir: Path, shard: Shard) -> Path:
    return out_dir / f"{RAW}{shard.tag}.raw.jsonl"


def _check_prompts(raw: Iterable[dict], expected: dict[Any, str], where: str) -> None:
    for r in raw:
        want = expected.get(r["id"])
        if want is not None and r.get("prompt_sha") != want:
            raise UserError(
                f"{where}: record {r['id']!r} was generated from a different prompt (the "
                "constitution or instruction changed); use a new output directory or delete it"
            )


def check_inputs(cfg: SelfAlignConfig, instructions_path: str | Path) -> dict[str, int]:
    """Load every input once so a bad file fails before a model is loaded; return their sizes."""
    c = stage_constitution(cfg)
    rows = load_instructions(instructions_path, cfg.max_instructions)
    return {
        "instructions": len(rows),
        "principles": len(c.principles),
        "exemplars": len(c.exemplars),
        "identity": len(_identity_data(cfg, c.identity)),
    }


def run_self_align(
    cfg: SelfAlignConfig,
    backend: Backend,
    instructions_path: str | Path,
    out_dir: str | Path,
    shard: str | tuple[int, int] | None = None,
) -> dict[str, Any]:
    """Answer this shard's instructions under the constitution (resuming), then, once every
    instruction has a completion, write the final files (`finalize_self_align`).

    Returns the stats of the final files, or `{"finalized": False, "pending": n, ...}` while
    other shards are still missing.
    """
    shard, out_dir = parse_shard(shard), Path(out_dir)
    c = stage_constitution(cfg)
    rows = load_instructions(instructions_path, cfg.max_instructions)
    mine = rows[shard.index :: shard.count]
    raw_path = _raw_path(out_dir, shard)
    expected = dict(zip((r["id"] for r in mine), prompt_shas(c, mine), strict=True))
    done = read_jsonl(raw_path) if raw_path.exists() else []
    _check_prompts(done, expected, str(raw_path))  # before generating anything more
    done_ids = {r["id"] for r in done}
    todo = [r for r in mine if r["id"] not in done_ids]
    del done
    bias = apology_bias(cfg, backend)
    params = sampling_params(cfg, c, bias)
    leakage = ExemplarLeakage.from_constitution(c, cfg.leak_ngram, cfg.leak_min_distinctive)

    def tally(r: dict[str, Any]) -> tuple[int, int]:  # the final filters, for the progress bar
        question = user_message(r["instruction"], r.get("input") or "")
        return verdicts(
            [judge(c, cfg, leakage, r["completion"], r["finish_reason"], question).reason]
        )

    # in chunks: the backend tokenizes its whole job at once, and the prompts are long
    for start in range(0, len(todo), cfg.chunk_size):
        generate_records(
            backend, prompt_records(c, todo[start : start + cfg.chunk_size]), params, raw_path,
            seed=cfg.seed, label="self-align", store_prompt=False, tally=tally,
        )  # fmt: skip
    extra = {"shard": f"{shard.index}/{shard.count}", "apology_bias_tokens": len(bias)}
    stats = _finalize(cfg, instructions_path, out_dir, wait_for_shards=shard.count > 1)
    return {**stats, **extra}


def finalize_self_align(
    cfg: SelfAlignConfig, instructions_path: str | Path, out_dir: str | Path
) -> dict[str, Any]:
    """Parse and filter the completions of every raw file in `out_dir` (all shards) and write
    aligned/identity/rejected/sft.jsonl and stats.json. No model needed: rerun it to apply other
    filter settings (e.g. `truncated: cut`) to the same completions."""
    return _finalize(cfg, instructions_path, out_dir, wait_for_shards=False)


def _finalize(cfg, instructions_path, out_dir, wait_for_shards: bool) -> dict[str, Any]:
    out_dir = Path(out_dir)
    c = stage_constitution(cfg)
    rows = load_instructions(instructions_path, cfg.max_instructions)
    expected = dict(zip((r["id"] for r in rows), prompt_shas(c, rows), strict=True))
    by_id: dict[Any, dict] = {}
    for path in sorted(out_dir.glob(f"{RAW}*.raw.jsonl")):
        raw = read_jsonl(path)
        _check_prompts(raw, expected, str(path))
        for r in raw:
            by_id.setdefault(r["id"], r)
    missing = [r["id"] for r in rows if r["id"] not in by_id]
    if missing and not cfg.allow_missing:
        if wait_for_shards:
            return {"finalized": False, "pending": len(missing), "instructions": len(rows)}
        raise UserError(
            f"{out_dir}: {len(missing)} of {len(rows)} instructions have no completion yet "
            f"(e.g. {missing[0]!r}); run the missing shards, or set allow_missing"
        )
    raw = [by_id[r["id"]] for r in rows if r["id"] in by_id]
    aligned, rejected, counts = filter_completions(c, cfg, raw)
    identity = _identity_data(cfg, c.identity)
    sft = shuffled(aligned + identity, cfg.seed)
    _check_unique(sft, out_dir / SFT)
    write_jsonl_atomic(out_dir / ALIGNED, aligned)
    write_jsonl_atomic(out_dir / IDENTITY, identity)
    write_jsonl_atomic(out_dir / REJECTED, rejected)
    write_jsonl_atomic(out_dir / SFT, sft)
    stats = {
        "finalized": True, "instructions": len(rows), "pending": len(missing), **counts,
        "identity": len(identity), "sft": len(sft),
    }  # fmt: skip
    write_text_atomic(out_dir / STATS, json.dumps(stats, indent=2, ensure_ascii=False) + "\n")
    return stats


def _identity_data(cfg: SelfAlignConfig, identity: Identity) -> list[dict[str, Any]]:
    rows = []
    if cfg.identity_questions:
        rows += identity_rows(load_identity_questions(cfg.identity_questions), identity, cfg.seed)
    if cfg.identity_conversations:
        rows += load_identity_conversations(
            cfg.identity_conversations, identity, cfg.identity_replace
        )
    return rows


def shuffled(rows: Sequence[dict[str, Any]], seed: int) -> list[dict[str, Any]]:
    """A seeded shuffle that depends only on the rows and the seed (not on file order)."""
    out = sorted(rows, key=lambda r: str(r["id"]))
    random.Random(row_seed(seed, "sft-shuffle")).shuffle(out)
    return out


def _check_unique(rows: Sequence[dict[str, Any]], where: Path) -> None:
    seen: set[Any] = set()
    for r in rows:
        if r["id"] in seen:
            raise UserError(
                f"{where}: id {r['id']!r} is used by an instruction and an identity row; "
                "rename the instruction id"
            )
        seen.add(r["id"])
