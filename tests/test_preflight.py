"""Before any work: every generating stage's longest prompt plus its max_tokens must fit the
model's context (`selfalign.stages.context_fit`), checked by `selfalign run`'s preflight and by
each stage's shell; left truncation is refused for the constitution prompt. After a stage: a
stage short of its target warns in the log, its summary line and the manifest
(`selfalign.run.shortfalls`)."""

from __future__ import annotations

import dataclasses
import io
import json
import re

import pytest

from selfalign.errors import UserError
from selfalign.generation import Capabilities
from selfalign.run.shortfalls import stage_warnings
from selfalign.stages.context_fit import (
    Limits,
    check_self_align_fit,
    check_stage1_fit,
    check_verbose_fit,
    count_tokens,
)
from selfalign.stages.stage1_instructions import (
    QuestionsConfig,
    SelfInstructConfig,
    TopicsConfig,
    _self_instruct_round,
    self_instruct_inputs,
)
from selfalign.stages.stage2_self_align import SelfAlignConfig, prompt_records, stage_constitution
from selfalign.stages.stage4_verbose import VerboseConfig
from selfalign.text.constitution import render_prefix

NEEDS = re.compile(
    r"it needs (\d+) tokens \((\d+) of prompt(?: \+ (\d+) kept for the instruction)?"
)
SMALL_STAGE1 = {
    f"instructions.{step}.sampling.max_tokens": 8
    for step in ("self_instruct", "topics", "questions")
}


@pytest.fixture(scope="module")
def short_model_dir(tmp_path_factory):
    """The tiny model with a 256-token context: too short for any stage's default prompts."""
    from selfalign.tiny import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("tiny-256") / "model", context=256)


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    from selfalign.modeling import load_tokenizer

    return load_tokenizer(str(tiny_model_dir))


def needed(error: pytest.ExceptionInfo) -> tuple[int, int, int]:
    """(tokens needed, prompt tokens, margin) stated by a fit error."""
    found = NEEDS.search(str(error.value))
    assert found, str(error.value)
    return int(found[1]), int(found[2]), int(found[3] or 0)


def fits_exactly(check, tokenizer, max_tokens: int) -> str:
    """`check(limits)` needs the prompt's tokens plus `max_tokens`: it fails one token short of
    that, and passes at it; the error message is returned."""
    with pytest.raises(UserError) as error:
        check(Limits(tokenizer, 16))
    need, prompt, margin = needed(error)
    assert need == prompt + margin + max_tokens
    with pytest.raises(UserError):
        check(Limits(tokenizer, need - 1))
    check(Limits(tokenizer, need))
    return str(error.value)


# -- `selfalign run`: before stage 1 --------------------------------------------------------------


def test_a_256_token_context_fails_before_stage_1_writes_anything(
    tmp_path, short_model_dir, monkeypatch, capsys
):
    from cli_run import run_main
    from test_pipeline import write_config

    config = write_config(tmp_path, short_model_dir)
    code, out, err = run_main(monkeypatch, capsys, "run", str(config))
    assert code == 2
    line = err.strip().splitlines()[-1]
    assert "stage 'instructions' (instructions.self_instruct)" in line and "256" in line
    assert "a model with a longer context" in line and "truncate" not in line
    run = tmp_path / "run"
    assert not (run / "1_instructions").exists() and not (run / "manifest.json").exists()


def test_a_context_too_short_for_the_constitution_fails_before_stage_1(tmp_path, tiny_model_dir):
    from test_pipeline import write_config

    from selfalign.run.settings import load_pipeline_config

    # stage 1 fits the tiny model's 2,048 tokens; the default constitution (~4,500) does not
    config = write_config(tmp_path, tiny_model_dir, **SMALL_STAGE1)
    with pytest.raises(UserError) as error:
        load_pipeline_config(config)
    message = str(error.value)
    assert message.startswith("stage 'self_align': the constitution prompt")
    need, prompt, margin = needed(error)
    assert margin == 64 and need == prompt + margin + 256 and "context is 2048" in message
    for fix in ("longer context", "shorter constitution", "exemplars", "sampling.max_tokens"):
        assert fix in message
    assert "truncat" not in message  # cutting the prompt's start would cut the principles
    assert not (tmp_path / "run" / "1_instructions").exists()


