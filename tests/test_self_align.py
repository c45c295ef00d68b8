"""Stage 2: parsing and filters on canned completions, the apology bias, identity data, and the
stage end to end (scripted backend, crash + resume, shards, a tiny local model, the CLI)."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from cli_run import run_cli

from selfalign.errors import UserError
from selfalign.generation import Completion
from selfalign.generation.scripted import ScriptedBackend
from selfalign.jsonl import read_jsonl
from selfalign.stages.stage2_self_align import (
    ROW_FIELDS,
    SelfAlignConfig,
    answer_rules,
    apology_bias,
    apology_token_ids,
    cut_to_last_sentence,
    finalize_self_align,
    identity_rows,
    judge,
    load_identity_conversations,
    load_identity_questions,
    parse_completion,
    run_self_align,
    sampling_params,
)
from selfalign.text.constitution import load_constitution, render_prefix
from selfalign.text.filters import ExemplarLeakage, cut_repetition, opens_with_apology

REF = Path(__file__).resolve().parents[2] / "shared/reference/dromedary-v1"
WATSON = REF / "prompts/watson_self_align_prompt.txt"
VICUNA = REF / "dummy_data/vicuna_dummy_data.json"
needs_ref = pytest.mark.skipif(not WATSON.exists(), reason="reference files not available")

SELF_ID = " I am a helpful, honest and careful assistant."


@pytest.fixture(scope="module")
def default():
    return load_constitution("default")


def thoughts(text="The user asks a plain question.", cite="2 (informative), 3 (helpful)"):
    return f"{SELF_ID} {text} I should follow principles {cite}."


def completion(answer: str, **kw) -> str:
    return f"{thoughts(**kw)}\n\nOrion: {answer}"


def verdict(c, text, finish="stop", question="Tell me about Lisbon.", **cfg):
    config = SelfAlignConfig(**cfg)
    return judge(c, config, answer_rules(c, config), text, finish, question)


# -- parsing ----------------------------------------------------------------------------------------


def test_good_answer_is_kept_with_its_citations_and_the_released_name(default):
    v = verdict(default, completion("Lisbon is the capital of Portugal. Orion likes its trams."))
    assert v.reason is None
    assert v.output == "Lisbon is the capital of Portugal. Dromedary likes its trams."
    assert v.parsed.principles == [2, 3] and v.renamed
    assert v.parsed.thoughts.startswith(SELF_ID.strip())


def test_completion_without_thoughts_is_rejected(default):
    assert verdict(default, " Orion: Lisbon is lovely in spring.").reason == "no_thoughts"
    assert verdict(default, "").reason == "no_thoughts"


def test_completion_starting_a_new_user_turn_has_no_answer(default):
    assert verdict(default, thoughts() + "\n\nUser: And Porto?").reason == "no_answer"
    assert verdict(default, thoughts()).reason == "no_answer"


def test_answer_ends_at_the_next_turn_marker(default):
    text = completion("Lisbon has seven hills and a long history.") + (
        "\n\nUser: Thanks!\n\nOrion (auto reply): You are welcome."
    )
    v = verdict(default, text, finish="length")  # the limit struck after the turn had ended
    assert v.reason is None and v.output == "Lisbon has seven hills and a long history."
    assert v.parsed.cuts == ["turn_marker"]
    second = completion("Lisbon is old and hilly.") + "\nOrion (internal thoughts): more"
    assert verdict(default, second).output == "Lisbon is old and hilly."


def test_thoughts_must_open_with_the_self_identification(default):
    text = " The user asks about Lisbon.\n\nOrion: Lisbon is the capital of Portugal."
    assert verdict(default, text).reason == "no_self_identification"


def test_parse_reads_cited_principles():
    c = load_constitution("default")
    p = parse_completion(
        c, completion("Fine answer here.", cite="7 (candor), 12 (dated knowledge)")
    )
    assert p.principles == [7, 12] and p.reason is None


def test_repetition_loop_is_cut_at_the_first_repeat(default):
    loop = "Lisbon is a city by the sea. " * 12
    v = verdict(default, completion(loop + "Lisbon is"), finish="length")
    assert v.reason is None  # the cut removed the part the length limit broke
    assert v.output == "Lisbon is a city by the sea."
    assert v.parsed.cuts == ["repetition"]


def test_repeated_phrase_without_punctuation_is_cut():
    text, cut = cut_repetition(
        "The answer is good and the cats are happy the cats are happy the cats are happy the cats"
    )
    assert cut and text == "The answer is good and the cats are happy"


def test_code_and_short_lists_are_not_repetition():
    code = "Here:\n\n```python\nx = 1\nprint(x)\nx = 2\nprint(x)\nprint(x)\nprint(x)\n```\n\nDone."
    assert cut_repetition(code) == (code, False)
    assert cut_repetition("The sorted list is [1, 1, 1, 4, 4, 5].")[1] is False
    assert cut_repetition("In binary: 0 1 0 1 0 1 0 1 is a pattern.")[1] is False


def test_truncated_answer_is_dropped_by_default(default):
    v = verdict(
        default, completion("Lisbon is the capital. It lies on the Tagus and its old to"), "length"
    )
    assert v.reason == "truncated"


def test_truncated_answer_cut_back_to_its_last_sentence_when_opted_in(default):
    text = completion("Lisbon is the capital. It lies on the Tagus and its old to")
    v = verdict(default, text, "length", truncated="cut")
    assert v.reason is None and v.output == "Lisbon is the capital."
    assert v.parsed.cuts == ["truncated_to_sentence"]
    # no complete sentence at all: still dropped, never kept with a dangling word
    v = verdict(default, completion("Lisbon is the capital of Portu"), "length", truncated="cut")
    assert v.reason == "truncated"


def test_cut_to_last_sentence_rules():
    assert cut_to_last_sentence("It costs 3.5 euros. Then the pri") == "It costs 3.5 euros."
    assert cut_to_last_sentence("Steps:\n1. Buy a ticket.\n2. Ta") == "Steps:\n1. Buy a ticket."
    assert cut_to_last_sentence("Steps:\n1. Buy") is None
    assert cut_to_last_sentence('He said "go." And th') == 'He said "go."'
    code = "Use this. Then:\n\n```python\nx = 1. \ny = 2"
    assert cut_to_last_sentence(code) == "Use this."


@pytest.mark.parametrize(
    "answer",
    ["Sorry, I cannot help.", "I'm sorry, but no.", "I am so sorry to hear that.", "Im sorry.",
     "I’m sorry: no.", "My apologies, I do not know.", "I apologize for the confusion.",
     '"Sorry," I cannot.'],
)  # fmt: skip
def test_apology_openings_are_rejected(default, answer):
    assert opens_with_apology(answer)
    assert verdict(default, completion(answer + " More words here.")).reason == "apology"


def test_a_later_apology_or_sorry_word_is_fine(default):
    assert not opens_with_apology("Sorrento is a town in Italy.")
    v = verdict(default, completion("Lisbon is lovely. I'm sorry it rains in winter."))
    assert v.reason is None


def test_empty_and_too_short_answers(default):
    assert verdict(default, thoughts() + "\n\nOrion:").reason == "empty"
    assert verdict(default, completion("Yes.")).reason == "too_short"
    assert verdict(default, completion("Yes."), min_words=1).reason is None


def test_require_citation(default):
    text = f"{SELF_ID} Easy one.\n\nOrion: Lisbon is the capital of Portugal."
    assert verdict(default, text).reason is None
    assert verdict(default, text, require_citation=True).reason == "no_citation"


# -- exemplar leakage -------------------------------------------------------------------------------


def test_copying_a_distinctive_exemplar_sentence_is_leakage(default):
    answer = (
        "Lisbon is old. French soldiers found it in 1799 near the town of Rashid (Rosetta) "
        "in the Nile delta."
    )
    v = verdict(default, completion(answer))
    assert v.reason == "exemplar_leakage" and "1799" in v.detail


def test_leakage_is_not_flagged_when_the_question_is_on_that_topic(default):
    answer = (
        "The Rosetta Stone is a granite slab inscribed in 196 BC with one decree in three scripts."
    )
    assert verdict(default, completion(answer), question="Tell me about Lisbon.").reason == (
        "exemplar_leakage"
    )
    asked = "What is the Rosetta Stone, inscribed in 196 BC?"
    assert verdict(default, completion(answer), question=asked).reason is None


def test_generic_exemplar_phrasing_is_not_leakage(default):
    answer = (
        "My knowledge ends in September 2023, so I cannot tell who won the 2030 World Cup. "
        "The FIFA website will have the answer."
    )
    assert (
        verdict(default, completion(answer), question="Who won the 2030 World Cup?").reason is None
    )


@needs_ref
@pytest.mark.parametrize(
    "answer, question",
    [
        ("The president of the United States is elected every four years through the Electoral "
         "College.", "How are US presidents elected?"),
        ("Lisbon is mild in spring; check the weather forecast before packing, and visit the "
         "palace where the president of Portugal works.", "Plan a weekend in Lisbon."),
        ("As an AI language model, I have no access to weather sensors or real-time weather "
         "data. Check a forecast website.", "What is the weather in Paris today?"),
    ],
)  # fmt: skip
def test_watson_answers_mentioning_a_president_or_the_weather_are_kept(answer, question):
    c = load_constitution(WATSON)
    text = (
        " I am a helpful, ethical, and reliable assistant. The user asks a question. "
        f"I should follow rules 2 (informative).\n\nWatson: {answer} Watson hopes this helps."
    )
    v = verdict(c, text, question=question)
    assert v.reason is None, v.detail
    assert v.output.endswith("Dromedary hopes this helps.")


@needs_ref
def test_watson_exemplar_copied_into_another_topic_is_leakage():
    c = load_constitution(WATSON)
    leak = ExemplarLeakage.from_constitution(c)
    copied = "The alpaca (Lama pacos) is a species of South American camelid mammal."
    assert leak.find(copied, "Tell me about cows.")
    assert not leak.find(copied, "Tell me about the alpaca (Lama pacos).")
    weather = "I have no access to weather sensors or real-time weather data."
    assert leak.find(weather, "Recommend a restaurant in Rome.")


# -- sampling: paper defaults, turn stop, apology bias ----------------------------------------------


def test_sampling_defaults_and_stop(default):
    cfg = SelfAlignConfig(sampling={"ngram_penalties": {3: 1.0}, "stop": ["###"]})
    params = sampling_params(cfg, default, {5: -100.0})
    assert params.stop == ["###", "\nUser:"] and params.logit_bias == {5: -100.0}
    assert params.ngram_penalties == {3: 1.0}
    paper = SelfAlignConfig().sampling
    assert (paper.temperature, paper.top_p, paper.max_tokens) == (0.5, 0.95, 256)


def test_no_apology_bias_without_a_tokenizer():
    assert apology_bias(SelfAlignConfig(), ScriptedBackend(lambda p, s: "")) == {}


def test_apology_bias_covers_every_way_to_start_sorry():
    from selfalign.tiny import train_tokenizer

    corpus = [
        "Sorry, I can't. sorry! I'm sorry. I am sorry. SORRY. Sorrow and sorrows. Sorry Sorry",
        "The professor sorted the tensor. Sort it. Some sort of sorcery.",
    ] * 20
    tok = train_tokenizer(corpus, vocab_size=400)
    ids = set(apology_token_ids(tok))
    assert ids
    for phrase in ["Sorry, no.", " Sorry, no.", " sorry", "I'm sorry", "I am sorry", "\nSorry"]:
        pieces = tok(phrase, add_special_tokens=False)["input_ids"]
        # the token that starts the word "sorry" in this spelling is biased
        start = next(i for i in pieces if "sor" in tok.decode([i]).lower())
        assert start in ids, (phrase, [tok.decode([i]) for i in pieces])
    for word in ("professor", "tensor"):
        for i in tok(word, add_special_tokens=False)["input_ids"]:
            assert i not in ids or tok.decode([i])[:1].isspace(), tok.decode([i])
    for i in ids:
        text = tok.decode([i]).lstrip().lower()
        assert text.startswith("sorry") or "sorry".startswith(text)


def test_apology_bias_with_sentencepiece_style_markers():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    words = "Sorry sorry Sorrow Sorrento sorrel professor tensor Sort sort sorted Sorbet".split()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>"], show_progress=False)
    tok.train_from_iterator([" ".join(words)] * 50, trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>")
    ids = set(apology_token_ids(fast))
    pieces = {fast.convert_ids_to_tokens(i) for i in ids}
    assert "▁Sorry" in pieces and "▁sorry" in pieces
    for i in fast("professor tensor", add_special_tokens=False)["input_ids"][1:]:
        assert i not in ids or fast.convert_ids_to_tokens(i).startswith("▁")
    assert all(p.lstrip("▁").lower()[:3] == "sor" for p in pieces)


# -- identity data ----------------------------------------------------------------------------------


def test_bundled_identity_questions_are_answered_from_the_identity(default):
    questions = load_identity_questions()
    assert len(questions) >= 30 and len({q.id for q in questions}) == len(questions)
    rows = identity_rows(questions, default.identity, seed=1)
    assert len(rows) == len(questions)
    text = json.dumps(rows)
    assert "Dromedary" in text and "the selfalign authors" in text and "September 2023" in text
    assert "Orion" not in text and "{" not in "".join(r["output"] for r in rows)
    assert all(tuple(r) == ROW_FIELDS for r in rows)
    assert rows == identity_rows(questions, default.identity, seed=1)


def test_identity_conversations_sharegpt_with_name_replacement(tmp_path, default):
    data = [
        {"id": "a", "conversations": [
            {"from": "human", "value": "Who are you?"},
            {"from": "gpt", "value": "I am Vicuna, trained by Large Model Systems Organization (LMSYS)."},
            {"from": "human", "value": "What can you do?"},
            {"from": "gpt", "value": "I can chat. Vicuna's skills grow."}]},
        {"id": "b", "conversations": [
            {"from": "human", "value": "Who are you?"},
            {"from": "gpt", "value": "I am Vicuna, trained by Large Model Systems Organization (LMSYS)."}]},
    ]  # fmt: skip
    path = tmp_path / "ids.json"
    path.write_text(json.dumps(data))
    rows = load_identity_conversations(path, default.identity, SelfAlignConfig().identity_replace)
    assert [r["id"] for r in rows] == [
        "identity-conv-a-0",
        "identity-conv-a-1",
    ]  # duplicate dropped
    assert rows[0]["output"] == "I am Dromedary, trained by the selfalign authors."
    assert rows[1]["output"] == "I can chat. Dromedary's skills grow."
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"id": 1, "turns": []}\n')
    with pytest.raises(UserError, match="record 1 has no 'conversations'"):
        load_identity_conversations(bad, default.identity)


@pytest.mark.skipif(not VICUNA.exists(), reason="reference files not available")
def test_original_identity_data_loads_with_our_names(default):
    rows = load_identity_conversations(VICUNA, default.identity, SelfAlignConfig().identity_replace)
    assert len(rows) > 800
    text = json.dumps(rows)
    assert "Vicuna" not in text and "LMSYS" not in text and "Dromedary" in text


# -- end to end with a scripted model ---------------------------------------------------------------

ANSWERS = {
    "good": completion("Tides are caused mostly by the Moon's gravity pulling on the oceans."),
    "president": completion("The president of Portugal is elected for five years. Orion says so."),
    "weather": completion("Pack a light jacket: the weather in Lisbon is mild but windy."),
    "leak": completion("French soldiers found it in 1799 near the town of Rashid in the delta."),
    "loop": completion("Cats are curious animals indeed. " * 20),
    "apology": completion("Sorry, I cannot answer that question today."),
    "nothoughts": " Orion: Here is a poem about rain and grey skies.",
    "userturn": thoughts() + "\n\nUser: Another question?",
}


def respond(prompt: str, seed: int):
    question = prompt[len(PREFIX) :]
    key = question.split("[", 1)[1].split("]", 1)[0]
    if key == "truncated":
        text = completion("The city is very old. Its history is long and its first")
        return Completion(text, "length", 1, 40)
    return ANSWERS[key]


PREFIX = render_prefix(load_constitution("default"))


def write_instructions(path: Path, keys=None, copies: int = 2) -> Path:
    keys = keys or [*ANSWERS, "truncated"]
    with open(path, "w") as f:
        for n in range(copies):
            for k in keys:
                rec = {"id": f"{k}-{n}", "instruction": f"Question [{k}] number {n}?", "input": "",
                       "source": "self_instruct"}  # fmt: skip
                f.write(json.dumps(rec) + "\n")
    return path


def outputs(out: Path) -> dict[str, str]:
    names = ["aligned.jsonl", "identity.jsonl", "rejected.jsonl", "sft.jsonl", "stats.json"]
    return {n: (out / n).read_text() for n in names}


def test_run_end_to_end_with_a_scripted_model(tmp_path):
    inp = write_instructions(tmp_path / "instructions.jsonl")
    out = tmp_path / "out"
    backend = ScriptedBackend(respond, batch_size=3)
    stats = run_self_align(SelfAlignConfig(), backend, inp, out)

    assert all(p.startswith(PREFIX + " ") for p in backend.calls)
    raw = read_jsonl(out / "self_align.raw.jsonl")
    assert len(raw) == 18 and "prompt" not in raw[0]
    # the hash in the raw file is the prompt's (which is not stored per row)
    assert raw[0]["prompt_sha"] == hashlib.sha256(backend.calls[0].encode()).hexdigest()[:16]
    aligned, rejected = read_jsonl(out / "aligned.jsonl"), read_jsonl(out / "rejected.jsonl")
    assert stats["generated"] == 18 == stats["kept"] + sum(stats["rejected"].values())
    assert len(aligned) == stats["kept"] == 8 and len(rejected) == 10
    assert {r["id"].rsplit("-", 1)[0] for r in aligned} == {"good", "president", "weather", "loop"}
    assert stats["rejected"] == {"exemplar_leakage": 2, "apology": 2, "no_thoughts": 2,
                                 "no_answer": 2, "truncated": 2}  # fmt: skip
    assert stats["parsed"] == 14 and stats["cuts"] == {"repetition": 2} and stats["renamed"] == 2
    assert (
        stats["citations"]["2 (informative)"] == 8 and stats["citations"]["16 (operational)"] == 0
    )
    assert all(set(r) >= {"reason", "completion"} for r in rejected)
    assert all(tuple(r) == ROW_FIELDS for r in aligned)
    assert json.loads((out / "stats.json").read_text()) == {
        k: v for k, v in stats.items() if k not in ("shard", "apology_bias_tokens")
    }
    sft = read_jsonl(out / "sft.jsonl")
    identity = read_jsonl(out / "identity.jsonl")
    assert len(sft) == len(aligned) + len(identity) == stats["sft"]
    assert sorted(r["id"] for r in sft) == sorted(r["id"] for r in aligned + identity)
    assert all(tuple(r) == ROW_FIELDS for r in sft)
    assert [r["id"] for r in sft] != [r["id"] for r in aligned + identity]  # shuffled

    # stage 3 and export read it as it is
    from selfalign.run.export import export_run
    from selfalign.stages.stage3_engrave import load_sft_rows

    assert len(load_sft_rows(out / "sft.jsonl")) == len(sft)
    run_dir = tmp_path / "run"
    (run_dir / "2_self_align").mkdir(parents=True)
    (run_dir / "2_self_align" / "sft.jsonl").write_text((out / "sft.jsonl").read_text())
    (run_dir / "config.yaml").write_text("model: {model: base}\n")  # the system prompts' source
    assert export_run(run_dir, "alpaca", tmp_path / "export")["self_align"] == len(sft)

    # a rerun generates nothing and writes the same files
    before = outputs(out)
    again = ScriptedBackend(respond)
    run_self_align(SelfAlignConfig(), again, inp, out)
    assert again.calls == [] and outputs(out) == before


class Crash(RuntimeError):
    pass


def crashing(after_batches: int) -> ScriptedBackend:
    backend = ScriptedBackend(respond, batch_size=2)
    inner = backend.iter_batches
    count = [0]  # batches over every call

    def iter_batches(*args, **kwargs):
        for batch in inner(*args, **kwargs):
            if count[0] == after_batches:
                raise Crash("killed")
            count[0] += 1
            yield batch

    backend.iter_batches = iter_batches
    return backend


def test_crash_and_rerun_loses_and_duplicates_nothing(tmp_path):
    inp = write_instructions(tmp_path / "instructions.jsonl", copies=3)
    ref = tmp_path / "ref"
    run_self_align(SelfAlignConfig(), ScriptedBackend(respond, batch_size=5), inp, ref)
    out = tmp_path / "out"
    chunked = SelfAlignConfig(chunk_size=5)  # several generation calls; the same result
    with pytest.raises(Crash):
        run_self_align(chunked, crashing(after_batches=4), inp, out)
    assert len(read_jsonl(out / "self_align.raw.jsonl")) == 7  # batches of 2, 2, 1 | 2
    assert not (out / "sft.jsonl").exists()
    # a torn last line, as a kill -9 mid-write leaves
    with open(out / "self_align.raw.jsonl", "a") as f:
        f.write('{"id": "good-2", "compl')
    backend = ScriptedBackend(respond, batch_size=3)
    run_self_align(chunked, backend, inp, out)
    assert len(backend.calls) == 27 - 7
    raw_ids = [r["id"] for r in read_jsonl(out / "self_align.raw.jsonl")]
    assert len(raw_ids) == len(set(raw_ids)) == 27
    assert outputs(out) == outputs(ref)


def test_a_run_reads_its_raw_file_once_and_other_shards_files_once(tmp_path, monkeypatch):
    import selfalign.jsonl

    reads: list[str] = []
    scan = selfalign.jsonl._scan

    def counting(path):
        reads.append(path.name)
        return scan(path)

    monkeypatch.setattr(selfalign.jsonl, "_scan", counting)
    inp = write_instructions(tmp_path / "instructions.jsonl", copies=3)
    out = tmp_path / "out"
    # in chunks: a fresh run writes the file and reads it never; a rerun (resume) once
    for times in (0, 1):
        run_self_align(SelfAlignConfig(chunk_size=4), ScriptedBackend(respond), inp, out)
        assert reads.count("self_align.raw.jsonl") == times
        assert reads.count("instructions.jsonl") == 1
        reads.clear()
    # the last shard to finish reads every other raw file once, its own (new) never
    run_self_align(SelfAlignConfig(), ScriptedBackend(respond), inp, out, shard="0/2")
    reads.clear()
    run_self_align(SelfAlignConfig(), ScriptedBackend(respond), inp, out, shard="1/2")
    raw = sorted(name for name in reads if name.endswith(".raw.jsonl"))
    assert raw == ["self_align.raw.jsonl", "self_align.shard0of2.raw.jsonl"]


def test_shards_produce_the_same_files_as_one_run(tmp_path):
    inp = write_instructions(tmp_path / "instructions.jsonl")
    ref = tmp_path / "ref"
    run_self_align(SelfAlignConfig(), ScriptedBackend(respond), inp, ref)
    out = tmp_path / "out"
    first = run_self_align(SelfAlignConfig(), ScriptedBackend(respond), inp, out, shard="1/3")
    assert first == {"finalized": False, "pending": 12, "instructions": 18, "shard": "1/3",
                     "apology_bias_tokens": 0}  # fmt: skip
    assert (out / "self_align.shard1of3.raw.jsonl").exists() and not (out / "sft.jsonl").exists()
    run_self_align(SelfAlignConfig(), ScriptedBackend(respond), inp, out, shard="0/3")
    last = run_self_align(SelfAlignConfig(), ScriptedBackend(respond), inp, out, shard="2/3")
    assert last["finalized"] and last["generated"] == 18
    assert outputs(out) == outputs(ref)
    with pytest.raises(UserError, match="expected I/N"):
        run_self_align(SelfAlignConfig(), ScriptedBackend(respond), inp, out, shard="2")


def test_finalize_refilters_without_a_model_and_refuses_missing_work(tmp_path):
    inp = write_instructions(tmp_path / "instructions.jsonl")
    out = tmp_path / "out"
    with pytest.raises(UserError, match="18 of 18 instructions have no completion"):
        finalize_self_align(SelfAlignConfig(), inp, out)
    run_self_align(SelfAlignConfig(), ScriptedBackend(respond), inp, out)
    stats = finalize_self_align(SelfAlignConfig(truncated="cut"), inp, out)
    assert "truncated" not in stats["rejected"] and stats["cuts"]["truncated_to_sentence"] == 2
    kept = {r["id"]: r["output"] for r in read_jsonl(out / "aligned.jsonl")}
    assert kept["truncated-0"] == "The city is very old."


def test_changed_constitution_is_noticed_on_resume(tmp_path):
    inp = write_instructions(tmp_path / "instructions.jsonl", copies=1)
    out = tmp_path / "out"
    run_self_align(SelfAlignConfig(), ScriptedBackend(respond), inp, out)
    other = load_constitution("default").model_dump(exclude_none=True)
    other["codename"] = "Vega"
    path = tmp_path / "vega.yaml"
    path.write_text(yaml.safe_dump(other))
    with pytest.raises(UserError, match="generated from a different prompt"):
        run_self_align(SelfAlignConfig(constitution=str(path)), ScriptedBackend(respond), inp, out)


def test_bad_instructions_are_named(tmp_path):
    inp = tmp_path / "i.jsonl"
    inp.write_text('{"id": 1, "instruction": "ok"}\n{"id": 1, "instruction": "again"}\n')
    with pytest.raises(UserError, match="record 2: duplicate id 1"):
        run_self_align(SelfAlignConfig(), ScriptedBackend(respond), inp, tmp_path / "o")
    inp.write_text('{"id": 1, "text": "no instruction"}\n')
    with pytest.raises(UserError, match="record 1 .id 1. has no 'instruction'"):
        run_self_align(SelfAlignConfig(), ScriptedBackend(respond), inp, tmp_path / "o")


def test_config_is_strict_and_documented():
    with pytest.raises(Exception, match="extra"):
        SelfAlignConfig(temprature=0.3)
    for name, f in SelfAlignConfig.model_fields.items():
        assert f.description, name


def test_cli_finalize_and_errors(tmp_path, monkeypatch, capsys):
    inp = write_instructions(tmp_path / "instructions.jsonl")
    out = tmp_path / "out"
    status, text = run_cli(monkeypatch, capsys, "self-align", "--instructions", str(inp),
                           "--output", str(out))  # fmt: skip
    assert status == 2 and "error: no model given" in text
    run_self_align(SelfAlignConfig(), ScriptedBackend(respond), inp, out)
    status, text = run_cli(monkeypatch, capsys, "self-align", "--instructions", str(inp),
                           "--output", str(out), "--finalize", "--truncated", "cut",
                           "--name", "Kestrel")  # fmt: skip
    assert status == 0, text
    assert "kept 10/18 answers" in text and "33 identity rows" in text
    aligned = read_jsonl(out / "aligned.jsonl")
    assert "Kestrel" in json.dumps(aligned) and "Dromedary" not in json.dumps(aligned)
    status, text = run_cli(monkeypatch, capsys, "self-align", "--instructions", str(inp),
                           "--output", str(out), "--finalize", "--truncated", "maybe")  # fmt: skip
    assert status == 2 and "truncated" in text
    status, text = run_cli(monkeypatch, capsys, "self-align", "--instructions",
                           str(tmp_path / "none.jsonl"), "--output", str(out), "--model", "x")  # fmt: skip
    assert status == 2 and "none.jsonl: file not found" in text


# -- a tiny local model -----------------------------------------------------------------------------

SMALL = {
    "identity": {"name": "Kestrel", "developer": "Acme Labs", "knowledge_cutoff": "2024-03"},
    "codename": "Wren",
    "self_identification": "I am a careful assistant.",
    "principles": [
        {"id": 1, "name": "honest", "text": "{name} tells the truth."},
        {"id": 2, "name": "helpful", "text": "{name} helps."},
    ],
    "exemplars": [
        {"name": "sea", "turns": [{"user": "Why is the sea salty?", "thoughts": "A science question.",
                                   "principles": [1, 2], "answer": "Rivers carry salts to it."}]}
    ],
}  # fmt: skip


def tiny_inputs(tmp_path: Path, n: int) -> tuple[Path, Path]:
    constitution = tmp_path / "small.yaml"
    constitution.write_text(yaml.safe_dump(SMALL))
    inp = tmp_path / "instructions.jsonl"
    inp.write_text(
        "".join(
            json.dumps({"id": f"q{i}", "instruction": f"Question {i} about the sea?"}) + "\n"
            for i in range(n)
        )
    )
    return constitution, inp


def test_end_to_end_on_a_tiny_model(tiny_backend, tmp_path):
    """Every instruction is answered once by the model, with the stage's prompt, sampling and
    per-id seed; every answer is judged by the stage-2 filters into aligned or rejected; the
    stats, SFT and identity files agree with that."""
    from collections import Counter

    from selfalign.generation import row_seed
    from selfalign.text.constitution import render_prompt, user_text

    constitution, inp = tiny_inputs(tmp_path, 6)
    cfg = SelfAlignConfig(constitution=str(constitution), sampling={"max_tokens": 24})
    stats = run_self_align(cfg, tiny_backend, inp, tmp_path / "out")
    out, instructions = tmp_path / "out", read_jsonl(inp)
    raw = {r["id"]: r for r in read_jsonl(out / "self_align.raw.jsonl")}
    assert sorted(raw) == sorted(r["id"] for r in instructions)

    c = load_constitution(constitution)
    params = sampling_params(cfg, c, apology_bias(cfg, tiny_backend))
    again = tiny_backend.generate(
        [render_prompt(c, r["instruction"]) for r in instructions],
        params,
        [row_seed(cfg.seed, r["id"]) for r in instructions],
    )
    assert [raw[r["id"]]["completion"] for r in instructions] == [a.text for a in again]

    aligned = {r["id"]: r for r in read_jsonl(out / "aligned.jsonl")}
    rejected = {r["id"]: r for r in read_jsonl(out / "rejected.jsonl")}
    assert aligned.keys() | rejected.keys() == raw.keys() and not aligned.keys() & rejected.keys()
    rules = answer_rules(c, cfg)
    for r in instructions:
        got = raw[r["id"]]
        verdict = judge(c, cfg, rules, got["completion"], got["finish_reason"],
                        user_text(r["instruction"], ""))  # fmt: skip
        if verdict.reason:
            assert rejected[r["id"]]["reason"] == verdict.reason
        else:
            assert aligned[r["id"]]["output"] == verdict.output

    reasons = Counter(r["reason"] for r in rejected.values())
    assert stats["generated"] == 6 and stats["kept"] == len(aligned)
    assert stats["rejected"] == reasons
    identity = read_jsonl(out / "identity.jsonl")
    assert identity and "Kestrel" in json.dumps(identity)
    sft = read_jsonl(out / "sft.jsonl")
    assert sorted(r["id"] for r in sft) == sorted([*aligned, *(r["id"] for r in identity)])
    assert stats["identity"] == len(identity) and stats["sft"] == len(sft)


def test_default_constitution_prefix_is_prefilled_once(tmp_path):
    """Every prompt begins with the identical constitution text, so the transformers backend
    finds it as the job's common prefix (computed once, shared by every row)."""
    from selfalign.generation.transformers_backend import TransformersBackend
    from selfalign.tiny import build_tiny_model

    model = build_tiny_model(tmp_path / "m", context=8192)  # the full prompt needs > 2048
    backend = TransformersBackend.load(str(model), device="cpu", dtype="float32", batch_size=4)
    inp = tmp_path / "i.jsonl"
    inp.write_text("".join(json.dumps({"id": i, "instruction": f"Q{i} {'x' * i}?"}) + "\n"
                           for i in range(4)))  # fmt: skip
    cfg = SelfAlignConfig(sampling={"max_tokens": 8}, identity_questions=None)
    stats = run_self_align(cfg, backend, inp, tmp_path / "out")
    assert stats["generated"] == 4 == stats["kept"] + sum(stats["rejected"].values())
    prefix_tokens = len(backend.tokenizer(PREFIX)["input_ids"])
    assert backend.last_shared_prefix >= prefix_tokens - 1


