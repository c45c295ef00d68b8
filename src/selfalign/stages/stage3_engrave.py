"""Stage 3, principle engraving (paper section 3.3): fine-tune the base model on stage 2's answers.

Reads SFT data (`sft.jsonl` from stage 2: `{id, instruction, input, output, ...}` per line, or
`{id, messages}`; a JSON array such as Alpaca `{instruction, input, output}` or ShareGPT
`{conversations: [{from, value}]}`, also as JSONL; or a directory a `datasets` dataset was saved
to; rows without an id get one made from their content) and fine-tunes a base model on it WITHOUT the constitution in the prompt: each example is a short system prompt (see
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

import hashlib
import json
import logging
import shutil
import time
from collections import Counter
from pathlib import Path
from typing import Any

from selfalign.errors import UserError
from selfalign.jsonl import check_unique_ids, read_records
from selfalign.text.constitution import Identity
from selfalign.text.conversation import check_sft_row
from selfalign.training import launch, model_dir, sft
from selfalign.training.sft import TrainConfig

__all__ = ["ENGRAVE_DATA", "TrainConfig", "load_sft_rows", "run_engrave", "with_ids"]

log = logging.getLogger(__name__)

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
    """The SFT records of `path` (JSONL; a JSON array such as Alpaca data or the original ShareGPT
    identity data; a saved `datasets` directory), each with an id (`with_ids`) and checked; a bad
    one is a UserError naming file and record."""
    rows = _load_from_disk(Path(path)) if Path(path).is_dir() else read_records(path)
    if not rows:
        raise UserError(f"{path}: no records to train on (the file is empty)")
    rows = with_ids(rows, path)
    for n, row in enumerate(rows, start=1):
        check_sft_row(row, f"{path}: record {n}")
    check_unique_ids(rows, path)
    return rows


def _load_from_disk(path: Path) -> list[dict[str, Any]]:
    """The rows of a dataset saved with `datasets`' `save_to_disk` (of a DatasetDict: its train
    split, or its only one)."""
    from datasets import DatasetDict, load_from_disk

    try:
        data = load_from_disk(str(path))
    except FileNotFoundError:
        raise UserError(
            f"{path}: a directory, but no dataset saved with datasets' save_to_disk in it; give "
            "such a directory, a JSONL file or a JSON array"
        ) from None
    if isinstance(data, DatasetDict):
        if "train" not in data and len(data) != 1:
            raise UserError(
                f"{path}: a dataset with the splits {', '.join(data)} and none named 'train'; "
                "save the split to train on alone"
            )
        data = data["train"] if "train" in data else next(iter(data.values()))
    return data.to_list()


def with_ids(rows: list[dict[str, Any]], source: str | Path) -> list[dict[str, Any]]:
    """`rows`, each without an id given one made from its content (`sha-` and 12 hex digits of a
    hash; identical rows numbered -2, -3, ...), so the same data gets the same ids every time
    (seeded choices and resume key on them); one INFO line says how many were made."""
    made: Counter[str] = Counter()
    out = []
    for row in rows:
        if row.get("id") is None:
            text = json.dumps(row, sort_keys=True, ensure_ascii=False, default=str)
            key = "sha-" + hashlib.sha256(text.encode()).hexdigest()[:12]
            made[key] += 1
            row = {**row, "id": key if made[key] == 1 else f"{key}-{made[key]}"}
        out.append(row)
    if made:
        log.info("%s: made ids for %d rows (from a hash of each row)", source, made.total())
    return out
