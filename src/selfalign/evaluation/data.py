"""The evaluation data shipped in the package (`selfalign/data/eval/`, Apache-2.0; see its
SOURCES.md): TruthfulQA's multiple-choice questions, BIG-bench's HHH alignment subsets, and the
Vicuna and MT-bench questions. Read-only; nothing here touches the network.

Each file is a byte-for-byte copy of upstream; `FILES` holds its sha256, checked by the tests and
by `check_files()`.
"""

from __future__ import annotations

import hashlib
import json
from functools import cache
from importlib import resources
from pathlib import Path
from typing import Any

from selfalign.errors import UserError

FILES: dict[str, str] = {
    "LICENSE": "c71d239df91726fc519c6eb72d318ec65820627232b2f796219e87dcf35d0ab4",
    "truthfulqa/mc_task.json": "b3799639bc76c939836d587de7d30b48d91012cb34be04806d33106ce06c162a",
    "hhh/harmless.json": "4720acbc916cc18413e48c6bb55c19af73400436a6304c7e110b8bb40f8952a1",
    "hhh/helpful.json": "1bd2a58d9bb17b26af4806e8302374cea60671dc387fbfc2c5aa5c23e0901628",
    "hhh/honest.json": "69ba96e5bff121327ad1366e3772b7b45c50e96e7f995b2cef62c350380f1b14",
    "hhh/other.json": "4d6b041d79e5bf2705a9f81994efb95274179faaba9270f6dc83bd0cd17c227e",
    "vicuna/question.jsonl": "c248c5c98ba45bb0c2aadae2f270e643bd32679c6c306a3b2a503ac4254cdaa5",
    "mt_bench/question.jsonl": "119565adbab82227089cefdb44c8d7e2cf04dc0a0ec233634c82e7d4e2a944f7",
}
HHH_SUBSETS = ("harmless", "helpful", "honest", "other")
# BIG-bench's hhh_alignment task.json: each input is shown as a turn of this dialogue
HHH_INPUT_PREFIX, HHH_OUTPUT_PREFIX = "\nHuman: ", "\nAssistant:"
BENCHES = ("vicuna", "mt_bench")


def data_path(name: str) -> Path:
    """The bundled file `name` (a key of FILES)."""
    return Path(str(resources.files("selfalign") / "data" / "eval" / name))


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def check_files() -> None:
    """Refuse a bundled file that is missing or not the upstream bytes."""
    for name, digest in FILES.items():
        path = data_path(name)
        if not path.is_file() or sha256(path) != digest:
            raise UserError(f"{path}: missing or modified evaluation data; reinstall selfalign")


@cache
def truthfulqa_mc() -> tuple[dict[str, Any], ...]:
    """TruthfulQA's 817 multiple-choice items in the layout lm-eval's truthfulqa tasks read:
    `question`, `mc1_targets` / `mc2_targets` = {"choices": [...], "labels": [1/0, ...]} in the
    upstream order (mc1's single true answer first)."""
    items = json.loads(data_path("truthfulqa/mc_task.json").read_text(encoding="utf-8"))

    def targets(answers: dict[str, int]) -> dict[str, list]:
        return {"choices": list(answers), "labels": [int(v) for v in answers.values()]}

    return tuple(
        {
            "question": item["question"],
            "mc1_targets": targets(item["mc1_targets"]),
            "mc2_targets": targets(item["mc2_targets"]),
        }
        for item in items
    )


@cache
def hhh(subset: str) -> tuple[dict[str, Any], ...]:
    """One HHH subset: `input` (the dialogue so far), `choices` (two answers in upstream order),
    `label` (the index of the better one)."""
    if subset not in HHH_SUBSETS:
        raise UserError(f"unknown HHH subset {subset!r}; choose from {', '.join(HHH_SUBSETS)}")
    task = json.loads(data_path(f"hhh/{subset}.json").read_text(encoding="utf-8"))
    docs = []
    for example in task["examples"]:
        scores = example["target_scores"]
        docs.append(
            {
                "input": example["input"],
                "choices": list(scores),
                "label": list(scores.values()).index(max(scores.values())),
            }
        )
    return tuple(docs)


@cache
def questions(bench: str) -> tuple[dict[str, Any], ...]:
    """The Vicuna (80, one turn) or MT-bench (80, two turns) questions: `question_id`,
    `category`, `turns`."""
    if bench not in BENCHES:
        raise UserError(f"unknown question set {bench!r}; choose from {', '.join(BENCHES)}")
    lines = data_path(f"{bench}/question.jsonl").read_text(encoding="utf-8").splitlines()
    return tuple(json.loads(line) for line in lines if line.strip())
