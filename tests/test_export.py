import json

import pytest

from selfalign.errors import UserError
from selfalign.jsonl import write_jsonl_atomic
from selfalign.run.export import export_run


@pytest.fixture
def run(tmp_path):
    rows = [
        {
            "id": f"a{i}",
            "instruction": f"Question {i}?",
            "input": "context" if i % 2 else "",
            "output": f"Answer {i}.",
            "thoughts": "",
            "principles": [],
            "source": "self_instruct",
        }
        for i in range(5)
    ]
    write_jsonl_atomic(tmp_path / "run" / "2_self_align" / "sft.jsonl", rows)
    write_jsonl_atomic(tmp_path / "run" / "4_verbose" / "verbose.jsonl", rows[:3])
    return tmp_path / "run"


def test_jsonl_formats_load_with_datasets(run, tmp_path):
    from datasets import load_dataset

    for fmt, column in (("sharegpt", "conversations"), ("messages", "messages")):
        counts = export_run(run, fmt, tmp_path / fmt)
        assert counts == {"self_align": 5, "verbose": 3}
        ds = load_dataset(
            "json", data_files=str(tmp_path / fmt / "self_align.jsonl"), split="train"
        )
        assert ds.num_rows == 5 and column in ds.column_names
    first = json.loads((tmp_path / "messages" / "self_align.jsonl").read_text().splitlines()[1])
    assert first["messages"][0] == {"role": "user", "content": "Question 1?\n\ncontext"}


def test_alpaca_and_hf_dataset(run, tmp_path):
    from datasets import load_dataset, load_from_disk

    export_run(run, "alpaca", tmp_path / "alpaca")
    ds = load_dataset("json", data_files=str(tmp_path / "alpaca" / "verbose.json"), split="train")
    assert ds.num_rows == 3 and set(ds.column_names) == {"instruction", "input", "output"}
    export_run(run, "hf-dataset", tmp_path / "hf")
    dd = load_from_disk(str(tmp_path / "hf"))
    assert dd["self_align"].num_rows == 5 and dd["verbose"].num_rows == 3
    assert {"messages", "instruction", "output"} <= set(dd["self_align"].column_names)


def test_errors(tmp_path, run):
    with pytest.raises(UserError, match="no stage-2 or stage-4 dataset"):
        export_run(tmp_path / "empty", "alpaca", tmp_path / "x")
    with pytest.raises(UserError, match="--format"):
        export_run(run, "csv", tmp_path / "x")