@pytest.mark.slow
def test_cli_kill_9_and_rerun_leaves_no_duplicates(tiny_model_dir, tmp_path):
    constitution, inp = tiny_inputs(tmp_path, 60)
    out = tmp_path / "out"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "SELFALIGN_PROGRESS": "0"}
    cmd = [sys.executable, "-m", "selfalign", "self-align", "--model", str(tiny_model_dir),
           "--instructions", str(inp), "--output", str(out), "--constitution", str(constitution),
           "--max-tokens", "32", "--batch-size", "2", "--device", "cpu", "--dtype", "float32"]  # fmt: skip
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    raw = out / "self_align.raw.jsonl"
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        if raw.exists() and raw.read_text().count("\n") >= 6:
            break
        time.sleep(0.05)
    assert proc.poll() is None, "generation finished before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert 6 <= len(read_jsonl(raw)) < 60
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "kept" in done.stderr and "SFT rows" in done.stderr
    ids = [r["id"] for r in read_jsonl(raw)]
    assert len(ids) == len(set(ids)) == 60
    stats = json.loads((out / "stats.json").read_text())
    assert stats["generated"] == 60 == stats["kept"] + sum(stats["rejected"].values())
    sft_ids = [r["id"] for r in read_jsonl(out / "sft.jsonl")]
    assert len(sft_ids) == len(set(sft_ids))
