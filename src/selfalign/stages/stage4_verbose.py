"""Stage 4, verbose cloning (paper section 3.4): long answers from the engraved model, then the
final model is the BASE model fine-tuned on them (context distillation).

Stage 3's model answers briefly. Here it answers every stage-2 instruction (and the identity
questions) under a verbose system prompt, an "extensive" mode asking for thorough, organised,
multi-aspect answers. The verbose prompt is then distilled away: the final model is trained on
(instruction, verbose answer) with the short system prompts of `selfalign.text.conversation`.

Reads:  aligned.jsonl (stage 2: id, instruction, input, ...), identity.jsonl (optional, same fields)
Writes: verbose.raw.jsonl   every completion (resume: ids already there are not regenerated)
        verbose.jsonl       id, instruction, input, output, source, source_id
        rejected.jsonl      every rejected completion with its `reason`
        model/              the final model (same outputs as `selfalign engrave`)

Filters, each with a reason: truncated (cut by the length limit), too_short, repetition,
echo_prompt (the answer repeats the question), echo_system (it recites the verbose prompt),
turn_marker (it writes the next turn), exemplar_leakage (it copies a distinctive passage of a
constitution exemplar into an answer on another topic; stage 2's `ExemplarLeakage`, so an answer
that merely mentions "the weather" or "a president" is kept).

Every verbose prompt starts with the same text (the verbose system prompt in the chat template),
so a backend that detects a shared prefix computes it once per batch.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator

from selfalign.errors import UserError
from selfalign.generation import Backend, SamplingParams
from selfalign.generation.records import generate_records, verdicts
from selfalign.jsonl import read_jsonl, write_jsonl_atomic
from selfalign.stages.stage2_self_align import ExemplarLeakage
from selfalign.stages.stage3_engrave import TrainConfig, run_engrave
from selfalign.text.constitution import Constitution, Identity
from selfalign.text.conversation import (
    ASSISTANT_HEADER,
    TURN_STOPS,
    USER_HEADER,
    prompt_messages,
    prompt_text,
    render_prompt,
    user_text,
)

VERBOSE_PROMPT = (
    "You are {name}, an AI assistant developed by {developer}, now answering in extensive mode. "
    "In extensive mode you give the most complete answer you can: you look at the request from "
    "several angles, explain the background and your reasoning step by step, add examples, "
    "caveats and practical advice where they help, and organise longer answers into short "
    "paragraphs or numbered points. You stay accurate and candid: your knowledge extends to "
    "{knowledge_cutoff}, you say so when you are unsure or lack current information, and you turn "
    "down harmful requests while explaining why and offering a safer alternative."
)


VERBOSE_DATA = (
    "long answers the principle-engraved model wrote in a verbose mode (verbose cloning: the "
    "verbose prompt is distilled away)"
)


def verbose_system_prompt(identity: Identity, spec: str | None = None) -> str:
    """The verbose system prompt: ours by default, or `spec` (a prompt file such as the original
    `dromedary_verbose_prompt.txt`, or the text itself), with the identity filled in."""
    return prompt_text(
        spec or "extensive", identity, {"extensive": VERBOSE_PROMPT}, "verbose prompt"
    )


def _verbose_sampling() -> SamplingParams:
    return SamplingParams(
        temperature=0.3,
        top_p=0.7,
        max_tokens=512,
        ngram_penalties={3: 1.0, 4: 2.0},
        stop=list(TURN_STOPS),
    )


def _final_training() -> TrainConfig:
    return TrainConfig(max_length=768)


class VerboseConfig(BaseModel):
    """Stage 4: verbose generation with the engraved model, filters, and the final SFT."""

    model_config = ConfigDict(extra="forbid")

    seed: int = Field(42, description="Seeds each row's sampling stream (with the row id).")
    sampling: SamplingParams = Field(
        default_factory=_verbose_sampling,
        description="Paper defaults: temperature 0.3, top-p 0.7, 512 tokens, 3-gram 1.0 and 4-gram 2.0 penalties.",
    )
    verbose_prompt: str | None = Field(
        None,
        description="Verbose system prompt: None for ours (an 'extensive' mode), a prompt file "
        "(.txt/.md, e.g. the original dromedary_verbose_prompt.txt) or the text itself; "
        "{name}, {developer}, {knowledge_cutoff} are filled in.",
    )
    include_identity: bool = Field(True, description="Also answer the identity questions.")
    max_instructions: int | None = Field(
        None, ge=1, description="Use only the first N stage-2 instructions (None: all)."
    )
    min_words: int = Field(20, ge=0, description="Reject answers with fewer words (too_short).")
    echo_ngram: int = Field(
        8,
        ge=3,
        description="Words in a row shared with the verbose prompt that count as reciting it.",
    )
    repeat_ngram: int = Field(
        6, ge=2, description="Length (words) of a phrase checked for repetition."
    )
    max_repeats: int = Field(
        2, ge=1, description="A phrase may occur this often; more is repetition."
    )
    leak_ngram: int = Field(
        8,
        ge=3,
        description="Words in a row copied from an exemplar (with a word distinctive of it that the "
        "question lacks) that count as leakage.",
    )
    train: TrainConfig = Field(
        default_factory=_final_training,
        description="The final SFT of the base model (paper: same recipe, cut-off 768).",
    )

    @field_validator("train", mode="before")
    @classmethod
    def _final_defaults(cls, value: Any) -> Any:
        # keys given in YAML change the final-model defaults (cut-off 768), not the stage-3 ones
        if isinstance(value, dict):
            return {"max_length": 768, **value}
        return value


# -- pure core: prompts and filters --------------------------------------------------------------


def instruction_rows(
    aligned: Sequence[dict[str, Any]], identity_rows: Iterable[dict[str, Any]], cfg: VerboseConfig
) -> list[dict[str, Any]]:
    """The questions to answer: stage-2 instructions, then identity questions (deduplicated)."""
    rows = list(aligned)[: cfg.max_instructions] if cfg.max_instructions else list(aligned)
    out, seen = [], set()
    sources = [("aligned", rows), ("identity", list(identity_rows) if cfg.include_identity else [])]
    for source, group in sources:
        for n, row in enumerate(group, start=1):
            if row.get("id") is None or not isinstance(row.get("instruction"), str):
                raise UserError(f"{source} record {n}: needs 'id' and a string 'instruction'")
            text = user_text(row["instruction"], row.get("input") or "")
            key = _normalise(text)
            if not key or key in seen:
                continue
            seen.add(key)
            out.append(
                {
                    "id": f"verbose-{row['id']}",
                    "source_id": row["id"],
                    "source": row.get("source") or source,
                    "instruction": row["instruction"].strip(),
                    "input": (row.get("input") or "").strip(),
                }
            )
    return out


def add_prompts(
    rows: list[dict[str, Any]], tokenizer, identity: Identity, verbose_prompt: str | None = None
) -> list[dict[str, Any]]:
    """Each row with `prompt`: the verbose system prompt and the question in the chat template."""
    system = verbose_system_prompt(identity, verbose_prompt)
    return [
        {
            **row,
            "prompt": render_prompt(
                tokenizer, prompt_messages(system, user_text(row["instruction"], row["input"]))
            ),
        }
        for row in rows
    ]


def _normalise(text: str) -> str:
    return " ".join(re.findall(r"\w+", text.lower()))


def _words(text: str) -> list[str]:
    return re.findall(r"\w+", text.lower())


def _ngrams(words: Sequence[str], n: int) -> list[tuple[str, ...]]:
    return [tuple(words[i : i + n]) for i in range(len(words) - n + 1)]


def leakage_detector(
    cfg: VerboseConfig,
    constitution: Constitution | None = None,
    exemplar_texts: Iterable[str] = (),
) -> ExemplarLeakage | None:
    """Stage 2's exemplar-leakage check for verbose answers: built from the constitution (best:
    it knows each exemplar's topic), else from bare exemplar texts (one group), else none."""
    if constitution is not None and constitution.exemplars:
        return ExemplarLeakage.from_constitution(constitution, n=cfg.leak_ngram)
    texts = [t for t in exemplar_texts if t.strip()]
    return ExemplarLeakage([texts], n=cfg.leak_ngram) if texts else None


