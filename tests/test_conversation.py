"""The conversation format: system prompts, the chat template, the assistant mask, SFT rows."""

from __future__ import annotations

from pathlib import Path

import pytest

from selfalign.errors import UserError
from selfalign.text.constitution import Identity
from selfalign.text.conversation import (
    ASSISTANT_HEADER,
    USER_HEADER,
    check_sft_row,
    choose_variant,
    install_chat_template,
    prompt_messages,
    render_prompt,
    sft_messages,
    system_prompt,
    user_text,
)

IDENTITY = Identity(name="Quokka", developer="the Lab", knowledge_cutoff="2024-01")


@pytest.fixture()
def tokenizer(tiny_model_dir):
    from selfalign.modeling import load_tokenizer

    tok = load_tokenizer(str(tiny_model_dir))
    install_chat_template(tok, IDENTITY)
    return tok


def test_system_prompts_name_the_identity_and_no_principles():
    for variant in ("standard", "concise"):
        text = system_prompt(IDENTITY, variant)
        assert "Quokka" in text and "the Lab" in text and "January 2024" in text
        assert len(text.split()) < 40  # short: the principles are engraved, not prompted
    with pytest.raises(UserError, match="variant 'verbose'"):
        system_prompt(IDENTITY, "verbose")


def test_variant_choice_is_seeded_per_id_and_uses_every_variant():
    variants = ["standard", "concise"]
    picks = [choose_variant(variants, 7, f"r{i}") for i in range(50)]
    assert picks == [choose_variant(variants, 7, f"r{i}") for i in range(50)]
    assert set(picks) == set(variants)
    assert picks != [choose_variant(variants, 8, f"r{i}") for i in range(50)]


def test_rendered_text_is_exactly_the_documented_format(tokenizer):
    messages = [
        {"role": "system", "content": "SYS"},
        {"role": "user", "content": "Hi?"},
        {"role": "assistant", "content": "Hello."},
        {"role": "user", "content": "Bye?"},
        {"role": "assistant", "content": "Bye."},
    ]
    text = tokenizer.apply_chat_template(messages, tokenize=False)
    assert text == (
        "<s>SYS" + USER_HEADER + "Hi?" + ASSISTANT_HEADER + "Hello.</s>"
        + USER_HEADER + "Bye?" + ASSISTANT_HEADER + "Bye.</s>"
    )  # fmt: skip
    prompt = tokenizer.apply_chat_template(messages[:2], tokenize=False, add_generation_prompt=True)
    assert prompt == "<s>SYS" + USER_HEADER + "Hi?" + ASSISTANT_HEADER


def test_missing_system_message_gets_the_standard_prompt(tokenizer):
    text = tokenizer.apply_chat_template([{"role": "user", "content": "Hi?"}], tokenize=False)
    assert text == "<s>" + system_prompt(IDENTITY, "standard") + USER_HEADER + "Hi?"


def test_identity_with_template_syntax_stays_literal(tiny_model_dir):
    from selfalign.modeling import load_tokenizer

    tok = load_tokenizer(str(tiny_model_dir))
    odd = Identity(name="{{ evil }} {% if %}", developer="\"quotes\" \\ and 'more'")
    install_chat_template(tok, odd)
    text = tok.apply_chat_template([{"role": "user", "content": "x"}], tokenize=False)
    assert system_prompt(odd) in text


def test_unknown_role_is_an_error(tokenizer):
    with pytest.raises(Exception, match="unsupported role tool"):
        tokenizer.apply_chat_template([{"role": "tool", "content": "x"}], tokenize=False)


