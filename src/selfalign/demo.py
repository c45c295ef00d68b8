"""The offline demo model: a tiny Llama that has learned the pipeline's prompt formats.

`make demo` must show every stage working on a laptop with no GPU and no network, so it cannot
download a base model. Instead it builds one here: a byte-level BPE tokenizer and a ~1.7M-parameter
Llama, trained for about a minute on text rendered with the stages' OWN prompt builders from
the bundled seeds: each prompt followed by a well-formed continuation (numbered task blocks,
topic lists, hint lines, internal thoughts + answer, chat turns). Its completions therefore parse
and the filters have something to keep; the words themselves are recombined seed text and mean
nothing. It is a plumbing demo, not a model.

`build_demo_model` writes the tokenizer, config, safetensors weights and an empty `demo_done`
marker into the folder it is given; it reads only the bundled seeds, prompts and constitution.
Where the time goes: the prompts are long (the constitution alone is ~1,600 tokens) and only the
continuations are learned, so a step runs each kind's shared opening once without gradients,
the vocabulary projection only where the loss is, and the backward pass with denormal floats
flushed to zero (left as they were, they made it several times slower).
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable
from pathlib import Path

from selfalign.stages.stage1_instructions import (
    build_question_prompt,
    build_self_instruct_prompt,
    build_topic_prompt,
    hint_label,
    load_seed_questions,
    load_seed_tasks,
    read_text_input,
)
from selfalign.text.constitution import Constitution, Turn, load_constitution, render_prompt
from selfalign.text.constitution import render_thoughts as constitution_thoughts
from selfalign.text.conversation import ASSISTANT_HEADER, SYSTEM_PROMPTS, USER_HEADER, user_text

THOUGHTS = [
    "The user asks for something I can do well, so I will answer it directly.",
    "This is a harmless request; a clear and complete answer will help most.",
    "The user wants a concrete result, so I will give one and keep it short.",
    "I can answer this from what I know, and I should say it plainly.",
]
Doc = tuple[list[int], int, str]  # (token ids, number of prompt tokens, kind)
# The recipe (issue 17: 3x faster than the 20 epochs of a 4x-wide MLP before; bench/demo_build.py
# measures both side by side, with the stages' kept counts on each model)
EPOCHS = 12  # 900 steps of 4 rows; 8 or 10 kept fewer stage-2 records (bench/RESULTS.md)
# 2x the hidden size instead of 4x: the MLP was 3/4 of the compute, and learns the formats as well
MLP_WIDTH = 256
PREFIX_REFRESH = 4  # steps of a kind for which its shared prefix's keys and values are reused


def _topic_words(tasks: list[dict[str, str]]) -> list[str]:
    words = {w.strip(".,;:!?\"'()").capitalize() for t in tasks for w in t["instruction"].split()}
    return sorted(w for w in words if len(w) > 3 and w.isalpha())


def demo_corpus(
    constitution: Constitution, seed: int = 0, per_kind: int = 60
) -> list[tuple[str, str, str]]:
    """(kind, prompt, continuation) for every stage; continuations in the format its parser reads."""
    rng = random.Random(seed)
    tasks, seeds = load_seed_tasks(), load_seed_questions()
    words = _topic_words(tasks)
    meta = read_text_input(None, "self_instruct_prompt.txt")
    topic_template = read_text_input(None, "topic_brainstorm_prompt.txt")
    question_template = read_text_input(None, "question_prompt.txt")
    texts: list[tuple[str, str, str]] = []

    for _ in range(per_kind):  # stage 1: self-instruct, 5 shown + 3 continued blocks
        chosen = rng.sample(tasks, 8)
        text = ""
        for n, task in enumerate(chosen[5:], start=6):
            head = "" if n == 6 else f"###\n{n}. Instruction:"
            text += f"{head} {task['instruction'].strip()}\n{n}. Input:\n{task['input'] or '<noinput>'}\n"
        texts.append(
            ("self_instruct", build_self_instruct_prompt(meta, chosen[:5]), text + "###\n")
        )

    for _ in range(per_kind):  # stage 1: topic brainstorm
        qtype = rng.choice(seeds)["question_type"]
        topics = [" ".join(rng.sample(words, rng.randint(1, 2))) for _ in range(9)]
        prompt = build_topic_prompt(topic_template, qtype, topics[:4])
        # the prompt ends in "5.": the first new topic follows it unnumbered
        text = f" {topics[4]}" + "".join(f"\n{n}. {t}" for n, t in enumerate(topics[5:], 6))
        texts.append(("topics", prompt, text))

    for _ in range(per_kind):  # stage 1: topic-guided questions
        examples = rng.sample(seeds, 3)
        hints = [(q["question_type"], q["topic"]) for q in rng.sample(seeds, 3)]
        questions = [rng.choice(tasks)["instruction"].strip() for _ in hints]
        prompt = build_question_prompt(question_template, examples, hints)
        text = f" {questions[0]}"
        for j, ((qtype, topic), q) in enumerate(
            zip(hints[1:], questions[1:], strict=True), start=5
        ):
            text += f"\n{j}. type: {hint_label(qtype)}, topic: {topic}, instruction: {q}"
        texts.append(("questions", prompt, text + "\n"))

    ids = [p.id for p in constitution.principles]
    for _ in range(per_kind):  # stage 2: internal thoughts, then the answer
        task = rng.choice(tasks)
        turn = Turn(user=task["instruction"], thoughts=rng.choice(THOUGHTS),
                    principles=sorted(rng.sample(ids, 2)), answer=task["output"])  # fmt: skip
        texts.append((
            "self_align",
            render_prompt(constitution, task["instruction"], task["input"]),
            f" {constitution_thoughts(constitution, turn)}\n\n"
            + f"{constitution.label('answer')}: {task['output'].strip()}\n\n"
            + f"{constitution.label('user')}:",
        ))  # fmt: skip

    identity = constitution.identity.model_dump()
    systems = [s.format(**identity) for s in SYSTEM_PROMPTS.values()]
    for _ in range(per_kind):  # stages 3-4: chat turns as the chat template renders them
        task = rng.choice(tasks)
        user = user_text(task["instruction"], task["input"])
        prompt = rng.choice(systems) + USER_HEADER + user + ASSISTANT_HEADER
        texts.append(("chat", prompt, task["output"].strip() + "</s>"))
    rng.shuffle(texts)
    return texts


def build_demo_model(
    path: str | Path,
    constitution: str = "default",
    seed: int = 0,
    epochs: int = EPOCHS,
    log: Callable[[str], None] = print,
) -> Path:
    """Build the demo model into `path` (skipped when it is already there); return the path."""
    import torch

    from selfalign.tiny import build_tiny_model

    path = Path(path)
    if (path / "demo_done").exists():
        log(f"demo model: {path} exists, reused")
        return path
    pairs = demo_corpus(load_constitution(constitution), seed)
    build_tiny_model(path, [p + c for _, p, c in pairs], vocab_size=4096, hidden_size=128, layers=4, heads=4,
                     intermediate_size=MLP_WIDTH, context=4096, seed=seed,
                     initializer_range=0.02)  # fmt: skip
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path)
    torch.manual_seed(seed)
    docs: list[Doc] = []  # loss on the continuation only
    for kind, prompt, continuation in pairs:
        ids = tokenizer(prompt + continuation)["input_ids"]
        docs.append((ids, len(tokenizer(prompt)["input_ids"]), kind))
    started, tokens = time.perf_counter(), sum(len(d) for d, _, _ in docs) * epochs
    log(f"demo model: training on {len(docs)} texts, {tokens:,} tokens over {epochs} epochs")
    _train(model, docs, epochs, seed, log=log)
    model.save_pretrained(path, safe_serialization=True)
    (path / "demo_done").write_text("")
    log(f"demo model: saved to {path} in {time.perf_counter() - started:.0f}s")
    return path


def _common_length(docs: list[list[int]]) -> int:
    first, n = docs[0], len(docs[0])
    for ids in docs[1:]:
        n = next((i for i, (a, b) in enumerate(zip(first[:n], ids, strict=False)) if a != b),
                 min(n, len(ids)))  # fmt: skip
    return n


def _plan(docs: list[Doc], epochs: int, batch_size: int, seed: int) -> tuple[list, dict[str, int]]:
    """The steps, (kind, doc indices) each, in a seeded order, and each kind's shared prefix
    length: at least one token short of its shortest prompt, because the last prompt token's
    output predicts the first continuation token."""
    groups: dict[str, list[int]] = {}
    for i, (_, _, group) in enumerate(docs):
        groups.setdefault(group, []).append(i)
    shared = {
        g: min(_common_length([docs[i][0] for i in idx]), min(docs[i][1] for i in idx) - 1)
        for g, idx in groups.items()
    }
    rng = random.Random(seed)
    plan = []
    for _ in range(epochs):
        epoch = []
        for g, idx in groups.items():
            idx = idx[:]
            rng.shuffle(idx)
            epoch += [(g, idx[k : k + batch_size]) for k in range(0, len(idx), batch_size)]
        rng.shuffle(epoch)
        plan += epoch
    return plan, shared


def _train(model, docs: list[Doc], epochs: int, seed: int, batch_size: int = 4,
           lr: float = 3e-3, log=None) -> None:  # fmt: skip
    """Next-token training on the continuations, cheap where prompts share a prefix.

    Docs of one kind share their prompt's opening (the constitution, the self-instruct meta
    prompt): it runs without gradients into keys and values every row of a step attends to
    (`_SharedPrefixes`); only the rest runs with gradients, and only continuation tokens carry
    loss. That is most of the tokens skipped, not just unscored.
    """
    import torch

    plan, shared = _plan(docs, epochs, batch_size, seed)
    # fused: one kernel for all the parameters, several times faster than the default here;
    # beta2 0.95 (as in GPT-3 and LLaMA) adapts faster in a short run: at 0.999 the 900 steps
    # left stage 1 keeping half as many instructions (bench/RESULTS.md)
    opt = torch.optim.AdamW(
        model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.0, fused=True
    )
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / 20) * 0.5 * (1 + math.cos(math.pi * s / len(plan)))
    )
    prefixes = _SharedPrefixes(model, PREFIX_REFRESH)
    losses: dict[str, list[float]] = {}
    model.train()
    # The backward passes of this small model fill with denormal floats (below 1e-38), which
    # x86 CPUs compute many times slower: a quarter of the build. Zero serves as well here.
    torch.set_flush_denormal(True)
    try:
        for step, (kind, batch) in enumerate(plan, start=1):
            kv = prefixes(kind, docs[batch[0]][0][: shared[kind]])
            loss = _step_loss(model, [docs[i] for i in batch], shared[kind], kv)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0, foreach=True)
            opt.step()
            sched.step()
            opt.zero_grad()
            losses.setdefault(kind, []).append(loss.item())
            if log and step % max(1, len(plan) // 8) == 0:
                mean = {g: round(sum(v) / len(v), 2) for g, v in losses.items()}
                log(f"demo model: step {step}/{len(plan)}, loss by kind {mean}")
                losses.clear()
    finally:
        torch.set_flush_denormal(False)
    model.eval()


class _SharedPrefixes:
    """Each kind's shared prompt opening as keys and values, run again after `refresh` steps of
    that kind: they carry no gradient anyway and the weights move little in a few steps, so the
    constitution (1,600 tokens) need not run for every batch of stage-2 rows."""

    def __init__(self, model, refresh: int) -> None:
        self.model, self.refresh = model, refresh
        self.kept: dict[str, tuple[int, list]] = {}  # kind -> (steps it served, kv)

    def __call__(self, kind: str, ids: list[int]) -> list:
        served, kv = self.kept.get(kind, (self.refresh, []))
        if served >= self.refresh:
            served, kv = 0, _prefix_kv(self.model, ids)
        self.kept[kind] = (served + 1, kv)
        return kv


def _prefix_kv(model, ids: list[int]) -> list:
    """Keys and values of `ids` (one row), per layer; no gradients, no vocabulary projection."""
    import torch
    from transformers import DynamicCache

    from selfalign.modeling import with_cache

    if not ids:
        return []
    cache = DynamicCache(config=model.config)
    base = model.get_decoder()
    with torch.no_grad():
        base(input_ids=torch.tensor([ids]), **with_cache(base, cache))
    return [(k, v) for k, v, *_ in cache]


def _step_loss(model, rows: list[Doc], start: int, kv: list):
    """Mean next-token loss on the rows' continuations, their first `start` tokens (the same in
    every row) given as keys and values `kv`. The vocabulary projection runs on the scored
    positions only: on the prompt tokens it would be a large part of a step, for no loss."""
    import torch
    from transformers import DynamicCache

    from selfalign.modeling import with_cache

    n, base = len(rows), model.get_decoder()
    data = [(k.expand(n, -1, -1, -1), v.expand(n, -1, -1, -1)) for k, v in kv]
    cache = DynamicCache(ddp_cache_data=data or None, config=model.config)
    width = max(len(ids) for ids, _, _ in rows) - start
    ids = torch.zeros((n, width), dtype=torch.long)
    target = torch.full((n, width), -100)  # target[r, t]: the token position t predicts, if scored
    mask = torch.zeros((n, start + width), dtype=torch.long)
    for r, (tokens, prompt, _) in enumerate(rows):
        rest = torch.tensor(tokens[start:])
        ids[r, : len(rest)] = rest
        target[r, prompt - start - 1 : len(rest) - 1] = rest[prompt - start :]
        mask[r, : len(tokens)] = 1
    hidden = base(input_ids=ids, attention_mask=mask, **with_cache(base, cache)).last_hidden_state
    scored = target != -100
    return torch.nn.functional.cross_entropy(model.lm_head(hidden[scored]), target[scored])