def test_left_truncation_of_the_constitution_prompt_is_refused(tmp_path, pipeline_model_dir):
    from test_pipeline import write_config

    from selfalign.run.settings import load_pipeline_config
    from selfalign.stages.stage2_self_align import check_backend

    config = write_config(tmp_path, pipeline_model_dir)
    load_pipeline_config(config)  # fits 8,192 tokens
    left = write_config(
        tmp_path, pipeline_model_dir, **{"self_align.sampling.truncate_prompt": "left"}
    )
    with pytest.raises(UserError, match=r"truncate_prompt: 'left' would cut the constitution's"):
        load_pipeline_config(left)
    # the stage's own shell (`selfalign self-align`) refuses it too, in its file's terms
    cfg = SelfAlignConfig(sampling={"truncate_prompt": "left"})
    with pytest.raises(UserError, match=r"^stage 'self_align': sampling.truncate_prompt"):
        check_backend(cfg, Capabilities("transformers", True, frozenset({1, 2, 3, 4}), True), "")


# -- what is checked: the longest prompt, plus max_tokens -----------------------------------------


def test_self_instruct_refuses_when_no_draw_fits_and_warns_when_the_longest_does_not(
    tokenizer, caplog
):
    """Prompts show seed tasks drawn at random: the shortest draw must fit (else no round can),
    the longest draw not fitting is a warning (the original files have a few long seed tasks
    that rarely meet)."""
    cfg = SelfInstructConfig(sampling={"max_tokens": 100})
    message = fits_exactly(lambda limits: check_stage1_fit(cfg, limits), tokenizer, 100)
    assert "shortest prompt" in message and "num_prompt_instructions, now 5" in message
    assert "self_instruct.sampling.max_tokens" in message
    with pytest.raises(UserError) as error:
        check_stage1_fit(cfg, Limits(tokenizer, 16))
    shortest, _, _ = needed(error)
    caplog.clear()
    check_stage1_fit(cfg, Limits(tokenizer, shortest))
    [warning] = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    longest = int(NEEDS.search(warning)[1])
    assert "longest prompt" in warning and "stops the stage" in warning and longest > shortest
    caplog.clear()
    check_stage1_fit(cfg, Limits(tokenizer, longest))
    assert not [r for r in caplog.records if r.levelname == "WARNING"]
    # no prompt any round builds is longer than the longest one checked
    seeds, meta = self_instruct_inputs(cfg)
    built = [r["prompt"] for r in range(3) for r in _self_instruct_round(cfg, seeds, meta, r)]
    assert max(count_tokens(tokenizer, p) for p in built) + 100 <= longest


@pytest.mark.parametrize(
    ("step", "fix"),
    [(TopicsConfig(), "topics.num_examples"), (QuestionsConfig(), "questions.hints_per_prompt")],
)
def test_each_tgrt_step_checks_its_prompt_plus_max_tokens(step, fix, tokenizer):
    message = fits_exactly(
        lambda limits: check_stage1_fit(step, limits), tokenizer, step.sampling.max_tokens
    )
    assert fix in message and f"max_tokens {step.sampling.max_tokens})" in message


def test_questions_hint_at_the_real_topics_once_they_exist(tokenizer):
    cfg = QuestionsConfig(sampling={"max_tokens": 8})
    with pytest.raises(UserError) as seeds_only:
        check_stage1_fit(cfg, Limits(tokenizer, 16))
    long_topic = {"question_type": "Questions about " + "very " * 40 + "long things",
                  "topic": "an extraordinarily long topic " * 5, "epoch": 0}  # fmt: skip
    with pytest.raises(UserError) as with_topics:
        check_stage1_fit(cfg, Limits(tokenizer, 16), topics=[long_topic])
    assert needed(with_topics)[1] > needed(seeds_only)[1]


def test_left_truncation_opted_into_skips_a_stage_1_step(tokenizer):
    cfg = TopicsConfig(sampling={"truncate_prompt": "left"})
    check_stage1_fit(cfg, Limits(tokenizer, 16))


