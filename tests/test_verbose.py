"""Stage 4: verbose prompts, filters on canned completions, resume, and the final SFT."""

from __future__ import annotations

from pathlib import Path

import pytest

from selfalign.errors import UserError
from selfalign.generation import Completion
from selfalign.generation.scripted import ScriptedBackend
from selfalign.jsonl import read_jsonl, write_jsonl_atomic
from selfalign.stages.stage4_verbose import (
    AnswerFilters,
    VerboseConfig,
    add_prompts,
    filter_answers,
    instruction_rows,
    run_final_sft,
    run_verbose,
    verbose_labels,
    verbose_system_prompt,
)
from selfalign.text.constitution import Identity, load_constitution
from selfalign.text.conversation import ASSISTANT_HEADER, install_chat_template, system_prompt

IDENTITY = Identity(name="Quokka", developer="the Lab", knowledge_cutoff="2024-01")
# the bundled constitution, released as Quokka: what stage 4 gets from `selfalign run`
CONSTITUTION = load_constitution("default").with_identity(IDENTITY)

GOOD = (
    "There are several sides to this. First, the history: the idea appeared long ago and changed "
    "over time. Second, the practical view: most people meet it in daily life. Third, a caveat: "
    "details differ between countries, so check local sources."
)


@pytest.fixture()
def tokenizer(tiny_model_dir):
    from selfalign.modeling import load_tokenizer

    tok = load_tokenizer(str(tiny_model_dir))
    install_chat_template(tok, IDENTITY)
    return tok


def generated(
    completion: str, instruction: str = "Explain taxes.", finish: str = "stop", **extra
) -> dict:
    return {
        "id": "verbose-a", "source_id": "a", "source": "aligned", "instruction": instruction,
        "input": "", "completion": completion, "finish_reason": finish, **extra,
    }  # fmt: skip


def filtered(row, cfg=None):
    return filter_answers([row], AnswerFilters(cfg or VerboseConfig(), CONSTITUTION))


def reason_of(row, cfg=None):
    kept, rejected, counts = filtered(row, cfg)
    return rejected[0]["reason"] if rejected else None


def test_paper_defaults():
    cfg = VerboseConfig()
    s = cfg.sampling
    assert (s.temperature, s.top_p, s.max_tokens) == (0.3, 0.7, 512)
    assert s.ngram_penalties == {3: 1.0, 4: 2.0}
    assert (
        cfg.train.max_length == 768 and cfg.train.learning_rate == 4e-4 and cfg.train.lora_r == 16
    )
    # a partial `train:` section in YAML keeps the final model's cut-off
    assert VerboseConfig(train={"max_steps": 2}).train.max_length == 768


def test_verbose_prompt_is_our_extensive_mode_with_identity():
    text = verbose_system_prompt(IDENTITY)
    assert "extensive" in text and "Quokka" in text and "the Lab" in text and "January 2024" in text
    assert text != system_prompt(IDENTITY)


def test_good_answer_is_kept_even_if_it_mentions_a_president_or_the_weather():
    row = generated(GOOD + " The president and the weather both matter here.")
    kept, rejected, counts = filtered(row)
    assert not rejected and counts["kept"] == 1
    assert kept == [
        {
            "id": "verbose-a",
            "instruction": "Explain taxes.",
            "input": "",
            "output": row["completion"],
            "source": "aligned",
            "source_id": "a",
        }  # fmt: skip
    ]


@pytest.mark.parametrize(
    ("row", "reason"),
    [
        (generated(GOOD, finish="length"), "truncated"),
        (generated("Taxes pay for roads."), "too_short"),
        (generated("   "), "too_short"),
        (generated("Sorry, " + GOOD), "apology"),
        (
            generated(
                "Explain in detail how income taxes work. " + GOOD,
                "Explain in detail how income taxes work.",
            ),
            "echo_prompt",
        ),
        (
            generated(
                GOOD
                + " I look at the request from several angles, explain the background and my reasoning."
            ),
            "echo_system",
        ),
        (generated(GOOD + " " + GOOD), "repetition"),
        (generated("It is good. " * 12), "repetition"),
    ],
)
def test_each_filter_names_its_reason(row, reason):
    assert reason_of(row) == reason


