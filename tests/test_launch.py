"""Training in several processes (`processes: 2`) under `accelerate launch`, for real: two
processes on CPU joined over gloo, against one process at the same effective batch and seed."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from test_engrave import IDENTITY, sft_rows, tiny_config
from test_pipeline import write_config

from selfalign.errors import UserError
from selfalign.jsonl import read_jsonl, write_jsonl_atomic
from selfalign.stages.stage3_engrave import run_engrave
from selfalign.training import launch

# Per-step loss of two processes against one: the same examples make each optimizer step, summed
# in another order (two micro batches of 4 on one process, one on each of two), so the curves
# agree to float rounding plus what a changed sum order does to a few steps of training.
LOSS_TOLERANCE = 0.05


def config(model, **changes):
    # 32 examples, 8 per optimizer step: 4 steps (accumulation 2 on one process, 1 on two)
    return tiny_config(model, **({"max_steps": -1, "epochs": 1, "save_steps": 2} | changes))


@pytest.fixture(scope="module")
def sft_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("launch") / "sft.jsonl"
    write_jsonl_atomic(path, sft_rows(32))
    return path


def losses(out: Path) -> list[float]:
    return [row["loss"] for row in read_jsonl(out / "training_log.jsonl")]


# -- what is launched ------------------------------------------------------------------------------


def test_processes_auto_is_one_without_a_gpu_and_cpu_runs_ddp_only(tiny_model_dir):
    assert launch.processes(config(tiny_model_dir, processes="auto")) == 1
    assert launch.processes(config(tiny_model_dir, processes=3)) == 3  # gloo: any number
    with pytest.raises(UserError, match=r"distributed: fsdp needs GPUs.*distributed: ddp"):
        launch.processes(config(tiny_model_dir, processes=2, distributed="fsdp"))


def test_launch_command_names_the_sharding_config(tiny_model_dir, tmp_path):
    job = tmp_path / "job.json"
    ddp = launch.launch_command(config(tiny_model_dir), 2, job)
    assert ddp[1:3] == ["-m", "accelerate.commands.launch"] and "--multi_gpu" in ddp
    assert ddp[-3:] == ["-m", "selfalign.training.launch", str(job)]
    assert ddp[ddp.index("--num_processes") + 1] == "2"
    assert ddp[ddp.index("--mixed_precision") + 1] == "no"  # fp32 on CPU
    # one process: accelerate refuses --multi_gpu ("at least 2 processes"), found on an H200
    assert "--multi_gpu" not in launch.launch_command(config(tiny_model_dir), 1, job)
    fsdp = launch.launch_command(config(tiny_model_dir, distributed="fsdp"), 2, job)
    shipped = Path(fsdp[fsdp.index("--config_file") + 1])
    assert shipped.name == "fsdp.yaml" and "--multi_gpu" not in fsdp
    settings = yaml.safe_load(shipped.read_text())
    assert settings["distributed_type"] == "FSDP"
    assert settings["fsdp_config"]["fsdp_auto_wrap_policy"] == "TRANSFORMER_BASED_WRAP"
    zero3 = yaml.safe_load((shipped.parent / "deepspeed_zero3.yaml").read_text())
    assert zero3["deepspeed_config"]["zero_stage"] == 3
    assert zero3["deepspeed_config"]["zero3_save_16bit_model"] is True
    own = tmp_path / "mine.yaml"
    own.write_text("distributed_type: MULTI_GPU\n")
    mine = launch.launch_command(config(tiny_model_dir, accelerate_config=str(own)), 2, job)
    assert mine[mine.index("--config_file") + 1] == str(own)
    with pytest.raises(UserError, match=r"accelerate_config: .*nope.yaml: file not found"):
        launch.launch_command(config(tiny_model_dir, accelerate_config="nope.yaml"), 2, job)


def test_deepspeed_without_deepspeed_says_how_to_install_it(tiny_model_dir, tmp_path):
    pytest.importorskip("torch")
    import importlib.util

    if importlib.util.find_spec("deepspeed") is not None:
        pytest.skip("deepspeed is installed here")
    with pytest.raises(UserError, match=r"pip install 'selfalign\[deepspeed\]'"):
        launch.launch_command(config(tiny_model_dir, distributed="deepspeed"), 2, tmp_path / "j")


# -- two real processes ----------------------------------------------------------------------------


@pytest.mark.slow
def test_two_processes_train_as_one_does(tiny_model_dir, sft_file, tmp_path):
    one = run_engrave(config(tiny_model_dir), sft_file, tmp_path / "one", IDENTITY)
    two = run_engrave(config(tiny_model_dir, processes=2), sft_file, tmp_path / "two", IDENTITY)
    assert (one["world_size"], one["gradient_accumulation"]) == (1, 2)
    assert (two["world_size"], two["gradient_accumulation"]) == (2, 1)
    assert one["effective_batch_size"] == two["effective_batch_size"] == 8
    assert one["steps"] == two["steps"] == 4
    a, b = losses(tmp_path / "one"), losses(tmp_path / "two")
    assert len(a) == len(b) == 4
    assert max(abs(x - y) for x, y in zip(a, b, strict=True)) < LOSS_TOLERANCE, (a, b)
    # one model directory, written once (rank 0), that loads; the launch files are gone
    out = tmp_path / "two"
    assert not (out / launch.LAUNCH_DIR).exists()
    assert json.loads((out / "train_stats.json").read_text())["world_size"] == 2
    assert "x 2 processes (ddp))" in (out / "README.md").read_text()
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(out, use_safetensors=True)
    # how many processes trained it is not part of what was trained: a rerun with one is done
    again = run_engrave(config(tiny_model_dir, processes=1), sft_file, out, IDENTITY)
    assert again.get("skipped") is True


@pytest.mark.slow
def test_a_failed_rank_fails_the_run_with_its_reason(tiny_model_dir, sft_file, tmp_path):
    # accelerate applies FSDP to GPUs only: on CPU it would quietly run DDP, and each rank refuses
    cfg = config(tiny_model_dir, processes=2, distributed="fsdp")
    job = launch.make_job(cfg, sft_file, tmp_path, IDENTITY, data_description="test")
    with pytest.raises(UserError) as failed:
        launch.train_launched(cfg, 2, job, tmp_path)
    message = str(failed.value)
    assert message.startswith("training process ") and " of 2 failed: " in message
    assert "distributed: fsdp was asked for, but accelerate did not enable it" in message
    assert not (tmp_path / "train_stats.json").exists()


def _engrave_command(tmp_path, model, sft_file, processes) -> list[str]:
    settings = config(model, processes=processes, max_steps=8, save_steps=1).model_dump()
    path = tmp_path / f"engrave-{processes}.yaml"
    path.write_text(yaml.safe_dump({k: v for k, v in settings.items() if v is not None}))
    return [sys.executable, "-m", "selfalign", "engrave", "--config", str(path),
            "--data", str(sft_file), "--output", str(tmp_path / "model")]  # fmt: skip


def _launched_processes(job: Path) -> list[int]:
    found = subprocess.run(["pgrep", "-f", str(job)], capture_output=True, text=True)
    return [int(pid) for pid in found.stdout.split()]


@pytest.mark.slow
def test_killed_two_process_run_resumes_only_with_two(tiny_model_dir, sft_file, tmp_path):
    env = {**os.environ, "SELFALIGN_PROGRESS": "0"}
    command = _engrave_command(tmp_path, tiny_model_dir, sft_file, 2)
    parent = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    first = tmp_path / "model" / "checkpoints" / "checkpoint-1" / "trainer_state.json"
    deadline = time.monotonic() + 300
    while not first.exists() and parent.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert first.exists(), parent.stderr.read().decode()[-3000:] if parent.poll() else "timeout"
    parent.send_signal(signal.SIGKILL)  # selfalign itself: its training processes must follow
    parent.wait()
    job = tmp_path / "model" / launch.LAUNCH_DIR / launch.JOB
    deadline = time.monotonic() + 60
    while _launched_processes(job) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not _launched_processes(job)
    assert not (tmp_path / "model" / "train_stats.json").exists()

    # one process cannot resume what two wrote (each wrote its own RNG state)
    one = subprocess.run(_engrave_command(tmp_path, tiny_model_dir, sft_file, 1), env=env,
                         capture_output=True, text=True)  # fmt: skip
    assert one.returncode == 2, one.stderr[-2000:]
    assert "was written by 2 processes (ddp), this run has 1 process" in one.stderr
    assert "Traceback" not in one.stderr

    two = subprocess.run(command, env=env, capture_output=True, text=True)
    assert two.returncode == 0, two.stderr[-3000:]
    stats = json.loads((tmp_path / "model" / "train_stats.json").read_text())
    assert 1 <= stats["resumed_from_step"] < 8 and stats["steps"] == 8
    assert stats["world_size"] == 2
    steps = [row["step"] for row in read_jsonl(tmp_path / "model" / "training_log.jsonl")]
    assert steps == list(range(1, 9))  # logged once each, across the kill


@pytest.mark.slow
def test_pipeline_stage_3_with_two_processes(tmp_path, pipeline_model_dir, monkeypatch):
    import pipeline_fakes

    from selfalign.run.pipeline import run_pipeline
    from selfalign.run.settings import load_pipeline_config, parse_stages

    pipeline_fakes.install(monkeypatch)  # scripted stages 1-2; the training is real
    config = write_config(tmp_path, pipeline_model_dir, **{"engrave.processes": 2})
    manifest = run_pipeline(
        load_pipeline_config(config), stages=parse_stages("1-3"), report=False
    ).data
    assert manifest["stages"]["engrave"]["status"] == "done"
    model = tmp_path / "run" / "3_engrave" / "model"
    assert json.loads((model / "train_stats.json").read_text())["world_size"] == 2
    # processes are not a setting of what stage 3 makes: one process finds it done
    fewer = load_pipeline_config(config, ["engrave.processes=1"])
    manifest = run_pipeline(fewer, stages=parse_stages("1-3"), report=False).data
    assert manifest["stages"]["engrave"]["status"] == "done"


@pytest.mark.slow
def test_selfalign_engrave_under_accelerate_launch_by_hand(tiny_model_dir, sft_file, tmp_path):
    # each process runs the command and trains in place (it is one of a launched job)
    command = _engrave_command(tmp_path, tiny_model_dir, sft_file, 1)
    by_hand = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu",
               "--num_processes", "2", "--mixed_precision", "no", "--dynamo_backend", "no",
               "-m", *command[2:]]  # fmt: skip
    done = subprocess.run(by_hand, env={**os.environ, "SELFALIGN_PROGRESS": "0"},
                          capture_output=True, text=True)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    stats = json.loads((tmp_path / "model" / "train_stats.json").read_text())
    assert (stats["world_size"], stats["gradient_accumulation"], stats["steps"]) == (2, 1, 8)
    assert done.stderr.count(": trained on ") == 1, done.stderr[-2000:]  # rank 0's summary
    assert not (tmp_path / "model" / launch.LAUNCH_DIR).exists()  # nothing was launched again