def expected_mask(tokenizer, text: str, ids: list[int]) -> list[int]:
    """1 for every token inside an assistant reply or its EOS, found by string search."""
    spans, start = [], 0
    while (at := text.find(ASSISTANT_HEADER, start)) >= 0:
        begin = at + len(ASSISTANT_HEADER)
        end = text.index(tokenizer.eos_token, begin) + len(tokenizer.eos_token)
        spans.append((begin, end))
        start = end
    offsets = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)[
        "offset_mapping"
    ]
    assert len(offsets) == len(ids)
    return [int(any(b < e2 and e > b2 for b2, e2 in spans)) for b, e in offsets]


def test_assistant_mask_is_exactly_the_answers_and_their_eos(tokenizer):
    messages = sft_messages(
        {
            "id": "m",
            "messages": [
                {"role": "user", "content": "What is 2+2? Explain."},
                {"role": "assistant", "content": "It is 4: two and two make four."},
                {"role": "user", "content": "And 3+3?"},
                {"role": "assistant", "content": "6.\n\nSix, that is."},
            ],
        },
        IDENTITY,
        ["standard"],
        0,
    )
    out = tokenizer.apply_chat_template(
        messages, return_dict=True, return_assistant_tokens_mask=True
    )
    ids, mask = out["input_ids"], out["assistant_masks"]
    text = tokenizer.apply_chat_template(messages, tokenize=False)
    assert mask == expected_mask(tokenizer, text, ids)
    masked = [tokenizer.decode([i]) for i, m in zip(ids, mask, strict=True) if m]
    assert masked.count(tokenizer.eos_token) == 2
    assert tokenizer.decode([i for i, m in zip(ids, mask, strict=True) if m]) == (
        "It is 4: two and two make four.</s>6.\n\nSix, that is.</s>"
    )


def test_saved_template_round_trips(tokenizer, tmp_path):
    from transformers import AutoTokenizer

    tokenizer.save_pretrained(tmp_path)
    assert (tmp_path / "chat_template.jinja").is_file()
    reloaded = AutoTokenizer.from_pretrained(tmp_path)
    messages = sft_messages(
        {"id": 1, "instruction": "Name a colour.", "output": "Blue."}, IDENTITY, ["concise"], 0
    )
    assert reloaded.apply_chat_template(messages, tokenize=False) == tokenizer.apply_chat_template(
        messages, tokenize=False
    )


def test_render_prompt_tokenizes_like_the_template(tokenizer):
    """A text backend adds BOS itself: the prompt text must not carry a second one."""
    messages = prompt_messages(None, "Tell me a joke.")
    text = render_prompt(tokenizer, messages)
    assert not text.startswith("<s>")
    backend_ids = tokenizer(text, add_special_tokens=True)["input_ids"]
    template_ids = tokenizer.apply_chat_template(
        messages, add_generation_prompt=True, return_dict=True
    )["input_ids"]
    assert backend_ids == template_ids


def test_render_prompt_without_template_is_a_user_error(tiny_model_dir):
    from selfalign.modeling import load_tokenizer

    with pytest.raises(UserError, match="no chat template"):
        render_prompt(load_tokenizer(str(tiny_model_dir)), prompt_messages(None, "x"))


def test_sft_row_to_messages():
    row = {
        "id": "a",
        "instruction": " Summarise this. ",
        "input": "Long text.",
        "output": " Short. ",
    }
    messages = sft_messages(row, IDENTITY, ["standard", "concise"], 3)
    assert messages[0]["role"] == "system"
    assert messages[0]["content"] == system_prompt(
        IDENTITY, choose_variant(["standard", "concise"], 3, "a")
    )
    assert messages[1:] == [
        {"role": "user", "content": "Summarise this.\n\nLong text."},
        {"role": "assistant", "content": "Short."},
    ]
    assert user_text("Q", "") == "Q"
    own = sft_messages(
        {"id": 1, "messages": [{"role": "system", "content": "S"}, *messages[1:]]},
        IDENTITY,
        ["standard"],
        0,
    )
    assert own[0] == {"role": "system", "content": "S"}


