"""The demo model (selfalign.demo): its training texts are in the format each stage's parser
reads; its cheap training step computes the plain causal-LM loss on the continuations; its plan
and shared prefixes are what the step relies on; and the model `make demo` builds gives
completions the demo pipeline keeps in stages 1, 2 and 4."""

from __future__ import annotations

import json
import re
from collections import Counter

import pytest

from selfalign import demo
from selfalign.stages.stage1_instructions import parse_questions, parse_self_instruct, parse_topics
from selfalign.stages.stage2_self_align import parse_completion
from selfalign.text.constitution import load_constitution

KINDS = {"self_instruct", "topics", "questions", "self_align", "chat"}


def _question_hints(prompt: str):
    """The (examples, new hints) a question prompt was built from, read back from its text."""
    hints = [m.groups() for line in prompt.splitlines() if ", instruction:" not in line
             if (m := re.match(r"(\d+)\. type: (.*), topic: (.*)$", line))]  # fmt: skip
    answered = dict(re.findall(r"^(\d+)\. type: .*, instruction: (.*)$", prompt, re.MULTILINE))
    pairs = [(t.replace("Instructions", "Questions", 1), p) for _, t, p in hints]
    examples = [{"question_type": t, "topic": p, "question": answered[str(n)]}
                for n, (t, p) in enumerate(pairs[: len(answered)], 1)]  # fmt: skip
    return examples, pairs[len(answered) :]


def test_every_continuation_parses_with_its_stage_parser():
    constitution = load_constitution("default")
    texts = demo.demo_corpus(constitution, seed=3, per_kind=8)
    assert Counter(kind for kind, _, _ in texts) == dict.fromkeys(KINDS, 8)
    for kind, prompt, text in texts:
        if kind == "self_instruct":  # 5 tasks shown, 3 written
            blocks = parse_self_instruct(text, 5, "stop")
            assert [b.reason for b in blocks] == [None] * 3 and all(b.instruction for b in blocks)
        elif kind == "topics":  # 4 shown, 5 written; the prompt ends in "5."
            assert [reason for _, reason in parse_topics(text, 4, "stop")] == [None] * 5
        elif kind == "questions":  # one question per new hint, in order
            examples, hints = _question_hints(prompt)
            parsed = parse_questions(text, examples, hints, "stop")
            assert len(hints) == 3 and [q.hint for q in parsed] == [0, 1, 2]
        elif kind == "self_align":
            parsed = parse_completion(constitution, text)
            # the format parses (a seed answer may still fail a filter, e.g. one regex line)
            assert parsed.reason in (None, "turn_header") and parsed.answer and parsed.principles
        else:
            assert text.endswith("</s>") and "</s>" not in prompt


# rows of one kind: a shared opening [1, 5], prompts of 5, 4 and 3 tokens, then continuations
ROWS = [
    ([1, 5, 9, 12, 30, 31, 40], 5, "g"),
    ([1, 5, 9, 14, 20, 22], 4, "g"),
    ([1, 5, 17, 18], 3, "g"),
]


def _plain_loss(model, rows):
    """The causal-LM loss of transformers on the whole texts, labels on the continuations."""
    import torch

    width = max(len(ids) for ids, _, _ in rows)
    ids = torch.zeros((len(rows), width), dtype=torch.long)
    labels = torch.full((len(rows), width), -100)
    for r, (tokens, prompt, _) in enumerate(rows):
        ids[r, : len(tokens)] = torch.tensor(tokens)
        labels[r, prompt : len(tokens)] = torch.tensor(tokens[prompt:])
    mask = (labels != -100) | (torch.arange(width) < torch.tensor([[p] for _, p, _ in rows]))
    return model(input_ids=ids, attention_mask=mask.long(), labels=labels).loss


def test_the_step_loss_is_the_causal_lm_loss_on_the_continuations(tiny_model_dir):
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    expected = _plain_loss(model, ROWS)
    expected.backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters()}
    model.zero_grad()
    for start in (0, 1, 2):  # no shared prefix, and a shared prefix of 1 or 2 tokens
        kv = demo._prefix_kv(model, ROWS[0][0][:start])
        loss = demo._step_loss(model, ROWS, start, kv)
        assert torch.allclose(loss, expected, atol=1e-5), start
        if start == 0:  # nothing runs without gradients: the gradients are the plain ones too
            loss.backward()
            for name, p in model.named_parameters():
                assert torch.allclose(p.grad, grads[name], atol=1e-6), name
            model.zero_grad()


