"""SharedPrefixLM (selfalign.evaluation.scorer) against lm-eval's own HFLM on the tiny model: the
same log-likelihoods and greedy flags, request by request and through `simple_evaluate`, with
each shared context run through the model once."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from lm_eval.api.instance import Instance
from lm_eval.models.huggingface import HFLM

from selfalign.evaluation.scorer import SharedPrefixLM, padded_batches, prefix_groups

PRIMER = (
    "Q: What is the capital of France?\nA: The capital of France is Paris.\n\n"
    "Q: How many legs does a dog have?\nA: A dog has four legs.\n\nQ: "
)
QUESTIONS = ["Who wrote the poem about the sea?", "What is water made of?", "Why is it so?"]
CHOICES = [" Paris.", " Water boils at 100 degrees Celsius at sea level.", " water", " The fox."]
MAX_LENGTH = 128  # both models get it, so the long requests below exceed it
LONG = "Numbers 0 1 2 3 4 5 6 7 8 9 10 100 1000; punctuation , . ; : ! ? ( ) [ ] { } " * 8


def lm(cls, model_dir, batch_size, device="cpu", **kwargs):
    return cls(
        pretrained=str(model_dir),
        device=device,
        dtype="float32",
        batch_size=batch_size,
        max_length=MAX_LENGTH,
        **kwargs,
    )


def model_tokens(model, context: list[int], tokens: int, second_first: bool = False) -> list[int]:
    """The model's own greedy continuation of `context` (token ids), or with `second_first` one
    that starts with the second most likely token and goes on greedily."""
    ids = list(context)
    if second_first:
        ids.append(int(model(torch.tensor([ids])).logits[0, -1].topk(2).indices[1]))
    out = model.generate(
        torch.tensor([ids]), max_new_tokens=tokens, do_sample=False, eos_token_id=None
    )
    return out[0, len(context) :].tolist()


@pytest.fixture(scope="module")
def requests(tiny_model_dir):
    pairs = [(PRIMER + q + "\nA:", c) for q in QUESTIONS for c in CHOICES]
    pairs += [
        (PRIMER, " Where is the sea?"),  # a context that the other contexts start with
        ("User: Hi\nAssistant:", " Hello."),  # shares no prefix with the others
        ("", "A journey of a thousand miles"),  # empty context: the prefix token stands in
        (LONG, " punctuation"),  # the context alone is longer than max_length
        (LONG[:300], " the quick brown fox jumps over the lazy dog"),  # fits only cut
        (PRIMER + QUESTIONS[1] + "\nA:", CHOICES[1]),  # a repeat (HHH repeats items)
    ]
    # (none where one request's context + continuation minus its last token equals another's
    # with a different context: HFLM's logits cache then reads the shorter one's log-probs from
    # the wrong positions, lm-eval 0.4.13)
    return [Instance("loglikelihood", {}, pair, i) for i, pair in enumerate(pairs)]


def assert_same(ours, theirs):
    """Same greedy flags; same sums up to float32 rounding (a few ulps of sums near -170: the
    tiny model's wide initialisation gives large log-probs)."""
    assert [g for _, g in ours] == [g for _, g in theirs]
    assert [ll for ll, _ in ours] == pytest.approx([ll for ll, _ in theirs], rel=1e-6, abs=1e-5)


def count_tokens(model) -> list[tuple[int, int]]:
    """(rows, real input tokens) of every forward pass of `model`, padding not counted."""
    seen = []

    def hook(_module, args, kwargs):
        ids = kwargs.get("input_ids", args[0] if args else None)
        mask = kwargs.get("attention_mask")
        real = mask[:, -ids.shape[1] :].sum() if mask is not None else ids.numel()
        seen.append((ids.shape[0], int(real)))

    model.register_forward_pre_hook(hook, with_kwargs=True)
    return seen


class Recorder:
    def __init__(self):
        self.calls = []

    def add_partial(self, attr, req, res):
        self.calls.append((attr, req, res))


@pytest.fixture(scope="module")
def reference(tiny_model_dir, requests):
    return lm(HFLM, tiny_model_dir, 8).loglikelihood(requests, disable_tqdm=True)


def test_requests_cover_the_cases(tiny_model_dir, requests, reference):
    hflm = lm(HFLM, tiny_model_dir, 1)
    encoded = [hflm._encode_pair(*r.args) for r in requests if r.args[0]]
    assert any(len(cont) == 1 for _, cont in encoded)
    assert len({len(cont) for _, cont in encoded}) > 3
    assert any(len(ctx) > MAX_LENGTH for ctx, _ in encoded)
    assert any(len(ctx) <= MAX_LENGTH < len(ctx) + len(cont) - 1 for ctx, cont in encoded)
    contexts = {tuple(ctx) for ctx, _ in encoded}
    assert any(a != b and b[: len(a)] == a for a in contexts for b in contexts)


@pytest.mark.parametrize("batch_size", [1, 3])
def test_greedy_flags_equal_hflm(tiny_model_dir, batch_size):
    """Token-level requests (a decoded model output need not encode back to the same tokens):
    greedy continuations of 1 and 4 tokens, one whose first token is the second choice and the
    rest greedy, one of a greedy prefix and a wrong last token."""
    hflm = lm(HFLM, tiny_model_dir, batch_size)
    ctx = hflm.tok_encode(PRIMER + QUESTIONS[0] + "\nA:")
    greedy = model_tokens(hflm.model, ctx, 4)
    second = model_tokens(hflm.model, ctx, 3, second_first=True)
    wrong_last = greedy[:3] + [greedy[3] + 1]
    conts = [greedy[:1], greedy, second, wrong_last]
    requests = [(("q", str(i)), ctx, cont) for i, cont in enumerate(conts)]
    theirs = hflm._loglikelihood_tokens(requests, disable_tqdm=True)
    assert [g for _, g in theirs] == [True, True, False, False]
    ours = lm(SharedPrefixLM, tiny_model_dir, batch_size)._loglikelihood_tokens(requests, True)
    assert_same(ours, theirs)


@pytest.mark.parametrize("batch_size", [1, 3, 8])
@pytest.mark.parametrize("shared_prefix", [True, False])
def test_loglikelihood_equals_hflm(tiny_model_dir, requests, reference, batch_size, shared_prefix):
    ours = lm(SharedPrefixLM, tiny_model_dir, batch_size, shared_prefix=shared_prefix)
    assert ours.sharing_applies()
    seen = count_tokens(ours.model)
    assert_same(ours.loglikelihood(requests, disable_tqdm=True), reference)
    assert 1 < max(rows for rows, _ in seen) <= batch_size or batch_size == 1


def test_cache_hook_gets_every_answer(tiny_model_dir, requests, reference):
    ours = lm(SharedPrefixLM, tiny_model_dir, 3)
    hook = Recorder()
    ours.set_cache_hook(hook)
    answers = ours.loglikelihood(requests, disable_tqdm=True)
    calls = sorted(hook.calls, key=lambda c: c[1])
    expected = sorted(("loglikelihood", r.args, a) for r, a in zip(requests, answers, strict=True))
    assert calls == sorted(expected, key=lambda c: c[1])


def test_each_context_and_the_primer_run_once(tiny_model_dir, requests):
    """Only the primer-sharing requests: the primer once, each question's rest once, each
    distinct continuation but its last token once."""
    shared = requests[: len(QUESTIONS) * len(CHOICES)] + requests[-1:]
    ours = lm(SharedPrefixLM, tiny_model_dir, 8)
    seen = count_tokens(ours.model)
    answers = ours.loglikelihood(shared, disable_tqdm=True)
    assert_same(answers, lm(HFLM, tiny_model_dir, 8).loglikelihood(shared, disable_tqdm=True))
    encoded = {tuple(map(tuple, ours._encode_pair(*r.args))) for r in shared}
    assert len(encoded) == len(shared) - 1
    contexts = {ctx for ctx, _ in encoded}
    common = next(k for k in range(999) if len({c[k] for c in contexts}) > 1)
    assert seen[0] == (1, common)  # the primer, alone
    rests = sum(len(c) - common for c in contexts)
    conts = sum(len(cont) - 1 for _, cont in encoded)
    assert sum(tokens for _, tokens in seen) == common + rests + conts


def test_falls_back_to_hflm_where_the_cache_cannot_serve(tiny_model_dir, requests, reference):
    ours = lm(SharedPrefixLM, tiny_model_dir, 8)
    config = ours.model.config
    # a window wider than any input: the model computes the same, but the cache layout differs
    config.layer_types = ["sliding_attention"] * config.num_hidden_layers
    config.sliding_window = 4 * MAX_LENGTH
    assert not ours.sharing_applies()
    seen = count_tokens(ours.model)
    assert_same(ours.loglikelihood(requests[:4], disable_tqdm=True), reference[:4])
    assert len(seen) == 1  # HFLM's own single padded batch


def test_lora_adapter_equals_hflm(tiny_model_dir, requests, tmp_path):
    """`peft=`: HFLM wraps the model in a PeftModel; the cache keyword must reach the base."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    lora = LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    get_peft_model(base, lora).save_pretrained(tmp_path)
    theirs = lm(HFLM, tiny_model_dir, 3, peft=str(tmp_path)).loglikelihood(requests, True)
    ours = lm(SharedPrefixLM, tiny_model_dir, 3, peft=str(tmp_path))
    assert ours.sharing_applies()
    assert_same(ours.loglikelihood(requests, disable_tqdm=True), theirs)


def test_prefix_groups():
    a, b, c, d = (1, 2, 3, 4, 5), (1, 2, 3, 9), (7, 8), (1, 2)
    assert prefix_groups([a, b, c, d, a], minimum=2) == [(0, [d, c]), (3, [a, b])]
    assert prefix_groups([a, b, c, d], minimum=1) == [(0, [c]), (1, [d, a, b])]
    assert prefix_groups([a, b], minimum=2) == [(3, [a, b])]
    assert prefix_groups([a, b], minimum=4) == [(0, [a, b])]
    assert prefix_groups([(5,), (5,)], minimum=1) == [(0, [(5,)])]


def test_padded_batches():
    """At most batch_size items, and no batch more than a fifth padding."""
    items = list("abcdef")
    assert list(padded_batches(items, [10, 10, 9, 9, 9, 9], 4)) == [list("abcd"), list("ef")]
    assert list(padded_batches(items, [10, 9, 9, 8, 2, 2], 8)) == [list("abcd"), list("ef")]
    assert list(padded_batches(items[:3], [10, 7, 6], 8)) == [list("ab"), list("c")]
    assert list(padded_batches(items[:2], [5, 5], 1)) == [["a"], ["b"]]
    assert list(padded_batches([], [], 4)) == []


def truthfulqa_task(name: str) -> dict:
    """A truthfulqa_mc1/mc2-like task over the bundled data: lm-eval's own prompt (its YAML's
    primer template), choices and MC2 score (normalised in log space), built here so this test
    does not depend on the package's task files."""
    import datasets
    import lm_eval
    from lm_eval.tasks._yaml_loader import load_yaml

    from selfalign.evaluation.data import truthfulqa_mc

    upstream = load_yaml(Path(lm_eval.__file__).parent / "tasks/truthfulqa/truthfulqa_mc1.yaml")

    def dataset(**_):
        docs = datasets.Dataset.from_list(list(truthfulqa_mc()))
        return datasets.DatasetDict({"validation": docs})

    def mc2(doc, results):
        lls = np.array([ll for ll, _ in results])
        probs = np.exp(lls - lls.max())
        return {
            "acc": float(probs[np.array(doc["mc2_targets"]["labels"]) == 1].sum() / probs.sum())
        }

    targets = "mc1_targets" if name == "truthfulqa_mc1" else "mc2_targets"
    task = {
        "task": name,
        "custom_dataset": dataset,
        "output_type": "multiple_choice",
        "validation_split": "validation",
        "doc_to_text": upstream["doc_to_text"],
        "doc_to_choice": f"{{{{{targets}.choices}}}}",
        "doc_to_target": 0,
        "metric_list": [{"metric": "acc", "aggregation": "mean", "higher_is_better": True}],
    }
    if name == "truthfulqa_mc2":
        task["process_results"] = mc2
    return task