def is_repetitive(text: str, n: int, max_repeats: int) -> bool:
    """A phrase of `n` words occurring more than `max_repeats` times, or a repeated sentence."""
    words = _words(text)
    counts = Counter(_ngrams(words, n))
    if counts and max(counts.values()) > max_repeats:
        return True
    sentences = [_normalise(s) for s in re.split(r"(?<=[.!?])\s+|\n+", text)]
    long_sentences = [s for s in sentences if len(s.split()) >= n]
    return len(long_sentences) != len(set(long_sentences))


def filter_answer(
    row: dict[str, Any],
    cfg: VerboseConfig,
    system_grams: set[tuple[str, ...]],
    leakage: ExemplarLeakage | None = None,
) -> str | None:
    """Why a generated answer is rejected, or None to keep it."""
    if row.get("finish_reason") == "length":
        return "truncated"
    answer = row["completion"].strip()
    if any(marker.strip() in answer for marker in (USER_HEADER, ASSISTANT_HEADER)):
        return "turn_marker"
    words = _words(answer)
    if len(words) < max(cfg.min_words, 1):
        return "too_short"
    question = _words(user_text(row["instruction"], row["input"]))
    if len(question) >= 4 and words[: len(question)] == question:
        return "echo_prompt"
    if system_grams.intersection(_ngrams(words, cfg.echo_ngram)):
        return "echo_system"
    if is_repetitive(answer, cfg.repeat_ngram, cfg.max_repeats):
        return "repetition"
    if leakage is not None and leakage.find(answer, user_text(row["instruction"], row["input"])):
        return "exemplar_leakage"
    return None


