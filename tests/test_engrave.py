"""Stage 3's SFT recipe on a tiny local model: what is trained, what is written, resume, errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from cli_run import run_main as cli

from selfalign.errors import UserError
from selfalign.jsonl import read_jsonl, write_jsonl_atomic
from selfalign.stages.stage3_engrave import TrainConfig, load_sft_rows, run_engrave
from selfalign.text.constitution import Identity
from selfalign.text.conversation import ASSISTANT_HEADER
from selfalign.training.sft import fit_examples

IDENTITY = Identity(name="Quokka", developer="the Lab", knowledge_cutoff="2024-01")


def sft_rows(n: int = 8) -> list[dict]:
    return [
        {
            "id": f"r{i}",
            "instruction": f"Tell me about topic number {i}.",
            "input": "Some context." if i % 3 == 0 else "",
            "output": f"Topic {i} is a fine subject; here is what I know about it.",
            "source": "aligned",
        }
        for i in range(n)
    ]


def tiny_config(model_dir, **changes) -> TrainConfig:
    settings = dict(
        model=str(model_dir),
        effective_batch_size=8,
        micro_batch_size=4,
        max_steps=30,
        learning_rate=3e-2,
        warmup_steps=2,
        logging_steps=1,
        save_steps=10,
        seed=0,
    )
    return TrainConfig(**(settings | changes))


class Capture:
    """A TrainerCallback keeping the tokenized training set the trainer actually iterates."""

    def __new__(cls):
        from transformers import TrainerCallback

        class _Capture(TrainerCallback):
            dataset = None

            def on_train_begin(self, args, state, control, train_dataloader=None, **kwargs):
                self.dataset = train_dataloader.dataset

        return _Capture()


@pytest.fixture(scope="module")
def engraved(tiny_model_dir, tmp_path_factory):
    """One LoRA run shared by the tests that inspect its results."""
    root = tmp_path_factory.mktemp("engrave")
    write_jsonl_atomic(root / "sft.jsonl", sft_rows())
    capture = Capture()
    cfg = tiny_config(tiny_model_dir)
    stats = run_engrave(cfg, root / "sft.jsonl", root / "model", IDENTITY, callbacks=[capture])
    return root / "model", stats, capture.dataset


def test_every_output_is_written(engraved):
    out, stats, _ = engraved
    for name in ("config.json", "model.safetensors", "generation_config.json", "README.md",
                 "tokenizer.json", "chat_template.jinja", "training_log.jsonl", "train_config.yaml",
                 "train_stats.json", "adapter/adapter_config.json", "adapter/adapter_model.safetensors",
                 "adapter/chat_template.jinja"):  # fmt: skip
        assert (out / name).is_file(), name
    assert not (out / "checkpoints").exists()  # removed after success
    generation = json.loads((out / "generation_config.json").read_text())
    assert generation["eos_token_id"] == 2
    assert stats["steps"] == 30 and stats["examples"] == stats["trained"] == 8
    assert stats["gradient_accumulation"] == 2 and stats["effective_batch_size"] == 8
    card = (out / "README.md").read_text()
    for needle in ("fine-tuned from `", "Quokka", "the Lab", "Constitution: default", "| trained | 8 |",
                   "lora_r: 16", "learning_rate:", "selfalign engrave --config"):  # fmt: skip
        assert needle in card, needle


def test_loss_falls_and_log_has_the_fields(engraved):
    out, _, _ = engraved
    log = read_jsonl(out / "training_log.jsonl")
    assert [r["step"] for r in log] == list(range(1, 31))
    assert all({"step", "loss", "learning_rate", "tokens_per_second"} <= r.keys() for r in log)
    assert all(r["tokens_per_second"] > 0 for r in log)
    first = sum(r["loss"] for r in log[:5]) / 5
    last = sum(r["loss"] for r in log[-5:]) / 5
    assert last < first / 2


def test_label_mask_is_exactly_the_answers_with_eos(engraved, tiny_model_dir):
    """Token by token: labels are the input ids inside assistant spans (EOS included), else -100."""
    out, _, dataset = engraved
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(out)
    assert len(dataset) == 8
    for example in dataset:
        ids, labels = example["input_ids"], example["labels"]
        text = tokenizer.decode(ids)
        begin = text.index(ASSISTANT_HEADER) + len(ASSISTANT_HEADER)
        offsets = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        assert offsets["input_ids"] == ids  # the training text is exactly the rendered template
        expected = [
            i if start >= begin else -100
            for i, (start, _) in zip(ids, offsets["offset_mapping"], strict=True)
        ]
        assert labels == expected
        assert labels[-1] == tokenizer.eos_token_id


def test_training_text_equals_inference_template(engraved):
    """What the trainer tokenized == the saved tokenizer's apply_chat_template of the same row."""
    out, _, dataset = engraved
    from transformers import AutoTokenizer

    from selfalign.text.conversation import sft_messages

    tokenizer = AutoTokenizer.from_pretrained(out)
    variants = TrainConfig().system_prompts
    for row, example in zip(sft_rows(), dataset, strict=True):
        messages = sft_messages(row, IDENTITY, variants, 0)
        rendered = tokenizer.apply_chat_template(messages, return_dict=True)["input_ids"]
        assert rendered == example["input_ids"]
        prompt = tokenizer.apply_chat_template(
            messages[:-1], add_generation_prompt=True, return_dict=True
        )
        assert example["input_ids"][: len(prompt["input_ids"])] == prompt["input_ids"]


