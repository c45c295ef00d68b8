"""A trained model directory's metadata: read back, and damaged files as one line, never a traceback."""

from __future__ import annotations

import json

import pytest
from cli_run import run_main as cli

from selfalign.errors import UserError
from selfalign.jsonl import write_jsonl_atomic
from selfalign.modeling import adapter_base
from selfalign.text.constitution import Identity
from selfalign.training.model_dir import base_of, constitution_of, identity_of, train_stats

STATS = {
    "base_model": "/models/base",
    "identity": {"name": "Quokka", "developer": "the Lab", "knowledge_cutoff": "2024-01"},
    "constitution": "/data/constitution.yaml",
    "fingerprint": "0123456789abcdef",
}

DAMAGED = [
    ("{not json", "not valid JSON"),
    ("[1, 2]", "not a JSON object"),
    ('{"base_model": 3}', "'base_model' is not a string"),
    ('{"identity": ["Quokka"]}', "'identity' is not a valid identity"),
    ('{"identity": {"name": "Q", "colour": "red"}}', "'identity' is not a valid identity"),
]


def test_metadata_is_read_from_the_model_dir_and_from_its_adapter(tmp_path):
    (tmp_path / "model" / "adapter").mkdir(parents=True)
    (tmp_path / "model" / "train_stats.json").write_text(json.dumps(STATS))
    for where in (tmp_path / "model", tmp_path / "model" / "adapter"):
        assert base_of(where) == "/models/base"
        assert identity_of(where) == Identity(name="Quokka", developer="the Lab",
                                              knowledge_cutoff="2024-01")  # fmt: skip
        assert constitution_of(where) == "/data/constitution.yaml"
    (tmp_path / "other").mkdir()  # not trained by selfalign: nothing recorded, no error
    assert train_stats(tmp_path / "other") == {}
    assert base_of(tmp_path / "other") is None and identity_of(tmp_path / "other") is None


@pytest.mark.parametrize(("text", "why"), DAMAGED)
def test_damaged_train_stats_is_one_user_error(tmp_path, text, why):
    (tmp_path / "train_stats.json").write_text(text)
    for reader in (base_of, identity_of, constitution_of):
        with pytest.raises(UserError, match=why) as caught:
            reader(tmp_path)
        message = str(caught.value)
        assert message.startswith(f"{tmp_path / 'train_stats.json'}: damaged")
        assert "delete it and train the model again" in message and "\n" not in message


def test_engrave_into_a_dir_with_damaged_stats_says_what_to_do(
    tiny_model_dir, tmp_path, monkeypatch, capsys
):
    write_jsonl_atomic(tmp_path / "sft.jsonl", [{"id": "a", "instruction": "Q", "output": "A"}])
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "train_stats.json").write_text("{torn")
    code, _, err = cli(monkeypatch, capsys, "engrave", "--model", str(tiny_model_dir),
                       "--data", str(tmp_path / "sft.jsonl"), "--output", str(tmp_path / "m"))  # fmt: skip
    assert code == 2 and err.strip().count("\n") == 0
    assert f"{tmp_path / 'm' / 'train_stats.json'}: damaged" in err and "delete it" in err


def test_verbose_clone_of_a_model_with_damaged_stats(tmp_path, monkeypatch, capsys):
    (tmp_path / "engraved").mkdir()
    (tmp_path / "engraved" / "train_stats.json").write_text('["not", "stats"]')
    write_jsonl_atomic(tmp_path / "aligned.jsonl", [{"id": "a", "instruction": "Q"}])
    code, _, err = cli(monkeypatch, capsys, "verbose-clone", "--model", str(tmp_path / "engraved"),
                       "--data", str(tmp_path / "aligned.jsonl"), "--output", str(tmp_path / "v"))  # fmt: skip
    assert code == 2 and err.strip().count("\n") == 0
    assert f"{tmp_path / 'engraved' / 'train_stats.json'}: damaged (not a JSON object)" in err


ADAPTER_DAMAGED = [
    ("{oops", "damaged \\(not valid JSON"),
    ('"a string"', "not a JSON object"),
    ('{"r": 8}', "no base_model_name_or_path"),
]


@pytest.mark.parametrize(("text", "why"), ADAPTER_DAMAGED)
def test_damaged_adapter_config_is_one_user_error(tmp_path, text, why):
    (tmp_path / "adapter_config.json").write_text(text)
    with pytest.raises(UserError, match=why) as caught:
        adapter_base(tmp_path)
    assert str(caught.value).startswith(f"{tmp_path / 'adapter_config.json'}: ")
    assert "\n" not in str(caught.value)


def test_chat_with_a_damaged_adapter_says_what_to_do(tmp_path, monkeypatch, capsys):
    (tmp_path / "adapter").mkdir()
    (tmp_path / "adapter" / "adapter_config.json").write_text('{"base_model_name_or_path": ')
    code, _, err = cli(monkeypatch, capsys, "chat", str(tmp_path / "adapter"), stdin="/exit\n")
    assert code == 2 and err.strip().count("\n") == 0
    assert f"{tmp_path / 'adapter' / 'adapter_config.json'}: damaged" in err
    assert "re-export the adapter" in err
