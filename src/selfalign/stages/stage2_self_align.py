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
        self_align[.shardIofN].raw.jsonl  every completion (resume: ids there are not redone;
                                          prompt_sha/settings_sha refuse a rerun under other
                                          prompts or sampling)
        aligned.jsonl    id, instruction, input, output, thoughts, principles, source
        identity.jsonl   identity questions answered from the constitution's identity (same fields)
        rejected.jsonl   every rejected completion with its `reason` (and the raw completion)
        sft.jsonl        aligned + identity, seeded shuffle (stage 3 trains on it)
        stats.json       counts by reason, cuts, principle-citation histogram

Generation uses the paper's sampling (temperature 0.5, top-p 0.95, 256 new tokens), stops at the
next user turn and biases against every token that can start "Sorry" / "I'm sorry". Parsing and
filtering are pure functions; the answer filters are `selfalign.text.filters`, the ones stage 4
applies too. Each rejection has a reason:

    no_answer, no_thoughts, no_self_identification   the completion does not follow the format
    turn_header (the answer goes on with another turn before it is complete), empty, truncated,
    tail_section, apology, too_short, internal_thoughts, exemplar_leakage, no_citation

Cuts that keep an answer: at the next turn header of any format the run knows (the
constitution's speaker labels, under the prompt's and the released name, and the chat
template's headers), at the first repetition, at encyclopedia tail sections, and (opt-in) back
to the last complete sentence of an answer stopped by the length limit; then the constitution's
`rewrites` (the paper's: "According to my knowledge from Wikipedia, here" -> "Here"), counted.
Defects of the original avoided here (each has a test): only the first token of one spelling of
"Sorry" biased; answers cut by the length limit kept with a dangling partial word; exemplar
leakage found with a hand list of words ("president", "weather") that also dropped good answers;
identity rows without the fields training needs.

Sharding (`shard="i/n"`, 0-based): shard i answers instructions i, i+n, i+2n, ... into its own
raw file. Every call then parses ALL raw files; once every instruction has a completion it writes
the final files (the last shard to finish does it, and the files are the same whichever it is).
"""

from __future__ import annotations

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
from selfalign.generation import Backend, Capabilities, Need, SamplingParams, require, row_seed
from selfalign.generation.records import (
    Shas,
    check_resume,
    generate_records,
    prompt_shas,
    verdicts,
)
from selfalign.jsonl import (
    check_unique_ids,
    read_jsonl,
    read_records,
    write_jsonl_atomic,
    write_text_atomic,
)
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
    user_text,
)
from selfalign.text.conversation import TEMPLATE_LABELS, sharegpt_messages
from selfalign.text.filters import (
    AnswerRules,
    answer_rejection,
    cut_repetition,
    cut_turn,
    normalise_newlines,
    tidy_answer,
    turn_header_pattern,
    words,
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
    min_chars: int = Field(
        0,
        ge=0,
        description="Answers with fewer characters: too_short (the paper: 160; configs/paper.yaml).",
    )
    tail_sections: Literal["cut", "drop"] = Field(
        "cut",
        description="An answer ending in encyclopedia sections ('## See also', '## References'): "
        "cut them off, or drop the answer (as the original's stage 4 did).",
    )
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
    """{token id: cfg.apology_bias} from the backend's tokenizer; {} when the bias is off, or
    the backend has no tokenizer (only a canned one gets this far without: `check_backend`)."""
    if not cfg.apology_bias or backend.tokenizer is None:
        return {}
    return {i: cfg.apology_bias for i in apology_token_ids(backend.tokenizer)}


def check_backend(
    cfg: SelfAlignConfig, backend: Backend | Capabilities, section: str = "self_align"
) -> None:
    """Refuse, in one line and before any work, a backend that cannot run stage 2 as configured:
    the apology bias biases token ids found through the tokenizer, and the sampling must be
    within the backend's controls. `section` is the config key of this stage ("" in a stage-2
    file); `backend` is a loaded backend or `capabilities(cfg.model)`.

    Left truncation is refused too: every prompt starts with the constitution, so cutting a
    prompt's start to make it fit cuts the principles, and the answer is no longer principle-
    driven though it would be kept as if it were."""
    sampling = ".".join(filter(None, [section, "sampling"]))
    if cfg.sampling.truncate_prompt == "left":
        raise UserError(
            f"stage 'self_align': {sampling}.truncate_prompt: 'left' would cut the constitution's "
            "principles off the front of every prompt too long for the context; set it to "
            "'error' (a too-long prompt is then named before any work) and make the prompt fit: "
            "a model with a longer context, a shorter constitution, fewer exemplars or a smaller "
            f"{sampling}.max_tokens"
        )
    key = ".".join(filter(None, [section, "apology_bias"]))
    apology = Need("the apology bias", f"{key}: 0", token_logit_bias=True)
    needs = [apology] if cfg.apology_bias else []
    require(backend, cfg.sampling, "stage 'self_align'", sampling, needs)


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
    # turn_marker, repetition, truncated_to_sentence, tail_section
    cuts: list[str] = field(default_factory=list)
    reason: str | None = None  # the completion does not follow the format, or turn_header


def turn_headers(c: Constitution) -> re.Pattern:
    """A line opening another turn: the constitution's speaker labels ('User:', 'Orion
    (internal thoughts):', 'Dromedary:', ...) and the chat template's ('### User')."""
    return turn_header_pattern([*c.speaker_labels(), *TEMPLATE_LABELS])


def parse_completion(
    c: Constitution, completion: str, finish_reason: str = "stop", min_clause_words: int = 4
) -> Parsed:
    """Split what follows the thoughts cue into thoughts and answer.

    The answer starts after the answer label and ends at the next turn header (a user turn, new
    thoughts, an auto reply, another answer, a chat-template header); it is `turn_header` when
    what precedes the header is not a complete answer. The thoughts must open with the
    constitution's self-identification sentence. The answer gets the repetition cut here too.
    """
    completion = normalise_newlines(completion)
    headers = turn_headers(c)
    first = headers.search(completion)
    thoughts = completion[: first.start() if first else len(completion)].strip()
    if first is None or first.group(1) != f"{c.label('answer')}:":
        return Parsed(thoughts=thoughts, reason="no_answer" if thoughts else "no_thoughts")
    parsed = Parsed(thoughts=thoughts, truncated=finish_reason == "length")
    parsed.answer, cut, incomplete = cut_turn(completion[first.end() :], headers)
    if cut:
        parsed.cuts.append("turn_marker")
        parsed.truncated = False  # the length limit struck after the turn ended
    if not thoughts:
        parsed.reason = "no_thoughts"
        return parsed
    self_id = words(c.fill(c.self_identification))
    if words(thoughts)[: len(self_id)] != self_id:
        parsed.reason = "no_self_identification"
        return parsed
    parsed.principles = find_citations(thoughts, c.principles)
    if incomplete:
        parsed.reason = incomplete.reason
        return parsed
    answer, cut = cut_repetition(parsed.answer, min_clause_words)
    if cut:
        parsed.answer, parsed.truncated = answer, False
        parsed.cuts.append("repetition")
    return parsed


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


def replace_name(text: str, old: str, new: str) -> str:
    """Replace the whole word `old` (e.g. the prompt's codename) with `new`, taken literally."""
    if not old or old == new:
        return text
    return re.sub(rf"(?<!\w){re.escape(old)}(?!\w)", lambda _: new, text)


# ----------------------------------------------------------------------------- filtering


@dataclass
class Verdict:
    """What became of one completion: a kept answer, or a rejection with its reason."""

    reason: str | None
    parsed: Parsed
    output: str = ""
    detail: str = ""  # e.g. the leaked phrase
    renamed: bool = False  # the codename was replaced by the released name
    rewrites: Counter[str] = field(default_factory=Counter)  # rewrite pattern -> applications


def answer_rules(c: Constitution, cfg: SelfAlignConfig) -> AnswerRules:
    """The answer filters of stage 2 (shared with stage 4), built once per run."""
    return AnswerRules.from_constitution(
        c, min_words=cfg.min_words, min_chars=cfg.min_chars, tails=cfg.tail_sections,
        leak_ngram=cfg.leak_ngram, leak_min_distinctive=cfg.leak_min_distinctive,
    )  # fmt: skip


def judge(
    c: Constitution,
    cfg: SelfAlignConfig,
    rules: AnswerRules,
    completion: str,
    finish_reason: str,
    question: str = "",
) -> Verdict:
    """Parse one completion and apply every answer filter (`rules`: `answer_rules(c, cfg)`);
    the kept answer has the codename replaced by the released name."""
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
    tidied = tidy_answer(answer, rules)
    if tidied.rejection:
        return Verdict(tidied.rejection.reason, parsed)
    parsed.cuts += tidied.cuts
    answer = tidied.text
    if rejection := answer_rejection(answer, question, rules):
        return Verdict(rejection.reason, parsed, detail=rejection.detail)
    if cfg.require_citation and not parsed.principles:
        return Verdict("no_citation", parsed)
    output = replace_name(answer, c.codename or "", c.identity.name)
    return Verdict(None, parsed, output, renamed=output != answer, rewrites=tidied.rewrites)


def filter_completions(
    c: Constitution, cfg: SelfAlignConfig, raw: Sequence[dict[str, Any]]
) -> tuple[list[dict], list[dict], dict[str, Any]]:
    """Raw generation records -> (aligned rows, rejected rows, counts)."""
    rules = answer_rules(c, cfg)
    kept, rejected = [], []
    cuts: Counter[str] = Counter()
    rewrites: Counter[str] = Counter()
    renamed = 0
    for r in raw:
        question = user_text(r["instruction"], r.get("input") or "")
        v = judge(c, cfg, rules, r["completion"], r.get("finish_reason", "stop"), question)
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
        rewrites.update(v.rewrites)
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
        "rewrites": dict(rewrites.most_common()),
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
    check_unique_ids([q.model_dump() for q in data.questions], f"{path}: questions")
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


def load_identity_conversations(
    path: str | Path, identity: Identity, replace: dict[str, str] | None = None
) -> list[dict[str, Any]]:
    """ShareGPT-style conversations (`[{id, conversations: [{from, value}, ...]}]` as JSON, or
    one per JSONL line) as SFT rows: each user turn and the reply after it, names replaced
    (`replace`: old name -> template with {name}/{developer}/...), exact duplicates dropped."""
    path = Path(path)
    records = read_records(path)
    # longest first: "Large Model Systems Organization (LMSYS)" before "LMSYS"
    swaps = sorted((replace or {}).items(), key=lambda kv: -len(kv[0]))

    def rename(text: str) -> str:
        for old, new in swaps:
            text = replace_name(text, old, fill_identity(new, identity))
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
    """(user message, the reply right after it) of every exchange of a ShareGPT conversation."""
    messages = sharegpt_messages(turns, where)
    return [
        (m["content"], reply["content"])
        for m, reply in zip(messages, messages[1:], strict=False)
        if m["role"] == "user" and reply["role"] == "assistant"
    ]


# ----------------------------------------------------------------------------- shell


def load_instructions(path: str | Path, limit: int | None = None) -> list[dict[str, Any]]:
    """Stage-1 records (id, instruction, input, source), checked; the first `limit` of them."""
    records = read_jsonl(path)
    check_unique_ids(records, path)
    out = []
    for n, r in enumerate(records, start=1):
        if not isinstance(r.get("instruction"), str) or not r["instruction"].strip():
            raise UserError(f"{path}: record {n} (id {r['id']!r}) has no 'instruction' text")
        if not isinstance(r.get("input") or "", str):
            raise UserError(f"{path}: record {n} (id {r['id']!r}): 'input' must be a string")
        out.append(r)
    if not out:
        raise UserError(f"{path}: no instructions")
    return out[:limit] if limit else out


def _prompt_rest(c: Constitution, prefix: str, row: dict[str, Any]) -> str:
    """The row's `render_prompt` text after `prefix` (= `render_prefix(c)`, the same for all)."""
    prompt = render_prompt(c, row["instruction"], row.get("input") or "", prefix=prefix)
    return prompt[len(prefix) :]


def prompt_records(c: Constitution, rows: Sequence[dict[str, Any]], prefix: str) -> list[dict]:
    """Generation records whose `prompt` is what follows `prefix` (`render_prefix(c)`): the
    constitution is the same long text for every row, so `generate_records(prefix=...)` adds it,
    hashes it once into each row's `prompt_sha` and never writes it per row."""
    return [
        {"id": r["id"], "instruction": r["instruction"], "input": r.get("input") or "",
         "source": r.get("source") or "self_align", "prompt": _prompt_rest(c, prefix, r)}
        for r in rows
    ]  # fmt: skip


def _raw_path(out_dir: Path, shard: Shard) -> Path:
    return out_dir / f"{RAW}{shard.tag}.raw.jsonl"


def _expected_prompts(c: Constitution, rows: Sequence[dict[str, Any]]) -> dict[Any, Shas]:
    """id -> (prompt_sha, None) for finalizing: no model is loaded then, so the sampling settings
    (whose apology bias comes from its tokenizer) are not checked, the prompts are (a raw file
    made under another constitution is refused). The constitution prefix is hashed once."""
    prefix = render_prefix(c)
    shas = prompt_shas((_prompt_rest(c, prefix, r) for r in rows), prefix)
    return {r["id"]: (sha, None) for r, sha in zip(rows, shas, strict=True)}


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
    check_backend(cfg, backend)
    shard, out_dir = parse_shard(shard), Path(out_dir)
    c = stage_constitution(cfg)
    rows = load_instructions(instructions_path, cfg.max_instructions)
    mine = rows[shard.index :: shard.count]
    bias = apology_bias(cfg, backend)
    params = sampling_params(cfg, c, bias)
    rules = answer_rules(c, cfg)

    def tally(r: dict[str, Any]) -> tuple[int, int]:  # the final filters, for the progress bar
        question = user_text(r["instruction"], r.get("input") or "")
        return verdicts(
            [judge(c, cfg, rules, r["completion"], r["finish_reason"], question).reason]
        )

    # in chunks: the backend tokenizes its whole job at once, and the prompts are long
    prefix, raw_path = render_prefix(c), _raw_path(out_dir, shard)
    records = prompt_records(c, mine, prefix)
    from selfalign.stages.context_fit import check_self_align_fit  # it imports this module

    check_self_align_fit(cfg, backend, c, records)  # before any work, with the real instructions
    done = generate_records(
        backend, records, params, raw_path,
        seed=cfg.seed, label="self-align", store_prompt=False, tally=tally,
        prefix=prefix, chunk_size=cfg.chunk_size,
    )  # fmt: skip
    extra = {"shard": f"{shard.index}/{shard.count}", "apology_bias_tokens": len(bias)}
    # this shard's raw file is in memory, read and checked once: only other shards' are read
    stats = _finalize(cfg, out_dir, c, rows, wait_for_shards=shard.count > 1,
                      read={raw_path: done})  # fmt: skip
    return {**stats, **extra}


def finalize_self_align(
    cfg: SelfAlignConfig, instructions_path: str | Path, out_dir: str | Path
) -> dict[str, Any]:
    """Parse and filter the completions of every raw file in `out_dir` (all shards) and write
    aligned/identity/rejected/sft.jsonl and stats.json. No model needed: rerun it to apply other
    filter settings (e.g. `truncated: cut`) to the same completions."""
    rows = load_instructions(instructions_path, cfg.max_instructions)
    return _finalize(cfg, Path(out_dir), stage_constitution(cfg), rows, wait_for_shards=False)


def _finalize(
    cfg: SelfAlignConfig,
    out_dir: Path,
    c: Constitution,
    rows: list[dict[str, Any]],
    wait_for_shards: bool,
    read: dict[Path, list[dict[str, Any]]] | None = None,
) -> dict[str, Any]:
    """Write the final files from every raw file in `out_dir`; `read`: raw files already read
    and checked against this job (path -> records), not read again."""
    read = read or {}
    by_id: dict[Any, dict] = {}
    expected = None
    for path in sorted(out_dir.glob(f"{RAW}*.raw.jsonl")):
        raw = read.get(path)
        if raw is None:
            raw = read_jsonl(path)
            expected = expected or _expected_prompts(c, rows)
            check_resume(raw, expected, path)
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
    check_unique_ids(
        sft, out_dir / SFT, "an instruction and an identity row share it; rename the instruction id"
    )
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


# a typical instruction, in tokens: what must fit after the constitution besides the answer
INSTRUCTION_ROOM = 64


def context_shortfall(prefix_tokens: int, context: int, max_tokens: int) -> str | None:
    """Why a constitution prompt of `prefix_tokens` does not fit a `context`-token model with
    `max_tokens` of answer and a typical instruction; None when it fits. (Cutting the prompt's
    start, truncate_prompt='left', would cut the principles: never the way out here.)"""
    room = context - prefix_tokens - max_tokens
    if room >= INSTRUCTION_ROOM:
        return None
    return (
        f"the constitution prompt is {prefix_tokens} tokens; with max_tokens={max_tokens} it leaves "
        f"{max(room, 0)} of a {context}-token context for the instruction (want >= "
        f"{INSTRUCTION_ROOM}): use fewer or shorter exemplars/principles, a lower max_tokens, or a "
        "model with a longer context"
    )
