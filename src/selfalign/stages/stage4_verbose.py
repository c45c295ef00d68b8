"""Stage 4, verbose cloning (paper section 3.4): long answers from the engraved model, then the
final model is the BASE model fine-tuned on them (context distillation).

Stage 3's model answers briefly. Here it answers every stage-2 instruction (and the identity
questions) under a verbose system prompt, an "extensive" mode asking for thorough, organised,
multi-aspect answers. The verbose prompt is then distilled away: the final model is trained on
(instruction, verbose answer) with the short system prompts of `selfalign.text.conversation`.

Reads:  aligned.jsonl (stage 2: id, instruction, input, ...), identity.jsonl (optional, same
        fields), and the engraved model's directory: its tokenizer and chat template write the
        prompts, whichever backend serves the model (an OpenAI-compatible server included)
Writes: verbose.raw.jsonl   every completion (resume: ids already there are not regenerated)
        verbose.jsonl       id, instruction, input, output, source, source_id
        rejected.jsonl      every rejected completion with its `reason`
        model/              the final model (same outputs as `selfalign engrave`)

A verbose prompt that writes turns of its own (the original `verbose_dromedary_prompt.txt` ends
in "### User" after an example turn labelled "### Dromedary (extensive)") has its labels read
from its text: the answer is generated after its assistant label instead of the template's
"### Assistant" (the model is put in its "extensive" mode, as in the original), and its labels
are stop strings and turn headers.

An answer that goes on with another turn (a chat-template header, a label of the verbose
prompt, a speaker label of the constitution) is cut there when what precedes is complete, else
rejected as turn_header; tail sections ("## See also") are cut; the constitution's rewrites are
applied (all counted in `cuts`/`rewrites`). Filters, each with a reason, in this order:
turn_header, truncated (cut by the length limit), tail_section, echo_prompt (the answer repeats
the question), echo_system (it recites the verbose prompt), repetition, then the ones stage 2
applies too (`selfalign.text.filters`): apology, too_short, internal_thoughts, exemplar_leakage
(it copies a distinctive passage or a canned reply of a constitution exemplar into an answer on
another topic, so an answer that merely mentions "the weather" or "a president" is kept).

Every verbose prompt starts with the same text (the verbose system prompt in the chat template),
so a backend that detects a shared prefix computes it once per batch.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, Literal, NamedTuple

from pydantic import BaseModel, ConfigDict, Field

from selfalign.errors import UserError
from selfalign.generation import Backend, Capabilities, Need, SamplingParams, require
from selfalign.generation.records import generate_records, verdicts
from selfalign.jsonl import read_jsonl, write_jsonl_atomic
from selfalign.stages.stage3_engrave import run_engrave
from selfalign.text.constitution import Constitution, Identity
from selfalign.text.conversation import (
    TEMPLATE_LABELS,
    TURN_STOPS,
    PromptLabels,
    prompt_labels,
    prompt_messages,
    prompt_text,
    render_prompt,
    user_text,
)
from selfalign.text.filters import (
    AnswerRules,
    Rejection,
    answer_rejection,
    cut_turn,
    find_repetition,
    ngrams,
    normalise,
    normalise_newlines,
    tidy_answer,
    turn_header_pattern,
    words,
)
from selfalign.training.sft import FinalTrainConfig

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


def verbose_labels(identity: Identity, spec: str | None = None) -> PromptLabels:
    """The turn labels the verbose prompt writes itself, read from its text (ours: none; the
    original's: '### User' and '### Dromedary (extensive)', the latter its answer label)."""
    return prompt_labels(
        spec or "extensive", identity, {"extensive": VERBOSE_PROMPT}, "verbose prompt"
    )


def verbose_sampling(cfg: VerboseConfig, labels: PromptLabels) -> SamplingParams:
    """cfg.sampling, also stopping where the model starts a turn under a label of the verbose
    prompt ('\\n### Dromedary (extensive)')."""
    label_stops = [f"\n{label}" for label in labels.labels]
    stops = list(dict.fromkeys([*cfg.sampling.stop, *label_stops]))
    return cfg.sampling.model_copy(update={"stop": stops})


def _verbose_sampling() -> SamplingParams:
    return SamplingParams(
        temperature=0.3,
        top_p=0.7,
        max_tokens=512,
        ngram_penalties={3: 1.0, 4: 2.0},
        stop=list(TURN_STOPS),
    )


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
    min_chars: int = Field(
        0,
        ge=0,
        description="Reject answers with fewer characters (too_short; the original: 128).",
    )
    tail_sections: Literal["cut", "drop"] = Field(
        "cut",
        description="An answer ending in encyclopedia sections ('## See also', '## External "
        "links'): cut them off, or drop the answer (the original dropped it).",
    )
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
    train: FinalTrainConfig = Field(
        default_factory=FinalTrainConfig,
        description="The final SFT of the base model (paper: same recipe, cut-off 768).",
    )


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
            key = normalise(user_text(row["instruction"], row.get("input") or ""))
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
    """Each row with `prompt`: the verbose system prompt and the question in the chat template,
    ending with the verbose prompt's own answer label when it has one."""
    system = verbose_system_prompt(identity, verbose_prompt)
    label = verbose_labels(identity, verbose_prompt).answer
    return [
        {
            **row,
            "prompt": render_prompt(
                tokenizer,
                prompt_messages(system, user_text(row["instruction"], row["input"])),
                answer_label=label,
            ),
        }
        for row in rows
    ]


class Checked(NamedTuple):
    """What stage 4's filters made of one completion."""

    answer: str
    cuts: list[str]  # turn_marker, tail_section
    rewrites: Counter[str]  # rewrite pattern -> applications
    rejection: Rejection | None


class AnswerFilters:
    """Stage 4's filters, built once per run from the config and THE constitution (the one
    stage 2 used, with the released identity), so every caller filters alike."""

    def __init__(self, cfg: VerboseConfig, constitution: Constitution):
        self.cfg = cfg
        identity = constitution.identity
        system = verbose_system_prompt(identity, cfg.verbose_prompt)
        self.system_grams = set(ngrams(words(system), cfg.echo_ngram))
        # every turn opener the run knows: the chat template's, the verbose prompt's own, and
        # the constitution's speaker labels (stage 2's format)
        labels = verbose_labels(identity, cfg.verbose_prompt).labels
        self.headers = turn_header_pattern(
            [*TEMPLATE_LABELS, *labels, *constitution.speaker_labels()]
        )
        self.rules = AnswerRules.from_constitution(
            constitution, min_words=cfg.min_words, min_chars=cfg.min_chars,
            tails=cfg.tail_sections, leak_ngram=cfg.leak_ngram,
        )  # fmt: skip

    def check(self, row: dict[str, Any]) -> Checked:
        """The answer (cut at another turn, tail sections cut, rewritten), its cuts and rewrites,
        and why it is rejected (None: kept)."""
        answer, cut, rejection = cut_turn(normalise_newlines(row["completion"]), self.headers)
        cuts = ["turn_marker"] if cut else []
        if rejection:
            return Checked(answer, cuts, Counter(), rejection)
        if not cut and row.get("finish_reason") == "length":  # a cut turn had ended before
            return Checked(answer, cuts, Counter(), Rejection("truncated"))
        tidied = tidy_answer(answer, self.rules)
        if tidied.rejection:
            return Checked(answer, cuts, Counter(), tidied.rejection)
        rejection = self._rejection(row, tidied.text)
        return Checked(tidied.text, cuts + tidied.cuts, tidied.rewrites, rejection)

    def reason(self, row: dict[str, Any]) -> str | None:
        rejection = self.check(row).rejection
        return rejection.reason if rejection else None

    def _rejection(self, row: dict[str, Any], answer: str) -> Rejection | None:
        cfg = self.cfg
        question = user_text(row["instruction"], row["input"])
        asked, said = words(question), words(answer)
        if len(asked) >= 4 and said[: len(asked)] == asked:
            return Rejection("echo_prompt")
        if self.system_grams.intersection(ngrams(said, cfg.echo_ngram)):
            return Rejection("echo_system")
        repeats = find_repetition(
            answer, cfg.repeat_ngram, ngram=cfg.repeat_ngram, max_repeats=cfg.max_repeats
        )
        if repeats is not None:
            return Rejection("repetition")
        return answer_rejection(answer, question, self.rules)


REJECTED_FIELDS = (
    "id",
    "source_id",
    "source",
    "instruction",
    "input",
    "completion",
    "finish_reason",
)


def filter_answers(
    generated: list[dict[str, Any]], filters: AnswerFilters
) -> tuple[list[dict[str, Any]], list[dict[str, Any]], dict[str, Any]]:
    """Split generated rows into kept SFT rows and rejected rows (with `reason` and `detail`, e.g.
    the copied phrase of a leak); counts as `run_verbose` returns them."""
    kept, rejected = [], []
    cuts: Counter[str] = Counter()
    rewrites: Counter[str] = Counter()
    for row in generated:
        checked = filters.check(row)
        if checked.rejection:
            rejected.append(
                {key: row[key] for key in REJECTED_FIELDS}
                | {"reason": checked.rejection.reason, "detail": checked.rejection.detail}
            )
            continue
        cuts.update(checked.cuts)
        rewrites.update(checked.rewrites)
        kept.append(
            {
                "id": row["id"],
                "instruction": row["instruction"],
                "input": row["input"],
                "output": checked.answer,
                "source": row["source"],
                "source_id": row["source_id"],
            }
        )
    counts = {
        "generated": len(generated),
        "parsed": len(generated),
        "kept": len(kept),
        "rejected": len(rejected),
        "rejected_by_reason": dict(sorted(Counter(r["reason"] for r in rejected).items())),
        "cuts": dict(sorted(cuts.items())),
        "rewrites": dict(sorted(rewrites.items())),
    }
    return kept, rejected, counts


# -- shell ---------------------------------------------------------------------------------------


def _questions(
    cfg: VerboseConfig, aligned_path: str | Path, identity_path: str | Path | None
) -> list[dict[str, Any]]:
    aligned = read_jsonl(aligned_path)
    if not aligned:
        raise UserError(f"{aligned_path}: no instructions to answer (the file is empty)")
    if identity_path is None and (Path(aligned_path).parent / "identity.jsonl").is_file():
        identity_path = Path(aligned_path).parent / "identity.jsonl"
    identity_rows = read_jsonl(identity_path) if identity_path and cfg.include_identity else []
    return instruction_rows(aligned, identity_rows, cfg)


def run_verbose(
    cfg: VerboseConfig,
    backend: Backend,
    aligned_path: str | Path,
    out_dir: str | Path,
    constitution: Constitution,
    identity_path: str | Path | None = None,
    tokenizer=None,
    *,
    engraved: str | Path | None = None,
) -> dict[str, Any]:
    """Generate verbose answers with the engraved model behind `backend`, filter, write; counts.

    `constitution` is the one stage 2 used, carrying the released identity: the identity names
    the assistant in the verbose prompt, the exemplars drive the leakage filter. `engraved` is
    the engraved model's directory: its tokenizer and chat template write the prompts, whatever
    the backend (a server's own tokenizer may be the base model's). `selfalign run` and
    `selfalign verbose-clone` both pass these, so they send the same prompts and keep the same
    answers. `tokenizer` (already loaded, with the chat template) stands in for `engraved`.
    `identity_path` defaults to `identity.jsonl` next to `aligned_path` when it exists.
    Returns {generated, parsed, kept, rejected, rejected_by_reason, cuts, rewrites}.
    """
    check_backend(cfg, backend, tokenizer_given=True)
    out_dir = Path(out_dir)
    questions = _questions(cfg, aligned_path, identity_path)
    tokenizer = tokenizer if tokenizer is not None else engraved_tokenizer(engraved)
    rows = add_prompts(questions, tokenizer, constitution.identity, cfg.verbose_prompt)
    from selfalign.stages.context_fit import backend_limits, check_verbose_fit  # imports this

    check_verbose_fit(cfg, backend_limits(backend, tokenizer), constitution.identity,
                      [r["prompt"] for r in rows])  # fmt: skip
    filters = AnswerFilters(cfg, constitution)
    labels = verbose_labels(constitution.identity, cfg.verbose_prompt)
    generated = generate_records(
        backend,
        rows,
        verbose_sampling(cfg, labels),
        out_dir / "verbose.raw.jsonl",
        cfg.seed,
        label="verbose answers",
        tally=lambda row: verdicts([filters.reason(row)]),
    )
    kept, rejected, counts = filter_answers(generated, filters)
    write_jsonl_atomic(out_dir / "verbose.jsonl", kept)
    write_jsonl_atomic(out_dir / "rejected.jsonl", rejected)
    return counts


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


def engraved_tokenizer(engraved: str | Path | None):
    """The engraved model's tokenizer, with the chat template it was trained with."""
    from selfalign.modeling import load_tokenizer

    if engraved is None:
        raise UserError(
            "verbose cloning needs the engraved model's tokenizer (for its chat template): "
            "give the engraved model's directory"
        )
    return load_tokenizer(str(engraved))


def check_backend(
    cfg: VerboseConfig,
    backend: Backend | Capabilities,
    section: str = "verbose",
    tokenizer_given: bool = False,
) -> None:
    """Refuse, in one line and before any work, a backend that cannot run stage 4 as configured:
    the sampling (by default n-gram penalties of orders 3 and 4) must be within the backend's
    controls, and without `tokenizer_given` the backend must bring the engraved model's
    tokenizer. `run_verbose` and `selfalign run` give it (`engraved_tokenizer`: the engraved
    model's directory), so any backend will do for them. `section` is the config key of this
    stage ("" in a stage-4 file); `backend` is a loaded backend or `capabilities(cfg.model)`."""
    what = "the engraved model's tokenizer (for its chat template)"
    needs = [] if tokenizer_given else [Need("verbose cloning", what=what)]
    sampling = ".".join(filter(None, [section, "sampling"]))
    require(backend, cfg.sampling, "stage 'verbose'", sampling, needs)
