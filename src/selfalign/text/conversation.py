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
message gets the first configured system prompt (the standard one by default), baked into the
template.

A system prompt is given as a variant name (`standard`, `concise`), a prompt file (`.txt`, `.md`:
e.g. the original Dromedary "prompt distill" files; a trailing `### User` label is dropped, the
template writes it), or the text itself. A prompt that writes example turns of its own has its
labels read from its text (`prompt_labels`): the original verbose prompt's `### Dromedary
(extensive)` then replaces the template's `### Assistant` where the answer starts.

SFT rows are `{id, instruction, input, output}`, `{id, messages: [{role, content}]}`, or
ShareGPT `{id, conversations: [{from, value}]}` (the format of the original identity data).
"""

from __future__ import annotations

import functools
import random
import re
from pathlib import Path
from typing import Any, NamedTuple

from selfalign.errors import UserError
from selfalign.generation import row_seed
from selfalign.text.constitution import Identity, fill_identity, user_text

USER_HEADER = "\n\n### User\n"
ASSISTANT_HEADER = "\n\n### Assistant\n"
# The template's turn labels, each on a line of its own: never part of an answer.
TEMPLATE_LABELS = (USER_HEADER.strip(), ASSISTANT_HEADER.strip())
# A model that writes the next turn header instead of EOS is cut there when generating.
TURN_STOPS = tuple(f"\n{label}" for label in TEMPLATE_LABELS)

# Short system prompts (no principles: those are meant to be engraved in the weights).
SYSTEM_PROMPTS = {
    "standard": (
        "You are {name}, an AI assistant developed by {developer}. Your knowledge extends to "
        "{knowledge_cutoff}. Answer the user helpfully, honestly and harmlessly."
    ),
    "concise": "{name} is an AI assistant made by {developer} (knowledge up to {knowledge_cutoff}).",
}
DEFAULT_VARIANT = "standard"


PROMPT_FILE_SUFFIXES = (".txt", ".md")
# the user label a raw prompt file ends with (the template writes its own)
TRAILING_USER_LABEL = re.compile(r"\s*(?:#+\s*User|User:)\s*$")
# a prompt file ending in a markdown user label ("### User") writes its turn labels at that level
_TRAILING_MARKDOWN_USER = re.compile(r"(?:^|\n)[ \t]*(#+)[ \t]*User[ \t]*\Z")


def prompt_text(spec: str, identity: Identity, named: dict[str, str], what: str) -> str:
    """A prompt given as a name in `named`, a prompt file, or the text itself; identity filled.

    A spec that looks like a path (a known suffix or a '/') must be a file, so a mistyped path is
    an error rather than a system prompt that reads like a path. A file's trailing user label
    is dropped (the chat template writes its own).
    """
    text = _raw_prompt(spec, named, what)
    if _is_file_spec(spec.strip()) and spec.strip() not in named:
        text = TRAILING_USER_LABEL.sub("", text).strip()
        if not text:
            raise UserError(f"{what} {spec.strip()}: the file is empty")
    return fill_identity(text, identity)


def _is_file_spec(spec: str) -> bool:
    return spec.endswith(PROMPT_FILE_SUFFIXES) or "/" in spec


def _raw_prompt(spec: str, named: dict[str, str], what: str) -> str:
    """The text `spec` names, as written: a name in `named`, a prompt file, or the text itself."""
    spec = spec.strip()
    if spec in named:
        return named[spec]
    if _is_file_spec(spec):
        return _read_prompt_file(spec, what)
    if " " in spec:
        return spec
    raise UserError(
        f"{what} variant {spec!r}: choose from {', '.join(named)}, "
        "or give a prompt file (.txt/.md) or the prompt text itself"
    )


@functools.lru_cache(maxsize=32)
def _read_prompt_file(spec: str, what: str) -> str:
    path = Path(spec).expanduser()
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UserError(f"{what} {spec}: file not found") from None
    except (IsADirectoryError, UnicodeDecodeError) as e:
        raise UserError(f"{what} {spec}: cannot read it as text ({type(e).__name__})") from None


class PromptLabels(NamedTuple):
    """The turn labels a prompt writes itself (e.g. the original verbose prompt's example turn)."""

    labels: tuple[str, ...] = ()  # every label, each a line of its own: '### User', ...
    answer: str | None = None  # the label of the assistant's turn: generation goes after it


def prompt_labels(spec: str, identity: Identity, named: dict[str, str], what: str) -> PromptLabels:
    """The turn labels of the prompt `spec` (see `prompt_text`), read from its text: a prompt
    ending in a markdown user label ('### User') labels its turns at that heading level, and the
    last other label before the end is the assistant's ('### Dromedary (extensive)'). A prompt
    ending otherwise writes no turns of its own: ()."""
    text = fill_identity(_raw_prompt(spec, named, what), identity).rstrip()
    end = _TRAILING_MARKDOWN_USER.search(text)
    if end is None:
        return PromptLabels()
    level = re.escape(end.group(1))
    lines = rf"^[ \t]*({level}[ \t]+\S[^\n]*?)[ \t]*$"
    found = [re.sub(r"[ \t]+", " ", m) for m in re.findall(lines, text, re.MULTILINE)]
    answers = [label for label in found if label != found[-1]]  # found[-1]: the user's
    return PromptLabels(tuple(dict.fromkeys(found)), answers[-1] if answers else None)


def system_prompt(identity: Identity, variant: str = DEFAULT_VARIANT) -> str:
    """The system prompt `variant` (a name, a prompt file or text) with the assistant's identity."""
    return prompt_text(variant, identity, SYSTEM_PROMPTS, "system prompt")


def check_variants(variants: list[str]) -> None:
    """Every system prompt spec resolves (files exist, names are known), or a UserError."""
    if not variants:
        raise UserError("system_prompts: give at least one variant (e.g. standard)")
    for v in variants:
        system_prompt(Identity(), v)


def choose_variant(variants: list[str], seed: int, key: str | int) -> str:
    """The variant for one example: seeded by (seed, id), so it never depends on data order."""
    return random.Random(row_seed(seed, f"system:{key}")).choice(variants)


def chat_template(identity: Identity, default_system: str | None = None) -> str:
    """The Jinja chat template for this assistant; a conversation without a system message gets
    `default_system` (default: the standard system prompt)."""
    if default_system is None:
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


def install_chat_template(tokenizer, identity: Identity, default_system: str | None = None) -> None:
    """Give `tokenizer` our template (replacing any other) and make sure it can end a turn."""
    if tokenizer.eos_token is None:
        raise UserError("the tokenizer has no EOS token, so the model could not learn to stop")
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.chat_template = chat_template(identity, default_system)


def check_sft_row(row: dict[str, Any], where: str) -> None:
    """A row has an id and `messages`, ShareGPT `conversations`, or a non-empty instruction and
    output."""
    if row.get("id") is None:
        raise UserError(f"{where}: missing field 'id'")
    if "messages" in row:
        _check_messages(row["messages"], where)
        return
    if "conversations" in row:
        _check_messages(sharegpt_messages(row["conversations"], where), where)
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


# THE ShareGPT speaker table (`from` -> chat role), for every reader of ShareGPT data: the
# spellings found in ShareGPT, FastChat and their exports, matched without regard to case.
SHAREGPT_ROLES = {
    "human": "user", "user": "user",
    "gpt": "assistant", "assistant": "assistant", "bot": "assistant", "chatgpt": "assistant",
    "model": "assistant",
    "system": "system",
}  # fmt: skip


def sharegpt_messages(conversations: Any, where: str = "record") -> list[dict[str, str]]:
    """ShareGPT turns (`{from, value}`, `from` a key of SHAREGPT_ROLES) as chat messages; a bad
    turn is a UserError naming `where` (file and record) and the turn."""
    if not isinstance(conversations, list) or not conversations:
        raise UserError(
            f"{where}: field 'conversations' must be a non-empty list of {{from, value}}"
        )
    messages = []
    for n, turn in enumerate(conversations):
        if not isinstance(turn, dict) or not isinstance(turn.get("value"), str):
            raise UserError(f"{where}: conversations[{n}] needs a string 'value'")
        role = SHAREGPT_ROLES.get(str(turn.get("from", "")).lower())
        if role is None:
            raise UserError(
                f"{where}: conversations[{n}] is from {turn.get('from')!r}; use one of "
                f"{', '.join(SHAREGPT_ROLES)}"
            )
        messages.append({"role": role, "content": turn["value"]})
    return messages


def sft_messages(
    row: dict[str, Any], identity: Identity, variants: list[str], seed: int
) -> list[dict[str, str]]:
    """An SFT row as chat messages with a seeded system prompt variant.

    Rows are `{id, instruction, input, output, ...}` (stage 2 and 4 outputs), `{id, messages}` or
    `{id, conversations}` (multi-turn); a system message already in the row is kept.
    """
    if "messages" in row or "conversations" in row:
        given = row["messages"] if "messages" in row else sharegpt_messages(row["conversations"])
        turns = [{"role": m["role"], "content": m["content"].strip()} for m in given]
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


def render_prompt(
    tokenizer, messages: list[dict[str, str]], answer_label: str | None = None
) -> str:
    """The chat-template text that asks for the next assistant turn, for a text-in backend.

    Backends tokenize prompts with the tokenizer's special tokens (it adds BOS itself), so a BOS
    the template wrote is dropped here: the token ids equal `apply_chat_template(tokenize=True)`.
    `answer_label` (a prompt's own assistant label, e.g. '### Dromedary (extensive)') replaces
    the template's '### Assistant' where the answer starts, so the model answers in that mode.
    """
    if not tokenizer.chat_template:
        raise UserError(
            "this model's tokenizer has no chat template; use a model trained by `selfalign engrave`"
        )
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    bos = tokenizer.bos_token
    if bos and text.startswith(bos) and _adds_bos(tokenizer):
        text = text[len(bos) :]
    if answer_label is not None:
        if not text.endswith(ASSISTANT_HEADER):
            raise UserError(
                f"the model's chat template does not end a prompt with {ASSISTANT_HEADER.strip()!r}, "
                f"so the prompt's own label {answer_label!r} cannot take its place; use a model "
                "trained by `selfalign engrave`, or a prompt that does not end in '### User'"
            )
        text = text[: -len(ASSISTANT_HEADER)] + f"\n\n{answer_label}\n"
    return text


def _adds_bos(tokenizer) -> bool:
    ids = tokenizer("x", add_special_tokens=True)["input_ids"]
    return bool(ids) and ids[0] == tokenizer.bos_token_id