ROSETTA = (
    "French soldiers found it in 1799 near the town of Rashid (Rosetta) in the Nile delta, and it "
    "has been in the British Museum since 1802."
)


def test_exemplar_leakage_is_detected_but_not_on_the_exemplars_topic():
    """An exemplar's distinctive passage copied into another topic is leakage; the same passage
    in an answer about that exemplar's topic is not, nor is the exemplars' generic phrasing."""
    leaked = generated(GOOD + " " + ROSETTA, "Explain how glaciers form.")
    kept, rejected, counts = filtered(leaked)
    assert rejected[0]["reason"] == "exemplar_leakage" and "1799" in rejected[0]["detail"]
    on_topic = generated(GOOD + " " + ROSETTA, "Tell me the story of the Rosetta Stone.")
    assert reason_of(on_topic) is None
    generic = generated(GOOD + " Let me know if you want a version for very large n.")
    assert reason_of(generic) is None


def test_an_answer_going_on_with_a_made_up_turn_is_cut_there():
    """As the stop string would have cut it; the rest of the answer is still filtered."""
    kept, rejected, counts = filtered(generated(GOOD + "\n\n### User\nmore?\n### Assistant\nYes."))
    assert [r["output"] for r in kept] == [GOOD] and counts["cuts"] == {"turn_marker": 1}
    assert reason_of(generated("Taxes pay for roads.\n### User\n" + GOOD)) == "too_short"
    heading = GOOD + "\n### Username rules\nPick a long one."  # a heading, not a turn
    assert filtered(generated(heading))[0][0]["output"] == heading


WRITTEN_PROMPT = """# Kestrel

Kestrel answers at length, in the voice shown below.

### User
Hello?

### Kestrel (thorough)
Hello! I answer every question thoroughly.

### User
"""


def test_a_verbose_prompt_with_its_own_turns_generates_after_its_own_label(tmp_path, tokenizer):
    """Labels are read from the prompt (any name, any mode): the answer starts after the
    prompt's assistant label, which is also a stop string and a turn header."""
    (tmp_path / "kestrel.txt").write_text(WRITTEN_PROMPT)
    cfg = VerboseConfig(verbose_prompt=str(tmp_path / "kestrel.txt"))
    labels = verbose_labels(IDENTITY, cfg.verbose_prompt)
    assert labels == (("### User", "### Kestrel (thorough)"), "### Kestrel (thorough)")
    assert verbose_labels(IDENTITY) == ((), None)  # ours writes no turns
    write_stage2(tmp_path, 2)
    backend = RecordingBackend(lambda prompt, seed: GOOD + "\n### Kestrel (thorough)\nAgain.")
    counts = run_verbose(cfg, backend, tmp_path / "aligned.jsonl", tmp_path / "o", CONSTITUTION,
                         tokenizer=tokenizer)  # fmt: skip
    assert all(p.endswith("\n\n### Kestrel (thorough)\n") for p in backend.calls)
    assert "### Assistant" not in backend.calls[0]
    assert backend.params[0].stop == ["\n### User", "\n### Assistant", "\n### Kestrel (thorough)"]
    assert counts["kept"] == 3  # the backend stopped at the label
    kept, _, counts = filtered(generated(GOOD + "\n### Kestrel (thorough)\nAgain."), cfg)
    assert kept[0]["output"] == GOOD and counts["cuts"] == {"turn_marker": 1}  # no stop honoured
    # a model whose chat template does not end with '### Assistant' cannot take the label
    tokenizer.chat_template = "{{ messages[-1]['content'] }}"
    with pytest.raises(UserError, match="cannot take its place"):
        add_prompts([{"instruction": "Hi?", "input": ""}], tokenizer, IDENTITY, cfg.verbose_prompt)


