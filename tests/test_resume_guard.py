"""Resume never mixes prompts: every raw record carries `prompt_sha` and `settings_sha`, and a
rerun whose prompt or sampling differs from a record already on disk stops with one line naming
the file, leaving it byte-identical. An unchanged rerun resumes into exactly the records of an
uninterrupted run. Checked for `selfalign generate`, stage 1 (self-instruct), stage 2 and stage 4.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import yaml
from cli_run import run_main
from pipeline_fakes import Responder

from selfalign.errors import UserError
from selfalign.generation import SamplingParams
from selfalign.generation.records import (
    PROMPT_SHA,
    SETTINGS_SHA,
    ResumeMismatch,
    expected_shas,
    generate_records,
    prompt_shas,
)
from selfalign.generation.scripted import ScriptedBackend
from selfalign.jsonl import read_jsonl, write_jsonl_atomic
from selfalign.text.constitution import Identity

IDENTITY = Identity(name="Quokka", developer="the Lab", knowledge_cutoff="2024-01")


class Crash(Exception):
    pass


class CrashingBackend(ScriptedBackend):
    """Dies after `batches` batches, like a killed job."""

    def __init__(self, respond, batch_size: int, batches: int):
        super().__init__(respond, batch_size)
        self.batches = batches

    def iter_batches(self, prompts, params, seeds=None):
        for n, batch in enumerate(super().iter_batches(prompts, params, seeds)):
            if n == self.batches:
                raise Crash
            yield batch


def echo(prompt: str, seed: int) -> str:
    return f"answer to {prompt[-12:]!r} with seed {seed % 997}"


def assert_refused(excinfo, path: Path, before: bytes, *phrases: str) -> None:
    message = str(excinfo.value)
    assert "\n" not in message and message.startswith(f"{path}: record "), message
    for phrase in phrases:
        assert phrase in message, message
    assert path.read_bytes() == before


def assert_unique(records: list[dict]) -> None:
    ids = [r["id"] for r in records]
    assert len(ids) == len(set(ids))


# -- the guard in generate_records ---------------------------------------------------------------


def test_hash_with_a_shared_prefix_is_the_hash_of_the_whole_prompt(tmp_path):
    backend = ScriptedBackend(echo)
    records = [{"id": i, "prompt": f" question {i}?"} for i in range(3)]
    out = tmp_path / "out.jsonl"
    rows = generate_records(
        backend, records, SamplingParams(), out, prefix="A long constitution.", store_prompt=False
    )
    assert backend.calls == [f"A long constitution. question {i}?" for i in range(3)]
    for row, prompt in zip(rows, backend.calls, strict=True):
        assert "prompt" not in row
        assert row[PROMPT_SHA] == hashlib.sha256(prompt.encode()).hexdigest()[:16]
    assert prompt_shas(backend.calls) == [r[PROMPT_SHA] for r in rows]


@pytest.mark.parametrize(
    "change",
    [
        {"temperature": 0.5},
        {"top_p": 0.9},
        {"max_tokens": 7},
        {"stop": ["\n"]},
        {"logit_bias": {5: -100.0}},
        {"ngram_penalties": {3: 1.0}},
        {"truncate_prompt": "left"},
        {"seed": None},  # stands for the job's seed, which gives every record another stream
    ],
)
def test_every_setting_that_changes_the_text_is_guarded(tmp_path, change):
    records = [{"id": "a", "prompt": "p"}, {"id": "b", "prompt": "q"}]
    out = tmp_path / "out.jsonl"
    generate_records(ScriptedBackend(echo), records[:1], SamplingParams(), out, seed=1)
    before = out.read_bytes()
    seed = 2 if "seed" in change else 1
    params = SamplingParams(**{k: v for k, v in change.items() if k != "seed"})
    backend = ScriptedBackend(echo)
    with pytest.raises(ResumeMismatch) as excinfo:
        generate_records(backend, records, params, out, seed=seed, restart_hint="start over")
    assert_refused(excinfo, out, before, "'a'", "different sampling settings", "; start over")
    assert not backend.calls


def test_params_seed_is_not_hashed_since_records_have_their_own(tmp_path):
    records = [{"id": "a", "prompt": "p"}]
    assert expected_shas(records, SamplingParams(seed=1), 5) == expected_shas(
        records, SamplingParams(seed=9), 5
    )


def test_a_raw_file_from_before_the_guard_is_refused_with_a_clear_line(tmp_path):
    out = tmp_path / "old.raw.jsonl"
    out.write_text(json.dumps({"id": "a", "prompt": "p", "completion": "old"}) + "\n")
    before = out.read_bytes()
    with pytest.raises(UserError) as excinfo:
        generate_records(ScriptedBackend(echo), [{"id": "a", "prompt": "p"}], SamplingParams(), out)
    assert_refused(
        excinfo, out, before, "'a' has no prompt_sha/settings_sha", f"delete {out} or use another"
    )


# -- selfalign generate --------------------------------------------------------------------------


def write_prompts(path: Path, n: int, changed: int | None = None) -> Path:
    rows = [{"id": f"r{i}", "prompt": f"Question {i}{' (new)' if i == changed else ''}?"}
            for i in range(n)]  # fmt: skip
    write_jsonl_atomic(path, rows)
    return path


@pytest.fixture()
def scripted_generate(monkeypatch):
    """`selfalign generate` with a scripted model; `loads` counts the models loaded."""
    import selfalign.generation.generate_file as generate_file

    state = {"loads": 0, "crash_after": None, "backend": None}

    def load_backend(cfg):
        state["loads"] += 1
        if state["crash_after"] is not None:
            state["backend"] = CrashingBackend(echo, cfg.batch_size, state["crash_after"])
        else:
            state["backend"] = ScriptedBackend(echo, cfg.batch_size)
        return state["backend"]

    monkeypatch.setattr(generate_file, "load_backend", load_backend)
    return state


def generate(monkeypatch, capsys, inp: Path, out: Path, *args: str):
    return run_main(monkeypatch, capsys, "generate", "--model", "scripted", "--input", str(inp),
                    "--output", str(out), "--batch-size", "2", *args)  # fmt: skip


SETTINGS = (
    "different sampling settings (temperature, top_p, max_tokens, stop, logit_bias, "
    "ngram_penalties, truncate_prompt or seed)"
)


@pytest.mark.parametrize(
    "change, args, what",
    [
        ("prompt", (), "'r3' was generated from a different prompt"),
        ("temperature", ("--temperature", "0.2"), f"'r0' was generated with {SETTINGS}"),
        ("seed", ("--seed", "8"), f"'r0' was generated with {SETTINGS}"),
    ],
)
def test_generate_refuses_a_changed_prompt_or_setting(
    monkeypatch, capsys, tmp_path, scripted_generate, change, args, what
):
    inp, out = write_prompts(tmp_path / "in.jsonl", 6), tmp_path / "out.jsonl"
    assert generate(monkeypatch, capsys, inp, out).code == 0
    before = out.read_bytes()
    if change == "prompt":
        write_prompts(inp, 6, changed=3)
    code, _, err = generate(monkeypatch, capsys, inp, out, *args)
    assert code == 2
    assert err == f"error: {out}: record {what}; delete {out} or choose another --output\n"
    assert out.read_bytes() == before
    assert scripted_generate["loads"] == 1  # refused before a model was loaded


def test_generate_resumes_an_unchanged_rerun_into_the_uninterrupted_records(
    monkeypatch, capsys, tmp_path, scripted_generate
):
    inp = write_prompts(tmp_path / "in.jsonl", 9)
    assert generate(monkeypatch, capsys, inp, tmp_path / "ref.jsonl", "--seed", "4").code == 0
    out = tmp_path / "out.jsonl"
    scripted_generate["crash_after"] = 2
    crashed = generate(monkeypatch, capsys, inp, out, "--seed", "4")
    assert crashed.code == 1 and crashed.err.startswith("error: Crash")  # a bug: exit 1, one line
    assert len(read_jsonl(out)) == 4
    scripted_generate["crash_after"] = None
    assert generate(monkeypatch, capsys, inp, out, "--seed", "4").code == 0
    assert len(scripted_generate["backend"].calls) == 5  # only what was missing
    records = read_jsonl(out)
    assert_unique(records)
    assert records == read_jsonl(tmp_path / "ref.jsonl") and len(records) == 9
    assert all(r[PROMPT_SHA] and r[SETTINGS_SHA] for r in records)


# -- stage 1: self-instruct ----------------------------------------------------------------------


def self_instruct(tmp_path: Path, out: Path, backend, **change):
    from selfalign.stages.stage1_instructions import SelfInstructConfig, run_self_instruct

    cfg = SelfInstructConfig(num_instructions=6, prompts_per_round=3, suppress_eos=False,
                             **change)  # fmt: skip
    return run_self_instruct(cfg, backend, out)


def test_self_instruct_refuses_a_changed_meta_prompt_or_sampling(tmp_path):
    out = tmp_path / "run"
    self_instruct(tmp_path, out, ScriptedBackend(Responder()))
    raw = out / "self_instruct.raw.jsonl"
    before = raw.read_bytes()
    meta = tmp_path / "meta.txt"
    meta.write_text("Come up with a series of tasks, please:")
    backend = ScriptedBackend(Responder())
    with pytest.raises(UserError) as excinfo:
        self_instruct(tmp_path, out, backend, meta_prompt=str(meta))
    assert_refused(excinfo, raw, before, "different prompt", f"delete {raw}")
    other = SamplingParams(temperature=0.7, top_p=0.98, max_tokens=1024)
    with pytest.raises(UserError) as excinfo:
        self_instruct(tmp_path, out, backend, sampling=other)
    assert_refused(excinfo, raw, before, "different sampling settings")
    assert not backend.calls


def test_self_instruct_resumes_into_the_uninterrupted_records(tmp_path):
    self_instruct(tmp_path, tmp_path / "ref", ScriptedBackend(Responder()))
    out = tmp_path / "run"
    with pytest.raises(Crash):
        self_instruct(tmp_path, out, CrashingBackend(Responder(), 2, 1))
    partial = read_jsonl(out / "self_instruct.raw.jsonl")
    assert len(partial) == 2
    again = ScriptedBackend(Responder())
    self_instruct(tmp_path, out, again)
    assert not any(p in again.calls for p in [r["prompt"] for r in partial])  # not redone
    for name in ("self_instruct.raw.jsonl", "self_instruct.jsonl"):
        records = read_jsonl(out / name)
        assert_unique(records)
        assert records == read_jsonl(tmp_path / "ref" / name), name


# -- stage 2 -------------------------------------------------------------------------------------


def write_instructions(path: Path, n: int = 5) -> Path:
    write_jsonl_atomic(path, [{"id": f"i{k}", "instruction": f"Tell me about rivers {k}.",
                               "input": "", "source": "self_instruct"} for k in range(n)])  # fmt: skip
    return path


def test_self_align_refuses_changed_sampling_and_a_changed_constitution_after_it_ran(tmp_path):
    from selfalign.stages.stage2_self_align import (
        SelfAlignConfig,
        finalize_self_align,
        run_self_align,
    )
    from selfalign.text.constitution import load_constitution

    inp, out = write_instructions(tmp_path / "instructions.jsonl"), tmp_path / "out"
    run_self_align(SelfAlignConfig(), ScriptedBackend(Responder()), inp, out)
    raw = out / "self_align.raw.jsonl"
    before = raw.read_bytes()
    hotter = SelfAlignConfig(sampling=SamplingParams(temperature=0.9, top_p=0.95, max_tokens=256))
    with pytest.raises(UserError) as excinfo:
        run_self_align(hotter, ScriptedBackend(Responder()), inp, out)
    assert_refused(excinfo, raw, before, "'i0' was generated with different sampling")
    other = load_constitution("default").model_dump(exclude_none=True)
    other["codename"] = "Vega"
    path = tmp_path / "vega.yaml"
    path.write_text(yaml.safe_dump(other))
    with pytest.raises(UserError) as excinfo:  # no model: only the prompts can be checked
        finalize_self_align(SelfAlignConfig(constitution=str(path)), inp, out)
    assert_refused(excinfo, raw, before, "'i0' was generated from a different prompt")
    # other filter settings on the same completions need no model and are fine
    assert finalize_self_align(SelfAlignConfig(truncated="cut"), inp, out)["finalized"]


def test_self_align_resumes_into_the_uninterrupted_records(tmp_path):
    from selfalign.stages.stage2_self_align import SelfAlignConfig, run_self_align

    inp = write_instructions(tmp_path / "instructions.jsonl", 7)
    cfg = SelfAlignConfig(chunk_size=3)
    run_self_align(cfg, ScriptedBackend(Responder()), inp, tmp_path / "ref")
    out = tmp_path / "out"
    with pytest.raises(Crash):
        run_self_align(cfg, CrashingBackend(Responder(), 2, 1), inp, out)
    again = ScriptedBackend(Responder())
    run_self_align(cfg, again, inp, out)
    assert len(again.calls) == 5
    for name in ("self_align.raw.jsonl", "sft.jsonl"):
        records = read_jsonl(out / name)
        assert_unique(records)
        assert records == read_jsonl(tmp_path / "ref" / name), name


# -- stage 4 -------------------------------------------------------------------------------------


@pytest.fixture()
def tokenizer(tiny_model_dir):
    from selfalign.modeling import load_tokenizer
    from selfalign.text.conversation import install_chat_template

    tok = load_tokenizer(str(tiny_model_dir))
    install_chat_template(tok, IDENTITY)
    return tok


def verbose(tmp_path: Path, out: Path, backend, tokenizer, **change):
    from selfalign.stages.stage4_verbose import VerboseConfig, run_verbose
    from selfalign.text.constitution import load_constitution

    aligned = tmp_path / "stage2" / "aligned.jsonl"
    if not aligned.exists():
        write_jsonl_atomic(aligned, [{"id": f"a{i}", "instruction": f"Explain idea {i}.",
                                      "input": "", "output": "Short.", "source": "self_instruct"}
                                     for i in range(7)])  # fmt: skip
    constitution = load_constitution("default").with_identity(IDENTITY)
    return run_verbose(VerboseConfig(**change), backend, aligned, out, constitution,
                       tokenizer=tokenizer)  # fmt: skip


def test_verbose_refuses_a_changed_verbose_prompt_or_sampling(tmp_path, tokenizer):
    out = tmp_path / "out"
    verbose(tmp_path, out, ScriptedBackend(Responder()), tokenizer)
    raw = out / "verbose.raw.jsonl"
    before = raw.read_bytes()
    backend = ScriptedBackend(Responder())
    with pytest.raises(UserError) as excinfo:
        verbose(tmp_path, out, backend, tokenizer, verbose_prompt="Answer at great length.")
    assert_refused(excinfo, raw, before, "'verbose-a0' was generated from a different prompt",
                   f"delete {raw} or use another output directory")  # fmt: skip
    longer = SamplingParams(temperature=0.3, top_p=0.7, max_tokens=600)
    with pytest.raises(UserError) as excinfo:
        verbose(tmp_path, out, backend, tokenizer, sampling=longer)
    assert_refused(excinfo, raw, before, "'verbose-a0' was generated with different sampling")
    assert not backend.calls


def test_verbose_resumes_into_the_uninterrupted_records(tmp_path, tokenizer):
    verbose(tmp_path, tmp_path / "ref", ScriptedBackend(Responder()), tokenizer)
    out = tmp_path / "out"
    with pytest.raises(Crash):
        verbose(tmp_path, out, CrashingBackend(Responder(), 3, 1), tokenizer)
    again = ScriptedBackend(Responder())
    verbose(tmp_path, out, again, tokenizer)
    assert len(again.calls) == 4
    for name in ("verbose.raw.jsonl", "verbose.jsonl", "rejected.jsonl"):
        records = read_jsonl(out / name)
        assert_unique(records)
        assert records == read_jsonl(tmp_path / "ref" / name), name


# -- selfalign answer ----------------------------------------------------------------------------


def test_answer_refuses_a_changed_system_prompt(tmp_path, tokenizer):
    from selfalign.chat import run_answer

    inp, out = tmp_path / "questions.jsonl", tmp_path / "answers.jsonl"
    write_jsonl_atomic(inp, [{"id": f"q{i}", "question": f"Why {i}?"} for i in range(3)])
    params = SamplingParams(temperature=0)
    assert run_answer(ScriptedBackend(echo), tokenizer, inp, out, params, system="Be brief.") == 3
    before = out.read_bytes()
    backend = ScriptedBackend(echo)
    with pytest.raises(UserError) as excinfo:
        run_answer(backend, tokenizer, inp, out, params, system="Be thorough.")
    assert_refused(excinfo, out, before, "'q0' was generated from a different prompt",
                   f"; delete {out} or choose another --output")  # fmt: skip
    assert not backend.calls
    assert run_answer(backend, tokenizer, inp, out, params, system="Be brief.") == 3
    assert out.read_bytes() == before and not backend.calls  # unchanged: nothing to redo


# -- selfalign run -------------------------------------------------------------------------------


def test_the_pipeline_says_which_stage_to_force(tmp_path, pipeline_model_dir, monkeypatch):
    """A raw file whose completions came from other prompts than the stage's settings make now
    (an edited prompt file is caught earlier, by the stage hash, which covers file contents;
    here the raw file itself says so) is refused; the way out is `--force` of that stage."""
    import pipeline_fakes
    from test_pipeline import write_config

    import selfalign.run.pipeline as pipeline
    from selfalign.run.pipeline import run_pipeline
    from selfalign.run.settings import load_pipeline_config

    meta = tmp_path / "meta.txt"
    meta.write_text("Come up with a series of tasks:")
    config = write_config(tmp_path, pipeline_model_dir,
                          **{"instructions.self_instruct.meta_prompt": str(meta)})  # fmt: skip
    pipeline_fakes.install(monkeypatch)
    working = pipeline.load_backend

    def crashing(cfg):
        backend = working(cfg)
        return CrashingBackend(backend.respond, backend.batch_size, 1)

    monkeypatch.setattr(pipeline, "load_backend", crashing)
    with pytest.raises(Crash):
        run_pipeline(load_pipeline_config(config), stages=["instructions"], report=False)
    raw = tmp_path / "run" / "1_instructions" / "self_instruct.raw.jsonl"
    records = [json.loads(line) for line in raw.read_text().splitlines()]
    records[0]["prompt_sha"] = "0" * 16
    raw.write_text("".join(json.dumps(r) + "\n" for r in records))
    before = raw.read_bytes()
    monkeypatch.setattr(pipeline, "load_backend", working)
    with pytest.raises(UserError) as excinfo:
        run_pipeline(load_pipeline_config(config), stages=["instructions"], report=False)
    assert_refused(excinfo, raw, before, "different prompt; rerun with --force instructions")
    manifest = json.loads((tmp_path / "run" / "manifest.json").read_text())
    assert manifest["stages"]["instructions"]["error"].endswith("--force instructions")
