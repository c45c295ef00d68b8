"""Stage 3, principle engraving (paper section 3.3): fine-tune the base model on stage 2's answers.

Reads an SFT file (`sft.jsonl` from stage 2: `{id, instruction, input, output, ...}` per line,
`{id, messages}`, or a JSON array such as ShareGPT `{id, conversations}`) and fine-tunes a base
model on it WITHOUT the constitution in the prompt: each example is a short system prompt (see
`selfalign.text.conversation`), the user turn and the answer, and the loss covers the answer only.

Writes `out_dir`, a model directory that transformers and `vllm serve` load as is: the model files
of the recipe (`selfalign.training.sft`: merged model, adapter/, tokenizer, training log) and its
metadata (`selfalign.training.model_dir`: train_stats.json, model card, train_config.yaml).
A rerun resumes from the last checkpoint; a finished run with the same config and data is skipped.
With `processes` > 1 the training runs in that many processes under `accelerate launch`
(`selfalign.training.launch`), each calling `run_engrave` again.
Stage 4 trains its final model through `run_engrave` too.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path
from typing import Any

from selfalign.errors import UserError
from selfalign.jsonl import check_unique_ids, read_records
from selfalign.text.constitution import Identity
from selfalign.text.conversation import check_sft_row
from selfalign.training import launch, model_dir, sft
from selfalign.training.sft import TrainConfig

__all__ = ["ENGRAVE_DATA", "TrainConfig", "load_sft_rows", "run_engrave"]

ENGRAVE_DATA = "answers the base model wrote under a constitution of principles"


def run_engrave(
    cfg: TrainConfig,
    sft_path: str | Path,
    out_dir: str | Path,
    identity: Identity,
    constitution: str | None = None,
    command: str | None = None,
    callbacks: list | None = None,
    data_description: str = ENGRAVE_DATA,
) -> dict[str, Any]:
    """Fine-tune `cfg.model` on `sft_path` into the model directory `out_dir`; return its stats.

    `constitution` names the constitution behind the data (for the model card); `command` is the
    command line to print as the way to reproduce; `callbacks` are extra TrainerCallbacks;
    `data_description` says in the card what the answers are.
    """
    out_dir = Path(out_dir)
    model_name = sft.check_config(cfg)
    fingerprint = sft.fingerprint(cfg, identity, sft_path)
    done = model_dir.finished(out_dir, fingerprint)
    if done is not None:
        return done
    started = time.perf_counter()
    rows = load_sft_rows(sft_path)  # checked here once, not once per launched process
    n = 1 if launch.launched() else launch.processes(cfg)
    if n > 1:
        if callbacks:
            raise ValueError("callbacks cannot reach launched training processes")
        job = launch.make_job(cfg, sft_path, out_dir, identity, constitution, command,
                              data_description)  # fmt: skip
        launch.train_launched(cfg, n, job, out_dir)
        return model_dir.train_stats(out_dir)
    stats = sft.train(cfg, model_name, rows, out_dir, identity, fingerprint, callbacks, sft_path)
    stats.update(
        identity=identity.model_dump(),
        constitution=constitution or "default",
        data_description=data_description,
        fingerprint=fingerprint,
        versions=model_dir.versions(),
    )
    if not sft.main_process():
        return stats
    stats["seconds"] = round(time.perf_counter() - started, 1)
    model_dir.write_metadata(out_dir, cfg, stats, sft_path, command)
    if not cfg.keep_checkpoints:
        shutil.rmtree(out_dir / "checkpoints", ignore_errors=True)
    return stats


def load_sft_rows(path: str | Path) -> list[dict[str, Any]]:
    """The SFT records of `path` (JSONL, or a JSON array such as the original ShareGPT identity
    data), each checked; a bad one is a UserError naming file and record."""
    rows = read_records(path)
    if not rows:
        raise UserError(f"{path}: no records to train on (the file is empty)")
    for n, row in enumerate(rows, start=1):
        check_sft_row(row, f"{path}: record {n}")
    check_unique_ids(rows, path)
    return rows