def test_instruction_rows_merge_identity_questions_and_dedupe():
    aligned = [{"id": 1, "instruction": "What is rain?", "input": ""},
               {"id": 2, "instruction": "what is RAIN?"},
               {"id": 3, "instruction": "Sum these.", "input": "1 2"}]  # fmt: skip
    identity = [{"id": "who", "instruction": "Who are you?", "input": ""}]
    rows = instruction_rows(aligned, identity, VerboseConfig())
    assert [r["id"] for r in rows] == ["verbose-1", "verbose-3", "verbose-who"]
    assert rows[-1]["source"] == "identity"
    assert [r["id"] for r in instruction_rows(aligned, identity, VerboseConfig(include_identity=False))] == [
        "verbose-1", "verbose-3"
    ]  # fmt: skip
    assert len(instruction_rows(aligned, identity, VerboseConfig(max_instructions=1))) == 2
    with pytest.raises(UserError, match="aligned record 1: needs 'id'"):
        instruction_rows([{"instruction": "x"}], [], VerboseConfig())


def write_stage2(folder, n: int = 10):
    write_jsonl_atomic(
        folder / "aligned.jsonl",
        [
            {
                "id": f"a{i}",
                "instruction": f"Explain idea number {i}.",
                "input": "",
                "output": "Short.",
                "source": "self_instruct",
            }
            for i in range(n)
        ],  # fmt: skip
    )
    write_jsonl_atomic(
        folder / "identity.jsonl",
        [
            {
                "id": "id0",
                "instruction": "Who made you?",
                "input": "",
                "output": "The Lab.",
                "source": "identity",
            }
        ],
    )


def scripted(prompt: str, seed: int):
    question = prompt.rsplit("### User\n", 1)[1].split(ASSISTANT_HEADER)[0]
    if "number 3" in question:
        return Completion(GOOD, "length", 10, 512)  # cut by the limit
    if "number 4" in question:
        return "Too short."
    if "number 5" in question:
        return GOOD + " " + ROSETTA  # copied from the default constitution's exemplar
    return f"About '{question}': " + GOOD + f" (seed {seed % 1000})"


def test_run_verbose_writes_files_and_counts(tmp_path, tokenizer):
    write_stage2(tmp_path)
    backend = ScriptedBackend(scripted, batch_size=3)
    counts = run_verbose(
        VerboseConfig(),
        backend,
        tmp_path / "aligned.jsonl",
        tmp_path / "out",
        CONSTITUTION,
        tokenizer=tokenizer,
    )
    assert counts == {"generated": 11, "parsed": 11, "kept": 8, "rejected": 3, "cuts": {}, "rewrites": {},
                      "rejected_by_reason": {"exemplar_leakage": 1, "too_short": 1, "truncated": 1}}  # fmt: skip
    kept = read_jsonl(tmp_path / "out" / "verbose.jsonl")
    assert {"verbose-id0"} <= {
        r["id"] for r in kept
    }  # identity questions found next to aligned.jsonl
    assert all(r["output"].startswith("About") for r in kept)
    rejected = read_jsonl(tmp_path / "out" / "rejected.jsonl")
    assert {r["reason"] for r in rejected} == {"exemplar_leakage", "too_short", "truncated"}
    assert all("completion" in r for r in rejected)
    raw = read_jsonl(tmp_path / "out" / "verbose.raw.jsonl")
    assert len(raw) == 11
    # prompts: the verbose system prompt in the chat template, ending where the answer starts
    # every prompt: the same verbose system prompt first (one shared prefix for the backend),
    # then the question in the chat template, ending where the answer starts
    prefix = verbose_system_prompt(IDENTITY) + "\n\n### User\n"
    assert len(backend.calls) == 11
    assert all(p.startswith(prefix) and p.endswith(ASSISTANT_HEADER) for p in backend.calls)
    first, second = (tokenizer(p)["input_ids"] for p in backend.calls[:2])
    shared = next(i for i, (a, b) in enumerate(zip(first, second, strict=False)) if a != b)
    assert shared >= len(tokenizer(verbose_system_prompt(IDENTITY))["input_ids"])


class RecordingBackend(ScriptedBackend):
    """Also keeps the sampling parameters of every job."""

    params: list

    def iter_batches(self, prompts, params, seeds=None):
        self.params = [*getattr(self, "params", []), params]
        yield from super().iter_batches(prompts, params, seeds)


