"""`selfalign export`: every format carries the system prompt each row is trained with, and
`--format llama-factory` writes a dataset_info.json that names files and fields that exist."""

import json

import pytest
import yaml

from selfalign.errors import UserError
from selfalign.jsonl import read_jsonl, write_jsonl_atomic
from selfalign.run.export import export_run
from selfalign.text.constitution import Identity
from selfalign.text.conversation import choose_variant, system_prompt

ENGRAVE_SYSTEM = "You are Quokka, trained by engraving."
VERBOSE_SYSTEM = "You are Quokka, trained on verbose answers."


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
    run = tmp_path / "run"
    write_jsonl_atomic(run / "2_self_align" / "sft.jsonl", rows)
    write_jsonl_atomic(run / "4_verbose" / "verbose.jsonl", rows[:3])
    config = {
        "model": {"model": "tiny"},
        "engrave": {"system_prompts": [ENGRAVE_SYSTEM]},
        "verbose": {"train": {"system_prompts": [VERBOSE_SYSTEM]}},
    }
    (run / "config.yaml").write_text(yaml.safe_dump(config))
    return run


def test_jsonl_formats_load_with_datasets_and_carry_the_system_prompt(run, tmp_path):
    from datasets import load_dataset

    for fmt, column in (("sharegpt", "conversations"), ("messages", "messages")):
        counts = export_run(run, fmt, tmp_path / fmt)
        assert counts == {"self_align": 5, "verbose": 3}
        ds = load_dataset(
            "json", data_files=str(tmp_path / fmt / "self_align.jsonl"), split="train"
        )
        assert ds.num_rows == 5 and column in ds.column_names
    first = read_jsonl(tmp_path / "messages" / "self_align.jsonl")[1]["messages"]
    assert first == [
        {"role": "system", "content": ENGRAVE_SYSTEM},
        {"role": "user", "content": "Question 1?\n\ncontext"},
        {"role": "assistant", "content": "Answer 1."},
    ]
    for row in read_jsonl(tmp_path / "sharegpt" / "verbose.jsonl"):
        assert row["conversations"][0] == {"from": "system", "value": VERBOSE_SYSTEM}
        assert [t["from"] for t in row["conversations"][1:]] == ["human", "gpt"]


def test_alpaca_and_hf_dataset_carry_the_system_prompt(run, tmp_path):
    from datasets import load_dataset, load_from_disk

    export_run(run, "alpaca", tmp_path / "alpaca")
    ds = load_dataset("json", data_files=str(tmp_path / "alpaca" / "verbose.json"), split="train")
    assert ds.num_rows == 3 and set(ds.column_names) == {"instruction", "input", "output", "system"}
    assert set(ds["system"]) == {VERBOSE_SYSTEM}
    export_run(run, "hf-dataset", tmp_path / "hf")
    dd = load_from_disk(str(tmp_path / "hf"))
    assert dd["self_align"].num_rows == 5 and dd["verbose"].num_rows == 3
    assert {"messages", "instruction", "output", "system"} <= set(dd["self_align"].column_names)
    assert set(dd["self_align"]["system"]) == {ENGRAVE_SYSTEM}
    assert dd["self_align"][0]["messages"][0] == {"role": "system", "content": ENGRAVE_SYSTEM}


def test_a_trained_model_says_which_prompt_each_row_had(run, tmp_path):
    """Once stage 3 has trained, its train_config.yaml and identity win over the run's config:
    each row gets the variant training chose for it (seeded by its id)."""
    model = run / "3_engrave" / "model"
    model.mkdir(parents=True)
    variants, seed = ["standard", "concise"], 3
    (model / "train_config.yaml").write_text(
        yaml.safe_dump({"model": "tiny", "system_prompts": variants, "seed": seed})
    )
    identity = Identity(name="Wombat", developer="the Burrow", knowledge_cutoff="2025")
    (model / "train_stats.json").write_text(json.dumps({"identity": identity.model_dump()}))
    export_run(run, "messages", tmp_path / "out")
    systems = {
        row["id"]: row["messages"][0]["content"]
        for row in read_jsonl(tmp_path / "out" / "self_align.jsonl")
    }
    expected = {
        key: system_prompt(identity, choose_variant(variants, seed, key)) for key in systems
    }
    assert systems == expected
    assert len(set(systems.values())) == 2  # a prompt per row, not one for the whole file
    assert all("Wombat" in text for text in systems.values())


def test_llama_factory_dataset_info_names_files_and_fields_that_exist(run, tmp_path):
    out = tmp_path / "lf"
    assert export_run(run, "llama-factory", out) == {"self_align": 5, "verbose": 3}
    info = json.loads((out / "dataset_info.json").read_text())
    assert set(info) == {"selfalign_self_align", "selfalign_verbose"}
    for entry in info.values():
        assert entry["formatting"] == "sharegpt"
        rows = read_jsonl(out / entry["file_name"])
        assert rows
        tags, column = entry["tags"], entry["columns"]["messages"]
        speakers = {tags["system_tag"], tags["user_tag"], tags["assistant_tag"]}
        for row in rows:
            turns = row[column]
            assert all({tags["role_tag"], tags["content_tag"]} <= turn.keys() for turn in turns)
            # as LLaMA-Factory reads it: a first system turn, then user/assistant in turn
            roles = [turn[tags["role_tag"]] for turn in turns]
            assert set(roles) <= speakers and roles[0] == tags["system_tag"]
            assert roles[1:] == [tags["user_tag"], tags["assistant_tag"]]
            assert turns[0][tags["content_tag"]] in (ENGRAVE_SYSTEM, VERBOSE_SYSTEM)


def test_errors(tmp_path, run):
    with pytest.raises(UserError, match="no stage-2 or stage-4 dataset"):
        export_run(tmp_path / "empty", "alpaca", tmp_path / "x")
    with pytest.raises(UserError, match="--format"):
        export_run(run, "csv", tmp_path / "x")
    (run / "config.yaml").unlink()
    with pytest.raises(UserError, match="system prompt each row is trained with is unknown"):
        export_run(run, "messages", tmp_path / "x")
