"""The conversation format, in one place: system prompts, the chat template, SFT rows as messages.

Stage 3 (principle engraving, paper section 3.3) trains the base model WITHOUT the constitution in
the prompt: only a short system prompt saying who the assistant is. Stage 4 (verbose cloning,
section 3.4) trains the final model the same way, with several short system prompt variants
sampled per example. Everything that decides the text a model is trained on lives here, and the
same Jinja chat template is saved into the tokenizer, so `tokenizer.apply_chat_template` at
inference (transformers, `vllm serve`, any OpenAI client) produces exactly the training text.

The rendered text of one conversation is::

    <bos>{system prompt}

    ### User
    {user message}

    ### Assistant
    {assistant message}<eos>

    ### User
    ...

The assistant text and its EOS sit inside `{% generation %}` ... `{% endgeneration %}`, which is
how TRL's `assistant_only_loss` finds the tokens to train: the model learns its answers and
learns to stop, and never learns to write the user's turns. A conversation without a system
message gets the standard system prompt, baked into the template.
"""

from __future__ import annotations

import random
from typing import Any

from selfalign.backends import row_seed
from selfalign.constitution import Identity
from selfalign.errors import UserError

USER_HEADER = "\n\n### User\n"
ASSISTANT_HEADER = "\n\n### Assistant\n"
# A model that writes the next turn header instead of EOS is cut there when generating.
TURN_STOPS = ("\n### User", "\n### Assistant")

# Short system prompts (no principles: those are meant to be engraved in the weights).
SYSTEM_PROMPTS = {
    "standard": (
        "You are {name}, an AI assistant developed by {developer}. Your knowledge extends to "
        "{knowledge_cutoff}. Answer the user helpfully, honestly and harmlessly."
    ),
    "concise": "{name} is an AI assistant made by {developer} (knowledge up to {knowledge_cutoff}).",
}
DEFAULT_VARIANT = "standard"


def system_prompt(identity: Identity, variant: str = DEFAULT_VARIANT) -> str:
    """The system prompt `variant` filled in with the assistant's identity."""
    if variant not in SYSTEM_PROMPTS:
        raise UserError(
            f"system prompt variant {variant!r}: choose from {', '.join(SYSTEM_PROMPTS)}"
        )
    return SYSTEM_PROMPTS[variant].format(**identity.model_dump())


def check_variants(variants: list[str]) -> None:
    if not variants:
        raise UserError("system_prompts: give at least one variant (e.g. standard)")
    for v in variants:
        if v not in SYSTEM_PROMPTS:
            raise UserError(f"system prompt variant {v!r}: choose from {', '.join(SYSTEM_PROMPTS)}")


def choose_variant(variants: list[str], seed: int, key: str | int) -> str:
    """The variant for one example: seeded by (seed, id), so it never depends on data order."""
    return random.Random(row_seed(seed, f"system:{key}")).choice(variants)


def chat_template(identity: Identity) -> str:
    """The Jinja chat template for this assistant (its standard system prompt is the default)."""
    default_system = system_prompt(identity, DEFAULT_VARIANT)
    # {% raw %} keeps any braces in the name or developer literal.
    return (
        "{%- set default_system %}{% raw %}" + default_system + "{% endraw %}{% endset -%}\n"
        "{%- if bos_token %}{{ bos_token }}{% endif -%}\n"
        "{%- if messages and messages[0]['role'] == 'system' -%}\n"
        "{{ messages[0]['content'] }}\n"
        "{%- set turns = messages[1:] -%}\n"
        "{%- else -%}\n"
        "{{ default_system }}\n"
        "{%- set turns = messages -%}\n"
        "{%- endif -%}\n"
        "{%- for message in turns -%}\n"
        "{%- if message['role'] == 'user' -%}\n"
        "{{ " + repr(USER_HEADER) + " + message['content'] }}\n"
        "{%- elif message['role'] == 'assistant' -%}\n"
        "{{ " + repr(ASSISTANT_HEADER) + " }}\n"
        "{%- generation %}{{ message['content'] + eos_token }}{% endgeneration -%}\n"
        "{%- else -%}\n"
        "{{ raise_exception('unsupported role ' + message['role'] + ': use user and assistant "
        "turns after an optional first system message') }}\n"
        "{%- endif -%}\n"
        "{%- endfor -%}\n"
        "{%- if add_generation_prompt -%}\n"
        "{{ " + repr(ASSISTANT_HEADER) + " }}\n"
        "{%- endif -%}\n"
    )


