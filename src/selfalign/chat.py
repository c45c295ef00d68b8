"""Talking to a trained model: `selfalign chat MODEL` and `selfalign answer MODEL`.

`chat` is an interactive, multi-turn conversation that streams the answer as it is generated,
like `ollama run`: Ctrl-C stops an answer and the conversation goes on; slash commands (/help,
/reset, /system, /save FILE writes the conversation as JSON, /exit) are handled here and never
reach the model. At a terminal, lines are edited with readline and kept in
$XDG_CACHE_HOME/selfalign/chat_history (~/.cache/... by default), read at start, written at exit.
`answer` answers every question of a JSONL
file in batches, with resume (`selfalign.generation.records.generate_records`): a rerun whose
prompts (system prompt, chat template, questions) or sampling differ from the records already in
the output is refused.

Both render prompts with the model's own chat template (the one `selfalign engrave` saved in the
tokenizer), so the model sees exactly the format it was trained on. MODEL is a merged model
directory or a LoRA adapter directory (loaded onto its base), or any model with a chat template.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from selfalign.errors import UserError
from selfalign.generation import Backend, SamplingParams
from selfalign.generation.records import check_records, generate_records
from selfalign.jsonl import read_jsonl, write_jsonl_atomic, write_text_atomic
from selfalign.text.conversation import TURN_STOPS, render_prompt, user_text

PROMPT = "> "
HELP = "Type a message; /help lists the commands. Ctrl-C stops an answer, Ctrl-D leaves."
COMMANDS = """\
/help          this list
/reset         forget the conversation (the system prompt stays)
/system TEXT   set the system prompt and start over (/system alone shows it)
/save FILE     write the conversation and its system prompt to FILE as JSON
/exit, /quit   leave (so do Ctrl-D, and Ctrl-C twice at the prompt)
Ctrl-C while an answer streams stops it; the conversation goes on."""
EXIT_HINT = "(Ctrl-C again, Ctrl-D or /exit leaves)"


class ChatSettings(BaseModel):
    """How `selfalign chat` samples its answers."""

    model_config = ConfigDict(extra="forbid")

    system: str | None = Field(None, description="System prompt; None uses the model's default.")
    temperature: float = Field(0.7, ge=0, description="0 means greedy.")
    top_p: float = Field(0.9, gt=0, le=1, description="Nucleus sampling mass.")
    max_new_tokens: int = Field(512, ge=1, description="Tokens per answer at most.")
    seed: int | None = Field(None, description="Makes sampled answers reproducible.")


# -- chat ----------------------------------------------------------------------------------------


class StopFlag:
    """A `generate` stopping criterion that another thread sets (Ctrl-C stops the answer)."""

    def __init__(self) -> None:
        self.event = threading.Event()

    def __call__(self, input_ids, scores, **kwargs):
        import torch

        return torch.full((input_ids.shape[0],), self.event.is_set(), device=input_ids.device)


def stream_reply(
    model, tokenizer, messages: list[dict[str, str]], settings: ChatSettings, write
) -> tuple[str, bool]:
    """Generate the next assistant turn, writing text pieces as they come; return the reply (what
    was shown) and whether Ctrl-C stopped it."""
    import torch
    from transformers import StoppingCriteriaList, TextIteratorStreamer

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
    stop = StopFlag()
    kwargs = dict(
        **ids,
        **sampling,
        max_new_tokens=settings.max_new_tokens,
        streamer=streamer,
        stop_strings=list(TURN_STOPS),
        stopping_criteria=StoppingCriteriaList([stop]),
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
    pieces: list[str] = []
    stopped = False
    worker.start()
    try:
        for text in visible_text(streamer):
            pieces.append(text)  # first: a Ctrl-C while writing it still keeps what was shown
            write(text)
    except KeyboardInterrupt:  # Python delivers Ctrl-C to this thread, never to the worker
        stopped = True
    finally:
        # Ending here while generate still runs would leave a daemon thread inside torch's C++
        # code, which aborts the process at exit ("terminate called without an active
        # exception"): stop it at the next token and wait for it. No draining: the streamer's
        # queue is unbounded, and iterating it past its end would wait forever.
        stop.event.set()
        join_through_interrupts(worker)
    if failure and not stopped:
        raise failure[0]
    return "".join(pieces).strip(), stopped


def join_through_interrupts(worker: threading.Thread) -> None:
    """Wait for `worker` even if Ctrl-C is pressed again meanwhile."""
    while worker.is_alive():
        try:
            worker.join()
        except KeyboardInterrupt:
            continue


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


@dataclass
class Session:
    """One conversation: its settings (the system prompt may change) and its turns so far."""

    settings: ChatSettings
    messages: list[dict[str, str]] = field(default_factory=list)

    def reset(self) -> None:
        system = self.settings.system
        self.messages = [{"role": "system", "content": system}] if system else []


def run_command(session: Session, text: str, write: Callable[[str], None]) -> bool:
    """Carry out a slash command (never sent to the model); return True to leave."""
    name, _, arg = text.partition(" ")
    arg = arg.strip()
    if name in ("/exit", "/quit"):
        return True
    if name == "/help":
        write(COMMANDS + "\n")
    elif name == "/reset":
        session.reset()
        write("(conversation reset)\n")
    elif name == "/system" and arg:
        session.settings = session.settings.model_copy(update={"system": arg})
        session.reset()
        write("(system prompt set; conversation reset)\n")
    elif name == "/system":
        write(f"system prompt: {session.settings.system or '(the model default)'}\n")
    elif name == "/save":
        write(save_conversation(session, arg) + "\n")
    else:
        write(f"unknown command {name}; /help lists the commands\n")
    return False


def save_conversation(session: Session, path: str) -> str:
    """Write the conversation as JSON; return the line to show (a failure does not end the chat)."""
    if not path:
        return "usage: /save FILE"
    turns = [m for m in session.messages if m["role"] != "system"]
    record = {"system": session.settings.system, "messages": session.messages,
              "settings": session.settings.model_dump()}  # fmt: skip
    try:
        write_text_atomic(Path(path).expanduser(), json.dumps(record, indent=2, ensure_ascii=False))
    except OSError as e:
        return f"could not save to {path}: {e.strerror or e}"
    return f"(saved {len(turns)} turns to {path})"


def answer_turn(model, tokenizer, session: Session, text: str, budget: int, write) -> None:
    """Answer one user message, streamed. Ctrl-C keeps what was shown as the assistant's turn
    (the next question then sees what the user saw); a stop before any text forgets the question."""
    candidate = fit_history(
        tokenizer, [*session.messages, {"role": "user", "content": text}], budget
    )
    if len(candidate) < len(session.messages) + 1:
        write("(older turns dropped to fit the context)\n")
    reply, stopped = stream_reply(model, tokenizer, candidate, session.settings, write)
    write("\n(answer stopped)\n" if stopped else "\n")
    if reply or not stopped:
        session.messages = [*candidate, {"role": "assistant", "content": reply}]


def chat_loop(
    model,
    tokenizer,
    settings: ChatSettings,
    read: Callable[[str], str] = input,
    write: Callable[[str], None] | None = None,
) -> list[dict[str, str]]:
    """Run the conversation until /exit, end of input or Ctrl-C twice at the prompt; return the
    last conversation."""
    from selfalign.modeling import context_length

    write = write or _print
    if not tokenizer.chat_template:
        raise UserError(
            "this model has no chat template; chat with a model made by `selfalign engrave`"
        )
    budget = context_length(model) - settings.max_new_tokens
    session = Session(settings)
    session.reset()
    write(HELP + "\n")
    interrupted = False  # the last thing at the prompt was Ctrl-C
    while True:
        try:
            write("\n")
            text = read(PROMPT).strip()
        except EOFError:
            write("\n")
            return session.messages
        except KeyboardInterrupt:
            if interrupted:
                write("\n")
                return session.messages
            interrupted = True
            write(f"\n{EXIT_HINT}\n")
            continue
        interrupted = False
        if text.startswith("/"):
            if run_command(session, text, write):
                return session.messages
        elif text:
            try:
                answer_turn(model, tokenizer, session, text, budget, write)
            except KeyboardInterrupt:  # before streaming began: nothing shown, nothing kept
                write("\n(answer stopped)\n")


def _print(text: str) -> None:
    print(text, end="", flush=True)


def history_path() -> Path:
    """Where typed lines are kept between sessions: $XDG_CACHE_HOME/selfalign/chat_history."""
    cache = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(cache) / "selfalign" / "chat_history"


@contextmanager
def line_editing(path: Path | None = None) -> Iterator[None]:
    """Arrow keys, line editing and a history kept across sessions (stdlib readline), when a
    person types at a terminal; piped input is read as is."""
    try:
        if not sys.stdin.isatty():
            raise ImportError
        import readline  # importing it is what makes input() edit lines
    except ImportError:
        yield
        return
    path = path or history_path()
    readline.set_history_length(1000)
    with suppress(OSError):
        readline.read_history_file(path)
    try:
        yield
    finally:
        with suppress(OSError):
            path.parent.mkdir(parents=True, exist_ok=True)
            readline.write_history_file(path)


@contextmanager
def ctrl_c() -> Iterator[None]:
    """Ctrl-C reaches the chat as KeyboardInterrupt even when selfalign was started with SIGINT
    ignored (a background job of a non-interactive shell hands that on, and Python then installs
    no handler): at a terminal the person typing expects it to stop the answer."""
    if not sys.stdin.isatty() or signal.getsignal(signal.SIGINT) is not signal.SIG_IGN:
        yield
        return
    signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)


def banner(model_path: str, model, settings: ChatSettings) -> str:
    """What the user is talking to and how it samples, before the first prompt."""
    dtype = str(model.dtype).removeprefix("torch.")
    sampling = (
        f"temperature {settings.temperature}, top_p {settings.top_p}"
        if settings.temperature > 0
        else "greedy (temperature 0)"
    )
    seed = "" if settings.seed is None else f", seed {settings.seed}"
    return (
        f"model: {model_path} ({model.device}, {dtype})\n"
        f"sampling: {sampling}, max tokens {settings.max_new_tokens}{seed}\n"
        f"system prompt: {settings.system or '(the model default)'}\n"
    )


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
    (write or _print)(banner(model_path, model, settings))
    with line_editing(), ctrl_c():
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
