"""Checkpoints always resume, and a resumed run's stats are the whole run's (issue 12, items 2, 9).

Every run here trains the tiny model 5 steps on 16 rows: 2 optimizer steps an epoch (so the
Trainer, handed the final checkpoint, would train a 6th), a checkpoint every 2 steps and at the
end, the loss logged at steps 1, 2, 4 and 5 (step 3 unlogged: the loss must weigh steps). An
interrupted run keeps checkpoint-2 and checkpoint-4; each test damages a copy of it, or kills a
subprocess while it trains, then reruns and compares with an uninterrupted run: the Trainer's
resume is exact on CPU, so steps, log rows, loss and weights must all be equal.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from test_engrave import IDENTITY, Crash, sft_rows, tiny_config

from selfalign.jsonl import read_jsonl, write_jsonl_atomic
from selfalign.stages.stage3_engrave import run_engrave

STEPS = 5


def config(model_dir, method: str = "lora", **changes):
    rate = 1e-3 if method == "full" else 3e-2
    return tiny_config(model_dir, max_steps=STEPS, save_steps=2, logging_steps=STEPS,
                       method=method, learning_rate=rate, device="cpu", **changes)  # fmt: skip


def weights(out: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(out / "model.safetensors")


def assert_same_run(out: Path, stats: dict, straight: tuple[Path, dict]) -> None:
    """`out` trained the same run as the uninterrupted one: steps, log rows, loss and weights."""
    import torch

    reference, expected = straight
    assert stats["steps"] == expected["steps"] == STEPS
    rows = read_jsonl(out / "training_log.jsonl")
    expected_rows = read_jsonl(reference / "training_log.jsonl")
    assert [r["step"] for r in rows] == [r["step"] for r in expected_rows]  # one row per step
    assert [r["loss"] for r in rows] == [r["loss"] for r in expected_rows]
    assert stats["train_loss"] == pytest.approx(expected["train_loss"], abs=1e-6)
    a, b = weights(out), weights(reference)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


class TrainerLoss:
    """A TrainerCallback keeping the train_loss the Trainer logs when `train()` ends."""

    def __new__(cls):
        from transformers import TrainerCallback

        class _TrainerLoss(TrainerCallback):
            loss = None

            def on_log(self, args, state, control, logs=None, **kwargs):
                if logs and "train_loss" in logs:
                    self.loss = logs["train_loss"]

        return _TrainerLoss()


@pytest.fixture(scope="module")
def runs(tiny_model_dir, tmp_path_factory):
    """runs(method) -> (data, interrupted dir with checkpoint-2 and -4, (straight dir, stats))."""
    made = {}

    def make(method: str):
        if method not in made:
            root = tmp_path_factory.mktemp(f"runs-{method}")
            write_jsonl_atomic(root / "sft.jsonl", sft_rows(16))
            cfg = config(tiny_model_dir, method)
            own = TrainerLoss()
            straight = run_engrave(
                cfg, root / "sft.jsonl", root / "straight", IDENTITY, callbacks=[own]
            )
            # uninterrupted, the Trainer's own mean loss is the run's: ours must be the same
            assert straight["train_loss"] == pytest.approx(own.loss, abs=1e-6)
            with pytest.raises(KeyboardInterrupt):
                run_engrave(cfg, root / "sft.jsonl", root / "cut", IDENTITY, callbacks=[Crash(5)])
            names = sorted(p.name for p in (root / "cut" / "checkpoints").glob("checkpoint-*"))
            assert names == ["checkpoint-2", "checkpoint-4"]
            made[method] = (root / "sft.jsonl", root / "cut", (root / "straight", straight))
        return made[method]

    return make


def copy_of(interrupted: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(interrupted, tmp_path / "model"))


def set_aside_folders(out: Path, name: str) -> list[Path]:
    return sorted((out / "checkpoints").glob(f"incomplete-{name}-*"))


def damage(path: Path, how: str) -> None:
    if how == "missing":
        path.unlink()
    else:  # cut in half, as a kill or a full disk mid-write leaves it
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


# -- a damaged newest checkpoint is set aside, the one before it resumes ---------------------------


@pytest.mark.parametrize(
    ("method", "name", "how"),
    [
        ("lora", "adapter_model.safetensors", "missing"),
        ("lora", "adapter_model.safetensors", "truncated"),
        ("lora", "adapter_config.json", "missing"),
        ("lora", "optimizer.pt", "missing"),
        ("lora", "scheduler.pt", "missing"),
        ("lora", "rng_state.pth", "missing"),
        ("lora", "trainer_state.json", "missing"),
        pytest.param("full", "model.safetensors", "missing", marks=pytest.mark.slow),
        pytest.param("full", "optimizer.pt", "truncated", marks=pytest.mark.slow),
    ],
)
def test_incomplete_checkpoint_is_set_aside_and_the_previous_resumes(
    runs, tiny_model_dir, tmp_path, caplog, method, name, how
):
    data, interrupted, straight = runs(method)
    out = copy_of(interrupted, tmp_path)
    damage(out / "checkpoints" / "checkpoint-4" / name, how)
    # a log row the dead run wrote after its last good checkpoint: redone, so logged anew
    rows = read_jsonl(out / "training_log.jsonl")
    rows = [r if r["step"] <= 2 else {**r, "loss": 99.0} for r in rows]
    write_jsonl_atomic(out / "training_log.jsonl", rows)

    cfg = config(tiny_model_dir, method, keep_checkpoints=True)
    with caplog.at_level(logging.WARNING):
        stats = run_engrave(cfg, data, out, IDENTITY)
    assert stats["resumed_from_step"] == 2
    assert_same_run(out, stats, straight)
    aside = set_aside_folders(out, "checkpoint-4")  # moved, as it was, never deleted
    assert len(aside) == 1 and (aside[0] / name).exists() == (how != "missing")
    warned = [r.getMessage() for r in caplog.records if " is incomplete " in r.getMessage()]
    assert len(warned) == 1 and name in warned[0] and str(aside[0]) in warned[0]


def test_incomplete_only_checkpoint_starts_fresh(runs, tiny_model_dir, tmp_path, caplog):
    data, interrupted, straight = runs("lora")
    out = copy_of(interrupted, tmp_path)
    shutil.rmtree(out / "checkpoints" / "checkpoint-2")
    damage(out / "checkpoints" / "checkpoint-4" / "trainer_state.json", "missing")
    cfg = config(tiny_model_dir, keep_checkpoints=True)
    with caplog.at_level(logging.WARNING):
        stats = run_engrave(cfg, data, out, IDENTITY)
    assert stats["resumed_from_step"] == 0
    assert_same_run(out, stats, straight)
    aside = set_aside_folders(out, "checkpoint-4")
    assert len(aside) == 1 and (aside[0] / "optimizer.pt").is_file()  # kept as it was
    assert str(aside[0]) in caplog.text


def test_resume_from_the_final_checkpoint_trains_no_extra_step(runs, tiny_model_dir, tmp_path):
    """Killed after the last checkpoint, before the model was written: the rerun writes the
    model from that checkpoint (the Trainer would train step 6 of 5)."""
    from transformers import TrainerCallback

    class StopAfterFinalSave(TrainerCallback):
        def on_save(self, args, state, control, **kwargs):
            if state.global_step == STEPS:
                raise KeyboardInterrupt("killed after the final checkpoint")

    data, _, straight = runs("lora")
    cfg = config(tiny_model_dir)
    with pytest.raises(KeyboardInterrupt):
        run_engrave(cfg, data, tmp_path / "model", IDENTITY, callbacks=[StopAfterFinalSave()])
    assert (tmp_path / "model" / "checkpoints" / f"checkpoint-{STEPS}").is_dir()
    stats = run_engrave(cfg, data, tmp_path / "model", IDENTITY)
    assert stats["resumed_from_step"] == STEPS
    assert_same_run(tmp_path / "model", stats, straight)


# -- SIGKILL of a training process, then a rerun ---------------------------------------------------

# The child trains like `runs` but dies by SIGKILL at one point: writing half of a checkpoint file
# (the first time one of that name is written after step 2) or after a callback event.
CHILD = r"""
import io, os, signal, sys
sys.path.insert(0, sys.argv[1])
from pathlib import Path
from test_checkpoints import IDENTITY, config
from selfalign.stages.stage3_engrave import run_engrave