def test_lora_changes_only_adapted_weights(engraved, tiny_model_dir):
    from safetensors.torch import load_file

    out, _, _ = engraved
    adapter = load_file(out / "adapter" / "adapter_model.safetensors")
    assert adapter and all("lora_" in key for key in adapter)
    base, merged = (
        load_file(tiny_model_dir / "model.safetensors"),
        load_file(out / "model.safetensors"),
    )
    assert base.keys() == merged.keys()
    changed = {k for k in base if not (base[k] == merged[k]).all()}
    targets = ("q_proj", "k_proj", "v_proj", "o_proj")
    assert changed and all(any(t in k for t in targets) for k in changed)
    assert all(k in changed for k in base if any(t in k for t in targets))


def test_merged_model_generates_like_base_plus_adapter(engraved):
    from selfalign.generation import SamplingParams
    from selfalign.generation.transformers_backend import TransformersBackend
    from selfalign.text.conversation import prompt_messages, render_prompt

    out, _, _ = engraved
    merged = TransformersBackend.load(str(out), device="cpu", dtype="float32")
    adapter = TransformersBackend.load(str(out / "adapter"), device="cpu", dtype="float32")
    prompts = [render_prompt(merged.tokenizer, prompt_messages(None, q)) for q in
               ("Tell me about topic number 3.", "Tell me about topic number 11.", "Hello?")]  # fmt: skip
    greedy = SamplingParams(temperature=0, max_tokens=60)
    assert [c.text for c in merged.generate(prompts, greedy)] == [
        c.text for c in adapter.generate(prompts, greedy)
    ]
    # it learned its answers, and to stop
    learned = merged.generate(prompts[:1], greedy)[0]
    assert learned.finish_reason == "stop" and "is a fine subject; here is what" in learned.text


class Crash:
    def __new__(cls, at_step: int):
        from transformers import TrainerCallback

        class _Crash(TrainerCallback):
            def on_step_end(self, args, state, control, **kwargs):
                if state.global_step == at_step:
                    raise KeyboardInterrupt("simulated crash")

        return _Crash()