@pytest.mark.slow  # ~10 s, mostly HFLM
def test_simple_evaluate_gives_hflm_results(tiny_model_dir):
    """TruthfulQA MC1 + MC2 through lm-eval's evaluator (one loglikelihood call for both tasks):
    the same accuracies and per-choice log-likelihoods, with far fewer tokens run."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    runs = []
    for cls in (HFLM, SharedPrefixLM):
        model = cls(pretrained=str(tiny_model_dir), device="cpu", dtype="float32", batch_size=8)
        seen = count_tokens(model.model)
        out = lm_eval.simple_evaluate(
            model=model,
            tasks=[truthfulqa_task("truthfulqa_mc1"), truthfulqa_task("truthfulqa_mc2")],
            task_manager=TaskManager(include_defaults=False),
            limit=20,
            log_samples=True,
        )
        acc = {task: result["acc,none"] for task, result in out["results"].items()}
        lls = [r[0] for task in sorted(acc) for doc in out["samples"][task] for r in doc["filtered_resps"]]  # fmt: skip
        runs.append((acc, lls, sum(tokens for _, tokens in seen)))
    (theirs, their_lls, their_tokens), (ours, our_lls, our_tokens) = runs
    assert set(theirs) == {"truthfulqa_mc1", "truthfulqa_mc2"}
    assert len(their_lls) > 200  # 20 questions per task, 4 to 13 choices each
    assert our_lls == pytest.approx(their_lls, rel=1e-6, abs=1e-5)
    assert ours["truthfulqa_mc1"] == theirs["truthfulqa_mc1"]
    assert ours["truthfulqa_mc2"] == pytest.approx(theirs["truthfulqa_mc2"], abs=1e-6)
    assert our_tokens * 5 < their_tokens  # the primer and each question ran once


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_loglikelihood_equals_hflm_on_cuda(tiny_model_dir, requests):
    theirs = lm(HFLM, tiny_model_dir, 8, device="cuda").loglikelihood(requests, disable_tqdm=True)
    for batch_size in (1, 8):
        ours = lm(SharedPrefixLM, tiny_model_dir, batch_size, device="cuda")
        assert ours.device.type == "cuda"
        assert_same(ours.loglikelihood(requests, disable_tqdm=True), theirs)
