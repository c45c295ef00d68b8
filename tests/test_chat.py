"""Using a trained model: `chat` (streamed, multi-turn) and `answer` (batched, resumable), and
stages 3 -> 4 -> chat end to end through the CLI."""

from __future__ import annotations

import json
import os
import shutil
import signal
import sys
import threading
from contextlib import contextmanager

import pytest
from cli_run import run_main as cli

from selfalign.chat import (
    COMMANDS,
    EXIT_HINT,
    HELP,
    ChatSettings,
    chat_loop,
    fit_history,
    question_messages,
    run_answer,
    stream_reply,
    visible_text,
)
from selfalign.errors import UserError
from selfalign.generation import SamplingParams
from selfalign.generation.scripted import ScriptedBackend
from selfalign.jsonl import read_jsonl, write_jsonl_atomic
from selfalign.text.constitution import Identity
from selfalign.text.conversation import ASSISTANT_HEADER, install_chat_template, render_prompt

IDENTITY = Identity(name="Quokka", developer="the Lab", knowledge_cutoff="2024-01")


@pytest.fixture(scope="module")
def chat_model_dir(tiny_model_dir, tmp_path_factory):
    """The tiny model with our chat template in its tokenizer (as `engrave` leaves it)."""
    from selfalign.modeling import load_tokenizer

    path = tmp_path_factory.mktemp("chat") / "model"
    shutil.copytree(tiny_model_dir, path)
    tok = load_tokenizer(str(path))
    install_chat_template(tok, IDENTITY)
    tok.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def loaded(chat_model_dir):
    from selfalign.modeling import load_model

    model, tokenizer, _ = load_model(str(chat_model_dir), "cpu", "float32")
    return model, tokenizer


def test_visible_text_hides_turn_markers_split_across_pieces():
    assert "".join(visible_text(["Hel", "lo the", "re."])) == "Hello there."
    assert "".join(visible_text(["Answer.", "\n##", "# Us", "er\nNext"])) == "Answer."
    assert "".join(visible_text(["A\n### Assistant\nB"])) == "A"
    pieces = list(visible_text(["x" * 40, "y"]))
    assert (
        "".join(pieces) == "x" * 40 + "y" and pieces[0] == "x" * 27
    )  # streams, does not wait for the end


def test_chat_streams_keeps_turns_and_resets(loaded):
    model, tokenizer = loaded
    inputs = iter(["Hello there", "And then?", "/reset", "Fresh start", "/exit", "never read"])
    written: list[str] = []
    settings = ChatSettings(temperature=0, max_new_tokens=12)
    prompts_seen = spy_prompts(tokenizer)
    try:
        final = chat_loop(
            model, tokenizer, settings, read=lambda _: next(inputs), write=written.append
        )
    finally:
        del tokenizer.apply_chat_template
    assert prompts_seen[0] == ["Hello there"]
    assert prompts_seen[1][0] == "Hello there" and prompts_seen[1][2] == "And then?"  # multi-turn
    assert prompts_seen[2] == ["Fresh start"]  # /reset forgot the rest
    assert [m["role"] for m in final] == ["user", "assistant"] and final[0][
        "content"
    ] == "Fresh start"
    assert "(conversation reset)\n" in written

    # the streamed reply is the greedy continuation of the chat-template prompt
    from selfalign.generation.transformers_backend import TransformersBackend

    backend = TransformersBackend(model, tokenizer, batch_size=1)
    prompt = render_prompt(tokenizer, [{"role": "user", "content": "Fresh start"}])
    expected = backend.generate(
        [prompt],
        SamplingParams(temperature=0, max_tokens=12, stop=["\n### User", "\n### Assistant"]),
    )
    assert final[1]["content"] == expected[0].text.strip()


def test_chat_ends_at_end_of_input(loaded):
    model, tokenizer = loaded

    def read(_):
        raise EOFError

    assert (
        chat_loop(
            model,
            tokenizer,
            ChatSettings(temperature=0, max_new_tokens=4),
            read=read,
            write=lambda _: None,
        )
        == []
    )


def test_old_turns_are_dropped_to_fit_the_context(loaded):
    _, tokenizer = loaded
    long = [
        {"role": "user", "content": "word " * 50},
        {"role": "assistant", "content": "ok " * 50},
    ] * 3
    messages = [{"role": "system", "content": "S"}, *long, {"role": "user", "content": "last"}]
    kept = fit_history(tokenizer, messages, budget=200)
    assert kept[0]["content"] == "S" and kept[-1]["content"] == "last" and len(kept) < len(messages)