class CrashingBackend(ScriptedBackend):
    """Dies after `batches` batches, like a killed job."""

    def __init__(self, respond, batch_size, batches):
        super().__init__(respond, batch_size)
        self.batches = batches

    def iter_batches(self, prompts, params, seeds=None):
        for n, batch in enumerate(super().iter_batches(prompts, params, seeds)):
            if n == self.batches:
                raise RuntimeError("killed")
            yield batch


def test_crash_and_rerun_gives_the_uninterrupted_result(tmp_path, tokenizer):
    write_stage2(tmp_path)
    cfg = VerboseConfig()
    with pytest.raises(RuntimeError, match="killed"):
        run_verbose(
            cfg,
            CrashingBackend(scripted, 3, 2),
            tmp_path / "aligned.jsonl",
            tmp_path / "a",
            CONSTITUTION,
            tokenizer=tokenizer,
        )
    assert len(read_jsonl(tmp_path / "a" / "verbose.raw.jsonl")) == 6
    again = ScriptedBackend(scripted, batch_size=3)
    run_verbose(
        cfg, again, tmp_path / "aligned.jsonl", tmp_path / "a", CONSTITUTION, tokenizer=tokenizer
    )
    assert len(again.calls) == 5  # only what was missing
    run_verbose(
        cfg,
        ScriptedBackend(scripted, 4),
        tmp_path / "aligned.jsonl",
        tmp_path / "b",
        CONSTITUTION,
        tokenizer=tokenizer,
    )
    for name in ("verbose.jsonl", "rejected.jsonl"):
        a, b = read_jsonl(tmp_path / "a" / name), read_jsonl(tmp_path / "b" / name)
        assert a == b and len({r["id"] for r in a}) == len(a)


def test_empty_aligned_file_and_missing_tokenizer(tmp_path, tokenizer):
    (tmp_path / "aligned.jsonl").write_text("")
    with pytest.raises(UserError, match="no instructions to answer"):
        run_verbose(
            VerboseConfig(),
            ScriptedBackend(scripted),
            tmp_path / "aligned.jsonl",
            tmp_path / "o",
            CONSTITUTION,
            tokenizer=tokenizer,
        )
    write_stage2(tmp_path)
    with pytest.raises(UserError, match="needs the engraved model's tokenizer"):
        run_verbose(
            VerboseConfig(),
            ScriptedBackend(scripted),
            tmp_path / "aligned.jsonl",
            tmp_path / "o",
            CONSTITUTION,
        )


def test_final_sft_trains_the_base_model_on_verbose_answers(tmp_path, tokenizer, tiny_model_dir):
    write_stage2(tmp_path)
    run_verbose(
        VerboseConfig(),
        ScriptedBackend(scripted),
        tmp_path / "aligned.jsonl",
        tmp_path / "v",
        CONSTITUTION,
        tokenizer=tokenizer,
    )
    cfg = VerboseConfig(
        train={
            "effective_batch_size": 4,
            "max_steps": 2,
            "gradient_checkpointing": False,
            "group_by_length": True,
        }  # fmt: skip
    )
    stats = run_final_sft(
        cfg,
        tmp_path / "v" / "verbose.jsonl",
        tmp_path / "v" / "model",
        IDENTITY,
        str(tiny_model_dir),
    )
    assert stats["trained"] == 8 and stats["base_model"] == str(tiny_model_dir.resolve())
    assert (tmp_path / "v" / "model" / "model.safetensors").is_file()
    card = (tmp_path / "v" / "model" / "README.md").read_text()
    assert "max_length: 768" in card and "verbose cloning" in card
    write_jsonl_atomic(tmp_path / "empty.jsonl", [])
    with pytest.raises(UserError, match="no verbose answer passed the filters"):
        run_final_sft(cfg, tmp_path / "empty.jsonl", tmp_path / "m2", IDENTITY, str(tiny_model_dir))


REF = Path(__file__).resolve().parents[2] / "shared/reference/dromedary-v1"


