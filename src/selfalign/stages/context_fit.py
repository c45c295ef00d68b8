"""Do a stage's prompts, plus its `max_tokens`, fit the model's context? Checked before any work.

A prompt that does not fit fails when it is generated: in the middle of a stage, or, in
`selfalign run`, after the stages before it ran for hours. So `selfalign run`'s preflight
(`selfalign.run.settings`) and the `run_*` shell of every generating stage (1, 2, 4) call these
first. Each renders the longest prompt its stage can build from what is known, with the stage's
own prompt builders, tokenizes it with the model's tokenizer (special tokens added, as the
backends count), and refuses in one `UserError` line naming the stage and prompt, the tokens
needed (prompt + max_tokens), the model's context, and the fixes.

What is not known yet stands in as its longest known example (stage 1's topics before the
brainstorm: the seed topics) or as a margin of `INSTRUCTION_ROOM` tokens (the instruction of a
stage-2 or stage-4 prompt before stage 1 has run). A stage whose sampling opts into
`truncate_prompt='left'` is not checked: its too-long prompts lose their start by the user's
choice. Left truncation is never offered as a fix: in stage 2 it would cut the constitution's
principles off the front of the prompt, so `stage2_self_align.check_backend` refuses it there.

Reads the stages' own input files (seed tasks, prompts, topics) through their loaders; writes
nothing.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from selfalign.errors import UserError
from selfalign.generation import SamplingParams
from selfalign.stages.stage1_instructions import (
    STEP_KEYS,
    QuestionsConfig,
    SelfInstructConfig,
    StepConfig,
    TopicsConfig,
    build_question_prompt,
    build_self_instruct_prompt,
    build_topic_prompt,
    load_seed_questions,
    question_pairs,
    read_text_input,
    self_instruct_inputs,
    topics_inputs,
)
from selfalign.stages.stage2_self_align import INSTRUCTION_ROOM, SelfAlignConfig
from selfalign.stages.stage4_verbose import VerboseConfig, add_prompts
from selfalign.text.constitution import Constitution, Identity, render_prefix, render_prompt

log = logging.getLogger(__name__)

LONGER_CONTEXT = "a model with a longer context"


@dataclass(frozen=True)
class Limits:
    """What a prompt must fit: the model's tokenizer and context (tokens), and its name."""

    tokenizer: Any
    context: int
    model: str = ""


def backend_limits(backend, tokenizer: Any = None) -> Limits | None:
    """A loaded backend's limits (`tokenizer`: the one that renders the prompts, when it is not
    the backend's own); None when it knows no context or has no tokenizer (a canned backend, an
    HTTP server without `model.context`): nothing can be checked then."""
    tokenizer = tokenizer if tokenizer is not None else getattr(backend, "tokenizer", None)
    context = getattr(backend, "context", None)
    if tokenizer is None or not isinstance(context, int) or context <= 0:
        return None
    return Limits(tokenizer, context)


def as_limits(given: Limits | Any) -> Limits | None:
    """`given` itself, or a backend's limits (`backend_limits`)."""
    return given if isinstance(given, Limits) or given is None else backend_limits(given)


def count_tokens(tokenizer, text: str) -> int:
    """Tokens of a prompt as the backends count them (`encode_prompts`: special tokens added)."""
    return len(tokenizer(text, add_special_tokens=True)["input_ids"])


def require_fit(
    limits: Limits,
    where: str,
    prompt: str,
    tokens: int,
    params: SamplingParams,
    fixes: Sequence[str],
    margin: int = 0,
) -> None:
    """Refuse, in one line, a prompt of `tokens` (+ `margin` for text not known yet) that leaves
    less than `params.max_tokens` of the context."""
    if params.truncate_prompt == "left":
        return
    needed = tokens + margin + params.max_tokens
    if needed <= limits.context:
        return
    room = f" + {margin} kept for the instruction" if margin else ""
    model = f" ({limits.model})" if limits.model else ""
    raise UserError(
        f"{where}: {prompt} does not fit the model's context: it needs {needed} tokens ({tokens} "
        f"of prompt{room} + max_tokens {params.max_tokens}), the model's context is "
        f"{limits.context}{model}; fix: {', '.join(fixes[:-1])} or {fixes[-1]}"
    )