model, data, out, point = sys.argv[2:6]
die = lambda: os.kill(os.getpid(), signal.SIGKILL)

def half(path, data):
    with open(path, "wb") as f:
        f.write(data[: len(data) // 2])
        f.flush()
    die()

def late(path):
    return "checkpoint-2" not in str(path)

if point == "optimizer.pt":
    import torch
    save = torch.save
    def torch_save(obj, f, *a, **k):
        if isinstance(f, str) and f.endswith("optimizer.pt") and late(f):
            buffer = io.BytesIO()
            save(obj, buffer, *a, **k)
            half(f, buffer.getvalue())
        return save(obj, f, *a, **k)
    torch.save = torch_save
elif point == "adapter_model.safetensors":
    import peft.peft_model as pm
    from safetensors.torch import save as to_bytes
    save_file = pm.safe_save_file
    def safe_save_file(tensors, filename, *a, **k):
        if late(filename):
            half(filename, to_bytes(tensors, metadata=k.get("metadata")))
        return save_file(tensors, filename, *a, **k)
    pm.safe_save_file = safe_save_file
elif point == "trainer_state.json":
    import dataclasses, json
    from transformers import TrainerState
    save_to_json = TrainerState.save_to_json
    def torn(self, path):
        if late(path):
            half(path, json.dumps(dataclasses.asdict(self), indent=2, sort_keys=True).encode())
        return save_to_json(self, path)
    TrainerState.save_to_json = torn

callbacks = []
if point.startswith("after:"):  # after:save:5 (the final checkpoint), after:step:3 (mid-run)
    from transformers import TrainerCallback
    event, step = point.split(":")[1], int(point.split(":")[2])
    class Kill(TrainerCallback):
        def on_save(self, args, state, control, **kw):
            if event == "save" and state.global_step == step:
                die()
        def on_step_end(self, args, state, control, **kw):
            if event == "step" and state.global_step == step:
                die()
    callbacks.append(Kill())
run_engrave(config(model), data, out, IDENTITY, callbacks=callbacks)
"""


def killed_run(point: str, tiny_model_dir: Path, data: Path, out: Path) -> None:
    env = {**os.environ, "SELFALIGN_PROGRESS": "0", "PYTHONPATH": str(Path(__file__).parent)}
    child = subprocess.run(
        [sys.executable, "-c", CHILD, str(Path(__file__).parent), str(tiny_model_dir), str(data),
         str(out), point],
        env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert child.returncode == -signal.SIGKILL, child.stderr[-3000:]


@pytest.mark.slow
@pytest.mark.parametrize(
    ("point", "resumes_from"),
    [
        ("adapter_model.safetensors", 2),  # while checkpoint-4's weights are written
        ("optimizer.pt", 2),  # ... its optimizer state
        ("trainer_state.json", 2),  # ... its last file
        ("after:step:3", 2),  # mid-run, a step the log does not show
        ("after:save:5", 5),  # right after the final checkpoint
    ],
)
def test_sigkill_then_rerun_equals_an_uninterrupted_run(
    runs, tiny_model_dir, tmp_path, point, resumes_from
):
    data, _, straight = runs("lora")
    out = tmp_path / "model"
    killed_run(point, tiny_model_dir, data, out)
    assert not (out / "train_stats.json").exists()

    stats = run_engrave(config(tiny_model_dir), data, out, IDENTITY)
    assert stats["resumed_from_step"] == resumes_from
    assert_same_run(out, stats, straight)
