"""The transformers backend on a tiny local model: ordering, determinism, every sampling control."""

import re

import pytest

from selfalign.errors import UserError
from selfalign.generation import SamplingParams
from selfalign.generation.transformers_backend import TransformersBackend

PROMPTS = [
    "The quick brown fox",
    "Instruction: Write a short poem about the sea.\nInput:",
    "User: What is the capital of France?\nAssistant:",
    "def add(a, b):",
    "1. Brainstorm topics.\n2.",
    "Science explains the world: water boils at",
    "Numbers 0 1 2 3",
    "A journey of a thousand miles begins with one step. A journey of a thousand miles",
    "?",
    "User: Tell me about the ocean, the tides, and the moon.\nAssistant: The",
]
GREEDY = SamplingParams(temperature=0, max_tokens=12)


def with_batch(backend, batch_size, share_prefix=True):
    return TransformersBackend(backend.model, backend.tokenizer, batch_size, share_prefix)


def plain_generate_ids(backend, prompt, max_tokens):
    """Reference: transformers' own greedy `generate` on one unpadded prompt."""
    ids = backend.tokenizer(prompt, return_tensors="pt")
    out = backend.model.generate(
        **ids,
        max_new_tokens=max_tokens,
        do_sample=False,
        eos_token_id=None,
        pad_token_id=backend.tokenizer.pad_token_id,
    )
    return out[0, ids["input_ids"].shape[1] :].tolist()


def test_one_completion_per_prompt_in_order(tiny_backend):
    out = tiny_backend.generate(PROMPTS, GREEDY)
    assert len(out) == len(PROMPTS)
    singles = [tiny_backend.generate([p], GREEDY)[0] for p in PROMPTS]
    assert out == singles


@pytest.mark.parametrize("batch_size", [1, 3, 8])
def test_greedy_is_identical_across_batch_sizes(tiny_backend, batch_size):
    reference = with_batch(tiny_backend, 1, share_prefix=False).generate(PROMPTS, GREEDY)
    assert with_batch(tiny_backend, batch_size).generate(PROMPTS, GREEDY) == reference


def test_greedy_matches_transformers_generate(tiny_backend):
    params = SamplingParams(
        temperature=0, max_tokens=10, logit_bias={tiny_backend.tokenizer.eos_token_id: -100}
    )
    for prompt in PROMPTS[:4]:
        ours = tiny_backend.generate([prompt], params)[0]
        theirs = plain_generate_ids(tiny_backend, prompt, 10)
        assert ours.text == tiny_backend.tokenizer.decode(theirs, skip_special_tokens=True)


def test_seeded_sampling_is_reproducible_and_batch_independent(tiny_backend):
    params = SamplingParams(temperature=1.0, top_p=0.9, max_tokens=12, seed=7)
    a = tiny_backend.generate(PROMPTS, params)
    b = with_batch(tiny_backend, 3).generate(PROMPTS, params)
    assert a == b
    other = tiny_backend.generate(PROMPTS, params.model_copy(update={"seed": 8}))
    assert other != a


def test_explicit_row_seeds_follow_the_row(tiny_backend):
    params = SamplingParams(temperature=1.0, max_tokens=8)
    seeds = list(range(100, 100 + len(PROMPTS)))
    full = tiny_backend.generate(PROMPTS, params, seeds)
    part = tiny_backend.generate(PROMPTS[3:], params, seeds[3:])
    assert part == full[3:]


def test_logit_bias_bans_a_token(tiny_backend):
    greedy = tiny_backend.generate(PROMPTS, SamplingParams(temperature=0, max_tokens=16))
    # ban the token greedy decoding picks first for the first prompt
    first = tiny_backend.tokenizer(greedy[0].text, add_special_tokens=False)["input_ids"][0]
    banned = SamplingParams(temperature=1.0, max_tokens=16, seed=1, logit_bias={first: -100})
    for c in tiny_backend.generate(PROMPTS, banned):
        assert first not in tiny_backend.tokenizer(c.text, add_special_tokens=False)["input_ids"]


def test_positive_logit_bias_forces_a_token(tiny_backend):
    token = tiny_backend.tokenizer.convert_tokens_to_ids("Ġthe")
    out = tiny_backend.generate(
        PROMPTS[:2], SamplingParams(temperature=0, max_tokens=5, logit_bias={token: 100})
    )
    assert all(c.text == " the" * 5 for c in out)