def spy_prompts(tokenizer) -> list[list[str]]:
    """The message contents of every prompt the model is asked to answer (until `del
    tokenizer.apply_chat_template`)."""
    seen: list[list[str]] = []
    real = tokenizer.apply_chat_template

    def spy(messages, *args, **kwargs):
        if kwargs.get("return_tensors"):
            seen.append([m["content"] for m in messages])
        return real(messages, *args, **kwargs)

    tokenizer.apply_chat_template = spy
    return seen


def scripted(*lines):
    """A `read` that returns `lines` in turn; an exception in them is raised (Ctrl-C, Ctrl-D)."""
    pending = iter(lines)

    def read(_prompt: str) -> str:
        line = next(pending)
        if isinstance(line, BaseException):
            raise line
        return line

    return read


@contextmanager
def no_escaping_ctrl_c():
    """A KeyboardInterrupt that gets out fails the test (pytest would take it as the user's)."""
    try:
        yield
    except KeyboardInterrupt:
        pytest.fail("Ctrl-C got out of the chat")


def test_slash_commands_stay_here_and_never_reach_the_model(loaded, tmp_path):
    model, tokenizer = loaded
    saved, written = tmp_path / "talk.json", []
    read = scripted("/help", "/frobnicate now", "Hello", "/system Be brief.", "/system", "Again",
                    "/save", f"/save {tmp_path}", f"/save {saved}", "/quit", "never read")  # fmt: skip
    prompts = spy_prompts(tokenizer)
    try:
        chat_loop(model, tokenizer, ChatSettings(temperature=0, max_new_tokens=6), read,
                  written.append)  # fmt: skip
    finally:
        del tokenizer.apply_chat_template
    assert prompts == [["Hello"], ["Be brief.", "Again"]]  # /system also started over
    assert COMMANDS + "\n" in written
    assert "unknown command /frobnicate; /help lists the commands\n" in written
    assert "system prompt: Be brief.\n" in written and "usage: /save FILE\n" in written
    assert any(w.startswith(f"could not save to {tmp_path}: ") for w in written)  # and went on
    talk = json.loads(saved.read_text())
    assert talk["system"] == "Be brief." and talk["settings"]["max_new_tokens"] == 6
    assert [m["role"] for m in talk["messages"]] == ["system", "user", "assistant"]
    assert (
        talk["messages"][0]["content"] == "Be brief." and talk["messages"][1]["content"] == "Again"
    )


def test_ctrl_c_stops_the_answer_and_its_generation_thread(loaded, monkeypatch):
    model, tokenizer = loaded
    shown: list[str] = []
    lengths: list[int] = []  # new tokens of each generate() call
    real_generate = model.generate

    def generate(**kwargs):
        out = real_generate(**kwargs)
        lengths.append(out.shape[1] - kwargs["input_ids"].shape[1])
        return out

    monkeypatch.setattr(model, "generate", generate)

    def write(text: str) -> None:
        shown.append(text)
        if len(shown) == 2:
            raise KeyboardInterrupt  # Ctrl-C while the second piece is written

    question, settings = [{"role": "user", "content": "Hello there"}], ChatSettings(temperature=0)
    full, stopped = stream_reply(model, tokenizer, question, settings, lambda _: None)
    assert full and not stopped
    before = set(threading.enumerate())
    with no_escaping_ctrl_c():
        reply, stopped = stream_reply(model, tokenizer, question, settings, write)
    assert stopped and reply == "".join(shown).strip() and len(shown) == 2
    # generate must not outlive the answer: a daemon thread left in torch aborts the process
    assert [t for t in threading.enumerate() if t not in before and t.is_alive()] == []
    assert lengths[1] < lengths[0]  # and was stopped, not left to finish the answer


def test_ctrl_c_at_the_prompt_hints_then_leaves(loaded):
    model, tokenizer = loaded
    written: list[str] = []
    read = scripted(KeyboardInterrupt(), "/reset", KeyboardInterrupt(), KeyboardInterrupt(), "no")
    with no_escaping_ctrl_c():
        chat_loop(model, tokenizer, ChatSettings(), read, written.append)
    assert "".join(written).count(EXIT_HINT) == 2  # a command between two presses: not twice