def install_chat_template(tokenizer, identity: Identity) -> None:
    """Give `tokenizer` our template (replacing any other) and make sure it can end a turn."""
    if tokenizer.eos_token is None:
        raise UserError("the tokenizer has no EOS token, so the model could not learn to stop")
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.chat_template = chat_template(identity)


def user_text(instruction: str, input_text: str = "") -> str:
    """The user's message: the instruction, then its input (if any) after a blank line."""
    instruction, input_text = instruction.strip(), (input_text or "").strip()
    return f"{instruction}\n\n{input_text}" if input_text else instruction


SFT_FIELDS = ("id", "instruction", "output")


def check_sft_row(row: dict[str, Any], where: str) -> None:
    """A row has an id and either `messages` or a non-empty instruction and output."""
    if row.get("id") is None:
        raise UserError(f"{where}: missing field 'id'")
    if "messages" in row:
        _check_messages(row["messages"], where)
        return
    for field in ("instruction", "output"):
        if field not in row:
            raise UserError(f"{where} (id {row['id']!r}): missing field '{field}'")
        if not isinstance(row[field], str) or not row[field].strip():
            raise UserError(
                f"{where} (id {row['id']!r}): field '{field}' must be a non-empty string"
            )
    if not isinstance(row.get("input") or "", str):
        raise UserError(f"{where} (id {row['id']!r}): field 'input' must be a string")


def _check_messages(messages: Any, where: str) -> None:
    if not isinstance(messages, list) or not messages:
        raise UserError(f"{where}: field 'messages' must be a non-empty list of {{role, content}}")
    for n, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("content"), str):
            raise UserError(f"{where}: messages[{n}] needs a string 'content'")
        if m.get("role") not in ("system", "user", "assistant") or (m["role"] == "system" and n):
            raise UserError(
                f"{where}: messages[{n}] has role {m.get('role')!r}; use user/assistant turns "
                "after an optional first system message"
            )
    if not any(m["role"] == "assistant" for m in messages):
        raise UserError(f"{where}: 'messages' has no assistant turn to train on")


def sft_messages(
    row: dict[str, Any], identity: Identity, variants: list[str], seed: int
) -> list[dict[str, str]]:
    """An SFT row as chat messages with a seeded system prompt variant.

    Rows are `{id, instruction, input, output, ...}` (stage 2 and 4 outputs) or `{id, messages}`
    (multi-turn); a system message already in `messages` is kept.
    """
    if "messages" in row:
        turns = [{"role": m["role"], "content": m["content"].strip()} for m in row["messages"]]
    else:
        turns = [
            {"role": "user", "content": user_text(row["instruction"], row.get("input") or "")},
            {"role": "assistant", "content": row["output"].strip()},
        ]
    if turns[0]["role"] == "system":
        return turns
    variant = choose_variant(variants, seed, row["id"])
    return [{"role": "system", "content": system_prompt(identity, variant)}, *turns]


def prompt_messages(system: str | None, user: str) -> list[dict[str, str]]:
    """A one-question conversation awaiting the assistant's answer."""
    messages = [{"role": "system", "content": system}] if system is not None else []
    return [*messages, {"role": "user", "content": user}]


def render_prompt(tokenizer, messages: list[dict[str, str]]) -> str:
    """The chat-template text that asks for the next assistant turn, for a text-in backend.

    Backends tokenize prompts with the tokenizer's special tokens (it adds BOS itself), so a BOS
    the template wrote is dropped here: the token ids equal `apply_chat_template(tokenize=True)`.
    """
    if not tokenizer.chat_template:
        raise UserError(
            "this model's tokenizer has no chat template; use a model trained by `selfalign engrave`"
        )
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    bos = tokenizer.bos_token
    if bos and text.startswith(bos) and _adds_bos(tokenizer):
        text = text[len(bos) :]
    return text


def _adds_bos(tokenizer) -> bool:
    ids = tokenizer("x", add_special_tokens=True)["input_ids"]
    return bool(ids) and ids[0] == tokenizer.bos_token_id