@pytest.mark.parametrize(
    ("row", "message"),
    [
        ({"instruction": "q", "output": "a"}, "missing field 'id'"),
        ({"id": 1, "instruction": "q"}, "missing field 'output'"),
        ({"id": 1, "output": "a"}, "missing field 'instruction'"),
        ({"id": 1, "instruction": "  ", "output": "a"}, "'instruction' must be a non-empty string"),
        ({"id": 1, "instruction": "q", "output": "a", "input": 3}, "'input' must be a string"),
        ({"id": 1, "messages": [{"role": "user", "content": "q"}]}, "no assistant turn"),
        ({"id": 1, "messages": [{"role": "bot", "content": "q"}]}, "role 'bot'"),
    ],
)
def test_bad_sft_rows_name_the_problem(row, message):
    with pytest.raises(UserError, match=message):
        check_sft_row(row, "sft.jsonl: record 1")


# -- system prompts from files or text; ShareGPT rows -------------------------------------------

REF = Path(__file__).resolve().parents[2] / "shared/reference/dromedary-v1"


def test_system_prompt_from_a_file_or_text(tmp_path):
    from selfalign.text.conversation import check_variants

    (tmp_path / "mine.txt").write_text(
        "# {name}\n\nMade by {developer}; code: {x: 1}.\n\n### User\n"
    )
    assert system_prompt(IDENTITY, str(tmp_path / "mine.txt")) == (
        "# Quokka\n\nMade by the Lab; code: {x: 1}."  # trailing user label dropped
    )
    assert system_prompt(IDENTITY, "You are {name}, be brief.") == "You are Quokka, be brief."
    with pytest.raises(UserError, match="missing.txt: file not found"):
        check_variants(["standard", str(tmp_path / "missing.txt")])
    with pytest.raises(UserError, match="choose from standard, concise, or give a prompt file"):
        check_variants(["standrad"])


def test_template_default_is_the_first_system_prompt(tiny_model_dir):
    from selfalign.modeling import load_tokenizer

    tok = load_tokenizer(str(tiny_model_dir))
    install_chat_template(tok, IDENTITY, system_prompt(IDENTITY, "concise"))
    text = tok.apply_chat_template([{"role": "user", "content": "Hi?"}], tokenize=False)
    assert text == "<s>" + system_prompt(IDENTITY, "concise") + USER_HEADER + "Hi?"


@pytest.mark.skipif(not REF.is_dir(), reason="reference files not available")
def test_original_distill_prompts_load_as_system_prompts(tokenizer):
    for name in ("standard", "concise"):
        path = REF / f"prompts/inference_prompts/dromedary_{name}_prompt_distill.txt"
        text = system_prompt(IDENTITY, str(path))
        assert text.startswith("# Dromedary") and not text.endswith("User")
        messages = [{"role": "system", "content": text}, {"role": "user", "content": "Hi"}]
        rendered = tokenizer.apply_chat_template(messages, tokenize=False)
        assert rendered.endswith(text + USER_HEADER + "Hi")


def test_sharegpt_rows():
    from selfalign.text.conversation import sharegpt_messages

    row = {"id": "identity_0", "conversations": [
        {"from": "human", "value": "Who are you?"}, {"from": "gpt", "value": " I am Quokka. "},
        {"from": "human", "value": "What can you do?"}, {"from": "gpt", "value": "Chat."}]}  # fmt: skip
    check_sft_row(row, "f")
    messages = sft_messages(row, IDENTITY, ["standard"], 0)
    assert [m["role"] for m in messages] == ["system", "user", "assistant", "user", "assistant"]
    assert messages[2]["content"] == "I am Quokka."
    with pytest.raises(UserError, match=r"conversations\[0\] is from 'narrator'"):
        sharegpt_messages([{"from": "narrator", "value": "x"}], "f")
    with pytest.raises(UserError, match="no assistant turn"):
        check_sft_row({"id": 1, "conversations": [{"from": "human", "value": "q"}]}, "f")