def test_stage_2_names_its_longest_instruction(tokenizer):
    cfg = SelfAlignConfig(sampling={"max_tokens": 32})
    c = stage_constitution(cfg)
    rows = [{"id": f"r{i}", "instruction": "Name a colour."} for i in range(3)]
    rows.append({"id": "long", "instruction": "Explain " + "the history of the world " * 30})
    records = prompt_records(c, rows, render_prefix(c))
    message = fits_exactly(
        lambda limits: check_self_align_fit(cfg, limits, c, records), tokenizer, 32
    )
    assert "longest instruction ('long'" in message and "shorter instructions" in message
    # the count is the whole prompt's, as the backend will see it
    whole = render_prefix(c) + records[-1]["prompt"]
    assert f"({count_tokens(tokenizer, whole)} of prompt" in message


def test_stage_4_checks_the_verbose_prompt_before_and_after_there_are_questions(tiny_model_dir):
    from selfalign.modeling import load_tokenizer

    cfg, identity = VerboseConfig(), stage_constitution(SelfAlignConfig()).identity
    tok = load_tokenizer(str(tiny_model_dir))
    message = fits_exactly(lambda limits: check_verbose_fit(cfg, limits, identity), tok, 512)
    assert "64 kept for the instruction" in message and "verbose.verbose_prompt" in message
    prompts = ["short", "a much longer prompt " * 20, "medium prompt here"]
    message = fits_exactly(
        lambda limits: check_verbose_fit(cfg, limits, identity, prompts), tok, 512
    )
    assert f"({count_tokens(tok, prompts[1])} of prompt" in message


def test_a_stage_shell_checks_before_it_generates(tiny_backend, tmp_path):
    from selfalign.stages.stage1_instructions import run_self_instruct

    cfg = SelfInstructConfig(sampling={"max_tokens": 2000})  # the tiny model has 2,048 tokens
    with pytest.raises(UserError, match=r"stage 'instructions' \(instructions.self_instruct\)"):
        run_self_instruct(cfg, tiny_backend, tmp_path)
    assert not list(tmp_path.iterdir())


# -- shortfall warnings ---------------------------------------------------------------------------


def _cfg(pipeline_model_dir, tmp_path):
    from test_pipeline import write_config

    from selfalign.run.settings import load_pipeline_config

    return load_pipeline_config(write_config(tmp_path, pipeline_model_dir))


def test_stage_warnings_say_what_fell_short_and_what_to_do(pipeline_model_dir, tmp_path):
    cfg = _cfg(pipeline_model_dir, tmp_path)
    si = {"kept": 3, "target": 24, "shortfall": 21, "rounds": 4,
          "rejected": {"similar": 40, "unparseable": 5}}  # fmt: skip
    merge = {"generated": 10, "kept": 9, "rejected": {"similar": 1}}
    warnings = stage_warnings("instructions", {"steps": {"self_instruct": si, "merge": merge}}, cfg)
    assert len(warnings) == 1
    assert warnings[0].startswith("stage 1 kept 3 of 24 target instructions")
    assert "max_rounds" in warnings[0] and "similarity_threshold (now 0.7)" in warnings[0]
    met = {**si, "kept": 24, "shortfall": 0}
    assert (
        stage_warnings("instructions", {"steps": {"self_instruct": met, "merge": merge}}, cfg) == []
    )
    # the merge dropping most of its inputs is a shortfall too
    dropped = {"generated": 30, "kept": 9, "rejected": {"similar": 21}}
    [warning] = stage_warnings(
        "instructions", {"steps": {"self_instruct": met, "merge": dropped}}, cfg
    )
    assert "merge kept 9 of 30" in warning and "merge.similarity_threshold" in warning

    stage2 = {"instructions": 60, "kept": 10, "rejected": {"truncated": 40, "no_answer": 10}}
    [warning] = stage_warnings("self_align", stage2, cfg)
    assert warning.startswith("stage 2 kept 10 of 60 instructions (16%)")
    assert "raise self_align.sampling.max_tokens (now 256)" in warning and "bigger model" in warning
    assert stage_warnings("self_align", {**stage2, "kept": 30}, cfg) == []

    stage4 = {"generated": 20, "kept": 2, "rejected_by_reason": {"too_short": 18}}
    [warning] = stage_warnings("verbose", stage4, cfg)
    assert "stage 4 kept 2 of 20" in warning and "lower verbose.min_words (now 5)" in warning
    assert stage_warnings("engrave", {"examples": 3}, cfg) == []


