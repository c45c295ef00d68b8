"""The sampling controls of the transformers backend, against obviously-correct references."""

import random

import pytest
import torch

from selfalign.generation.ngram import ngram_penalty
from selfalign.generation.transformers_backend import top_p_filter


def reference_penalty(history: list[int], penalties: dict[int, float], vocab: int) -> list[float]:
    """Slow and plain: count each n-gram (last n-1 tokens, t) in the history, for every t."""
    out = [0.0] * vocab
    for n, weight in penalties.items():
        context = history[len(history) - (n - 1) :] if n > 1 else []
        if len(history) < n - 1:
            continue
        for t in range(vocab):
            gram = context + [t]
            count = sum(history[j : j + n] == gram for j in range(len(history) - n + 1))
            out[t] += weight * count
    return out


@pytest.mark.parametrize("trial", range(40))
def test_ngram_penalty_equals_reference(trial):
    rng = random.Random(trial)
    vocab = rng.choice([3, 5, 11])  # small vocabularies force repeated n-grams
    rows = rng.randint(1, 4)
    steps = rng.randint(1, 30)
    penalties = {
        n: rng.choice([0.0, 0.5, 1.0, 2.0, 3.7])
        for n in rng.sample([1, 2, 3, 4], rng.randint(1, 4))
    }
    histories = [[rng.randrange(vocab) for _ in range(steps)] for _ in range(rows)]
    got = ngram_penalty(torch.tensor(histories), penalties, vocab)
    for r, history in enumerate(histories):
        assert got[r].tolist() == pytest.approx(reference_penalty(history, penalties, vocab))


def test_first_generated_token_counts():
    # after one generated token, a unigram penalty already applies to it
    got = ngram_penalty(torch.tensor([[2]]), {1: 1.5}, 4)
    assert got.tolist() == [[0.0, 0.0, 1.5, 0.0]]
    # a bigram needs one previous token as context: (2, t) has not occurred yet
    assert ngram_penalty(torch.tensor([[2]]), {2: 1.0}, 4).sum() == 0
    # history 2 2: the bigram (2, 2) occurred once, and the context is 2
    assert ngram_penalty(torch.tensor([[2, 2]]), {2: 1.0}, 4).tolist() == [[0.0, 0.0, 1.0, 0.0]]


def test_top_p_keeps_smallest_set_reaching_mass():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    kept = top_p_filter(logits, 0.7).isfinite().tolist()[0]
    assert kept == [True, True, False, False]
    kept = top_p_filter(logits, 0.45).isfinite().tolist()[0]
    assert kept == [True, False, False, False]
    assert top_p_filter(logits, 1.0).isfinite().all()


@pytest.mark.parametrize("trial", range(40))
def test_incremental_ngram_counts_equal_reference(trial):
    """vLLM's logits processor keeps counts token by token; every step must equal the reference."""
    from selfalign.generation.ngram import NgramCounts

    rng = random.Random(1000 + trial)
    vocab = rng.choice([3, 5, 11])
    penalties = {
        n: rng.choice([0.5, 1.0, 2.0]) for n in rng.sample([1, 2, 3, 4], rng.randint(1, 4))
    }
    counts, history = NgramCounts(penalties), []
    for _ in range(rng.randint(1, 30)):
        token = rng.randrange(vocab)
        counts.add(token)
        history.append(token)
        got = [0.0] * vocab
        for t, value in counts.penalties().items():
            got[t] += value
        assert got == pytest.approx(reference_penalty(history, penalties, vocab))


def test_ngram_args_round_trip_and_refuse_bad_values():
    from selfalign.generation.ngram import ngram_args, parse_ngram_args

    assert parse_ngram_args(ngram_args({3: 1.0, 4: 2.0, 1: 0.0})) == {3: 1.0, 4: 2.0}
    assert parse_ngram_args({"other": 1}) == {}
    for bad in (
        {"selfalign_ngram_5": 1.0},
        {"selfalign_ngram_2": "x"},
        {"selfalign_ngram_2": True},
    ):
        with pytest.raises(ValueError, match="selfalign_ngram_"):
            parse_ngram_args(bad)


def test_logit_biases_stay_within_openai_range():
    """vLLM clamps biases to -100..100; a wider one would act differently per backend."""
    from pydantic import ValidationError

    from selfalign.generation import SamplingParams

    assert SamplingParams(logit_bias={3: -100, 4: 100}).logit_bias == {3: -100, 4: 100}
    with pytest.raises(ValidationError, match="within -100..100"):
        SamplingParams(logit_bias={3: -1e9})