# -- stage 1 --------------------------------------------------------------------------------------


def check_stage1_fit(
    step: StepConfig, limits: Limits | Any, section: str = "instructions", topics=None
) -> None:
    """The longest prompt one stage-1 step can build fits (`limits`: or a loaded backend).
    `topics` (the topics file's records) are what the questions step hints at; before the
    brainstorm ran, its seed topics stand in (brainstormed topics are at most
    `topics.max_words` words, like most seed topics)."""
    if (limits := as_limits(limits)) is None:
        return
    key = ".".join(filter(None, [section, STEP_KEYS[type(step)]]))
    if isinstance(step, SelfInstructConfig):
        _check_self_instruct(step, limits, key)
        return
    if isinstance(step, TopicsConfig):
        prompt, what, fixes = _longest_topic_prompt(step, key)
    else:
        prompt, what, fixes = _longest_question_prompt(step, key, topics)
    fixes = [LONGER_CONTEXT, *fixes, f"a smaller {key}.sampling.max_tokens"]
    tokens = count_tokens(limits.tokenizer, prompt)
    require_fit(limits, f"stage 'instructions' ({key})", what, tokens, step.sampling, fixes)


def _longest(items: Sequence[Any], n: int, text) -> list[Any]:
    """The `n` items of the longest `text` (characters: the longest prompt, near enough)."""
    return sorted(items, key=lambda item: len(text(item)), reverse=True)[:n]


def _task_text(task: dict[str, str]) -> str:
    return task["instruction"] + (task.get("input") or "")


def _check_self_instruct(cfg: SelfInstructConfig, limits: Limits, key: str) -> None:
    """Each prompt shows `num_prompt_instructions` seed tasks drawn at random: refused when even
    the shortest draw cannot fit; when only the longest draws cannot (they are rare with a few
    long seed tasks among many, as in the original files), a warning, since a round that draws
    them stops the stage."""
    seeds, meta = self_instruct_inputs(cfg)
    n = cfg.num_prompt_instructions
    fixes = [LONGER_CONTEXT, f"fewer seed tasks per prompt ({key}.num_prompt_instructions, now "
             f"{n})", "shorter seed tasks", f"a smaller {key}.sampling.max_tokens"]  # fmt: skip
    where = f"stage 'instructions' ({key})"
    longest = build_self_instruct_prompt(meta, _longest(seeds, n, _task_text))
    shortest = build_self_instruct_prompt(meta, sorted(seeds, key=lambda t: len(_task_text(t)))[:n])
    what = f"its shortest prompt (the meta prompt and the {n} shortest seed tasks)"
    require_fit(limits, where, what, count_tokens(limits.tokenizer, shortest), cfg.sampling, fixes)
    try:
        what = f"its longest prompt (the meta prompt and the {n} longest seed tasks)"
        tokens = count_tokens(limits.tokenizer, longest)
        require_fit(limits, where, what, tokens, cfg.sampling, fixes)
    except UserError as e:
        log.warning("%s; a round that draws them stops the stage", e)


def _longest_topic_prompt(cfg: TopicsConfig, key: str) -> tuple[str, str, list[str]]:
    seeds, template = topics_inputs(cfg)
    qtype = _longest([s["question_type"] for s in seeds], 1, str)[0]
    topics = _longest([s["topic"] for s in seeds], cfg.num_examples, str)
    what = f"its longest prompt (the brainstorm prompt and {len(topics)} of the longest topics)"
    fixes = [f"fewer topics per prompt ({key}.num_examples, now {cfg.num_examples})"]
    return build_topic_prompt(template, qtype, topics), what, fixes


def _longest_question_prompt(
    cfg: QuestionsConfig, key: str, topics: Sequence[dict] | None
) -> tuple[str, str, list[str]]:
    examples = load_seed_questions(cfg.seed_questions)
    template = read_text_input(cfg.prompt, "question_prompt.txt")
    pairs = question_pairs(topics, cfg) if topics else [
        (e["question_type"], e["topic"]) for e in examples
    ]  # fmt: skip
    shown = _longest(examples, cfg.num_examples, lambda e: e["question"] + e["topic"])
    hints = _longest(pairs, cfg.hints_per_prompt, lambda p: p[0] + p[1]) or [("", "")]
    what = (
        f"its longest prompt (the question prompt, the {len(shown)} longest seed questions and "
        f"{len(hints)} of the longest topic hints)"
    )
    fixes = [f"fewer examples per prompt ({key}.num_examples, now {cfg.num_examples})",
             f"fewer hints per prompt ({key}.hints_per_prompt, now {cfg.hints_per_prompt})"]  # fmt: skip
    return build_question_prompt(template, shown, hints), what, fixes