@pytest.mark.skipif(not REF.is_dir(), reason="reference files not available")
def test_original_verbose_prompt_file_is_the_shared_prefix(tmp_path, tokenizer):
    original = REF / "prompts/verbose_dromedary_prompt.txt"
    cfg = VerboseConfig(verbose_prompt=str(original))
    write_stage2(tmp_path, 3)
    backend = RecordingBackend(scripted, batch_size=4)
    run_verbose(
        cfg, backend, tmp_path / "aligned.jsonl", tmp_path / "o", CONSTITUTION, tokenizer=tokenizer
    )
    head = original.read_text().rstrip().removesuffix("### User").rstrip()
    assert all(p.startswith(head + "\n\n### User\n") for p in backend.calls)
    # generated after the prompt's own label, as the original script did: its "extensive" mode
    assert all(p.endswith("\n\n### Dromedary (extensive)\n") for p in backend.calls)
    assert "\n### Dromedary (extensive)" in backend.params[0].stop
    # an answer reciting the prompt's example is an echo of the system prompt
    recital = generated(GOOD + " My primary function is to assist users in answering questions, "
                        "generating text, and engaging in conversation.")  # fmt: skip
    assert reason_of(recital, cfg) == "echo_system"
    with pytest.raises(UserError, match="verbose prompt nothere.txt: file not found"):
        verbose_system_prompt(IDENTITY, "nothere.txt")


# -- `selfalign run` through an OpenAI-compatible server -------------------------------------------


def serve_completions(respond):
    """A scripted OpenAI-compatible completions server on 127.0.0.1: the text is
    `respond(prompt, seed)`, cut at the first of the request's `stop` strings as a real server
    does (finish_reason 'stop'). Returns (base_url, requests seen, the server)."""
    from fake_openai import serve

    def reply(body):
        text = respond(body["prompt"], body["seed"])
        cuts = [text.find(s) for s in body.get("stop") or [] if s in text]
        text = text[: min(cuts)] if cuts else text
        return {"choices": [{"text": text, "finish_reason": "stop"}],
                "usage": {"prompt_tokens": 1, "completion_tokens": len(text.split())}}  # fmt: skip

    return serve(reply)


@pytest.mark.slow
def test_selfalign_run_with_an_openai_server_completes_stage_4(
    tmp_path, tiny_model_dir, monkeypatch, capsys
):
    """All four stages with `backend: openai`; stage 4's prompts come from the engraved model's
    chat template although the server's tokenizer (model.tokenizer: the base model's) has none,
    and a made-up next turn the server cut at its stop string never reaches the training data."""
    import pipeline_fakes
    from cli_run import run_cli
    from test_pipeline import write_config

    fake = pipeline_fakes.Responder()

    def respond(prompt: str, seed: int) -> str:
        if prompt.endswith(ASSISTANT_HEADER):  # stage 4: a long answer, then another turn
            return f"{GOOD} (seed {seed % 97})\n\n### User\nAnd more?\n\n### Assistant\nYes, more."
        return fake(prompt, seed)

    url, seen, httpd = serve_completions(respond)
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    verbose_sampling = {"temperature": 0.3, "top_p": 0.7, "max_tokens": 64,
                        "ngram_penalties": {1: 0.5}, "stop": ["\n### User", "\n### Assistant"]}  # fmt: skip
    config = write_config(
        tmp_path, tiny_model_dir,
        **{"model.backend": "openai", "model.base_url": url, "model.tokenizer": str(tiny_model_dir),
           "model.concurrency": 4, "model.context": 16384, "verbose.sampling": verbose_sampling},
    )  # fmt: skip
    try:
        code, text = run_cli(monkeypatch, capsys, "run", str(config), "--quiet")
    finally:
        httpd.shutdown()
    assert code == 0, text
    run = tmp_path / "run"
    # stage 5's answers (greedy) end in the same header
    stage4 = [b for b in seen if b["prompt"].endswith(ASSISTANT_HEADER) and b["temperature"]]
    system = verbose_system_prompt(load_constitution("default").identity)
    assert stage4 and all(b["prompt"].startswith(system + "\n\n### User\n") for b in stage4)
    assert all(b["stop"] == verbose_sampling["stop"] for b in stage4)
    kept = read_jsonl(run / "4_verbose/verbose.jsonl")
    assert kept and all(r["output"].startswith(GOOD) and "###" not in r["output"] for r in kept)
    assert (run / "4_verbose/model/model.safetensors").is_file()