def test_resume_continues_at_the_saved_step(tiny_model_dir, tmp_path):
    write_jsonl_atomic(tmp_path / "sft.jsonl", sft_rows())
    cfg = tiny_config(tiny_model_dir, max_steps=6, save_steps=2, method="full", learning_rate=1e-3)
    with pytest.raises(KeyboardInterrupt):
        run_engrave(cfg, tmp_path / "sft.jsonl", tmp_path / "model", IDENTITY, callbacks=[Crash(5)])
    assert (tmp_path / "model" / "checkpoints" / "checkpoint-4").is_dir()
    assert not (tmp_path / "model" / "train_stats.json").exists()

    stats = run_engrave(cfg, tmp_path / "sft.jsonl", tmp_path / "model", IDENTITY)
    assert stats["resumed_from_step"] == 4 and stats["steps"] == 6
    log = read_jsonl(tmp_path / "model" / "training_log.jsonl")
    assert [r["step"] for r in log] == [1, 2, 3, 4, 5, 6]  # no step twice

    # an uninterrupted run ends with the same weights
    from safetensors.torch import load_file

    straight = run_engrave(cfg, tmp_path / "sft.jsonl", tmp_path / "straight", IDENTITY)
    assert straight["resumed_from_step"] == 0
    a, b = (
        load_file(tmp_path / "model" / "model.safetensors"),
        load_file(tmp_path / "straight" / "model.safetensors"),
    )
    assert all((a[k] - b[k]).abs().max() < 1e-5 for k in a)

    # a finished run is not redone; other settings into the same directory are refused
    assert run_engrave(cfg, tmp_path / "sft.jsonl", tmp_path / "model", IDENTITY)["skipped"]
    with pytest.raises(UserError, match="other settings or data"):
        run_engrave(
            cfg.model_copy(update={"learning_rate": 1e-4}),
            tmp_path / "sft.jsonl",
            tmp_path / "model",
            IDENTITY,
        )


def test_cutoff_truncation_is_counted_not_silent(tiny_model_dir):
    from selfalign.modeling import load_tokenizer
    from selfalign.text.conversation import install_chat_template, sft_messages

    tok = load_tokenizer(str(tiny_model_dir))
    install_chat_template(tok, IDENTITY)
    rows = sft_rows(4)
    rows[1]["output"] = "word " * 400
    rows[2]["instruction"] = "question " * 400
    conversations = [sft_messages(r, IDENTITY, ["standard"], 0) for r in rows]
    kept, counts = fit_examples(conversations, tok, 200, "truncate")
    assert counts == {"examples": 4, "truncated": 1, "dropped_overlong": 0, "dropped_prompt_too_long": 1,
                      "tokens": counts["tokens"], "trained": 3}  # fmt: skip
    kept, counts = fit_examples(conversations, tok, 200, "drop")
    assert counts["dropped_overlong"] == 1 and counts["trained"] == 2 == len(kept)


# -- bad input: one line, naming the problem -------------------------------------------------------


def test_sft_file_with_missing_field(tiny_model_dir, tmp_path, monkeypatch, capsys):
    rows = sft_rows(3)
    del rows[1]["output"]
    write_jsonl_atomic(tmp_path / "sft.jsonl", rows)
    code, _, err = cli(monkeypatch, capsys, "engrave", "--model", str(tiny_model_dir),
                    "--data", str(tmp_path / "sft.jsonl"), "--output", str(tmp_path / "m"))  # fmt: skip
    assert code == 2
    assert err.strip().count("\n") == 0
    assert "sft.jsonl: record 2 (id 'r1'): missing field 'output'" in err


def test_empty_sft_file(tiny_model_dir, tmp_path, monkeypatch, capsys):
    (tmp_path / "sft.jsonl").write_text("")
    code, _, err = cli(monkeypatch, capsys, "engrave", "--model", str(tiny_model_dir),
                    "--data", str(tmp_path / "sft.jsonl"), "--output", str(tmp_path / "m"))  # fmt: skip
    assert code == 2 and err.strip().count("\n") == 0
    assert "sft.jsonl: no records to train on (the file is empty)" in err


