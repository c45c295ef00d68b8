"""Export a run's datasets in the formats the ecosystem uses.

Reads the dataset of every stage that publishes one (the registry's `dataset`: stage 2's
`sft.jsonl`, aligned answers + identity rows, and stage 4's `verbose.jsonl`) and writes, per dataset:
- `alpaca`: a JSON array of {instruction, input, output};
- `sharegpt`: JSONL of {id, conversations: [{from: human, value}, {from: gpt, value}]};
- `messages`: JSONL of {id, messages: [{role: user, content}, {role: assistant, content}]};
- `hf-dataset`: a `datasets.DatasetDict` saved with `save_to_disk` (splits `self_align`, `verbose`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from selfalign.errors import UserError
from selfalign.jsonl import read_jsonl, write_jsonl_atomic, write_text_atomic
from selfalign.run.registry import STAGES
from selfalign.text.constitution import user_text

FORMATS = ("alpaca", "sharegpt", "messages", "hf-dataset")
DATASETS = {s.name: f"{s.folder}/{s.dataset}" for s in STAGES if s.dataset}


def to_alpaca(row: dict[str, Any]) -> dict[str, Any]:
    return {
        "instruction": row["instruction"],
        "input": row.get("input") or "",
        "output": row["output"],
    }


def to_sharegpt(row: dict[str, Any]) -> dict[str, Any]:
    return {
        "id": str(row["id"]),
        "conversations": [
            {"from": "human", "value": user_text(row["instruction"], row.get("input") or "")},
            {"from": "gpt", "value": row["output"]},
        ],
    }


def to_messages(row: dict[str, Any]) -> dict[str, Any]:
    return {
        "id": str(row["id"]),
        "messages": [
            {"role": "user", "content": user_text(row["instruction"], row.get("input") or "")},
            {"role": "assistant", "content": row["output"]},
        ],
    }


def load_datasets(run: Path) -> dict[str, list[dict[str, Any]]]:
    found = {}
    for name, rel in DATASETS.items():
        path = run / rel
        if path.exists():
            rows = read_jsonl(path)
            for n, row in enumerate(rows, start=1):
                missing = [k for k in ("id", "instruction", "output") if k not in row]
                if missing:
                    raise UserError(f"{path}: record {n} lacks {', '.join(missing)}")
            found[name] = rows
    if not found:
        raise UserError(
            f"{run}: no stage-2 or stage-4 dataset yet ({', '.join(DATASETS.values())})"
        )
    return found


def export_run(run: str | Path, fmt: str, out: str | Path) -> dict[str, int]:
    """Write every dataset of `run` in `fmt` under `out`; return rows per dataset."""
    run, out = Path(run), Path(out)
    if fmt not in FORMATS:
        raise UserError(f"--format {fmt!r}: choose one of {', '.join(FORMATS)}")
    data = load_datasets(run)
    if fmt == "hf-dataset":
        from datasets import Dataset, DatasetDict

        splits = {
            name: Dataset.from_list([to_messages(r) | to_alpaca(r) for r in rows])
            for name, rows in data.items()
        }
        DatasetDict(splits).save_to_disk(str(out))
    else:
        out.mkdir(parents=True, exist_ok=True)
        for name, rows in data.items():
            if fmt == "alpaca":
                write_text_atomic(
                    out / f"{name}.json",
                    json.dumps([to_alpaca(r) for r in rows], ensure_ascii=False, indent=1),
                )
            else:
                convert = to_sharegpt if fmt == "sharegpt" else to_messages
                write_jsonl_atomic(out / f"{name}.jsonl", [convert(r) for r in rows])
    return {name: len(rows) for name, rows in data.items()}
