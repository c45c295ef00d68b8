"""`selfalign run`: stages in order, skip when done, refuse changed settings, --force, resume
after SIGKILL in stage 2, and bad configs failing before any work."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from selfalign.errors import UserError
from selfalign.jsonl import read_jsonl
from selfalign.run.pipeline import run_pipeline
from selfalign.run.settings import load_pipeline_config, parse_stages, stage_hashes

TESTS = Path(__file__).parent

TRAIN = {
    "lora_r": 4, "effective_batch_size": 4, "micro_batch_size": 2, "max_steps": 2,
    "warmup_steps": 0, "max_length": 128, "gradient_checkpointing": False,
    "logging_steps": 1, "save_steps": 1,
}  # fmt: skip


def write_config(tmp_path: Path, model: Path, **changes) -> Path:
    data = {
        "run_dir": str(tmp_path / "run"),
        "model": {"model": str(model), "device": "cpu", "dtype": "float32", "batch_size": 4},
        "instructions": {
            "self_instruct": {"num_instructions": 6, "prompts_per_round": 4, "max_rounds": 3},
            "topics": {"epochs": 1, "max_prompts_per_type": 1},
            "questions": {"max_topics_per_type": 1},
        },
        "self_align": {"identity_questions": None},
        "engrave": dict(TRAIN),
        "verbose": {"min_words": 5, "train": dict(TRAIN)},
        "evaluate": {"limit": 2, "answers": 1, "max_tokens": 8, "chat_template": False},
    }
    for key, value in changes.items():
        node = data
        *parents, leaf = key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def all_ids_unique(run: Path) -> None:
    for path in run.rglob("*.jsonl"):
        if path.name == "training_log.jsonl":
            continue
        ids = [r["id"] for r in read_jsonl(path) if "id" in r]
        assert len(ids) == len(set(ids)), f"duplicate ids in {path}"


# -- pure parts ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (None, ["instructions", "self_align", "engrave", "verbose", "evaluate"]),
        ("2", ["self_align"]),
        ("1-2", ["instructions", "self_align"]),
        ("3-", ["engrave", "verbose", "evaluate"]),
        ("-2", ["instructions", "self_align"]),
        ("self-align", ["self_align"]),
        ("self_align-verbose", ["self_align", "engrave", "verbose"]),
    ],
)
def test_parse_stages(text, expected):
    assert parse_stages(text) == expected


@pytest.mark.parametrize("text", ["6", "2-1", "training"])
def test_parse_stages_rejects_nonsense(text):
    with pytest.raises(UserError, match="--stages"):
        parse_stages(text)


# -- bad configs fail before any work --------------------------------------------------------------


def run_cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "selfalign", *args], capture_output=True, text=True,
        env={**os.environ, **(env or {})}, timeout=600,
    )  # fmt: skip


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"self_align.temprature": 0.3}, "unknown key 'self_align.temprature'"),
        ({"engrave.max_steps": "many"}, "engrave.max_steps"),
        ({"model.model": "/nonexistent/model"}, "/nonexistent/model"),
        ({"instructions.topics.prompt": "/nonexistent/prompt.txt"}, "instructions.topics.prompt"),
        ({"instructions.self_instruct.seed_tasks": "EMPTY"}, "empty.jsonl"),
        ({"instructions.questions.seed_questions": "EMPTY"}, "empty.jsonl"),
    ],
)
def test_bad_config_fails_before_any_work(tmp_path, pipeline_model_dir, change, message):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    change = {k: str(empty) if v == "EMPTY" else v for k, v in change.items()}
    config = write_config(tmp_path, pipeline_model_dir, **change)
    result = run_cli("run", str(config))
    assert result.returncode == 2
    assert message in result.stderr and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "run" / "1_instructions").exists()


def test_unwritable_run_dir_fails_early(tmp_path, pipeline_model_dir):
    blocker = tmp_path / "file"
    blocker.write_text("")
    config = write_config(tmp_path, pipeline_model_dir, run_dir=str(blocker / "run"))
    result = run_cli("run", str(config))
    assert result.returncode == 2 and "not writable" in result.stderr
    assert "Traceback" not in result.stderr


def test_override_on_the_command_line(tmp_path, pipeline_model_dir):
    config = write_config(tmp_path, pipeline_model_dir)
    cfg = load_pipeline_config(config, ["self_align.sampling.max_tokens=7", "seed=3"])
    assert cfg.self_align.sampling.max_tokens == 7
    assert cfg.self_align.sampling.temperature == 0.5  # the stage default is kept
    assert cfg.self_align.seed == 3 and cfg.instructions.topics.seed == 3


# -- whole runs ------------------------------------------------------------------------------------


def record_progress(monkeypatch) -> dict[str, list[str]]:
    """Replace the progress bars by a recorder: label -> every status line shown."""
    from contextlib import contextmanager

    statuses: dict[str, list[str]] = {}

    class Bar:
        active = True

        def __init__(self, label):
            self.label = label

        def advance(self, n=1, status=""):
            statuses.setdefault(self.label, []).append(status)

    @contextmanager
    def recording(label, total):
        yield Bar(label)

    monkeypatch.setattr("selfalign.generation.records.progress_bar", recording)
    return statuses


@pytest.mark.slow
def test_full_run_skips_refuses_and_forces(tmp_path, pipeline_model_dir, monkeypatch):
    import pipeline_fakes

    # like `backend: openai`: no tokenizer in the backend (stage 4 takes the engraved model's),
    # order-1 n-gram penalties only, so EOS suppression and the apology bias are switched off
    pipeline_fakes.install(monkeypatch, server=True)
    statuses = record_progress(monkeypatch)
    config = write_config(
        tmp_path, pipeline_model_dir, **{
            "model.backend": "openai", "model.base_url": "http://127.0.0.1:9/v1",
            "instructions.self_instruct.suppress_eos": False,
            "instructions.topics.suppress_eos": False,
            "instructions.questions.suppress_eos": False,
            "self_align.apology_bias": 0, "verbose.sampling.ngram_penalties": {1: 0.5},
        },
    )  # fmt: skip
    run = tmp_path / "run"
    manifest = run_pipeline(load_pipeline_config(config)).data
    for stage, entry in manifest["stages"].items():
        assert entry["status"] == "done", stage
        assert entry["seconds"] >= 0 and entry["outputs"]
    # the progress bars counted kept and rejected rows as they came, with the stages' own filters
    last = {label: progress[-1] for label, progress in statuses.items() if label != "answering"}
    assert {"self-instruct", "topics epoch 0", "tgrt questions", "self-align"} <= set(last)
    tallies = {label: tuple(map(int, re.match(r"(\d+) ok, (\d+) rejected, \d+ tok/s", status).groups()))
               for label, status in last.items()}  # fmt: skip
    assert tallies["self-align"][0] == manifest["stages"]["self_align"]["counts"]["kept"]
    assert tallies["verbose answers"][0] == manifest["stages"]["verbose"]["counts"]["kept"]
    assert manifest["stages"]["instructions"]["counts"]["kept"] > 0
    assert manifest["stages"]["self_align"]["counts"]["kept"] > 0
    assert manifest["stages"]["verbose"]["counts"]["kept"] > 0
    for path in (
        "1_instructions/instructions.jsonl", "2_self_align/sft.jsonl",
        "3_engrave/model/model.safetensors", "4_verbose/verbose.jsonl",
        "4_verbose/model/model.safetensors", "report/index.html", "config.yaml",
    ):  # fmt: skip
        assert (run / path).exists(), path
    all_ids_unique(run)
    # stage 5 scored the three models on raw prompts and had each answer one question
    results = json.loads((run / "5_evaluate" / "results.json").read_text())
    assert list(results["mc"]) == ["base", "engraved", "final"]
    models = {"base": str(pipeline_model_dir), "engraved": str(run / "3_engrave/model"),
              "final": str(run / "4_verbose/model")}  # fmt: skip
    assert results["models"] == models
    for label, modes in results["mc"].items():
        assert list(modes) == ["raw"] and modes["raw"]["tasks"]["hhh"]["n"] == 8, label
        answers = read_jsonl(results["answers"]["files"][label])
        assert [r["id"] for r in answers] == ["vicuna-1"] and len(answers[0]["answers"]) == 1
    counts = manifest["stages"]["evaluate"]["counts"]
    assert counts["final truthfulqa_mc1"] == round(
        results["mc"]["final"]["raw"]["tasks"]["truthfulqa_mc1"]["acc"], 4
    )
    assert "Did it work?" in (run / "report" / "index.html").read_text()

    # a rerun with the same settings does nothing
    before = (run / "2_self_align" / "sft.jsonl").stat().st_mtime_ns
    run_pipeline(load_pipeline_config(config), report=False)
    assert (run / "2_self_align" / "sft.jsonl").stat().st_mtime_ns == before

    # changed settings of a done stage: refused, naming the key and the --force to use
    changed = load_pipeline_config(config, ["verbose.min_words=3"])
    with pytest.raises(UserError, match=r"'verbose'.*verbose.min_words.*--force verbose"):
        run_pipeline(changed, report=False)
    verbose_before = (run / "4_verbose" / "model" / "model.safetensors").stat().st_mtime_ns
    manifest = run_pipeline(changed, force=["verbose"], report=False).data
    assert manifest["stages"]["verbose"]["status"] == "done"
    assert (run / "2_self_align" / "sft.jsonl").stat().st_mtime_ns == before
    assert (run / "4_verbose" / "model" / "model.safetensors").stat().st_mtime_ns != verbose_before
    assert manifest["stages"]["verbose"]["settings"]["min_words"] == 3


def test_a_server_backend_that_cannot_do_what_a_stage_asks_fails_before_any_work(
    tmp_path, pipeline_model_dir
):
    # stage 4's default sampling has 3- and 4-gram penalties, which an OpenAI server cannot apply
    config = write_config(
        tmp_path, pipeline_model_dir, **{"model.backend": "openai", "model.base_url": "http://x/v1"}
    )
    with pytest.raises(UserError, match=r"stage 'verbose'.*orders 3, 4.*verbose.sampling"):
        load_pipeline_config(config)
    assert not (tmp_path / "run" / "manifest.json").exists()


@pytest.mark.slow
def test_sigkill_in_stage_2_resumes_stage_2(tmp_path, pipeline_model_dir):
    config = write_config(tmp_path, pipeline_model_dir)
    script = tmp_path / "run_fake.py"
    script.write_text(
        "import sys\n"
        f"sys.path.insert(0, {str(TESTS)!r})\n"
        "import pipeline_fakes\n"
        "pipeline_fakes.install(kill_after=int(sys.argv[1]) if sys.argv[1] != 'none' else None)\n"
        "from selfalign.cli import main\n"
        f"sys.argv = ['selfalign', 'run', {str(config)!r}, '--quiet']\n"
        "main()\n"
    )
    run = tmp_path / "run"
    killed = subprocess.run([sys.executable, str(script), "6"], capture_output=True, text=True)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    manifest = json.loads((run / "manifest.json").read_text())
    assert manifest["stages"]["instructions"]["status"] == "done"
    assert manifest["stages"]["self_align"]["status"] == "running"
    stage1 = {p: p.stat().st_mtime_ns for p in (run / "1_instructions").glob("*.jsonl")}
    raw_before = read_jsonl(next((run / "2_self_align").glob("*.raw.jsonl")))
    assert 0 < len(raw_before)

    done = subprocess.run([sys.executable, str(script), "none"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "[instructions] done already, skipped" in done.stderr
    assert {p: p.stat().st_mtime_ns for p in (run / "1_instructions").glob("*.jsonl")} == stage1
    manifest = json.loads((run / "manifest.json").read_text())
    assert all(s["status"] == "done" for s in manifest["stages"].values())
    raw_after = read_jsonl(next((run / "2_self_align").glob("*.raw.jsonl")))
    assert raw_after[: len(raw_before)] == raw_before  # resumed, not redone
    all_ids_unique(run)


@pytest.mark.parametrize(
    ("name", "overrides"),
    [
        ("demo", []),
        ("small-gpu", []),
        pytest.param("paper", [], marks=pytest.mark.vllm),  # backend vllm
        pytest.param("paper", ["model.backend=openai", "model.serve=auto"], marks=pytest.mark.vllm),
        # a server of the user's: only the kind is known, and a vLLM one runs the n-gram penalties
        ("paper", ["model.backend=openai", "model.server=vllm", "model.base_url=http://x/v1"]),
    ],
)
def test_example_configs_pass_preflight_and_open_with_their_command(
    name, overrides, tmp_path, pipeline_model_dir
):
    from importlib import resources

    path = resources.files("selfalign") / "configs" / f"{name}.yaml"
    header = [line for line in path.read_text().splitlines() if line.startswith("#")]
    assert re.search(rf"selfalign run \S*{name}\.yaml|make demo", "\n".join(header[:5]))
    # the whole preflight, on a model that exists here (theirs are hub ids or built by make demo)
    cfg = load_pipeline_config(
        str(path), [f"model.model={pipeline_model_dir}", *overrides], run_dir=tmp_path / "run"
    )
    assert cfg.run_dir == str(tmp_path / "run")


def test_an_edited_prompt_file_changes_the_stage_hash(tmp_path, pipeline_model_dir):
    prompt = tmp_path / "verbose.txt"
    prompt.write_text("You are {name}. Answer at length.")
    config = write_config(tmp_path, pipeline_model_dir, **{"verbose.verbose_prompt": str(prompt)})
    before = stage_hashes(load_pipeline_config(config))
    prompt.write_text("You are {name}. Answer briefly.")
    after = stage_hashes(load_pipeline_config(config))
    assert before["self_align"] == after["self_align"]
    assert before["verbose"] != after["verbose"]


def test_constitution_check_warns_when_the_prompt_leaves_no_room(
    monkeypatch, capsys, tiny_model_dir
):
    from cli_run import run_main

    code, out, err = run_main(monkeypatch, capsys, "constitution", "check", "default")
    assert code == 0 and "ok:" in out and "warning" not in err  # fits Llama 2's 4096
    code, out, err = run_main(
        monkeypatch, capsys, "constitution", "check", "default", "--context", "2048"
    )
    assert code == 0 and "ok:" in out and "warning" in err and "context 2048 assumed" in err
    # counted with a model's tokenizer, against that model's own context (2048 here)
    code, out, err = run_main(
        monkeypatch, capsys, "constitution", "check", "default", "--tokenizer", str(tiny_model_dir)
    )
    assert code == 0 and "tokens" in out and "context 2048 assumed" in err


@pytest.mark.parametrize(
    "overrides", [["model.backend=vllm"], ["model.backend=openai", "model.serve=auto"]]
)
def test_a_vllm_run_without_vllm_fails_before_any_work(
    overrides, tmp_path, pipeline_model_dir, monkeypatch
):
    import sys

    monkeypatch.setitem(sys.modules, "vllm", None)  # as if it were not installed
    config = write_config(tmp_path, pipeline_model_dir)
    with pytest.raises(UserError, match=r"needs vLLM.*selfalign\[vllm\].*make vllm"):
        load_pipeline_config(config, overrides)
    assert not (tmp_path / "run" / "manifest.json").exists()
