"""The original Dromedary-1 files, as they are, through selfalign (they are CC BY-NC 4.0: read
from ../shared/reference/dromedary-v1, never copied into the package or the tests).

`selfalign run --stages 1-2` on the tiny model with every original stage-1/2 file (seed tasks,
self-instruct prompt, TGRT prompts and seed questions, the watson self-align prompt, the ShareGPT
identity data), then stage 4 with the original verbose prompt on a tiny "engraved" model: the
rendered prompts end where each original script ended them (or where selfalign documents that it
adapts them), and every answer kept for training passes the filters.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml
from cli_run import run_cli
from test_corpus import assert_clean

from selfalign.jsonl import read_jsonl, write_jsonl_atomic
from selfalign.text.constitution import Identity, load_constitution, render_prompt, user_text
from selfalign.text.conversation import install_chat_template

REF = Path(__file__).resolve().parents[2] / "shared/reference/dromedary-v1"
PROMPTS = REF / "prompts"
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        not PROMPTS.is_dir(),
        reason="needs the original Dromedary files in ../shared/reference/dromedary-v1 (absent)",
    ),
]
SMALL = {"max_tokens": 48}


def original_config(tmp_path: Path, model: Path) -> Path:
    """A tiny run with every original stage-1/2 file (see configs/paper.yaml for the keys)."""
    data = {
        "run_dir": str(tmp_path / "run"),
        "constitution": str(PROMPTS / "watson_self_align_prompt.txt"),
        "model": {"model": str(model), "device": "cpu", "dtype": "float32", "batch_size": 8},
        "instructions": {
            "self_instruct": {
                "seed_tasks": str(PROMPTS / "self_instruct_seed_tasks.jsonl"),
                "meta_prompt": str(PROMPTS / "self_instruct_prompt.txt"),
                "num_instructions": 4, "prompts_per_round": 4, "max_rounds": 1,
                "sampling": {"temperature": 1.0, "top_p": 0.98, "max_tokens": 96},
            },
            "topics": {
                "seed_questions": str(PROMPTS / "tgrt_self_instruct_seed_questions.jsonl"),
                "prompt": str(PROMPTS / "tgrt_self_instruct_topic_brainstorm_prompt.txt"),
                "epochs": 1, "max_prompts_per_type": 1, "sampling": SMALL,
            },
            "questions": {
                "prompt": str(PROMPTS / "tgrt_self_instruct_question_generation_prompt.txt"),
                "max_topics_per_type": 1, "sampling": SMALL,
            },
        },
        "self_align": {
            "identity_conversations": str(REF / "dummy_data/vicuna_dummy_data.json"),
            "identity_questions": None, "max_instructions": 8, "min_chars": 160,
            "sampling": {"temperature": 0.5, "top_p": 0.95, "max_tokens": 64},
        },
    }  # fmt: skip
    path = tmp_path / "original.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def check_stage1_prompts(out: Path) -> None:
    """Each stage-1 prompt starts with its original file and ends where the model continues:
    the next numbered task (the original self-instruct script's ending), the next topic number
    and the next hint's 'instruction:' (selfalign's prefills: the original TGRT scripts let the
    model write the hint line itself)."""
    meta = (PROMPTS / "self_instruct_prompt.txt").read_text().strip()
    raw = read_jsonl(out / "self_instruct.raw.jsonl")
    assert raw and all(r["prompt"].startswith(meta) for r in raw)
    assert all(r["prompt"].endswith("###\n6. Instruction:") for r in raw)
    brainstorm = (PROMPTS / "tgrt_self_instruct_topic_brainstorm_prompt.txt").read_text()
    head = brainstorm.split("{}")[0].strip()
    topics = read_jsonl(out / "topics.raw.jsonl")
    assert topics and all(r["prompt"].startswith(head) for r in topics)
    assert all(r["prompt"].endswith(f"\n{r['shown'] + 1}.") for r in topics)
    question_head = (PROMPTS / "tgrt_self_instruct_question_generation_prompt.txt").read_text()
    questions = read_jsonl(out / "tgrt_questions.raw.jsonl")
    assert questions and all(
        r["prompt"].startswith(question_head.split("{}")[0].strip()) for r in questions
    )
    assert all(r["prompt"].endswith(", instruction:") for r in questions)


def check_stage2(out: Path, instructions: list[dict]) -> None:
    """The watson prompt, verbatim, then the instruction and the thoughts cue, as the original
    generate_self_align_response.py wrote it; every training row is clean."""
    watson = load_constitution(PROMPTS / "watson_self_align_prompt.txt")
    text = (PROMPTS / "watson_self_align_prompt.txt").read_text().strip()
    for r in instructions[:8]:
        prompt = render_prompt(watson, r["instruction"], r.get("input") or "")
        question = user_text(r["instruction"], r.get("input") or "")
        assert prompt == f"{text} {question}\n\nWatson (internal thoughts):"
    for row in read_jsonl(out / "sft.jsonl"):
        assert_clean(row["output"])
        assert "Vicuna" not in row["output"] and "LMSYS" not in row["output"]
    for row in read_jsonl(out / "aligned.jsonl"):
        assert len(row["output"]) >= 160 and "Watson" not in row["output"]


@pytest.fixture(scope="module")
def long_tiny_model(tiny_model_dir, tmp_path_factory) -> Path:
    """The tiny model with room for the original prompts: its byte-level vocabulary of 512
    makes the watson prompt some 4,400 tokens (rotary positions extend as they are)."""
    folder = tmp_path_factory.mktemp("long") / "model"
    shutil.copytree(tiny_model_dir, folder)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "max_position_embeddings": 8192}))
    return folder


def test_stages_1_and_2_with_every_original_file(tmp_path, long_tiny_model, monkeypatch, capsys):
    code, text = run_cli(
        monkeypatch, capsys, "run", str(original_config(tmp_path, long_tiny_model)),
        "--stages", "1-2", "--quiet",
    )  # fmt: skip
    assert code == 0, text
    run = tmp_path / "run"
    check_stage1_prompts(run / "1_instructions")
    instructions = read_jsonl(run / "1_instructions/instructions.jsonl")
    assert instructions, "stage 1 kept no instruction"
    check_stage2(run / "2_self_align", instructions)
    identity = read_jsonl(run / "2_self_align/identity.jsonl")
    assert len(identity) > 100 and any("Dromedary" in r["output"] for r in identity)


def engraved_model(folder: Path, tiny_model_dir: Path) -> Path:
    """The tiny model with selfalign's chat template: what stage 3 leaves behind."""
    from selfalign.modeling import load_tokenizer

    shutil.copytree(tiny_model_dir, folder)
    tokenizer = load_tokenizer(str(folder))
    install_chat_template(tokenizer, Identity())
    tokenizer.save_pretrained(folder)
    return folder