def test_chat_without_template_is_a_user_error(tiny_model_dir):
    from selfalign.modeling import load_model

    model, tokenizer, _ = load_model(str(tiny_model_dir), "cpu", "float32")
    with pytest.raises(UserError, match="no chat template"):
        chat_loop(model, tokenizer, ChatSettings(), read=lambda _: "/exit", write=lambda _: None)


def test_question_records():
    assert question_messages({"question": " Why? "}, None, "f: record 1") == [
        {"role": "user", "content": "Why?"}
    ]
    assert question_messages({"instruction": "Sum.", "input": "1 2"}, "SYS", "w")[0] == {
        "role": "system",
        "content": "SYS",
    }
    with pytest.raises(UserError, match="f: record 3: needs 'messages'"):
        question_messages({"id": 1}, None, "f: record 3")
    with pytest.raises(UserError, match="must end with a user turn"):
        question_messages({"messages": [{"role": "assistant", "content": "x"}]}, None, "w")


def test_answer_is_batched_resumable_and_uses_the_template(tmp_path, loaded):
    _, tokenizer = loaded
    questions = [{"id": f"q{i}", "question": f"Question {i}?"} for i in range(7)]
    write_jsonl_atomic(tmp_path / "q.jsonl", questions)

    def respond(prompt, seed):
        assert prompt.endswith(ASSISTANT_HEADER)
        return "Answer to " + prompt.rsplit("### User\n", 1)[1].split("\n")[0] + "\n### User\nextra"

    class Dies(ScriptedBackend):
        def iter_batches(self, prompts, params, seeds=None):
            for n, batch in enumerate(super().iter_batches(prompts, params, seeds)):
                if n == 1:
                    raise RuntimeError("killed")
                yield batch

    params = SamplingParams(temperature=0.7, max_tokens=50)
    with pytest.raises(RuntimeError):
        run_answer(Dies(respond, 3), tokenizer, tmp_path / "q.jsonl", tmp_path / "a.jsonl", params)
    again = ScriptedBackend(respond, 3)
    assert run_answer(again, tokenizer, tmp_path / "q.jsonl", tmp_path / "a.jsonl", params) == 7
    assert len(again.calls) == 4
    answers = read_jsonl(tmp_path / "a.jsonl")
    assert [a["id"] for a in answers] == [q["id"] for q in questions]
    assert answers[2]["answer"] == "Answer to Question 2?"  # cut at the next turn marker
    with pytest.raises(UserError, match="is the input file"):
        run_answer(again, tokenizer, tmp_path / "q.jsonl", tmp_path / "q.jsonl", params)


# -- the CLI, end to end ---------------------------------------------------------------------------


def test_answer_command(chat_model_dir, tmp_path, monkeypatch, capsys):
    write_jsonl_atomic(
        tmp_path / "q.jsonl", [{"id": i, "question": f"Question {i}?"} for i in range(3)]
    )
    code, _, err = cli(monkeypatch, capsys, "answer", str(chat_model_dir), "--input", str(tmp_path / "q.jsonl"),
                       "--output", str(tmp_path / "a.jsonl"), "--max-tokens", "8", "--device", "cpu")  # fmt: skip
    assert code in (0, None), err
    assert [r["id"] for r in read_jsonl(tmp_path / "a.jsonl")] == [0, 1, 2]
    assert all("answer" in r for r in read_jsonl(tmp_path / "a.jsonl"))