def test_a_short_stage_warns_in_the_log_summary_and_manifest(
    pipeline_model_dir, tmp_path, monkeypatch
):
    from selfalign.run import pipeline
    from selfalign.run.pipeline import Events, Pipeline

    cfg = _cfg(pipeline_model_dir, tmp_path)
    counts = {"generated": 30, "kept": 3, "steps": {
        "self_instruct": {"kept": 3, "target": 24, "shortfall": 21, "rounds": 4, "rejected": {}},
        "merge": {"generated": 3, "kept": 3}}}  # fmt: skip

    def short_stage1(p):
        out = p.dir("instructions")
        out.mkdir(parents=True)
        return counts, []

    stages = tuple(
        dataclasses.replace(s, run=short_stage1) if s.name == "instructions" else s
        for s in pipeline.STAGES
    )
    monkeypatch.setattr(pipeline, "STAGES", stages)
    log = io.StringIO()
    Pipeline(cfg, Events(stream=log)).execute(["instructions"])
    lines = log.getvalue().splitlines()
    done = next(line for line in lines if line.startswith("[instructions] done"))
    assert done.endswith("[1 warning]")
    assert lines[lines.index(done) + 1].startswith(
        "[instructions] WARNING: stage 1 kept 3 of 24 target instructions"
    )
    manifest = json.loads((tmp_path / "run" / "manifest.json").read_text())
    [warning] = manifest["stages"]["instructions"]["warnings"]
    assert warning.startswith("stage 1 kept 3 of 24 target instructions")
    # JSON logs carry them as fields
    log = io.StringIO()
    Pipeline(cfg, Events(json_logs=True, stream=log)).execute(
        ["instructions"], force={"instructions"}
    )
    events = [json.loads(line) for line in log.getvalue().splitlines()]
    assert [e["warning"] for e in events if e["event"] == "stage_warning"] == [warning]
    assert next(e for e in events if e["event"] == "stage_done")["warnings"] == [warning]


def test_devices_and_packages_of_the_selected_stages_are_checked_before_any_work(
    tmp_path, pipeline_model_dir, monkeypatch
):
    """A tracker, bitsandbytes or lm-evaluation-harness that is missing fails `selfalign run`
    before stage 1, not hours later when its stage starts; stages not selected need nothing."""
    import importlib.util

    from selfalign.run.pipeline import Events, Pipeline
    from selfalign.run.settings import check_needs

    real = importlib.util.find_spec
    missing = {"wandb", "bitsandbytes", "lm_eval"}
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name in missing else real(name, *a)
    )
    cfg = _cfg(pipeline_model_dir, tmp_path)
    cfg.verbose.train.report_to = "wandb"
    run = Pipeline(cfg, Events(stream=io.StringIO()))
    with pytest.raises(UserError, match=r"^verbose.train.report_to: wandb is not installed"):
        run.execute()
    assert not (tmp_path / "run/1_instructions").exists()
    cfg.verbose.train.report_to = "none"
    cfg.engrave.method = "qlora"
    monkeypatch.setattr("torch.cuda.is_available", lambda: True)
    with pytest.raises(UserError, match=r"^engrave.method qlora needs .*selfalign\[gpu\]"):
        check_needs(cfg, ["self_align", "engrave"])
    monkeypatch.setattr("torch.cuda.is_available", lambda: False)
    with pytest.raises(UserError, match=r"^engrave.method qlora needs a CUDA GPU"):
        check_needs(cfg, ["engrave"])
    check_needs(cfg, ["instructions", "self_align"])  # not selected: not needed
    with pytest.raises(UserError, match=r"selfalign\[eval\]"):
        check_needs(cfg, ["evaluate"])
    cfg.evaluate.tasks = []
    check_needs(cfg, ["evaluate"])
    # a GPU the config asks for and this machine lacks: said now, naming the key
    monkeypatch.setattr("torch.cuda.is_available", lambda: False)
    cfg.engrave.device, cfg.engrave.method = "cuda", "lora"
    with pytest.raises(UserError, match=r"^engrave.device: cuda: CUDA is not available"):
        check_needs(cfg, ["engrave"])
    cfg.engrave.device, cfg.model.device = "auto", "cuda"
    with pytest.raises(UserError, match=r"^model.device: cuda: CUDA is not available"):
        check_needs(cfg, ["instructions"])
    check_needs(cfg, ["engrave"])  # trains on its own device setting