def test_stage_4_with_the_original_verbose_prompt(tmp_path, long_tiny_model):
    from selfalign.generation.transformers_backend import TransformersBackend
    from selfalign.stages.stage4_verbose import VerboseConfig, run_verbose

    original = PROMPTS / "verbose_dromedary_prompt.txt"
    questions = ["Why is the sky blue?", "Give me three tips for learning a language.",
                 "Explain what a prime number is.", "Who are you?"]  # fmt: skip
    write_jsonl_atomic(tmp_path / "aligned.jsonl", [
        {"id": f"a{i}", "instruction": q, "input": "", "output": "x", "source": "self_instruct"}
        for i, q in enumerate(questions)
    ])  # fmt: skip
    engraved = engraved_model(tmp_path / "engraved", long_tiny_model)
    backend = TransformersBackend.load(str(engraved), device="cpu", dtype="float32")
    cfg = VerboseConfig(
        verbose_prompt=str(original), min_words=1,
        sampling={"temperature": 0.3, "top_p": 0.7, "max_tokens": 48,
                  "ngram_penalties": {3: 1.0, 4: 2.0}, "stop": ["\n### User"]},
    )  # fmt: skip
    watson = load_constitution(PROMPTS / "watson_self_align_prompt.txt")
    try:
        counts = run_verbose(cfg, backend, tmp_path / "aligned.jsonl", tmp_path / "out", watson,
                             engraved=engraved)  # fmt: skip
    finally:
        backend.close()
    head = original.read_text().rstrip().removesuffix("### User").rstrip()
    raw = {r["instruction"]: r["prompt"] for r in read_jsonl(tmp_path / "out/verbose.raw.jsonl")}
    assert counts["generated"] == len(raw) == len(questions)
    for question in questions:
        # the original generate_verbose_response.py: prompt, question, then its own label
        assert raw[question].startswith(head + "\n\n### User\n")
        assert raw[question].endswith(f"### User\n{question}\n\n### Dromedary (extensive)\n")
    for row in read_jsonl(tmp_path / "out/verbose.jsonl"):
        assert_clean(row["output"])