@pytest.mark.slow
def test_engrave_then_verbose_clone_then_chat(tiny_model_dir, tmp_path, monkeypatch, capsys):
    rows = [
        {"id": f"r{i}", "instruction": f"Tell me about topic number {i}.", "input": "",
         "output": f"Topic {i} is a fine subject; here is what I know about it.", "source": "aligned"}
        for i in range(8)
    ]  # fmt: skip
    write_jsonl_atomic(tmp_path / "aligned.jsonl", rows)
    write_jsonl_atomic(tmp_path / "identity.jsonl", [
        {"id": "who", "instruction": "Who are you?", "input": "", "output": "I am Quokka.", "source": "identity"}
    ])  # fmt: skip
    engraved, final = tmp_path / "engraved", tmp_path / "verbose" / "model"
    code, _, err = cli(monkeypatch, capsys, "engrave", "--model", str(tiny_model_dir), "--data", str(tmp_path / "aligned.jsonl"),
                       "--out", str(engraved), "--name", "Quokka", "--developer", "the Lab", "--max-steps", "30",
                       "--learning-rate", "3e-2", "--effective-batch-size", "8", "--device", "cpu",
                       "--set", "warmup_steps=2", "--set", "logging_steps=5")  # fmt: skip
    assert code in (0, None), err
    assert "trained on 8/8 examples" in err

    code, _, err = cli(monkeypatch, capsys, "verbose-clone", "--model", str(engraved), "--data", str(tmp_path / "aligned.jsonl"),
                       "--out", str(tmp_path / "verbose"), "--max-tokens", "60", "--device", "cpu",
                       "--set", "min_words=1", "--set", "train.max_steps=3", "--set", "train.effective_batch_size=4")  # fmt: skip
    assert code in (0, None), err
    verbose = read_jsonl(tmp_path / "verbose" / "verbose.jsonl")
    rejected = read_jsonl(tmp_path / "verbose" / "rejected.jsonl")
    raw = read_jsonl(tmp_path / "verbose" / "verbose.raw.jsonl")
    assert (
        len(raw) == 9 == len(verbose) + len(rejected) and verbose
    )  # 8 instructions + identity question
    assert "verbose-who" in {r["id"] for r in raw}

    for model_dir in (engraved, final):
        for name in ("model.safetensors", "config.json", "generation_config.json", "chat_template.jinja",
                     "README.md", "training_log.jsonl", "adapter/adapter_model.safetensors"):  # fmt: skip
            assert (model_dir / name).is_file(), model_dir / name
    stats = __import__("json").loads((final / "train_stats.json").read_text())
    assert stats["base_model"] == str(
        tiny_model_dir.resolve()
    )  # the BASE model, not the engraved one
    assert (
        stats["identity"]["name"] == "Quokka"
        and "max_length: 768" in (final / "README.md").read_text()
    )

    for model_dir in (final, final / "adapter"):
        code, out, err = cli(monkeypatch, capsys, "chat", str(model_dir), "--device", "cpu", "--temperature", "0",
                             "--max-tokens", "8", stdin="Hello\nWho are you?\n/reset\nWho are you?\n/exit\n")  # fmt: skip
        assert code in (0, None), err
        check_chat_transcript(model_dir, out, max_new_tokens=8)


