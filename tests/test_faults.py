"""Faults injected into real `selfalign run` processes (`tests/faults.py`): SIGKILL at 13 points
across the first four stages (stage 5 runs after each), torn writes, Ctrl-C and a full disk. After each, a plain rerun must
complete, write every id exactly once, keep the manifest's counts equal to the files' lines, and
produce data byte-identical to one uninterrupted run with the same seeds."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from test_pipeline import all_ids_unique, write_config

from selfalign.jsonl import read_jsonl

pytestmark = pytest.mark.slow
TESTS = Path(__file__).parent


def fault_run(config: Path, point: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(TESTS / "faults.py"), str(config), point, *args],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip


def config_for(tmp_path: Path, model: Path, name: str) -> Path:
    path = write_config(tmp_path, model, run_dir=str(tmp_path / name))
    return path.rename(tmp_path / f"{name}.yaml")


def data_files(run: Path) -> dict[str, list[dict]]:
    """Every JSONL record the stages wrote (training logs and checkpoints aside)."""
    return {
        str(p.relative_to(run)): read_jsonl(p)
        for p in sorted(run.rglob("*.jsonl"))
        if p.name != "training_log.jsonl"
        and ".trash" not in p.parts
        and "checkpoints" not in p.parts
    }


@pytest.fixture(scope="module")
def reference(tmp_path_factory, pipeline_model_dir):
    """One uninterrupted run: what every interrupted-then-resumed run must reproduce."""
    tmp = tmp_path_factory.mktemp("reference")
    done = fault_run(config_for(tmp, pipeline_model_dir, "run"), "none")
    assert done.returncode == 0, done.stderr
    return tmp / "run"


def check_like_reference(run: Path, reference: Path) -> None:
    manifest = json.loads((run / "manifest.json").read_text())
    assert {n: s["status"] for n, s in manifest["stages"].items()} == dict.fromkeys(
        ("instructions", "self_align", "engrave", "verbose", "evaluate"), "done"
    )
    assert data_files(run) == data_files(reference)
    all_ids_unique(run)
    for stage, kept in (("instructions", "1_instructions/instructions.jsonl"),
                        ("self_align", "2_self_align/aligned.jsonl"),
                        ("verbose", "4_verbose/verbose.jsonl")):  # fmt: skip
        assert manifest["stages"][stage]["counts"]["kept"] == len(read_jsonl(run / kept)), stage
    for model in ("3_engrave/model", "4_verbose/model"):
        ours = json.loads((run / model / "train_stats.json").read_text())
        theirs = json.loads((reference / model / "train_stats.json").read_text())
        assert ours["steps"] == theirs["steps"], model
        logged = [r["step"] for r in read_jsonl(run / model / "training_log.jsonl") if "loss" in r]
        assert logged == sorted(set(logged)) and max(logged) == theirs["steps"], model


POINTS = [
    "kill:batch:self_instruct.raw.jsonl:1",  # stage 1, self-instruct generation
    "torn:batch:topics.raw.jsonl:2",  # stage 1, a torn line in the topic brainstorm
    "kill:batch:tgrt_questions.raw.jsonl:1",  # stage 1, TGRT questions
    "kill:replace:instructions.jsonl",  # stage 1, the merge's final file not yet in place
    "kill:finish:instructions",  # between stages 1 and 2
    "kill:batch:self_align.raw.jsonl:2",  # stage 2 generation
    "torn:batch:self_align.raw.jsonl:1",  # stage 2, a torn line
    "kill:replace:sft.jsonl",  # stage 2's finalize
    "kill:step:1:1",  # stage 3 training, after step 1 (its checkpoint not yet written)
    "kill:save:optimizer.pt",  # stage 3, a checkpoint half written
    "kill:finish:engrave",  # between stages 3 and 4
    "kill:batch:verbose.raw.jsonl:1",  # stage 4 generation
    "kill:step:1:2",  # stage 4's final SFT
]


@pytest.mark.parametrize("point", POINTS)
def test_sigkill_then_rerun_gives_the_uninterrupted_result(
    point, reference, tmp_path, pipeline_model_dir
):
    config = config_for(tmp_path, pipeline_model_dir, "run")
    killed = fault_run(config, point)
    assert killed.returncode == -signal.SIGKILL, (point, killed.stderr[-2000:])
    done = fault_run(config, "none")
    assert done.returncode == 0, done.stderr[-2000:]
    check_like_reference(tmp_path / "run", reference)


def test_ctrl_c_exits_130_then_rerun_resumes(reference, tmp_path, pipeline_model_dir):
    config = config_for(tmp_path, pipeline_model_dir, "run")
    stopped = fault_run(config, "int:batch:self_align.raw.jsonl:1")
    assert stopped.returncode == 130, stopped.stderr[-2000:]
    assert "interrupted; rerun to resume" in stopped.stderr and "Traceback" not in stopped.stderr
    manifest = json.loads((tmp_path / "run" / "manifest.json").read_text())
    assert manifest["stages"]["self_align"]["status"] in ("interrupted", "failed")
    done = fault_run(config, "none")
    assert done.returncode == 0, done.stderr[-2000:]
    check_like_reference(tmp_path / "run", reference)


def test_a_full_disk_is_one_line_then_rerun_resumes(reference, tmp_path, pipeline_model_dir):
    config = config_for(tmp_path, pipeline_model_dir, "run")
    full = fault_run(config, "enospc:verbose.raw.jsonl:1")
    assert full.returncode in (1, 2), full.stderr[-2000:]
    lines = full.stderr.strip().splitlines()
    assert (
        "Traceback" not in full.stderr
        and "No space left" in lines[-1]
        and "verbose.raw.jsonl" in lines[-1]
    )
    manifest = json.loads((tmp_path / "run" / "manifest.json").read_text())
    assert manifest["stages"]["verbose"]["status"] == "failed"
    assert "No space left" in manifest["stages"]["verbose"]["error"]
    done = fault_run(config, "none")
    assert done.returncode == 0, done.stderr[-2000:]
    check_like_reference(tmp_path / "run", reference)