def test_logit_bias_outside_vocabulary_is_refused(tiny_backend):
    with pytest.raises(UserError, match="outside the vocabulary"):
        tiny_backend.generate(["x"], SamplingParams(logit_bias={10**7: 1.0}))


def test_stop_strings_cut_the_completion_in_the_step_that_completes_them(tiny_backend):
    tok = tiny_backend.tokenizer
    greedy = tiny_backend.generate(PROMPTS, SamplingParams(temperature=0, max_tokens=24))
    stop = greedy[0].text[6:9]  # a string greedy decoding is known to produce
    assert stop.strip()
    out = tiny_backend.generate(PROMPTS, SamplingParams(temperature=0, max_tokens=24, stop=[stop]))
    stopped = 0
    for prompt, full, cut in zip(PROMPTS, greedy, out, strict=True):
        assert stop not in cut.text
        if stop not in full.text:
            assert cut == full
            continue
        stopped += 1
        assert cut.finish_reason == "stop"
        assert cut.text == full.text[: full.text.index(stop)]
        ids = plain_generate_ids(tiny_backend, prompt, 24)
        first_step = next(
            k for k in range(1, 25) if stop in tok.decode(ids[:k], skip_special_tokens=True)
        )
        assert cut.completion_tokens == first_step
    assert stopped >= 1


def test_completion_tokens_never_exceed_max_tokens(tiny_backend):
    for max_tokens in (1, 5, 17):
        for c in tiny_backend.generate(
            PROMPTS, SamplingParams(temperature=1.0, seed=0, max_tokens=max_tokens)
        ):
            assert c.completion_tokens <= max_tokens
            if c.finish_reason == "length":
                assert c.completion_tokens == max_tokens


def test_eos_ends_a_row_with_stop(tiny_backend):
    eos = tiny_backend.tokenizer.eos_token_id
    out = tiny_backend.generate(
        PROMPTS[:3], SamplingParams(temperature=0, max_tokens=10, logit_bias={eos: 100})
    )
    assert all(c.finish_reason == "stop" and c.text == "" and c.completion_tokens == 1 for c in out)


def test_ngram_penalty_breaks_repetition(tiny_backend):
    token = tiny_backend.tokenizer.convert_tokens_to_ids("Ġthe")
    # a bias of 5 makes " the" win every step; a unigram penalty of 3 per occurrence stops that
    params = SamplingParams(temperature=0, max_tokens=8, logit_bias={token: 30})
    assert tiny_backend.generate(["x"], params)[0].text == " the" * 8
    penalised = tiny_backend.generate(
        ["x"], params.model_copy(update={"ngram_penalties": {1: 40.0}})
    )[0]
    ids = tiny_backend.tokenizer(penalised.text, add_special_tokens=False)["input_ids"]
    assert ids.count(token) <= 2


def test_prompt_too_long_is_an_error_naming_it(tiny_backend):
    long = "word " * 3000
    with pytest.raises(UserError, match=r"prompt #1 has \d+ tokens"):
        tiny_backend.generate(["short", long], SamplingParams(max_tokens=8))


def test_left_truncation_keeps_the_end_of_the_prompt(tiny_backend):
    question = " What is the capital of France?"
    long = "word " * 3000 + question
    params = SamplingParams(temperature=0, max_tokens=8, truncate_prompt="left")
    out = tiny_backend.generate([long], params)[0]
    assert out.prompt_tokens == tiny_backend.context - 8
    tok = tiny_backend.tokenizer
    kept = tiny_backend.encode([long], params)[0]
    assert kept[0] == tok.bos_token_id
    assert tok.decode(kept, skip_special_tokens=True).endswith(question)


def test_shared_prefix_is_detected_and_exact(tiny_backend):
    prefix = "Consider the following principles carefully. " * 20
    prompts = [prefix + p for p in PROMPTS]
    shared = with_batch(tiny_backend, 4)
    got = shared.generate(prompts, GREEDY)
    assert shared.last_shared_prefix >= 100
    plain = with_batch(tiny_backend, 4, share_prefix=False).generate(prompts, GREEDY)
    assert got == plain


def test_unsupported_model_path_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="no such directory"):
        TransformersBackend.load(str(tmp_path / "missing"))