# -- stage 2 --------------------------------------------------------------------------------------


def check_self_align_fit(
    cfg: SelfAlignConfig,
    limits: Limits | Any,
    c: Constitution,
    records: Sequence[dict] | None = None,
    section: str = "self_align",
) -> None:
    """The constitution prompt fits with the longest instruction of `records` (`prompt_records`:
    each `prompt` is the text after the constitution prefix), or, with no instructions yet,
    with INSTRUCTION_ROOM tokens for one. `limits`: or a loaded backend."""
    if (limits := as_limits(limits)) is None:
        return
    key = ".".join(filter(None, [section, "sampling", "max_tokens"]))
    fixes = [LONGER_CONTEXT, "a shorter constitution (fewer or shorter principles)",
             "fewer or shorter exemplars", f"a smaller {key}"]  # fmt: skip
    where = "stage 'self_align'"
    if not records:
        prompt = render_prompt(c, "", "")
        what = "the constitution prompt (principles and exemplars, before the instruction)"
        tokens = count_tokens(limits.tokenizer, prompt)
        require_fit(limits, where, what, tokens, cfg.sampling, fixes, INSTRUCTION_ROOM)
        return
    # the constitution is the same for all: count every instruction part alone, then the
    # whole prompt of the longest one exactly
    rests = [r["prompt"] for r in records]
    lengths = [len(ids) for ids in limits.tokenizer(rests, add_special_tokens=False)["input_ids"]]
    longest = max(range(len(rests)), key=lengths.__getitem__)
    tokens = count_tokens(limits.tokenizer, render_prefix(c) + rests[longest])
    what = (
        f"the constitution prompt with its longest instruction ({records[longest]['id']!r}, "
        f"{lengths[longest]} tokens)"
    )
    fixes = [*fixes[:-1], "shorter instructions (stage 1's max_words)", fixes[-1]]
    require_fit(limits, where, what, tokens, cfg.sampling, fixes)


# -- stage 4 --------------------------------------------------------------------------------------


def check_verbose_fit(
    cfg: VerboseConfig,
    limits: Limits | None,
    identity: Identity,
    prompts: Sequence[str] | None = None,
    section: str = "verbose",
) -> None:
    """The verbose prompts fit: the longest of `prompts` (rendered with `limits.tokenizer`, the
    engraved model's), or, before there is an engraved model, the verbose system prompt in our
    chat template (stage 3 installs it; here into `limits.tokenizer`) with INSTRUCTION_ROOM
    tokens for the question. None `limits`: nothing to check with."""
    if limits is None:
        return
    prefix = f"{section}." if section else ""
    fixes = [LONGER_CONTEXT + " (the engraved model has the base model's)",
             f"a shorter verbose prompt ({prefix}verbose_prompt)",
             f"a smaller {prefix}sampling.max_tokens"]  # fmt: skip
    where = "stage 'verbose'"
    if prompts is None:
        from selfalign.text.conversation import install_chat_template

        install_chat_template(limits.tokenizer, identity)
        prompt = add_prompts([{"instruction": "", "input": ""}], limits.tokenizer, identity,
                             cfg.verbose_prompt)[0]["prompt"]  # fmt: skip
        what = "the verbose prompt (before the question)"
        tokens = count_tokens(limits.tokenizer, prompt)
        require_fit(limits, where, what, tokens, cfg.sampling, fixes, INSTRUCTION_ROOM)
        return
    if not prompts:
        return
    lengths = [len(ids) for ids in limits.tokenizer(list(prompts))["input_ids"]]
    what = "the longest verbose prompt (the verbose prompt and the longest question)"
    require_fit(limits, where, what, max(lengths), cfg.sampling, fixes)
