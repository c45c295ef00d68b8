"""Export a run's datasets in the formats the ecosystem uses, as the conversations trained on.

Reads the dataset of every stage that publishes one (the registry's `dataset`: stage 2's
`sft.jsonl`, aligned answers + identity rows, and stage 4's `verbose.jsonl`) and how each is
trained: the system prompt variants and seed in the trained model's `train_config.yaml` and the
identity in its `train_stats.json` (RUN/3_engrave/model for stage 2's data, RUN/4_verbose/model
for stage 4's) or, before that model exists, the run's `config.yaml`. Each row becomes the very
conversation training builds (`sft_messages`: a system prompt variant seeded by the row id), so
the exports carry the system prompt each row is trained with. Writes, per dataset, under OUT:
- `alpaca`: a JSON array of {instruction, input, output, system};
- `sharegpt`: JSONL of {id, conversations: [{from: system|human|gpt, value}]};
- `messages`: JSONL of {id, messages: [{role: system|user|assistant, content}]};
- `llama-factory`: the `sharegpt` files plus `dataset_info.json`, which describes them in
  LLaMA-Factory's schema (`dataset_dir: OUT`, `dataset: selfalign_self_align`);
- `hf-dataset`: a `datasets.DatasetDict` saved with `save_to_disk` (splits `self_align`,
  `verbose`; the `messages` and alpaca columns).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

from selfalign.errors import UserError
from selfalign.jsonl import read_jsonl, write_jsonl_atomic, write_text_atomic
from selfalign.run.registry import STAGES
from selfalign.text.constitution import Identity
from selfalign.text.conversation import sft_messages

FORMATS = ("alpaca", "sharegpt", "messages", "llama-factory", "hf-dataset")
DATASETS = {s.name: f"{s.folder}/{s.dataset}" for s in STAGES if s.dataset}
# the model each dataset trains, and that training's section of the run's config
TRAINED_BY: dict[str, tuple[str, Callable[[Any], Any]]] = {
    "self_align": ("3_engrave/model", lambda cfg: cfg.engrave),
    "verbose": ("4_verbose/model", lambda cfg: cfg.verbose.train),
}
# ShareGPT speakers: FastChat's names, and a first `system` turn as LLaMA-Factory and axolotl
# read it (and `selfalign engrave`, so an export trains again with the same system prompts)
SPEAKERS = {"system": "system", "user": "human", "assistant": "gpt"}
LLAMA_FACTORY_INFO = "dataset_info.json"


class TrainedWith(NamedTuple):
    """What turns a dataset's rows into training conversations."""

    variants: list[str]  # system prompt variants, one chosen per row
    seed: int
    identity: Identity

    def messages(self, row: dict[str, Any]) -> list[dict[str, str]]:
        """The conversation `row` is trained as: system prompt, user turn, answer."""
        return sft_messages(row, self.identity, self.variants, self.seed)


def trained_with(run: Path, name: str) -> TrainedWith:
    """How dataset `name` of `run` is trained: as its trained model records it, else as the
    run's config.yaml says it will be."""
    from selfalign.config import build_config
    from selfalign.training.model_dir import identity_of
    from selfalign.training.sft import TrainConfig

    folder, section = TRAINED_BY[name]
    model = run / folder
    identity = identity_of(model)
    if identity is not None and (model / "train_config.yaml").is_file():
        train = build_config(TrainConfig, model / "train_config.yaml")
        return TrainedWith(train.system_prompts, train.seed, identity)
    config = run / "config.yaml"
    if not config.is_file():
        raise UserError(
            f"{run}: neither {folder}/train_config.yaml nor config.yaml, so the system prompt "
            "each row is trained with is unknown; export a run directory of `selfalign run`"
        )
    from selfalign.run.settings import PipelineConfig, shared_defaults
    from selfalign.stages.stage2_self_align import stage_constitution

    cfg = build_config(PipelineConfig, config, prepare=shared_defaults)
    train = section(cfg)
    identity = stage_constitution(cfg.self_align).identity
    return TrainedWith(train.system_prompts, train.seed, identity)


# -- one row, as each format writes it (`messages`: the row's training conversation) ------------


def to_alpaca(row: dict[str, Any], messages: list[dict[str, str]]) -> dict[str, Any]:
    return {
        "instruction": row["instruction"],
        "input": row.get("input") or "",
        "output": row["output"],
        "system": messages[0]["content"],
    }


def to_sharegpt(row: dict[str, Any], messages: list[dict[str, str]]) -> dict[str, Any]:
    turns = [{"from": SPEAKERS[m["role"]], "value": m["content"]} for m in messages]
    return {"id": str(row["id"]), "conversations": turns}


def to_messages(row: dict[str, Any], messages: list[dict[str, str]]) -> dict[str, Any]:
    return {"id": str(row["id"]), "messages": messages}


def llama_factory_info(files: dict[str, str]) -> dict[str, Any]:
    """LLaMA-Factory's dataset_info.json for sharegpt files ({dataset: file name}): one entry
    per dataset, named `selfalign_<dataset>`, its system prompt the first turn (`system_tag`)."""
    tags = {"role_tag": "from", "content_tag": "value"}
    tags |= {f"{role}_tag": speaker for role, speaker in SPEAKERS.items()}
    return {
        f"selfalign_{name}": {
            "file_name": file,
            "formatting": "sharegpt",
            "columns": {"messages": "conversations"},
            "tags": tags,
        }
        for name, file in files.items()
    }


# -- the run ------------------------------------------------------------------------------------


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
    data = {}  # dataset -> [(row, the conversation it is trained as)]
    for name, rows in load_datasets(run).items():
        how = trained_with(run, name)
        data[name] = [(row, how.messages(row)) for row in rows]
    if fmt == "hf-dataset":
        from datasets import Dataset, DatasetDict

        splits = {
            name: Dataset.from_list([to_messages(r, m) | to_alpaca(r, m) for r, m in pairs])
            for name, pairs in data.items()
        }
        DatasetDict(splits).save_to_disk(str(out))
        return {name: len(pairs) for name, pairs in data.items()}
    out.mkdir(parents=True, exist_ok=True)
    for name, pairs in data.items():
        if fmt == "alpaca":
            text = json.dumps([to_alpaca(r, m) for r, m in pairs], ensure_ascii=False, indent=1)
            write_text_atomic(out / f"{name}.json", text)
        else:
            convert = to_messages if fmt == "messages" else to_sharegpt
            write_jsonl_atomic(out / f"{name}.jsonl", [convert(r, m) for r, m in pairs])
    if fmt == "llama-factory":
        info = llama_factory_info({name: f"{name}.jsonl" for name in data})
        write_text_atomic(out / LLAMA_FACTORY_INFO, json.dumps(info, indent=2) + "\n")
    return {name: len(pairs) for name, pairs in data.items()}
