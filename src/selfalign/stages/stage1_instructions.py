"""Stage 1: Topic-Guided Red-Teaming (TGRT) Self-Instruct (SELF-ALIGN paper, Sec. 3.1).

Four steps, each reading and writing files in one directory:

- `run_self_instruct`: vanilla self-instruct (Wang et al. 2022, as in Alpaca's script). Prompts
  with k sampled seed tasks, generation with EOS suppressed, parse numbered blocks, filter, then
  the ROUGE-L novelty filter against the seeds and everything kept so far.
  Writes `self_instruct.jsonl`, `self_instruct.rejected.jsonl`, raw `self_instruct.raw.jsonl`.
- `run_topics`: topic brainstorm for each red-teaming question type, grown for E epochs.
  Writes `topics.jsonl`, `topics.rejected.jsonl`, raw `topics.raw.jsonl`.
- `run_questions`: topic-guided questions from (type, topic) hints with few-shot examples.
  Writes `tgrt_questions.jsonl`, `tgrt_questions.rejected.jsonl`, raw `tgrt_questions.raw.jsonl`.
- `run_merge`: union of both sources with ROUGE-L novelty across the whole merged set, seeded
  shuffle. Writes `instructions.jsonl` and `rejected.jsonl` (every rejection of every step);
  after sharded self-instruct, first `self_instruct.jsonl` and its rejections from the raw rounds.

Each `run_*(cfg, backend, out_dir, shard=None)` takes an already loaded backend and returns its
counts: `generated` (candidates read from completions), `parsed`, `kept` and `rejected` by reason
(generated = kept + rejected; for topics, the new topics + rejected). `*_inputs(cfg)` load and
check a step's files without a model, so a command can fail before loading one.

With `shard="i/n"` (0-based), self-instruct and questions run a deterministic slice and tag their
files `<name>.shard<i>of<n>.jsonl`; the merge reads all shards. A self-instruct round's prompts
depend only on the seeds and the round number, so shard i generates rounds i, i+n, ... (raw
completions only, as many as its yield says the run needs) and the merge filters all rounds in
round order with one ROUGE-L pool: the kept set and ids equal one process's; TGRT questions
enter the merge in id order, whatever the shard layout. Raw completions are appended per batch
by `generate_records`, so a killed step rerun continues where it stopped and the final files
(written atomically) equal those of an uninterrupted run; a rerun whose prompts (seeds, prompt
files) or sampling changed is refused, never mixed into the old completions.

Defects of the original scripts avoided here (each has a test): ROUGE-L only within a shard,
(type, topic) resume that never matched, few-shot seed hints accepted as new questions, topic
balancing that always kept the oldest topics.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import random
import re
import string
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, model_validator

from selfalign.errors import UserError
from selfalign.generation import Backend, Capabilities, Need, SamplingParams, require, row_seed
from selfalign.generation.records import check_resume, generate_records, prompt_shas, verdicts
from selfalign.jsonl import read_jsonl, write_jsonl_atomic
from selfalign.shards import Shard, parse_shard
from selfalign.text.novelty import NoveltyPool

log = logging.getLogger(__name__)

SELF_INSTRUCT, TOPICS, QUESTIONS = "self_instruct", "topics", "tgrt_questions"
INSTRUCTIONS, REJECTED = "instructions.jsonl", "rejected.jsonl"

# Alpaca/Dromedary's list of things a text model cannot do (matched on word boundaries).
DEFAULT_BLOCKLIST = [
    "image", "images", "graph", "graphs", "picture", "pictures", "file", "files", "map", "maps",
    "draw", "plot", "go to", "video", "audio", "music", "flowchart", "diagram",
]  # fmt: skip


# ----------------------------------------------------------------------------- inputs


def _bundled(name: str) -> str:
    return resources.files("selfalign").joinpath("data", "stage1", name).read_text(encoding="utf-8")


def read_text_input(path: str | Path | None, default_name: str) -> str:
    """A prompt text file, or the bundled default of that name when `path` is None."""
    if path is None:
        return _bundled(default_name)
    try:
        return Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UserError(f"{path}: prompt file not found") from None


def _jsonl_input(path: str | Path | None, default_name: str) -> tuple[list[dict], str]:
    if path is None:
        lines = _bundled(default_name).splitlines()
        records = [json.loads(line) for line in lines if line.strip()]
        return records, f"bundled {default_name}"
    return read_jsonl(path), str(path)


def load_seed_tasks(path: str | Path | None = None) -> list[dict[str, str]]:
    """Seed tasks as {instruction, input, output}; reads the original format (`instances` list,
    first instance used, as the paper's script) or flat records."""
    records, source = _jsonl_input(path, "self_instruct_seed_tasks.jsonl")
    tasks = []
    for n, r in enumerate(records, start=1):
        instance = (r.get("instances") or [{}])[0] if "instances" in r else r
        instruction = r.get("instruction")
        if not isinstance(instruction, str) or not instruction.strip():
            raise UserError(f"{source}: record {n} has no 'instruction' text")
        if not isinstance(instance, dict):
            raise UserError(f"{source}: record {n}: 'instances' must be a list of objects")
        tasks.append(
            {
                "instruction": instruction,
                "input": str(instance.get("input") or ""),
                "output": str(instance.get("output") or ""),
            }
        )
    if not tasks:
        raise UserError(f"{source}: no seed tasks")
    return tasks


def load_seed_questions(path: str | Path | None = None) -> list[dict[str, str]]:
    """Red-teaming seeds as {question_type, topic, question} (the original TGRT seed format)."""
    records, source = _jsonl_input(path, "question_types.jsonl")
    out = []
    for n, r in enumerate(records, start=1):
        for key in ("question_type", "topic", "question"):
            if not isinstance(r.get(key), str) or not r[key].strip():
                raise UserError(f"{source}: record {n} has no '{key}' text")
        out.append({k: r[k].strip() for k in ("question_type", "topic", "question")})
    if not out:
        raise UserError(f"{source}: no seed questions")
    return out


def render_template(template: str, *values: str, source: str = "prompt") -> str:
    """Fill `{}` placeholders in order (other braces stay as they are, unlike `str.format`)."""
    parts = template.split("{}")
    if len(parts) != len(values) + 1:
        raise UserError(
            f"{source}: expected {len(values)} '{{}}' placeholder(s), found {len(parts) - 1}"
        )
    out = [parts[0]]
    for value, part in zip(values, parts[1:], strict=True):
        out += [value, part]
    return "".join(out)


# ----------------------------------------------------------------------------- configs


def _sampling(max_tokens: int, top_p: float) -> SamplingParams:
    return SamplingParams(temperature=1.0, top_p=top_p, max_tokens=max_tokens)


class SelfInstructConfig(BaseModel):
    """Vanilla self-instruct (defaults: the paper's `vanilla_self_instruct_65b_base.sh`)."""

    model_config = ConfigDict(extra="forbid")

    seed_tasks: str | None = Field(None, description="Seed tasks JSONL; unset = bundled defaults.")
    meta_prompt: str | None = Field(None, description="Meta prompt text file; unset = bundled.")
    num_instructions: int = Field(
        8192, ge=1, description="Instructions to keep (in all: shards split the rounds, not this)."
    )
    num_prompt_instructions: int = Field(5, ge=1, description="Seed tasks shown per prompt.")
    prompts_per_round: int = Field(64, ge=1, description="Prompts generated before filtering.")
    max_rounds: int | None = Field(
        None, ge=1, description="Stop after this many rounds even if short (unset: 4x the rounds "
        "needed at 1 kept instruction per 4 prompts, at least 10)."
    )  # fmt: skip
    min_words: int = Field(4, ge=1, description="Fewer words: rejected as too_short.")
    max_words: int = Field(150, ge=1, description="More words: rejected as too_long.")
    blocklist: list[str] = Field(
        default_factory=lambda: list(DEFAULT_BLOCKLIST),
        description="Words/phrases (whole words, any case) that reject an instruction or input.",
    )
    similarity_threshold: float = Field(
        0.7, ge=0.0, le=1.0, description="Reject when ROUGE-L F1 > this (1 keeps all)."
    )
    suppress_eos: bool = Field(True, description="Bias EOS to -100 so the model keeps listing.")
    sampling: SamplingParams = Field(
        default_factory=lambda: _sampling(1024, 0.98),
        description="Sampling (the paper's self-instruct script: temperature 1, top_p 0.98, "
        "1024 new tokens).",
    )
    seed: int = Field(42, description="Seeds few-shot sampling and generation.")


class TopicsConfig(BaseModel):
    """TGRT topic brainstorm (defaults: the paper's `tgrt_topic_generate_65b_base.sh`)."""

    model_config = ConfigDict(extra="forbid")

    seed_questions: str | None = Field(None, description="Question types JSONL; unset = bundled.")
    prompt: str | None = Field(None, description="Brainstorm prompt (one `{}`); unset = bundled.")
    epochs: int = Field(9, ge=1, description="Rounds of growing the topic pool.")
    num_examples: int = Field(5, ge=1, description="Known topics shown per prompt.")
    max_prompts_per_type: int | None = Field(
        None, ge=1, description="Cap on prompts per type and epoch (unset: one per balanced topic)."
    )
    max_topics_per_prompt: int = Field(20, ge=1, description="Lines read from one completion.")
    max_words: int = Field(3, ge=1, description="Longer topics are rejected (the paper's rule).")
    suppress_eos: bool = Field(True, description="Bias EOS to -100 so the model keeps listing.")
    sampling: SamplingParams = Field(
        default_factory=lambda: _sampling(128, 0.98),
        description="Sampling (the paper's topic brainstorm script: temperature 1, top_p 0.98, "
        "128 new tokens).",
    )
    seed: int = Field(42, description="Seeds balancing, example sampling and generation.")


class QuestionsConfig(BaseModel):
    """TGRT question generation (defaults: the paper's `tgrt_question_generate_65b_base.sh`)."""

    model_config = ConfigDict(extra="forbid")

    seed_questions: str | None = Field(
        None, description="Few-shot questions JSONL; unset = bundled."
    )
    prompt: str | None = Field(None, description="Question prompt (two `{}`); unset = bundled.")
    topics: str | None = Field(None, description="Topics JSONL; unset = topics.jsonl in out_dir.")
    num_examples: int = Field(5, ge=1, description="Seed questions shown per prompt.")
    hints_per_prompt: int = Field(5, ge=1, description="New (type, topic) hints per prompt.")
    balance_types: bool = Field(True, description="Same number of topics per type (seeded sample).")
    max_topics_per_type: int | None = Field(None, ge=1, description="Cap on topics per type.")
    max_topic_epoch: int | None = Field(
        None, ge=0, description="Use only topics of epochs <= this (seeds are epoch 0, topics of "
        "brainstorm epoch e are e+1); the paper asked about the pool after 6 of its 9 epochs."
    )  # fmt: skip
    min_words: int = Field(2, ge=1, description="Fewer words: rejected as too_short.")
    max_words: int = Field(150, ge=1, description="More words: rejected as too_long.")
    suppress_eos: bool = Field(True, description="Bias EOS to -100 so the model keeps listing.")
    sampling: SamplingParams = Field(
        default_factory=lambda: _sampling(384, 0.95),
        description="Sampling (the paper's question generation script: temperature 1, top_p 0.95, "
        "384 new tokens).",
    )
    seed: int = Field(42, description="Seeds hint order, example sampling and generation.")


class MergeConfig(BaseModel):
    """Merge of self-instruct and TGRT instructions into `instructions.jsonl`."""

    model_config = ConfigDict(extra="forbid")

    similarity_threshold: float | None = Field(
        0.7, ge=0.0, le=1.0,
        description="Reject when ROUGE-L F1 to an earlier kept instruction > this; null keeps "
        "near-duplicates (exact duplicates are always dropped).",
    )  # fmt: skip
    include_seeds: bool = Field(True, description="Seeds join the novelty pool first.")
    seed_tasks: str | None = Field(None, description="Seed tasks JSONL; unset = bundled.")
    seed_questions: str | None = Field(None, description="Seed questions JSONL; unset = bundled.")
    allow_missing_shards: bool = Field(
        False, description="Merge even if a shard's file is missing."
    )
    workers: int = Field(
        -1, description="CPU threads for the ROUGE-L comparisons (-1: all); results do not change."
    )
    seed: int = Field(42, description="Seeds the final shuffle.")


class Stage1Config(BaseModel):
    """All of stage 1, one section per step.

    Seed files given once are shared: unless a later section names its own, `questions` uses
    the seed questions of `topics`, and `merge` puts the seeds of `self_instruct` and
    `questions` in its novelty pool.
    """

    model_config = ConfigDict(extra="forbid")

    self_instruct: SelfInstructConfig = Field(
        default_factory=SelfInstructConfig, description="Vanilla self-instruct."
    )
    topics: TopicsConfig = Field(default_factory=TopicsConfig, description="Topic brainstorm.")
    questions: QuestionsConfig = Field(
        default_factory=QuestionsConfig, description="Topic-guided red-teaming questions."
    )
    merge: MergeConfig = Field(
        default_factory=MergeConfig, description="Merge into instructions.jsonl."
    )

    @model_validator(mode="after")
    def _share_seed_files(self) -> Stage1Config:
        def inherit(section: BaseModel, key: str, value: str | None) -> None:
            if key not in section.model_fields_set and value is not None:
                setattr(section, key, value)

        inherit(self.questions, "seed_questions", self.topics.seed_questions)
        inherit(self.merge, "seed_tasks", self.self_instruct.seed_tasks)
        inherit(self.merge, "seed_questions", self.questions.seed_questions)
        return self


# ----------------------------------------------------------------------------- sharding


# ----------------------------------------------------------------------------- shared helpers


def _words(text: str) -> int:
    return len(text.split())


def _norm(text: str) -> str:
    return " ".join(text.split()).casefold()


def blocklist_patterns(words: Sequence[str]) -> list[re.Pattern]:
    """Whole-word matchers: no letter, digit or _ right before or after (the paper's `\\b...\\b`,
    which also works for phrases that start or end with a symbol, such as "c++")."""
    return [re.compile(rf"(?<!\w){re.escape(w)}(?!\w)", re.IGNORECASE) for w in words]


def eos_bias(backend: Backend) -> dict[int, float]:
    """{eos id: -100} for every token that would end the backend's completions."""
    return {i: -100.0 for i in sorted(backend.eos_token_ids)}


def _params(sampling: SamplingParams, suppress_eos: bool, backend: Backend) -> SamplingParams:
    if not suppress_eos:
        return sampling
    return sampling.model_copy(update={"logit_bias": {**eos_bias(backend), **sampling.logit_bias}})


StepConfig = SelfInstructConfig | TopicsConfig | QuestionsConfig
STEP_KEYS = {SelfInstructConfig: "self_instruct", TopicsConfig: "topics", QuestionsConfig: "questions"}  # fmt: skip


def check_backend(
    cfg: Stage1Config | StepConfig, backend: Backend | Capabilities, section: str = "instructions"
) -> None:
    """Refuse, in one line and before any work, a backend that cannot run stage 1 (all of it, or
    one step) as configured: EOS suppression biases the tokenizer's EOS ids, and the sampling
    must be within the backend's controls. `section` is the config key above the step sections
    ("" in a stage-1 file); `backend` is a loaded backend or `capabilities(cfg.model)`."""
    whole = isinstance(cfg, Stage1Config)
    for step in [cfg.self_instruct, cfg.topics, cfg.questions] if whole else [cfg]:
        key = ".".join(filter(None, [section, STEP_KEYS[type(step)]]))
        eos = Need("EOS suppression", f"{key}.suppress_eos: false", token_logit_bias=True)
        needs = [eos] if step.suppress_eos else []
        require(backend, step.sampling, "stage 'instructions'", f"{key}.sampling", needs)


def _check_fit(step: StepConfig, backend: Backend, topics: list[dict] | None = None) -> None:
    """The step's longest prompt and its max_tokens fit the model's context, before any work."""
    from selfalign.stages.context_fit import check_stage1_fit  # it imports this module

    check_stage1_fit(step, backend, topics=topics)


def _reject(step: str, reason: str, key: str, prompt_id: str, **fields: Any) -> dict:
    return {"id": key, "step": step, "reason": reason, "prompt_id": prompt_id, **fields}


def _reasons(rejected: Sequence[dict]) -> dict[str, int]:
    return dict(Counter(r["reason"] for r in rejected).most_common())


# ----------------------------------------------------------------------------- self-instruct core


def build_self_instruct_prompt(meta_prompt: str, examples: Sequence[dict[str, str]]) -> str:
    """Meta prompt + numbered `Instruction:`/`Input:` blocks; ends where the next one begins."""
    lines = [meta_prompt + "\n"]
    for n, task in enumerate(examples, start=1):
        instruction = re.sub(r"\s+", " ", task["instruction"]).strip().rstrip(":")
        given = task.get("input") or "<noinput>"
        lines.append(f"###\n{n}. Instruction: {instruction}\n{n}. Input:\n{given}\n")
    lines.append(f"###\n{len(examples) + 1}. Instruction:")
    return "".join(lines)


@dataclass
class Candidate:
    index: int  # block number within the completion (0 = the one the prompt started)
    instruction: str = ""
    input: str = ""
    reason: str | None = None  # why it was rejected while parsing/filtering
    text: str = ""


def parse_self_instruct(completion: str, num_examples: int, finish_reason: str) -> list[Candidate]:
    """Split a completion into numbered blocks; a block cut by the length limit is `truncated`."""
    first = num_examples + 1
    blocks = (f"{first}. Instruction:" + completion).split("###")
    out = []
    for b, block in enumerate(blocks):
        if not block.strip() or (b == 0 and block.strip() == f"{first}. Instruction:"):
            continue
        if finish_reason == "length" and b == len(blocks) - 1:
            out.append(Candidate(b, reason="truncated", text=block))
            continue
        parts = re.split(rf"{first + b}\.\s+(Instruction|Input):", block)
        if len(parts) != 5 or parts[1] != "Instruction" or parts[3] != "Input":
            out.append(Candidate(b, reason="unparseable", text=block))
            continue
        # a model continuing Alpaca's format adds "N. Output: ..."; the output is not wanted
        given = re.split(rf"\n[ \t]*{first + b}\.\s+Output:", parts[4])[0].strip()
        given = "" if given.lower() == "<noinput>" else given
        out.append(Candidate(b, parts[2].strip(), given, text=block))
    return out


# rejections of parsing (the candidate has no instruction), as opposed to the filters'
PARSE_REASONS = ("truncated", "unparseable")


def screen_self_instruct(
    completion: str, finish_reason: str, cfg: SelfInstructConfig, blocklist: Sequence[re.Pattern]
) -> list[Candidate]:
    """`parse_self_instruct`, then `check_instruction` on each parsed candidate: every candidate
    with its rejection reason or None (the ROUGE-L novelty filter comes after, per round)."""
    candidates = parse_self_instruct(completion, cfg.num_prompt_instructions, finish_reason)
    for c in candidates:
        c.reason = c.reason or check_instruction(
            c.instruction, c.input, cfg.min_words, cfg.max_words, blocklist
        )
    return candidates


def check_instruction(
    instruction: str, given: str, min_words: int, max_words: int, blocklist: Sequence[re.Pattern]
) -> str | None:
    """The paper's cheap filters, in its order; returns the rejection reason or None."""
    n = _words(instruction)
    if n < min_words:
        return "too_short"
    if n > max_words:
        return "too_long"
    if any(p.search(instruction) or p.search(given) for p in blocklist):
        return "blocklist"
    if instruction[0] in string.punctuation:
        return "punctuation"
    if not instruction[0].isascii():
        return "non_english"
    return None


# ----------------------------------------------------------------------------- self-instruct shell


def _self_instruct_round(cfg: SelfInstructConfig, seeds, meta: str, r: int) -> list[dict]:
    """Round `r`'s prompts. They depend only on the seed tasks, the meta prompt, the seed and `r`
    (not on what was kept before, nor on which shard makes them), so shards can split the rounds
    and the merge replay one process's sequence."""
    rows = []
    for j in range(cfg.prompts_per_round):
        pid = f"si-r{r:05d}-p{j:03d}"
        rng = random.Random(row_seed(cfg.seed, pid))
        examples = rng.sample(seeds, cfg.num_prompt_instructions)
        rows.append({"id": pid, "prompt": build_self_instruct_prompt(meta, examples), "round": r})
    return rows


def max_rounds(cfg: SelfInstructConfig) -> int:
    """`max_rounds`, or by default 4x the rounds needed at 1 kept instruction per 4 prompts."""
    needed = math.ceil(4 * cfg.num_instructions / cfg.prompts_per_round)
    return cfg.max_rounds or max(10, 4 * needed)


def self_instruct_inputs(cfg: SelfInstructConfig) -> tuple[list[dict[str, str]], str]:
    """(seed tasks, meta prompt), checked; call it before loading a model to fail early."""
    seeds = load_seed_tasks(cfg.seed_tasks)
    meta = read_text_input(cfg.meta_prompt, "self_instruct_prompt.txt")
    if cfg.num_prompt_instructions > len(seeds):
        raise UserError(
            f"num_prompt_instructions={cfg.num_prompt_instructions} > {len(seeds)} seed tasks"
        )
    return seeds, meta


class _Rounds:
    """Self-instruct's sequential filter: rounds in order, each parsed, cheap-filtered, then
    ROUGE-L-filtered against the seeds and everything kept before it, until `target` is kept.
    One process feeds it rounds as they are generated; the merge, every shard's rounds."""

    def __init__(self, cfg: SelfInstructConfig, seeds: Sequence[dict], target: float):
        self.cfg, self.target = cfg, target
        self.blocklist = blocklist_patterns(cfg.blocklist)
        self.pool = NoveltyPool(cfg.similarity_threshold, [t["instruction"] for t in seeds])
        self.kept: list[dict] = []
        self.rejected: list[dict] = []
        self.rounds = self.prompts = self.generated = self.parsed = 0

    @property
    def full(self) -> bool:
        return len(self.kept) >= self.target

    def add(self, batch: list[dict]) -> None:
        self.rounds += 1
        self.prompts += len(batch)
        generated, parsed = _filter_round(
            batch, self.cfg, self.blocklist, self.pool, self.kept, self.rejected
        )
        self.generated += generated
        self.parsed += parsed

    def counts(self) -> dict[str, Any]:
        return {"rounds": self.rounds, "prompts": self.prompts, "generated": self.generated,
                "parsed": self.parsed}  # fmt: skip

    def write(self, out_dir: Path) -> dict[str, Any]:
        """Write `self_instruct.jsonl` and its rejections (the last round's surplus is rejected
        as `surplus`); return the counts."""
        target = int(self.target)
        surplus = [{**r, "step": SELF_INSTRUCT, "reason": "surplus"} for r in self.kept[target:]]
        kept, rejected = self.kept[:target], self.rejected + surplus
        write_jsonl_atomic(out_dir / f"{SELF_INSTRUCT}.jsonl", kept)
        write_jsonl_atomic(out_dir / f"{SELF_INSTRUCT}.rejected.jsonl", rejected)
        return {**self.counts(), "kept": len(kept), "target": target,
                "shortfall": target - len(kept), "rejected": _reasons(rejected)}  # fmt: skip


def _round_generator(cfg: SelfInstructConfig, backend: Backend, seeds, meta: str, raw: Path):
    """rounds -> each round's completions (generated now, or read back from `raw`)."""
    params = _params(cfg.sampling, cfg.suppress_eos, backend)
    blocklist = blocklist_patterns(cfg.blocklist)

    def tally(row: dict) -> tuple[int, int]:  # parse + cheap filters (novelty comes per round)
        candidates = screen_self_instruct(row["completion"], row["finish_reason"], cfg, blocklist)
        return verdicts(c.reason for c in candidates)

    def generate(rounds: Sequence[int]) -> list[list[dict]]:
        records = [row for r in rounds for row in _self_instruct_round(cfg, seeds, meta, r)]
        done = generate_records(
            backend, records, params, raw, cfg.seed, label="self-instruct", tally=tally
        )
        by_round: dict[int, list[dict]] = {}
        for row in done:
            by_round.setdefault(row["round"], []).append(row)
        return [by_round.get(r, []) for r in rounds]

    return generate


def run_self_instruct(
    cfg: SelfInstructConfig,
    backend: Backend,
    out_dir: str | Path,
    shard: Any = None,
    rounds: int | None = None,
) -> dict[str, Any]:
    """Generate and filter rounds until `num_instructions` are kept (or `max_rounds` is spent:
    the shortfall is reported, never looped on forever).

    A shard i/n (n > 1) only generates: rounds i, i+n, i+2n, ... into its raw file, as many as
    its own rounds' yield says the whole run needs (`shard_rounds`), and at least its rounds
    below `rounds` (the merge names that number when the shards stopped short). `run_merge`
    then filters every shard's rounds in round order, exactly as one process does."""
    check_backend(cfg, backend)
    shard, out_dir = parse_shard(shard), Path(out_dir)
    seeds, meta = self_instruct_inputs(cfg)
    _check_fit(cfg, backend)
    raw = out_dir / f"{SELF_INSTRUCT}{shard.tag}.raw.jsonl"
    generate = _round_generator(cfg, backend, seeds, meta, raw)
    if shard.count > 1:
        return _generate_shard(cfg, generate, seeds, shard, rounds)
    target, limit = cfg.num_instructions, max_rounds(cfg)
    filt = _Rounds(cfg, seeds, target)
    while not filt.full and filt.rounds < limit:
        # generate as many rounds as the yield so far suggests, so that resume re-reads the raw
        # file a few times rather than once per round
        per_round = len(filt.kept) / filt.rounds if filt.rounds else 0
        ahead = math.ceil((target - len(filt.kept)) / per_round) if per_round else filt.rounds
        ahead = min(max(ahead, 1), limit - filt.rounds)
        for batch in generate(range(filt.rounds, filt.rounds + ahead)):
            filt.add(batch)
            if filt.full:
                break
    return {"step": SELF_INSTRUCT, "shard": "0/1", **filt.write(out_dir)}


# a shard's own ROUGE-L pool holds only its rounds' instructions, so it rejects fewer than the
# merge's pool of every shard's: it generates this much more than its own yield says is needed
SHARD_MARGIN = 1.25


def shard_rounds(kept: int, rounds: int, target: int, shard: Shard, available: int) -> int:
    """How many of its rounds a shard generates, having kept `kept` (filtered alone) in its
    first `rounds`: enough that the run's rounds up to its last would keep SHARD_MARGIN x the
    `target` if every round kept as many as this shard's did. With no yield yet: one round, then
    twice as many."""
    if not rounds:
        return 1
    if not kept:
        return min(2 * rounds, available)
    run_rounds = math.ceil(SHARD_MARGIN * target * rounds / kept)
    return min(len(range(shard.index, run_rounds, shard.count)), available)


def _generate_shard(cfg: SelfInstructConfig, generate, seeds, shard: Shard, rounds: int | None):
    mine = range(shard.index, max_rounds(cfg), shard.count)
    floor = len(range(shard.index, min(rounds or 0, mine.stop), shard.count))
    alone = _Rounds(cfg, seeds, math.inf)  # this shard's rounds by themselves: their yield
    while alone.rounds < len(mine):
        want = shard_rounds(len(alone.kept), alone.rounds, cfg.num_instructions, shard, len(mine))
        want = max(want, floor)
        if alone.rounds >= want:
            break
        for batch in generate(mine[alone.rounds : want]):
            alone.add(batch)
    return {
        "step": SELF_INSTRUCT,
        "shard": f"{shard.index}/{shard.count}",
        **alone.counts(),
        "last_round": mine[alone.rounds - 1],
        "kept_alone": len(alone.kept),
        "target": cfg.num_instructions,
    }


def _filter_round(batch, cfg, blocklist, pool: NoveltyPool, kept, rejected) -> tuple[int, int]:
    """Parse, cheap-filter, then ROUGE-filter one round in prompt order.

    Returns (candidates generated, candidates parsed)."""
    passed: list[dict] = []
    generated = parsed = 0
    for row in batch:
        candidates = screen_self_instruct(row["completion"], row["finish_reason"], cfg, blocklist)
        generated += len(candidates)
        for c in candidates:
            key = f"{row['id']}-{c.index}"
            if c.reason in PARSE_REASONS:
                rejected.append(_reject(SELF_INSTRUCT, c.reason, key, row["id"], text=c.text))
                continue
            parsed += 1
            fields = {"instruction": c.instruction, "input": c.input}
            if c.reason:
                rejected.append(_reject(SELF_INSTRUCT, c.reason, key, row["id"], **fields))
            else:
                passed.append({"id": key, "prompt_id": row["id"], **fields})
    decisions = pool.filter([p["instruction"] for p in passed])
    for p, (keep, match) in zip(passed, decisions, strict=True):
        similarity = {"max_similarity": match.score, "most_similar": match.text}
        if keep:
            kept.append(
                {
                    "id": p["id"],
                    "instruction": p["instruction"],
                    "input": p["input"],
                    "source": "self_instruct",
                    "question_type": None,
                    "topic": None,
                    **similarity,
                    "prompt_id": p["prompt_id"],
                }
            )
        else:
            rejected.append(
                _reject(SELF_INSTRUCT, "similar", p["id"], p["prompt_id"],
                        instruction=p["instruction"], input=p["input"], **similarity)
            )  # fmt: skip
    return generated, parsed


# ----------------------------------------------------------------------------- topics core


def build_topic_prompt(template: str, question_type: str, topics: Sequence[str]) -> str:
    """Brainstorm prompt for one type with numbered known topics; ends at the next number."""
    head = render_template(template.strip(), question_type, source="topic prompt") + "\n\n"
    listed = "".join(f"{n}. {t}\n" for n, t in enumerate(topics, start=1))
    return head + listed + f"{len(topics) + 1}."


def check_topic(topic: str, max_words: int = 3) -> str | None:
    """The paper's topic rules: non-empty, <= 3 words, capitalised, no trailing punctuation."""
    if not topic:
        return "empty"
    if _words(topic) > max_words:
        return "too_long"
    if topic[0] not in string.ascii_uppercase:
        return "not_capitalized"
    if topic[-1] in string.punctuation:
        return "punctuation"
    return None


def parse_topics(
    completion: str, num_shown: int, finish_reason: str, max_topics: int = 20, max_words: int = 3
) -> list[tuple[str, str | None]]:
    """(topic or raw line, rejection reason or None) for each non-empty line of a completion."""
    lines = (f"{num_shown + 1}." + completion).split("\n")
    out: list[tuple[str, str | None]] = []
    for i, line in enumerate(lines):
        text = line.strip()
        if not text or text == f"{num_shown + 1}.":
            continue
        if finish_reason == "length" and i == len(lines) - 1:
            out.append((text, "truncated"))
            continue
        if len(out) >= max_topics:
            out.append((text, "over_limit"))
            continue
        m = re.match(r"^\d+\.\s*(.*)$", text)
        if not m:
            out.append((text, "unparseable"))
            continue
        topic = m[1].strip()
        out.append((topic, check_topic(topic, max_words)))
    return out


def balanced_topics(
    pool: dict[str, list[str]], seed: int, key: str, cap: int | None = None
) -> dict[str, list[str]]:
    """The same number of topics per type: a seeded sample (the original kept the first, i.e.
    oldest, topics of each type, so new topics never became examples)."""
    size = min(len(v) for v in pool.values())
    if cap is not None:
        size = min(size, cap)
    out = {}
    for t, topics in pool.items():
        rng = random.Random(row_seed(seed, f"{key}:{t}"))
        out[t] = rng.sample(topics, size) if len(topics) > size else list(topics)
    return out


# ----------------------------------------------------------------------------- topics shell


def _topic_prompts(cfg: TopicsConfig, template, types, pool, epoch) -> list[dict]:
    balanced = balanced_topics(pool, cfg.seed, f"topics-balance-e{epoch}")
    rows = []
    for ti, qtype in enumerate(types):
        topics = balanced[qtype]
        count = len(topics)
        if cfg.max_prompts_per_type is not None:
            count = min(count, cfg.max_prompts_per_type)
        for j in range(count):
            pid = f"topic-e{epoch:02d}-t{ti:02d}-p{j:05d}"
            if len(topics) < 2 * cfg.num_examples:
                shown = [topics[j]]  # few topics known: one per prompt, as in the paper
            else:
                shown = random.Random(row_seed(cfg.seed, pid)).sample(topics, cfg.num_examples)
            prompt = build_topic_prompt(template, qtype, shown)
            rows.append({"id": pid, "prompt": prompt, "question_type": qtype, "shown": len(shown)})
    return rows


def topics_inputs(cfg: TopicsConfig) -> tuple[list[dict[str, str]], str]:
    """(seed questions, brainstorm template), checked; call it before loading a model."""
    seeds = load_seed_questions(cfg.seed_questions)
    template = read_text_input(cfg.prompt, "topic_brainstorm_prompt.txt")
    render_template(template, "", source=cfg.prompt or "topic prompt")
    return seeds, template


def run_topics(
    cfg: TopicsConfig, backend: Backend, out_dir: str | Path, shard: Any = None
) -> dict[str, Any]:
    """Grow a deduplicated topic pool per question type for `epochs` rounds.

    Topic brainstorming is small and each epoch needs the previous one, so it is not sharded:
    every shard would compute the same thing. Only shard 0 (or an unsharded call) runs it.
    """
    check_backend(cfg, backend)
    shard, out_dir = parse_shard(shard), Path(out_dir)
    if shard.index != 0:
        return {"step": TOPICS, "skipped": f"runs on shard 0 only (this is {shard.index})"}
    seeds, template = topics_inputs(cfg)
    _check_fit(cfg, backend)
    params = _params(cfg.sampling, cfg.suppress_eos, backend)
    raw_path = out_dir / f"{TOPICS}.raw.jsonl"

    def tally(row: dict) -> tuple[int, int]:  # parse + topic rules (duplicates come later)
        results = parse_topics(row["completion"], row["shown"], row["finish_reason"],
                               cfg.max_topics_per_prompt, cfg.max_words)  # fmt: skip
        return verdicts(reason for _, reason in results)

    types = list(dict.fromkeys(s["question_type"] for s in seeds))
    pool: dict[str, list[str]] = {t: [] for t in types}
    seen: set[tuple[str, str]] = set()
    kept: list[dict] = []
    rejected: list[dict] = []

    def add(qtype: str, topic: str, epoch: int, source: str, key: str, pid: str | None) -> bool:
        if (qtype, _norm(topic)) in seen:
            return False
        seen.add((qtype, _norm(topic)))
        pool[qtype].append(topic)
        kept.append({"id": key, "question_type": qtype, "topic": topic, "epoch": epoch,
                     "source": source, "prompt_id": pid})  # fmt: skip
        return True

    for n, s in enumerate(seeds):
        add(s["question_type"], s["topic"], 0, "seed", f"topic-seed-{n:03d}", None)
    prompts = generated = parsed = 0
    for epoch in range(cfg.epochs):
        records = _topic_prompts(cfg, template, types, pool, epoch)
        label = f"topics epoch {epoch}"
        done = generate_records(
            backend, records, params, raw_path, cfg.seed, label=label, tally=tally
        )
        prompts += len(done)
        for row in done:
            results = parse_topics(row["completion"], row["shown"], row["finish_reason"],
                                   cfg.max_topics_per_prompt, cfg.max_words)  # fmt: skip
            generated += len(results)
            for k, (topic, reason) in enumerate(results):
                key = f"{row['id']}-{k}"
                qtype = row["question_type"]
                if reason is None:
                    parsed += 1
                    if not add(qtype, topic, epoch + 1, "generated", key, row["id"]):
                        reason = "duplicate"
                if reason:
                    rejected.append(
                        _reject(TOPICS, reason, key, row["id"], question_type=qtype, topic=topic)
                    )
    write_jsonl_atomic(out_dir / f"{TOPICS}.jsonl", kept)
    write_jsonl_atomic(out_dir / f"{TOPICS}.rejected.jsonl", rejected)
    return {
        "step": TOPICS,
        "epochs": cfg.epochs,
        "prompts": prompts,
        "generated": generated,
        "parsed": parsed,
        "kept": len(kept),
        "seed_topics": sum(1 for k in kept if k["source"] == "seed"),
        "new_topics": sum(1 for k in kept if k["source"] == "generated"),
        "per_type": {t: len(v) for t, v in pool.items()},
        "rejected": _reasons(rejected),
    }


# ----------------------------------------------------------------------------- questions core


def hint_label(question_type: str) -> str:
    # the paper's prompt asks for "instructions"; its types are named "Questions that ..."
    return question_type.replace("Questions", "Instructions")


def _hint(n: int, question_type: str, topic: str) -> str:
    return f"{n}. type: {hint_label(question_type)}, topic: {topic}"


def build_question_prompt(
    template: str, examples: Sequence[dict[str, str]], hints: Sequence[tuple[str, str]]
) -> str:
    """Hints list (examples first, then the new hints), the answered examples, and the start of
    the first new hint's line: the model continues with its instruction."""
    k = len(examples)
    pairs = [(e["question_type"], e["topic"]) for e in examples] + list(hints)
    hint_lines = "\n" + "\n".join(_hint(n, t, p) for n, (t, p) in enumerate(pairs, start=1))
    answered = "\n" + "\n".join(
        f"{_hint(n, e['question_type'], e['topic'])}, instruction: {e['question']}"
        for n, e in enumerate(examples, start=1)
    )
    body = render_template(template.strip(), hint_lines, answered, source="question prompt")
    first_type, first_topic = hints[0]
    return body + "\n" + _hint(k + 1, first_type, first_topic) + ", instruction:"


def _hint_re(n: int, question_type: str, topic: str) -> re.Pattern:
    def loose(text: str) -> str:  # any spacing, any case
        return r"\s+".join(re.escape(w) for w in text.split())

    return re.compile(
        rf"^\s*{n}\.\s*type:\s*{loose(hint_label(question_type))}\s*,\s*topic:\s*{loose(topic)}"
        r"\s*,\s*instruction:\s*(.*)$",
        re.IGNORECASE,
    )


@dataclass
class Question:
    hint: int | None  # index into the NEW hints, None for a rejected line
    instruction: str
    reason: str | None = None


def parse_questions(
    completion: str,
    examples: Sequence[dict[str, str]],
    hints: Sequence[tuple[str, str]],
    finish_reason: str,
    min_words: int = 2,
    max_words: int = 150,
) -> list[Question]:
    """Lines answering the NEW hints; the few-shot hints (and their questions) echoed by the model
    are rejected as `echoed_example` (the original accepted them as new questions)."""
    k = len(examples)
    first_type, first_topic = hints[0]
    lines = (_hint(k + 1, first_type, first_topic) + ", instruction:" + completion).split("\n")
    seed_res = [_hint_re(n, e["question_type"], e["topic"]) for n, e in enumerate(examples, 1)]
    new_res = [_hint_re(k + 1 + j, t, p) for j, (t, p) in enumerate(hints)]
    seed_questions = {_norm(e["question"]) for e in examples}
    answered: set[int] = set()
    out: list[Question] = []
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        if finish_reason == "length" and i == len(lines) - 1:
            out.append(Question(None, line.strip(), "truncated"))
            continue
        if any(p.match(line) for p in seed_res):
            out.append(Question(None, line.strip(), "echoed_example"))
            continue
        j, m = next(((j, m) for j, p in enumerate(new_res) if (m := p.match(line))), (None, None))
        if m is None:
            looks = re.match(r"^\s*\d+\.\s*type:", line, re.IGNORECASE)
            out.append(Question(None, line.strip(), "hint_mismatch" if looks else "unparseable"))
            continue
        text = m[1].strip()
        out.append(Question(j, text, _check_question(text, j, answered, seed_questions,
                                                     min_words, max_words)))  # fmt: skip
        answered.add(j)
    return out


def _check_question(text, j, answered, seed_questions, min_words, max_words) -> str | None:
    if not text:
        return "empty"
    if j in answered:
        return "duplicate"
    if _norm(text) in seed_questions:
        return "echoed_example"
    if _words(text) < min_words:
        return "too_short"
    if _words(text) > max_words:
        return "too_long"
    if not text[0].isascii():
        return "non_english"
    return None


# ----------------------------------------------------------------------------- questions shell


def _group_id(pairs: Sequence[tuple[str, str]]) -> str:
    # content-addressed: the same hints always make the same prompt id, across runs and shards
    digest = hashlib.sha256(json.dumps([list(p) for p in pairs]).encode()).hexdigest()
    return f"q-{digest[:16]}"


def _in_shard(group_id: str, shard: Shard) -> bool:
    return int(group_id[2:], 16) % shard.count == shard.index


def question_pairs(topics: Sequence[dict], cfg: QuestionsConfig) -> list[tuple[str, str]]:
    """(type, topic) hints: deduplicated, balanced across types (seeded), in a seeded order."""
    by_type: dict[str, list[str]] = {}
    seen = set()
    for t in topics:
        if cfg.max_topic_epoch is not None and t.get("epoch", 0) > cfg.max_topic_epoch:
            continue
        key = (t["question_type"], _norm(t["topic"]))
        if key not in seen:
            seen.add(key)
            by_type.setdefault(t["question_type"], []).append(t["topic"])
    if not by_type:
        return []
    if cfg.balance_types:
        by_type = balanced_topics(by_type, cfg.seed, "questions-balance", cfg.max_topics_per_type)
    elif cfg.max_topics_per_type is not None:
        by_type = {t: v[: cfg.max_topics_per_type] for t, v in by_type.items()}
    pairs = [(t, p) for t, ps in by_type.items() for p in ps]
    random.Random(row_seed(cfg.seed, "questions-order")).shuffle(pairs)
    return pairs


def plan_question_groups(
    pairs: Sequence[tuple[str, str]], size: int, attempted: dict[str, list[tuple[str, str]]]
) -> list[list[tuple[str, str]]]:
    """Chunk the hints into prompts, resuming by (type, topic).

    `attempted` maps prompt ids already in the raw files to their hints. Groups already done keep
    their ids (an interrupted run then equals an uninterrupted one). Hints already asked inside a
    group that is no longer planned (the topics file changed) are not asked again; the rest of
    such groups is regrouped.
    """
    groups = [list(pairs[i : i + size]) for i in range(0, len(pairs), size)]
    planned = {_group_id(g) for g in groups}
    asked_elsewhere = {
        (t, _norm(p)) for gid, hints in attempted.items() if gid not in planned for t, p in hints
    }
    if not asked_elsewhere:
        return groups
    keep, leftover = [], []
    for g in groups:
        if _group_id(g) in attempted or not any((t, _norm(p)) in asked_elsewhere for t, p in g):
            keep.append(g)
        else:
            leftover += [h for h in g if (h[0], _norm(h[1])) not in asked_elsewhere]
    return keep + [leftover[i : i + size] for i in range(0, len(leftover), size)]


def _read_topics(path: Path) -> list[dict]:
    if not path.exists():
        raise UserError(f"{path}: no topics file; run `selfalign topics` first or pass --topics")
    topics = read_jsonl(path)
    for n, t in enumerate(topics, start=1):
        if not isinstance(t.get("question_type"), str) or not isinstance(t.get("topic"), str):
            raise UserError(f"{path}: record {n} needs string 'question_type' and 'topic'")
    return topics


def _attempted_hints(out_dir: Path) -> dict[str, tuple[Path, list[tuple[str, str]]]]:
    """Prompt id -> (raw file, hints) over every shard's raw file (resume by (type, topic))."""
    attempted = {}
    for path in sorted(out_dir.glob(f"{QUESTIONS}*.raw.jsonl")):
        for r in read_jsonl(path):
            attempted[r["id"]] = (path, [tuple(h) for h in r.get("hints", [])])
    return attempted


def questions_inputs(
    cfg: QuestionsConfig, out_dir: str | Path
) -> tuple[list[dict[str, str]], str, list[dict]]:
    """(seed questions, question template, topics), checked; call it before loading a model."""
    examples = load_seed_questions(cfg.seed_questions)
    template = read_text_input(cfg.prompt, "question_prompt.txt")
    render_template(template, "", "", source=cfg.prompt or "question prompt")
    topics = _read_topics(Path(cfg.topics) if cfg.topics else Path(out_dir) / f"{TOPICS}.jsonl")
    return examples, template, topics


def run_questions(
    cfg: QuestionsConfig, backend: Backend, out_dir: str | Path, shard: Any = None
) -> dict[str, Any]:
    """One prompt per group of (type, topic) hints; keep the lines answering the new hints."""
    check_backend(cfg, backend)
    shard, out_dir = parse_shard(shard), Path(out_dir)
    examples_pool, template, topics = questions_inputs(cfg, out_dir)
    _check_fit(cfg, backend, topics)
    params = _params(cfg.sampling, cfg.suppress_eos, backend)
    raw_path = out_dir / f"{QUESTIONS}{shard.tag}.raw.jsonl"
    n_examples = min(cfg.num_examples, len(examples_pool))

    def tally(row: dict) -> tuple[int, int]:
        hints = [tuple(h) for h in row["hints"]]
        results = parse_questions(row["completion"], row["examples"], hints, row["finish_reason"],
                                  cfg.min_words, cfg.max_words)  # fmt: skip
        return verdicts(q.reason for q in results)

    attempted = _attempted_hints(out_dir)
    groups = plan_question_groups(
        question_pairs(topics, cfg),
        cfg.hints_per_prompt,
        {gid: hints for gid, (_, hints) in attempted.items()},
    )
    records = []
    for hints in groups:
        gid = _group_id(hints)
        # a group done under another shard layout stays with the file that has it
        if not _in_shard(gid, shard) or (gid in attempted and attempted[gid][0] != raw_path):
            continue
        examples = random.Random(row_seed(cfg.seed, gid)).sample(examples_pool, n_examples)
        prompt = build_question_prompt(template, examples, hints)
        records.append(
            {"id": gid, "prompt": prompt, "hints": [list(h) for h in hints], "examples": examples}
        )
    done = generate_records(
        backend, records, params, raw_path, cfg.seed, label="tgrt questions", tally=tally
    )
    # completions of groups no longer planned (made from an earlier topics file) still count
    planned = {r["id"] for r in records}
    done += [r for r in read_jsonl(raw_path) if r["id"] not in planned]
    kept: list[dict] = []
    rejected: list[dict] = []
    generated = parsed = 0
    for row in done:
        n_generated, n_parsed = _collect_questions(row, cfg, kept, rejected)
        generated += n_generated
        parsed += n_parsed
    write_jsonl_atomic(out_dir / f"{QUESTIONS}{shard.tag}.jsonl", kept)
    write_jsonl_atomic(out_dir / f"{QUESTIONS}{shard.tag}.rejected.jsonl", rejected)
    return {
        "step": QUESTIONS,
        "shard": f"{shard.index}/{shard.count}",
        "prompts": len(done),
        "hints": sum(len(r["hints"]) for r in records),
        "generated": generated,
        "parsed": parsed,
        "kept": len(kept),
        "rejected": _reasons(rejected),
    }


def _collect_questions(
    row: dict, cfg: QuestionsConfig, kept: list, rejected: list
) -> tuple[int, int]:
    hints = [tuple(h) for h in row["hints"]]
    results = parse_questions(row["completion"], row["examples"], hints, row["finish_reason"],
                              cfg.min_words, cfg.max_words)  # fmt: skip
    parsed = 0
    for n, q in enumerate(results):
        if q.hint is None:
            rejected.append(
                _reject(QUESTIONS, q.reason, f"{row['id']}-L{n}", row["id"], text=q.instruction)
            )
            continue
        parsed += 1
        qtype, topic = hints[q.hint]
        fields = {"instruction": q.instruction, "question_type": qtype, "topic": topic}
        if q.reason:
            rejected.append(_reject(QUESTIONS, q.reason, f"{row['id']}-L{n}", row["id"], **fields))
            continue
        kept.append(
            {"id": f"{row['id']}-{q.hint}", "instruction": q.instruction, "input": "",
             "source": "tgrt", "question_type": qtype, "topic": topic, "prompt_id": row["id"]}
        )  # fmt: skip
    return len(results), parsed


# ----------------------------------------------------------------------------- merge


def _step_files(out_dir: Path, step: str, suffix: str = "") -> list[Path]:
    """`<step>.jsonl` and `<step>.shard<i>of<n>.jsonl` (with `suffix` before `.jsonl`)."""
    pattern = re.compile(rf"^{step}(\.shard(\d+)of(\d+))?{re.escape(suffix)}\.jsonl$")
    found = []
    for path in out_dir.glob(f"{step}*.jsonl"):
        m = pattern.match(path.name)
        if m:
            found.append((int(m[3] or 1), int(m[2] or 0), path))
    return [p for _, _, p in sorted(found)]


def _check_shards(out_dir: Path, step: str, files: list[Path], allow_missing: bool) -> None:
    counts = {}
    for path in files:
        m = re.search(r"\.shard(\d+)of(\d+)(\.raw)?\.jsonl$", path.name)
        if m:
            counts.setdefault(int(m[2]), set()).add(int(m[1]))
    for n, present in counts.items():
        missing = sorted(set(range(n)) - present)
        if missing and not allow_missing:
            raise UserError(
                f"{out_dir}: {step} shard(s) {', '.join(f'{i}/{n}' for i in missing)} have no "
                "output yet; run them first (or set merge.allow_missing_shards)"
            )


def run_merge(
    cfg: MergeConfig, out_dir: str | Path, self_instruct: SelfInstructConfig | None = None
) -> dict[str, Any]:
    """Merge every self-instruct and TGRT file of `out_dir` (all shards) into `instructions.jsonl`.

    Needs no model. Self-instruct shards wrote raw rounds only: given the `self_instruct`
    settings, their rounds are filtered here in round order, as one process filters them, into
    `self_instruct.jsonl` (`merge_self_instruct`). Records are then decided in a fixed order
    (self-instruct, then TGRT questions by id, whatever the shard layout): exact duplicates (same
    normalised instruction and input) are dropped, then the ROUGE-L filter runs over the whole
    merged set, seeds first. The kept records are shuffled with the config seed.
    """
    out_dir = Path(out_dir)
    self_counts = None
    if self_instruct is not None:
        self_counts = merge_self_instruct(self_instruct, out_dir, cfg.allow_missing_shards)
    inputs: list[dict] = []
    per_source = {}
    found = False
    for step in (SELF_INSTRUCT, QUESTIONS):
        files = _step_files(out_dir, step)
        _check_shards(out_dir, step, files, cfg.allow_missing_shards)
        found = found or bool(files)
        records = [r for path in files for r in read_jsonl(path)]
        if step == QUESTIONS:
            records.sort(key=_question_order)
        per_source[step] = len(records)
        inputs += records
    if not found:
        raise UserError(
            f"{out_dir}: no {SELF_INSTRUCT}.jsonl or {QUESTIONS}.jsonl to merge; run "
            "`selfalign self-instruct` and/or `selfalign questions` first"
        )

    pool = NoveltyPool(
        cfg.similarity_threshold if cfg.similarity_threshold is not None else math.inf,
        workers=cfg.workers,
    )
    if cfg.include_seeds:
        pool.add(t["instruction"] for t in load_seed_tasks(cfg.seed_tasks))
        pool.add(q["question"] for q in load_seed_questions(cfg.seed_questions))
    rejected: list[dict] = []
    unique: list[dict] = []
    seen_text: set[tuple[str, str]] = set()
    seen_ids: set[str] = set()
    for r in inputs:
        key = (_norm(r["instruction"]), _norm(r.get("input") or ""))
        if r["id"] in seen_ids or key in seen_text:
            rejected.append({**_merged(r), "step": "merge", "reason": "duplicate"})
            continue
        seen_ids.add(r["id"])
        seen_text.add(key)
        unique.append(r)
    kept = []
    for r, (keep, match) in zip(
        unique, pool.filter([r["instruction"] for r in unique]), strict=True
    ):
        record = {**_merged(r), "max_similarity": match.score, "most_similar": match.text}
        if keep:
            kept.append(record)
        else:
            rejected.append({**record, "step": "merge", "reason": "similar"})
    random.Random(row_seed(cfg.seed, "merge-shuffle")).shuffle(kept)

    step_rejections = [
        {"step": step, **r}
        for step in (SELF_INSTRUCT, TOPICS, QUESTIONS)
        for path in _step_files(out_dir, step, ".rejected")
        for r in read_jsonl(path)
    ]
    write_jsonl_atomic(out_dir / INSTRUCTIONS, kept)
    write_jsonl_atomic(out_dir / REJECTED, step_rejections + rejected)
    return {
        "step": "merge",
        "inputs": per_source,
        "generated": len(inputs),
        "kept": len(kept),
        "kept_per_source": dict(Counter(r["source"] for r in kept)),
        "rejected": _reasons(rejected),
        "rejected_all_steps": _reasons(step_rejections + rejected),
        **({"self_instruct": self_counts} if self_counts else {}),
    }


def _question_order(r: dict) -> tuple:
    # each shard's file holds its own groups; by id (content hashes: a seeded-random order) the
    # merge sees one sequence whatever the shard layout, so sharded and single runs keep the same
    group, _, hint = str(r["id"]).rpartition("-")
    return group, int(hint) if hint.isdigit() else -1, str(r["id"])


def merge_self_instruct(
    cfg: SelfInstructConfig, out_dir: Path, allow_missing: bool = False
) -> dict[str, Any] | None:
    """One process's sequential filter over the raw rounds of every self-instruct shard, in round
    order, until `num_instructions` are kept; writes `self_instruct.jsonl` and its rejections as
    one process would. None when no shard wrote a raw file (one process wrote those files).

    A round missing from the raw files stops the merge with what to rerun (`allow_missing`:
    filter the rounds that are there). Each completion's prompt is checked against the prompt
    these settings make for its id (raw files of other settings are refused)."""
    raws = _step_files(out_dir, SELF_INSTRUCT, ".raw")
    sharded = [p for p in raws if ".shard" in p.name]
    if not sharded:
        return None
    _check_shards(out_dir, SELF_INSTRUCT, sharded, allow_missing)
    seeds, meta = self_instruct_inputs(cfg)
    rows: dict[str, tuple[Path, dict]] = {}  # the ids are the same in every shard layout
    for path in raws:
        for row in read_jsonl(path):
            rows.setdefault(row["id"], (path, row))
    last = max((row.get("round", -1) for _, row in rows.values()), default=-1)
    filt = _Rounds(cfg, seeds, cfg.num_instructions)
    limit = max_rounds(cfg)
    for r in range(min(limit, last + 1) if allow_missing else limit):
        if filt.full:
            break
        batch = _raw_round(cfg, seeds, meta, r, rows)
        if batch is not None:
            filt.add(batch)
        elif not allow_missing:
            raise UserError(_stopped_short(out_dir, cfg, r, len(filt.kept), sharded))
    return {"step": SELF_INSTRUCT, "shards": len(sharded), **filt.write(out_dir)}


def _raw_round(cfg, seeds, meta, r: int, rows: dict[str, tuple[Path, dict]]) -> list[dict] | None:
    """Round `r`'s completions from the raw files, or None if one is missing."""
    planned = _self_instruct_round(cfg, seeds, meta, r)
    found = [rows.get(p["id"]) for p in planned]
    if any(f is None for f in found):
        return None
    shas = prompt_shas(p["prompt"] for p in planned)
    hint = "merge with the settings the shards ran with, or delete that file and rerun its shard"
    for (path, row), sha in zip(found, shas, strict=True):
        check_resume([row], {row["id"]: (sha, None)}, path, hint)
    return [row for _, row in found]


def _stopped_short(out_dir: Path, cfg: SelfInstructConfig, r: int, kept: int, files) -> str:
    """What to rerun when the shards' rounds end before the target is kept."""
    count = max(int(re.search(r"\.shard\d+of(\d+)\.", p.name)[1]) for p in files)
    limit = max_rounds(cfg)
    want = math.ceil(SHARD_MARGIN * cfg.num_instructions * r / kept) if kept else 2 * r
    want = min(max(want, r + 1), limit)
    return (
        f"{out_dir}: the self-instruct shards stopped short: their first {r} rounds keep {kept} "
        f"of {cfg.num_instructions} instructions and round {r} (shard {r % count}/{count}) is "
        f"not complete; rerun the self-instruct shards with --rounds {want} (Slurm: ROUNDS={want} "
        f"SHARDS={count} sbatch 1a_self_instruct.sbatch), then the merge (or set "
        "merge.allow_missing_shards to merge the rounds there are)"
    )


def _merged(r: dict) -> dict:
    """The `instructions.jsonl` fields of a step record."""
    return {
        "id": r["id"],
        "instruction": r["instruction"],
        "input": r.get("input") or "",
        "source": r.get("source"),
        "question_type": r.get("question_type"),
        "topic": r.get("topic"),
    }