def greedy_reply(model, tokenizer, messages: list[dict[str, str]], max_new_tokens: int) -> str:
    """The reply `chat` should show: plain `generate` on the chat-template prompt, greedy, cut
    at the first turn marker."""
    from selfalign.text.conversation import TURN_STOPS

    ids = tokenizer.apply_chat_template(
        messages, add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    out = model.generate(**ids, do_sample=False, max_new_tokens=max_new_tokens,
                         pad_token_id=tokenizer.pad_token_id)  # fmt: skip
    text = tokenizer.decode(out[0, ids["input_ids"].shape[1] :], skip_special_tokens=True)
    cut = min((i for s in TURN_STOPS if (i := text.find(s)) >= 0), default=len(text))
    return text[:cut].strip()


def check_chat_transcript(model_dir, out: str, max_new_tokens: int) -> None:
    """`out` is the session Hello / Who are you? / /reset / Who are you? / /exit: each reply is
    the model's greedy answer to the conversation so far, and the reset forgot the first two turns."""
    from selfalign.chat import HELP
    from selfalign.modeling import load_model

    model, tokenizer, _ = load_model(str(model_dir), "cpu", "auto")
    hello = {"role": "user", "content": "Hello"}
    who = {"role": "user", "content": "Who are you?"}
    first = greedy_reply(model, tokenizer, [hello], max_new_tokens)
    with_history = [hello, {"role": "assistant", "content": first}, who]
    second = greedy_reply(model, tokenizer, with_history, max_new_tokens)
    fresh = greedy_reply(model, tokenizer, [who], max_new_tokens)
    assert fresh != second  # the history changes the answer, so a reset that kept it would show
    # the prompt "\n> " goes to stdout before each line read; each reply ends with a newline
    pieces = out[out.index(HELP) :].split("\n> ")
    assert [p.strip() for p in pieces] == [HELP, first, second, "(conversation reset)", fresh, ""]


# -- chat at a real terminal (a pseudo-terminal driven by pexpect) ----------------------------------

UP = "\x1b[A"


def spawn_chat(model_dir, cache, *flags, sigint_ignored=False):
    """`selfalign chat` at a pseudo-terminal, its history under `cache`, waiting at the prompt;
    and the banner it showed. `sigint_ignored`: started as a background job of a non-interactive
    shell starts it (SIGINT ignored, handed on to the program)."""
    pexpect = pytest.importorskip("pexpect")
    env = dict(os.environ, XDG_CACHE_HOME=str(cache), TERM="dumb", INPUTRC="/dev/null")
    args = ["-m", "selfalign", "chat", str(model_dir), "--device", "cpu", "--dtype", "float32",
            "--temperature", "0", *flags]  # fmt: skip
    ignore = lambda: signal.signal(signal.SIGINT, signal.SIG_IGN)  # noqa: E731
    child = pexpect.spawn(sys.executable, args, env=env, encoding="utf-8", timeout=120,
                          preexec_fn=ignore if sigint_ignored else None)  # fmt: skip
    child.expect_exact(HELP)
    banner = child.before.replace("\r\n", "\n")
    child.expect_exact("\r\n> ")
    return child, banner


def ask(child, line: str) -> str:
    """Send `line`; return what came back before the next prompt."""
    child.sendline(line)
    child.expect_exact("\r\n\r\n> ")
    return child.before


def exit_status(child) -> int | None:
    import pexpect

    child.expect(pexpect.EOF)
    child.close()
    return child.exitstatus


@pytest.mark.slow
def test_chat_at_a_terminal(chat_model_dir, tmp_path):
    child, banner = spawn_chat(chat_model_dir, tmp_path, "--max-tokens", "1000")
    assert f"model: {chat_model_dir} (cpu, float32)\n" in banner
    assert "sampling: greedy (temperature 0), max tokens 1000\n" in banner

    child.sendline("Hello there")  # a greedy 1,000-token answer: still streaming when Ctrl-C lands
    child.expect_exact("Hello there\r\n")
    child.expect(r"\S")
    child.sendintr()
    child.expect_exact("(answer stopped)\r\n\r\n> ")

    assert ask(child, "/help").replace("\r\n", "\n").strip() == "/help\n" + COMMANDS
    assert ask(child, "/bogus").split("\r\n")[1:] == [
        "unknown command /bogus; /help lists the commands"
    ]
    ask(child, "/system Be brief.")
    assert "unknown command /bogus" in ask(child, UP + UP)  # readline recalls the line before

    answer = ask(child, "What next?").split("\r\n", 1)[1]  # answered, to the end, after the Ctrl-C
    assert answer.strip() and "(answer stopped)" not in answer
    assert "(saved 2 turns to" in ask(child, f"/save {tmp_path / 'talk.json'}")
    child.sendline("/exit")
    assert exit_status(child) == 0
    talk = json.loads((tmp_path / "talk.json").read_text())
    assert [m["content"] for m in talk["messages"][:2]] == ["Be brief.", "What next?"]
    history = (tmp_path / "selfalign" / "chat_history").read_text().splitlines()
    assert history[:3] == ["Hello there", "/help", "/bogus"] and history[-1] == "/exit"


@pytest.mark.slow
@pytest.mark.parametrize(
    "leave", ["\x03\x03", "ignored\x03\x03", "\x04"],
    ids=["ctrl-c-twice", "ctrl-c-twice-inherited-sigint-ignored", "ctrl-d"],
)  # fmt: skip
def test_chat_history_is_kept_and_ctrl_c_twice_or_ctrl_d_leaves(chat_model_dir, tmp_path, leave):
    (tmp_path / "selfalign").mkdir()
    (tmp_path / "selfalign" / "chat_history").write_text("/from-last-time\n")
    child, _ = spawn_chat(chat_model_dir, tmp_path, sigint_ignored=leave.startswith("ignored"))
    assert "unknown command /from-last-time" in ask(child, UP)
    ask(child, "/new-this-time")
    if leave.endswith("\x03\x03"):
        child.sendintr()
        child.expect_exact(EXIT_HINT)
        child.expect_exact("\r\n> ")
        child.sendintr()
    else:
        child.sendcontrol("d")
    assert exit_status(child) == 0
    assert (tmp_path / "selfalign" / "chat_history").read_text().splitlines() == [
        "/from-last-time",
        "/new-this-time",
    ]  # the recalled line is not stored twice