def test_the_plan_trains_every_text_once_an_epoch_in_batches_of_one_kind():
    texts = demo.demo_corpus(load_constitution("default"), per_kind=10)
    docs = [(list(range(len(p) % 50 + 2)) + [7] * (len(c) % 40 + 1), len(p) % 50 + 2, kind)
            for kind, p, c in texts]  # fmt: skip
    plan, shared = demo._plan(docs, epochs=3, batch_size=4, seed=0)
    assert len(plan) == 3 * 5 * 3  # 10 texts of each kind in batches of 4, 4, 2
    per_epoch = [Counter(i for _, batch in plan[e * 15 : (e + 1) * 15] for i in batch)
                 for e in range(3)]  # fmt: skip
    assert all(seen == Counter(range(len(docs))) for seen in per_epoch)
    for kind, batch in plan:
        assert {docs[i][2] for i in batch} == {kind} and 1 <= len(batch) <= 4
    assert all(shared[kind] <= min(p for _, p, k in docs if k == kind) - 1 for kind in shared)
    assert [b for _, b in plan[:15]] != [b for _, b in plan[15:30]]  # drawn afresh each epoch
    assert plan == demo._plan(docs, epochs=3, batch_size=4, seed=0)[0]  # seeded


def test_a_kinds_prefix_runs_again_after_refresh_steps_of_that_kind(monkeypatch):
    made = []
    monkeypatch.setattr(demo, "_prefix_kv", lambda model, ids: made.append(ids) or [len(made)])
    prefixes = demo._SharedPrefixes(model=None, refresh=3)
    got = [prefixes("a", [1, 2]) for _ in range(4)] + [prefixes("b", [3])]
    assert got == [[1], [1], [1], [2], [3]]  # "a": made, used 3 times, made again; "b" its own
    assert made == [[1, 2], [1, 2], [3]]


def test_a_training_step_scores_the_plain_loss_and_leaves_denormals_as_they_were(tiny_model_dir):
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    log: list[str] = []  # one step of the 3 rows (shared prefix [1, 5]); lr 0 keeps the weights
    demo._train(model, ROWS, epochs=1, seed=0, batch_size=3, lr=0.0, log=log.append)
    (line,) = log
    assert line.startswith("demo model: step 1/1, loss by kind {'g': ")
    assert abs(float(line.split(": ")[-1].rstrip("}")) - _plain_loss(model, ROWS).item()) <= 0.005
    assert (torch.tensor([1e-39]) * 1.0).item() != 0.0  # flushed to zero during training only


@pytest.mark.slow
def test_the_demo_model_completions_are_kept_in_every_generating_stage(demo_model_dir, tmp_path):
    """The model as `make demo` builds it, and `selfalign run` stages 1-4 of the bundled demo
    config on it, in a subprocess as `make demo` runs it."""
    import subprocess
    import sys
    from pathlib import Path

    import selfalign

    config = Path(selfalign.__file__).parent / "configs" / "demo.yaml"
    args = [sys.executable, "-m", "selfalign", "run", str(config), f"model.model={demo_model_dir}",
            "--run-dir", str(tmp_path / "run"), "--stages", "1-4", "--quiet"]  # fmt: skip
    done = subprocess.run(args, capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    stages = json.loads((tmp_path / "run" / "manifest.json").read_text())["stages"]
    steps = stages["instructions"]["counts"]["steps"]
    # bench/RESULTS.md "Demo model build" has what the build keeps with run seeds 42 and 43
    assert steps["self_instruct"]["kept"] >= 8
    assert steps["topics"]["kept"] >= 100
    assert steps["questions"]["kept"] >= 5
    assert stages["self_align"]["counts"]["kept"] >= 5
    assert stages["verbose"]["counts"]["kept"] >= 5
