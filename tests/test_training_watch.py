"""Training people can watch (issue 18, finding 6): a held-out split and its eval loss, trackers
(report_to), and training data as Alpaca/ShareGPT JSON or a saved `datasets` directory.

One tiny LoRA run (module fixture) trains on a `datasets` directory of Alpaca rows without ids,
holds out 4 of its 20 rows, evaluates at step 4 and at the last step (6), checkpoints every 2
steps and, when tensorboard is installed, also writes TensorBoard events into OUT/logs.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import random
from pathlib import Path

import pytest
from cli_run import run_main as cli
from test_engrave import IDENTITY, Crash, tiny_config

from selfalign.errors import UserError
from selfalign.jsonl import read_jsonl, write_jsonl_atomic
from selfalign.stages.stage3_engrave import load_sft_rows, run_engrave
from selfalign.training import sft

HAS_TENSORBOARD = importlib.util.find_spec("tensorboard") is not None


def alpaca_rows(n: int) -> list[dict]:
    return [
        {"instruction": f"Tell me about topic number {i}.", "input": "",
         "output": f"Topic {i} is a fine subject; here is what I know about it."}
        for i in range(n)
    ]  # fmt: skip


def save_dataset(rows: list[dict], path: Path) -> Path:
    from datasets import Dataset

    Dataset.from_list(rows).save_to_disk(str(path))
    return path


def watch_config(model_dir, **changes):
    settings = dict(max_steps=6, eval_fraction=0.2, eval_steps=4, save_steps=2, device="cpu",
                    report_to=["tensorboard"] if HAS_TENSORBOARD else "none")  # fmt: skip
    return tiny_config(model_dir, **(settings | changes))


@pytest.fixture(scope="module")
def watched(tiny_model_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("watch")
    data = save_dataset(alpaca_rows(20), root / "data")
    stats = run_engrave(watch_config(tiny_model_dir), data, root / "model", IDENTITY)
    return data, root / "model", stats


# -- eval split and eval loss ----------------------------------------------------------------------


def test_held_out_rows_depend_on_seed_and_ids_not_order():
    rows = [{"id": f"r{i}"} for i in range(40)]
    train, held = sft.split_eval(rows, 0.1, 7, "data")
    assert len(held) == 4 and len(train) == 36
    assert {r["id"] for r in train} | {r["id"] for r in held} == {r["id"] for r in rows}
    shuffled = random.Random(0).sample(rows, len(rows))
    assert {r["id"] for r in sft.split_eval(shuffled, 0.1, 7, "data")[1]} == {r["id"] for r in held}
    assert sft.split_eval(rows, 0.1, 8, "data")[1] != held  # another seed, another split
    assert {r["id"] for r in held} <= {r["id"] for r in sft.split_eval(rows, 0.2, 7, "data")[1]}
    assert sft.split_eval(rows, 0.0, 7, "data") == (rows, [])
    with pytest.raises(UserError, match="data: eval_fraction 0.1 of 1 rows leaves none"):
        sft.split_eval(rows[:1], 0.1, 7, "data")


def test_eval_loss_is_in_the_log_the_stats_and_the_card(watched):
    _, out, stats = watched
    log = read_jsonl(out / "training_log.jsonl")
    train = [r for r in log if "loss" in r]
    evals = [r for r in log if "eval_loss" in r]
    assert [r["step"] for r in train] == [1, 2, 3, 4, 5, 6]
    assert all({"step", "loss", "learning_rate"} <= r.keys() for r in train)
    assert [r["step"] for r in evals] == [4, 6]  # every eval_steps, and the last step
    assert all(r.keys() == {"step", "eval_loss"} and r["eval_loss"] > 0 for r in evals)
    assert stats["examples"] == 16 and stats["eval_examples"] == 4
    assert stats["eval_loss"] == pytest.approx(evals[-1]["eval_loss"], abs=1e-6)
    saved = json.loads((out / "train_stats.json").read_text())
    assert saved["eval_loss"] == stats["eval_loss"]
    assert (
        f"Eval loss {stats['eval_loss']} on 4 held-out examples" in (out / "README.md").read_text()
    )


def test_resumed_run_logs_each_evaluation_once(watched, tiny_model_dir, tmp_path):
    data, straight, _ = watched
    cfg = watch_config(tiny_model_dir, report_to="none")
    with pytest.raises(KeyboardInterrupt):
        run_engrave(cfg, data, tmp_path / "model", IDENTITY, callbacks=[Crash(5)])
    stats = run_engrave(cfg, data, tmp_path / "model", IDENTITY)
    assert stats["resumed_from_step"] == 4
    evals = [r for r in read_jsonl(tmp_path / "model/training_log.jsonl") if "eval_loss" in r]
    expected = [r for r in read_jsonl(straight / "training_log.jsonl") if "eval_loss" in r]
    assert [r["step"] for r in evals] == [4, 6]
    assert [r["eval_loss"] for r in evals] == pytest.approx([r["eval_loss"] for r in expected])


@pytest.mark.slow
def test_two_processes_evaluate_too(watched, tiny_model_dir, tmp_path):
    data, _, _ = watched
    cfg = watch_config(tiny_model_dir, report_to="none", processes=2)
    stats = run_engrave(cfg, data, tmp_path / "model", IDENTITY)
    assert stats["world_size"] == 2 and stats["eval_examples"] == 4
    evals = [r for r in read_jsonl(tmp_path / "model/training_log.jsonl") if "eval_loss" in r]
    assert [r["step"] for r in evals] == [4, 6]
    assert stats["eval_loss"] == pytest.approx(evals[-1]["eval_loss"], abs=1e-6)


# -- what the hashes cover -------------------------------------------------------------------------


def test_eval_fraction_is_a_recipe_setting_report_to_and_eval_steps_are_not(tmp_path):
    from selfalign.run.settings import PipelineConfig, stage_hashes

    def hashes(**engrave):
        train = {"report_to": engrave.get("report_to", "none")}
        cfg = PipelineConfig(model={"model": "m"}, engrave=engrave, verbose={"train": train})
        return stage_hashes(cfg)

    plain = hashes()
    assert hashes(report_to=["tensorboard", "wandb"], eval_steps=5) == plain
    assert hashes(eval_fraction=0.05)["engrave"] != plain["engrave"]
    # unset, the new keys are left out: runs made before they existed keep their hashes
    default = sft.hashed_settings(sft.TrainConfig())
    assert not {"report_to", "eval_steps", "eval_fraction"} & default.keys()

    write_jsonl_atomic(tmp_path / "sft.jsonl", [{"id": "a", "instruction": "Q", "output": "A"}])
    base = sft.fingerprint(sft.TrainConfig(), IDENTITY, tmp_path / "sft.jsonl")
    watching = sft.TrainConfig(report_to="tensorboard", eval_steps=3)
    assert sft.fingerprint(watching, IDENTITY, tmp_path / "sft.jsonl") == base
    held = sft.TrainConfig(eval_fraction=0.1)
    assert sft.fingerprint(held, IDENTITY, tmp_path / "sft.jsonl") != base


# -- trackers --------------------------------------------------------------------------------------


@pytest.mark.skipif(not HAS_TENSORBOARD, reason="tensorboard is not installed")
def test_tensorboard_events_are_written_into_out_logs(watched):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    _, out, _ = watched
    events = EventAccumulator(str(out / "logs"))
    events.Reload()
    assert {"train/loss", "train/learning_rate", "eval/loss"} <= set(events.Tags()["scalars"])
    assert [e.step for e in events.Scalars("eval/loss")] == [4, 6]


def test_a_missing_tracker_is_one_line_with_the_pip_command(
    monkeypatch, capsys, tiny_model_dir, tmp_path
):
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: None if name == "wandb" else find_spec(name, *a),
    )
    (tmp_path / "train.yaml").write_text("report_to: [tensorboard, wandb]\n")
    write_jsonl_atomic(tmp_path / "sft.jsonl", [{"id": "a", "instruction": "Q", "output": "A"}])
    code, _, err = cli(monkeypatch, capsys, "engrave", "--config", str(tmp_path / "train.yaml"),
                       "--model", str(tiny_model_dir), "--data", str(tmp_path / "sft.jsonl"),
                       "--output", str(tmp_path / "m"))  # fmt: skip
    assert code == 2 and err.strip().count("\n") == 0
    assert "report_to: wandb is not installed: pip install wandb" in err
    assert not (tmp_path / "m" / "checkpoints").exists()  # before any training


def test_wandb_logs_offline_without_an_api_key(tmp_path, monkeypatch):
    empty = tmp_path / "netrc"
    empty.write_text("machine example.com login me password secret\n")
    assert sft.wandb_offline({"NETRC": str(empty)})
    assert not sft.wandb_offline({"NETRC": str(empty), "WANDB_API_KEY": "k"})
    assert not sft.wandb_offline({"NETRC": str(empty), "WANDB_MODE": "online"})
    logged_in = tmp_path / "netrc2"
    logged_in.write_text("machine api.wandb.ai login user password k\n")
    logged_in.chmod(0o600)
    assert not sft.wandb_offline({"NETRC": str(logged_in)})

    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("NETRC", str(empty))
    report_to, _ = sft._trackers(sft.TrainConfig(report_to="wandb"), tmp_path)
    assert report_to == ["wandb"]
    import os

    assert os.environ["WANDB_MODE"] == "offline"


# -- data formats ----------------------------------------------------------------------------------


def test_alpaca_sharegpt_and_datasets_rows_get_stable_ids(tmp_path, caplog):
    alpaca = tmp_path / "alpaca.json"
    alpaca.write_text(json.dumps([*alpaca_rows(2), alpaca_rows(1)[0]]))
    with caplog.at_level(logging.INFO, logger="selfalign.stages.stage3_engrave"):
        rows = load_sft_rows(alpaca)
    assert f"{alpaca}: made ids for 3 rows" in caplog.text
    ids = [r["id"] for r in rows]
    assert ids[0].startswith("sha-") and ids[2] == f"{ids[0]}-2"  # identical rows: numbered
    assert [r["id"] for r in load_sft_rows(alpaca)] == ids  # the same every time

    sharegpt = tmp_path / "sharegpt.jsonl"
    turns = [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello"}]
    write_jsonl_atomic(sharegpt, [{"conversations": turns}, {"id": "x", "conversations": turns}])
    assert [r["id"] for r in load_sft_rows(sharegpt)][1] == "x"  # a given id is kept

    saved = save_dataset(alpaca_rows(3), tmp_path / "ds")
    assert [r["output"] for r in load_sft_rows(saved)] == [r["output"] for r in alpaca_rows(3)]
    base = sft.fingerprint(sft.TrainConfig(), IDENTITY, saved)
    assert base != sft.fingerprint(sft.TrainConfig(), IDENTITY, save_dataset(alpaca_rows(4),
                                                                               tmp_path / "ds2"))  # fmt: skip


def test_bad_training_data_names_the_file_row_and_field(tmp_path):
    bad = save_dataset([{"instruction": "Q", "output": "A"}, {"instruction": "Q2", "output": ""}],
                       tmp_path / "bad")  # fmt: skip
    with pytest.raises(UserError, match=r"bad: record 2 \(id 'sha-\w+'\): field 'output' must be"):
        load_sft_rows(bad)
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="empty: a directory, but no dataset saved"):
        load_sft_rows(tmp_path / "empty")
    from datasets import Dataset, DatasetDict

    splits = DatasetDict(a=Dataset.from_list(alpaca_rows(1)), b=Dataset.from_list(alpaca_rows(1)))
    splits.save_to_disk(str(tmp_path / "splits"))
    with pytest.raises(UserError, match="splits a, b and none named 'train'"):
        load_sft_rows(tmp_path / "splits")