def test_cutoff_shorter_than_system_prompt(tiny_model_dir, tmp_path, monkeypatch, capsys):
    write_jsonl_atomic(tmp_path / "sft.jsonl", sft_rows(2))
    code, _, err = cli(monkeypatch, capsys, "engrave", "--model", str(tiny_model_dir), "--max-length", "12",
                    "--data", str(tmp_path / "sft.jsonl"), "--output", str(tmp_path / "m"))  # fmt: skip
    assert code == 2 and err.strip().count("\n") == 0
    assert "max_length 12 is shorter than the system prompt" in err


def test_qlora_without_cuda(tiny_model_dir, tmp_path, monkeypatch, capsys):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    write_jsonl_atomic(tmp_path / "sft.jsonl", sft_rows(2))
    code, _, err = cli(monkeypatch, capsys, "engrave", "--model", str(tiny_model_dir), "--method", "qlora",
                    "--data", str(tmp_path / "sft.jsonl"), "--output", str(tmp_path / "m"))  # fmt: skip
    assert code == 2 and err.strip().count("\n") == 0
    assert "method qlora needs a CUDA GPU" in err


def test_duplicate_ids_and_bad_config(tmp_path):
    rows = sft_rows(2)
    rows[1]["id"] = rows[0]["id"]
    write_jsonl_atomic(tmp_path / "sft.jsonl", rows)
    with pytest.raises(UserError, match="record 2: duplicate id 'r0'"):
        load_sft_rows(tmp_path / "sft.jsonl")
    with pytest.raises(UserError, match="no base model given"):
        run_engrave(TrainConfig(), tmp_path / "sft.jsonl", tmp_path / "m", IDENTITY)


REF = Path(__file__).resolve().parents[2] / "shared/reference/dromedary-v1"


def test_json_array_and_sharegpt_rows(tmp_path):
    (tmp_path / "sft.json").write_text(json.dumps([
        {"id": "a", "conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello"}]},
        {"id": "b", "instruction": "Q", "output": "A"}]))  # fmt: skip
    assert [r["id"] for r in load_sft_rows(tmp_path / "sft.json")] == ["a", "b"]
    (tmp_path / "bad.json").write_text('{"id": 1}')
    with pytest.raises(UserError, match="bad.json: expected a JSON array"):
        load_sft_rows(tmp_path / "bad.json")
    (tmp_path / "broken.json").write_text("[{")
    with pytest.raises(UserError, match="broken.json: not valid JSON"):
        load_sft_rows(tmp_path / "broken.json")


@pytest.mark.slow
@pytest.mark.skipif(not REF.is_dir(), reason="reference files not available")
def test_original_identity_data_trains_without_crashing(tiny_model_dir, tmp_path):
    """The original ShareGPT identity file (which crashed the original training) trains as is:
    every conversation of the file is an example, steps run, losses are logged, a model is saved."""
    data = REF / "dummy_data/vicuna_dummy_data.json"
    conversations = json.loads(data.read_text())
    cfg = tiny_config(tiny_model_dir, max_steps=3, logging_steps=1, micro_batch_size=8)
    stats = run_engrave(cfg, data, tmp_path / "model", IDENTITY)

    assert stats["examples"] == len(conversations) == 910
    assert stats["trained"] == 910 and stats["truncated"] == 0  # every conversation fits
    assert stats["steps"] == 3
    log = read_jsonl(tmp_path / "model" / "training_log.jsonl")
    assert [r["step"] for r in log] == [1, 2, 3]
    assert all(isinstance(r["loss"], float) and 0 < r["loss"] < 100 for r in log)
    assert (tmp_path / "model" / "model.safetensors").is_file()
    saved = json.loads((tmp_path / "model" / "train_stats.json").read_text())
    assert saved["examples"] == 910 and saved["steps"] == 3