REJECTED_FIELDS = (
    "id",
    "source_id",
    "source",
    "instruction",
    "input",
    "completion",
    "finish_reason",
)


def _system_grams(cfg: VerboseConfig, identity: Identity) -> set[tuple[str, ...]]:
    system = verbose_system_prompt(identity, cfg.verbose_prompt)
    return set(_ngrams(_words(system), cfg.echo_ngram))


def filter_answers(
    generated: list[dict[str, Any]],
    cfg: VerboseConfig,
    identity: Identity,
    leakage: ExemplarLeakage | None = None,
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Split generated rows into kept SFT rows and rejected rows (with `reason`; a leak also
    with the copied phrase as `detail`)."""
    system_grams = _system_grams(cfg, identity)
    kept, rejected = [], []
    for row in generated:
        reason = filter_answer(row, cfg, system_grams, leakage)
        if reason:
            record = {key: row[key] for key in REJECTED_FIELDS} | {"reason": reason}
            if reason == "exemplar_leakage":
                question = user_text(row["instruction"], row["input"])
                record["detail"] = leakage.find(row["completion"], question)
            rejected.append(record)
            continue
        kept.append(
            {
                "id": row["id"],
                "instruction": row["instruction"],
                "input": row["input"],
                "output": row["completion"].strip(),
                "source": row["source"],
                "source_id": row["source_id"],
            }
        )
    return kept, rejected


# -- shell ---------------------------------------------------------------------------------------


def run_verbose(
    cfg: VerboseConfig,
    backend: Backend,
    aligned_path: str | Path,
    out_dir: str | Path,
    identity: Identity,
    identity_path: str | Path | None = None,
    exemplar_texts: Iterable[str] = (),
    tokenizer=None,
    constitution: Constitution | None = None,
) -> dict[str, Any]:
    """Generate verbose answers with the engraved model behind `backend`, filter, write; counts.

    `identity_path` defaults to `identity.jsonl` next to `aligned_path` when it exists.
    `tokenizer` (with the engraved model's chat template) defaults to `backend.tokenizer`.
    `constitution` (the one stage 2 used) drives the exemplar-leakage filter; bare
    `exemplar_texts` are the fallback when there is no constitution object.
    Returns {generated, parsed, kept, rejected, rejected_by_reason}.
    """
    out_dir = Path(out_dir)
    aligned = read_jsonl(aligned_path)
    if not aligned:
        raise UserError(f"{aligned_path}: no instructions to answer (the file is empty)")
    if identity_path is None and (Path(aligned_path).parent / "identity.jsonl").is_file():
        identity_path = Path(aligned_path).parent / "identity.jsonl"
    identity_rows = read_jsonl(identity_path) if identity_path and cfg.include_identity else []
    tokenizer = tokenizer if tokenizer is not None else getattr(backend, "tokenizer", None)
    if tokenizer is None:
        raise UserError(
            "verbose cloning needs the engraved model's tokenizer (for its chat template)"
        )

    questions = instruction_rows(aligned, identity_rows, cfg)
    rows = add_prompts(questions, tokenizer, identity, cfg.verbose_prompt)
    leakage = leakage_detector(cfg, constitution, exemplar_texts)
    system_grams = _system_grams(cfg, identity)
    generated = generate_records(
        backend,
        rows,
        cfg.sampling,
        out_dir / "verbose.raw.jsonl",
        cfg.seed,
        label="verbose answers",
        tally=lambda row: verdicts([filter_answer(row, cfg, system_grams, leakage)]),
    )
    kept, rejected = filter_answers(generated, cfg, identity, leakage)
    write_jsonl_atomic(out_dir / "verbose.jsonl", kept)
    write_jsonl_atomic(out_dir / "rejected.jsonl", rejected)
    by_reason = Counter(r["reason"] for r in rejected)
    return {
        "generated": len(generated),
        "parsed": len(generated),
        "kept": len(kept),
        "rejected": len(rejected),
        "rejected_by_reason": dict(sorted(by_reason.items())),
    }


def run_final_sft(
    cfg: VerboseConfig,
    verbose_path: str | Path,
    model_dir: str | Path,
    identity: Identity,
    base_model: str | None = None,
    constitution: str | None = None,
    command: str | None = None,
    callbacks: list | None = None,
) -> dict[str, Any]:
    """Fine-tune the BASE model on the verbose answers (same recipe as stage 3, cut-off 768).

    `base_model` fills `cfg.train.model` when that is empty (it must be the base model, not the
    engraved one); the other arguments and the returned stats are `run_engrave`'s.
    """
    train = (
        cfg.train
        if cfg.train.model or not base_model
        else cfg.train.model_copy(update={"model": base_model})
    )
    if not read_jsonl(verbose_path):
        raise UserError(
            f"{verbose_path}: no verbose answer passed the filters, so there is nothing to train on"
        )
    return run_engrave(
        train, verbose_path, model_dir, identity, constitution=constitution, command=command,
        callbacks=callbacks, data_description=VERBOSE_DATA,
    )  # fmt: skip


def training_stats(model_dir: str | Path) -> dict[str, Any]:
    """`train_stats.json` of a selfalign-trained model directory (or of its adapter's parent)."""
    import json

    for folder in (Path(model_dir), Path(model_dir).parent):
        if (folder / "train_stats.json").is_file():
            return json.loads((folder / "train_stats.json").read_text())
    return {}


def base_of(model_dir: str | Path) -> str | None:
    """The base model a selfalign-trained model directory was fine-tuned from, if it says."""
    return training_stats(model_dir).get("base_model")


def identity_of(model_dir: str | Path) -> Identity | None:
    """The identity a selfalign-trained model directory was trained with, if it says."""
    data = training_stats(model_dir).get("identity")
    return Identity(**data) if data else None
