"""Talking to a trained model: `selfalign chat MODEL` and `selfalign answer MODEL`.

`chat` is an interactive, multi-turn conversation that streams the answer as it is generated;
`/reset` starts over, `/exit` (or end of input) leaves. `answer` answers every question of a JSONL
file in batches, with resume (`selfalign.generation.records.generate_records`): a rerun whose
prompts (system prompt, chat template, questions) or sampling differ from the records already in
the output is refused.

Both render prompts with the model's own chat template (the one `selfalign engrave` saved in the
tokenizer), so the model sees exactly the format it was trained on. MODEL is a merged model
directory or a LoRA adapter directory (loaded onto its base), or any model with a chat template.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from selfalign.errors import UserError
from selfalign.generation import Backend, SamplingParams
from selfalign.generation.records import check_records, generate_records
from selfalign.jsonl import read_jsonl, write_jsonl_atomic
from selfalign.text.conversation import TURN_STOPS, render_prompt, user_text

HELP = "Type a message. /reset forgets the conversation, /exit leaves."


class ChatSettings(BaseModel):
    """How `selfalign chat` samples its answers."""

    model_config = ConfigDict(extra="forbid")

    system: str | None = Field(None, description="System prompt; None uses the model's default.")
    temperature: float = Field(0.7, ge=0, description="0 means greedy.")
    top_p: float = Field(0.9, gt=0, le=1, description="Nucleus sampling mass.")
    max_new_tokens: int = Field(512, ge=1, description="Tokens per answer at most.")
    seed: int | None = Field(None, description="Makes sampled answers reproducible.")


# -- chat ----------------------------------------------------------------------------------------


def stream_reply(
    model, tokenizer, messages: list[dict[str, str]], settings: ChatSettings, write
) -> str:
    """Generate the next assistant turn, writing text pieces as they come; return the reply."""
    import torch
    from transformers import TextIteratorStreamer

    ids = tokenizer.apply_chat_template(
        messages, add_generation_prompt=True, return_tensors="pt", return_dict=True
    ).to(model.device)
    streamer = TextIteratorStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
    sampling = (
        {"do_sample": True, "temperature": settings.temperature, "top_p": settings.top_p}
        if settings.temperature > 0
        else {"do_sample": False}
    )
    if settings.seed is not None:
        torch.manual_seed(settings.seed)
    kwargs = dict(
        **ids,
        **sampling,
        max_new_tokens=settings.max_new_tokens,
        streamer=streamer,
        stop_strings=list(TURN_STOPS),
        tokenizer=tokenizer,
        pad_token_id=tokenizer.pad_token_id,
    )
    failure: list[BaseException] = []

    def generate() -> None:
        try:
            with torch.no_grad():
                model.generate(**kwargs)
        except BaseException as e:  # surfaced below, in the caller's thread
            failure.append(e)
            streamer.end()

    worker = threading.Thread(target=generate, daemon=True)
    worker.start()
    pieces = []
    for text in visible_text(streamer):
        write(text)
        pieces.append(text)
    # no draining: the streamer's queue is unbounded and generation ends at the marker by itself
    # (iterating an exhausted streamer again would wait forever for another end signal)
    worker.join()
    if failure:
        raise failure[0]
    return "".join(pieces).strip()


def visible_text(pieces: Iterable[str], stops: Sequence[str] = TURN_STOPS) -> Iterator[str]:
    """Streamed text as it may be shown: text that could begin a turn marker is held back until
    it cannot, and the stream ends at a marker (the marker itself is never shown)."""
    held, keep = "", max(len(s) for s in stops) - 1
    for piece in pieces:
        held += piece
        cut = min((i for s in stops if (i := held.find(s)) >= 0), default=-1)
        if cut >= 0:
            if cut:
                yield held[:cut]
            return
        if len(held) > keep:
            yield held[: len(held) - keep]
            held = held[len(held) - keep :]
    if held:
        yield held


def fit_history(tokenizer, messages: list[dict[str, str]], budget: int) -> list[dict[str, str]]:
    """Drop the oldest exchanges until the prompt fits `budget` tokens (the system turn stays)."""
    system = messages[:1] if messages and messages[0]["role"] == "system" else []
    turns = messages[len(system) :]
    while True:
        text = tokenizer.apply_chat_template(
            system + turns, add_generation_prompt=True, tokenize=False
        )
        if len(tokenizer(text, add_special_tokens=False)["input_ids"]) <= budget or len(turns) <= 1:
            return system + turns
        turns = turns[2:]  # one user + assistant exchange


def chat_loop(
    model,
    tokenizer,
    settings: ChatSettings,
    read: Callable[[str], str] = input,
    write: Callable[[str], None] | None = None,
) -> list[dict[str, str]]:
    """Run the conversation until /exit or end of input; return the last conversation."""
    from selfalign.modeling import context_length

    if write is None:

        def write(text: str) -> None:
            print(text, end="", flush=True)

    if not tokenizer.chat_template:
        raise UserError(
            "this model has no chat template; chat with a model made by `selfalign engrave`"
        )
    budget = context_length(model) - settings.max_new_tokens
    start = [{"role": "system", "content": settings.system}] if settings.system else []
    messages = list(start)
    write(HELP + "\n")
    while True:
        try:
            line = read("\n> ")
        except EOFError:
            write("\n")
            return messages
        text = line.strip()
        if text in ("/exit", "/quit"):
            return messages
        if text == "/reset":
            messages = list(start)
            write("(conversation reset)\n")
            continue
        if not text:
            continue
        candidate = fit_history(tokenizer, [*messages, {"role": "user", "content": text}], budget)
        if len(candidate) < len(messages) + 1:
            write("(older turns dropped to fit the context)\n")
        reply = stream_reply(model, tokenizer, candidate, settings, write)
        write("\n")
        messages = [*candidate, {"role": "assistant", "content": reply}]


def run_chat(
    model_path: str,
    settings: ChatSettings,
    device: str = "auto",
    dtype: str = "auto",
    read: Callable[[str], str] = input,
    write: Callable[[str], None] | None = None,
) -> list[dict[str, str]]:
    from selfalign.modeling import load_model

    model, tokenizer, _ = load_model(model_path, device, dtype)
    return chat_loop(model, tokenizer, settings, read, write)


# -- answer --------------------------------------------------------------------------------------


def question_messages(
    record: dict[str, Any], system: str | None, where: str
) -> list[dict[str, str]]:
    """A question record as chat messages: `messages`, or `instruction` (+ `input`), or `question`."""
    if isinstance(record.get("messages"), list) and record["messages"]:
        messages = [{"role": m["role"], "content": m["content"]} for m in record["messages"]]
        if messages[-1]["role"] != "user":
            raise UserError(f"{where}: 'messages' must end with a user turn")
    elif isinstance(record.get("instruction"), str):
        messages = [
            {"role": "user", "content": user_text(record["instruction"], record.get("input") or "")}
        ]
    elif isinstance(record.get("question"), str):
        messages = [{"role": "user", "content": record["question"].strip()}]
    elif isinstance(record.get("prompt"), str):
        messages = [{"role": "user", "content": record["prompt"].strip()}]
    else:
        raise UserError(f"{where}: needs 'messages', 'instruction', 'question' or 'prompt'")
    if system is not None and messages[0]["role"] != "system":
        messages = [{"role": "system", "content": system}, *messages]
    return messages


def run_answer(
    backend: Backend,
    tokenizer,
    input_path: str | Path,
    output_path: str | Path,
    params: SamplingParams,
    seed: int = 0,
    system: str | None = None,
) -> int:
    """Answer every record of `input_path` into `output_path` (resumable); return the count."""
    records = read_jsonl(input_path)
    if not records:
        raise UserError(f"{input_path}: no questions (the file is empty)")
    if Path(output_path).resolve() == Path(input_path).resolve():
        raise UserError(f"--output {output_path} is the input file; choose another path")
    rows = []
    for n, record in enumerate(records, start=1):
        where = f"{input_path}: record {n}"
        messages = question_messages(record, system, where)
        rows.append({**record, "chat_prompt": render_prompt(tokenizer, messages)})
    check_records(rows, str(input_path), prompt_key="chat_prompt")
    params = params.model_copy(update={"stop": list(dict.fromkeys([*params.stop, *TURN_STOPS]))})
    done = generate_records(
        backend, rows, params, output_path, seed, prompt_key="chat_prompt", label="answering",
        restart_hint=f"delete {output_path} or choose another --output",
    )  # fmt: skip
    write_jsonl_atomic(output_path, [{**r, "answer": r["completion"].strip()} for r in done])
    return len(done)