def test_empty_job_returns_nothing(tiny_backend):
    assert tiny_backend.generate([], GREEDY) == []


# -- every control at once, and the effect of each --------------------------------------------------

NGRAM = {2: 40.0, 3: 1.0, 4: 2.0}


def lone_ascii_tokens(tokenizer) -> dict[int, str]:
    """Single-byte ASCII tokens whose character no other token contains: that character is in a
    decoded text exactly when the token was generated (byte-level decoding keeps ASCII as is)."""
    special = set(tokenizer.all_special_ids)
    texts = {i: tokenizer.decode([i]) for i in range(len(tokenizer)) if i not in special}
    return {
        i: t
        for i, t in texts.items()
        if len(t) == 1 and ord(t) < 128 and not any(t in o for j, o in texts.items() if j != i)
    }


def ascii_window(text: str, width: int = 3) -> str:
    """The first `width` printable ASCII characters in a row (not all blank) of `text`."""
    for i in range(len(text) - width + 1):
        window = text[i : i + width]
        if all(32 <= ord(ch) < 127 for ch in window) and window.strip():
            return window
    raise AssertionError(f"no printable ASCII window in {text!r}")


def adjacent_repeats(text: str, piece: str = " the") -> int:
    """How many times `piece` directly follows itself in `text` (overlapping: 3 in a row is 2)."""
    return len(re.findall(f"(?={re.escape(piece * 2)})", text))


def check_every_control(backend, prompts: list[str]) -> None:
    """Sampling with every control set at once (seeded, so reproducible), and each control's
    effect against the same run without it: a logit bias of -100 bans a token the run produced,
    a stop string cuts the text where it first appears, the n-gram penalty stops a forced
    repetition, and max_tokens bounds every completion."""
    tok = backend.tokenizer
    sampled = SamplingParams(
        temperature=0.7, top_p=0.9, max_tokens=24, seed=3, ngram_penalties=NGRAM
    )

    # logit bias: ban a token the run without the ban produces (and EOS, so rows run to the limit)
    free = backend.generate(prompts, sampled)
    seen = {i: sum(c.text.count(ch) for c in free) for i, ch in lone_ascii_tokens(tok).items()}
    banned = max(seen, key=seen.get)
    assert seen[banned] > 0, "the run without a ban produced none of the lone ASCII tokens"
    biased = sampled.model_copy(update={"logit_bias": {banned: -100, tok.eos_token_id: -100}})

    # stop: cut exactly where the stop string first appears in the same row generated without it
    # (one row per call, so the rows around it cannot change its arithmetic)
    full = backend.generate(prompts[:1], biased)[0]
    assert full.finish_reason == "length" and full.completion_tokens == 24  # EOS banned
    stop = ascii_window(full.text[4:])
    every = biased.model_copy(update={"stop": [stop]})
    cut = backend.generate(prompts[:1], every)[0]
    assert cut.finish_reason == "stop" and cut.text == full.text[: full.text.index(stop)]
    assert cut.completion_tokens < full.completion_tokens

    # all at once, batched: reproducible, the banned token and the stop string never appear,
    # max_tokens bounds every row (and ends the rows the stop string did not end)
    out = backend.generate(prompts, every)
    assert backend.generate(prompts, every) == out
    for c in out:
        assert tok.decode([banned]) not in c.text and stop not in c.text
        assert 0 < c.completion_tokens <= 24
        assert c.finish_reason == "stop" or c.completion_tokens == 24
    assert any(c.finish_reason == "length" for c in out)

    # n-gram penalty: a token pushed to win every step repeats without it, and not with it
    the = tok.convert_tokens_to_ids("Ġthe")
    pushed = sampled.model_copy(update={"logit_bias": {the: 30}, "ngram_penalties": {}})
    assert backend.generate(prompts[:1], pushed)[0].text == " the" * 24
    penalised = backend.generate(prompts[:1], pushed.model_copy(update={"ngram_penalties": NGRAM}))
    assert adjacent_repeats(penalised[0].text) <= 1  # the bigram (the, the) at most once


def test_every_control_at_once_and_the_effect_of_each(tiny_backend):
    prefix = "Consider the following principles carefully before you answer. " * 30
    check_every_control(tiny_backend, [prefix + p for p in PROMPTS[1:6]])
