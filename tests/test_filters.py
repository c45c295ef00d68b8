"""The text every stage shares: the answer filters of `selfalign.text.filters` (stages 2 and 4
alike), the one ShareGPT role table, the one `user_text`, the one id check; and stage 4 keeping
the same answers through `selfalign run` and through `selfalign verbose-clone`."""

from __future__ import annotations

import json
import shutil

import pytest
import yaml
from cli_run import run_cli

from selfalign.errors import UserError
from selfalign.generation.records import check_records
from selfalign.generation.scripted import ScriptedBackend
from selfalign.jsonl import check_unique_ids, read_jsonl, write_jsonl_atomic
from selfalign.run.export import to_messages, to_sharegpt
from selfalign.stages.stage2_self_align import (
    SelfAlignConfig,
    answer_rules,
    filter_completions,
    judge,
    load_identity_conversations,
    load_identity_questions,
    load_instructions,
    turn_headers,
)
from selfalign.stages.stage3_engrave import load_sft_rows
from selfalign.stages.stage4_verbose import (
    AnswerFilters,
    VerboseConfig,
    filter_answers,
)
from selfalign.text.constitution import (
    PROVENANCE_REWRITE,
    Identity,
    dump_constitution,
    load_constitution,
    render_prompt,
    user_text,
)
from selfalign.text.conversation import (
    ASSISTANT_HEADER,
    TEMPLATE_LABELS,
    install_chat_template,
    sft_messages,
    sharegpt_messages,
)
from selfalign.text.filters import (
    AnswerRules,
    ExemplarLeakage,
    Rewrites,
    answer_rejection,
    cut_at_turn_header,
    cut_repetition,
    cut_tail_sections,
    cut_turn,
    find_repetition,
    is_complete,
    normalise,
    tidy_answer,
    turn_header_pattern,
    words,
)

GOOD = (
    "There are several sides to this. First, the history: the idea appeared long ago and changed "
    "over time. Second, the practical view: most people meet it in daily life. Third, a caveat: "
    "details differ between countries, so check local sources."
)
# a distinctive passage of the bundled constitution's Rosetta Stone exemplar
ROSETTA = (
    "French soldiers found it in 1799 near the town of Rashid (Rosetta) in the Nile delta, and it "
    "has been in the British Museum since 1802."
)
ON_TOPIC = "Tell me the story of the Rosetta Stone."
OFF_TOPIC = "Explain how glaciers form."
IDENTITY = Identity(name="Quokka", developer="the Lab", knowledge_cutoff="2024-01")
TURN_HEADERS = turn_header_pattern(TEMPLATE_LABELS)  # the chat template's headers


@pytest.fixture(scope="module")
def default():
    return load_constitution("default")


# -- words, turn headers, repetition, apology, the shared rejections -------------------------------


def test_one_word_rule_and_normal_form():
    assert words("It's 2023: C++ & Rust_lang!") == ["it", "s", "2023", "c", "rust_lang"]
    assert normalise("  What is\n RAIN?? ") == normalise("what is rain") == "what is rain"


def test_an_answer_going_on_with_a_made_up_turn_is_cut_at_its_header(default):
    stage2 = turn_headers(default)
    text = "Lisbon is old.\n\nUser: And Porto?\n\nOrion: Also old."
    assert cut_at_turn_header(text, stage2) == ("Lisbon is old.", True)
    # the longest label wins, so an auto reply is not read as an answer followed by text
    assert stage2.search("x\nOrion (auto reply): hi").group(1) == "Orion (auto reply):"
    plain = "User accounts need care.\nOrion is a constellation."  # no label with its colon
    assert cut_at_turn_header(plain, stage2) == (plain, False)
    assert cut_at_turn_header("Fine.\n  ### Assistant\nmore", TURN_HEADERS) == ("Fine.", True)
    heading = "Rules:\n### Username\nPick a long one."  # a markdown heading, not a turn
    assert cut_at_turn_header(heading, TURN_HEADERS) == (heading, False)
    section = "### User accounts\nOne per person."  # a heading that starts like a label
    assert cut_at_turn_header(section, TURN_HEADERS) == (section, False)
    code = "Example:\n```\n### User\nhi\n```\nDone."  # a label inside closed code is code
    assert cut_at_turn_header(code + "\n### User\nx", TURN_HEADERS) == (code, True)


def test_every_known_format_of_turn_header_is_a_header(default):
    """The constitution's labels under the prompt's and the released name, and the chat
    template's; a verbose prompt's own labels are read from it (stage 4, test_verbose)."""
    headers = turn_headers(default)
    for header in ("User:", "Orion:", "Orion (internal thoughts):", "Orion (auto reply):",
                   "Dromedary:", "Dromedary (internal thoughts):", "### User", "### Assistant"):  # fmt: skip
        after = " more" if header.endswith(":") else "\nmore"  # a markdown label is a line
        assert cut_at_turn_header(f"Done.\n{header}{after}", headers) == ("Done.", True), header
    assert default.speaker_labels()[:4] == [
        "User:", "Orion (internal thoughts):", "Orion:", "Orion (auto reply):"
    ]  # fmt: skip


@pytest.mark.parametrize(
    ("before", "complete"),
    [("Lisbon is old.", True), ("Is it old?", True), ("He said \"yes.\"", True),
     ("1. Lisbon\n2. Porto", True), ("| a | b |", True), ("Good luck 🍀", True),
     ("```\ncode\n```", True), ("Lisbon is", False), ("Cities:", False), ("1. Lisbon\n2.", False),
     ("Run:\n```\ncode", False), ("", False)],
)  # fmt: skip
def test_a_cut_at_a_header_keeps_only_complete_answers(default, before, complete):
    answer, cut, rejection = cut_turn(before + "\n### User\nmore", turn_headers(default))
    assert cut and answer == before.strip()
    assert rejection == (None if complete else ("turn_header", ""))
    assert is_complete(before) is complete


def test_tail_sections_are_cut_only_at_the_end():
    body = "The tower is tall.\n\n## History\nBuilt in 1889."
    for tail in ("## See also\n- Louvre", "**External links**\n- site", "== References ==\n1. x",
                 "Further reading:\n- a book", "## Notes\nx\n\n## Sources\ny"):  # fmt: skip
        assert cut_tail_sections(f"{body}\n\n{tail}") == (body, True), tail
    inside = "## References\nCite them.\n\n## Style\nBe consistent."  # another section follows
    assert cut_tail_sections(inside) == (inside, False)
    coded = body + "\n\n```\n## See also\n```"  # a heading inside code is code
    assert cut_tail_sections(coded) == (coded, False)
    rules = AnswerRules.from_constitution(load_constitution("default"))
    assert tidy_answer("## See also\n- Louvre", rules).rejection == ("tail_section", "")
    dropping = AnswerRules.from_constitution(load_constitution("default"), tails="drop")
    assert tidy_answer(f"{body}\n\n## See also\n- x", dropping).rejection.reason == "tail_section"


def test_rewrites_are_data_applied_and_counted(tmp_path, default):
    assert default.rewrites == PROVENANCE_REWRITE  # the paper's, in the bundled default
    text = "According to my knowledge from Wikipedia, here is a fact.\n\nAccording to my knowledge from Wikipedia, here are two."
    rewritten, counts = Rewrites(default.rewrites).apply(text)
    assert rewritten == "Here is a fact.\n\nHere are two."
    assert counts == {next(iter(PROVENANCE_REWRITE)): 2}
    data = yaml.safe_load(dump_constitution(default))
    data["rewrites"] = {r"\bcolour\b": "color", "^Sure! ": ""}
    path = tmp_path / "mine.yaml"
    path.write_text(yaml.safe_dump(data))
    mine = load_constitution(path)
    assert Rewrites(mine.rewrites).apply("Sure! The colour red.") == (
        "The color red.", {r"\bcolour\b": 1, "^Sure! ": 1}
    )  # fmt: skip
    data["rewrites"] = {"(unclosed": "x"}
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(UserError, match=r"mine.yaml: rewrites: '\(unclosed' -> 'x' is not a valid"):
        load_constitution(path)


def test_stage_2_counts_its_rewrites_in_stats(default):
    completion = (
        " I am a helpful, honest and careful assistant. The user asks. I should follow principles "
        "8 (knowledge recitation).\n\nOrion: According to my knowledge from Wikipedia, here is "
        "what I know: llamas are camelids."
    )
    row = {"id": 1, "instruction": "Tell me about llamas.", "completion": completion}
    kept, rejected, counts = filter_completions(default, SelfAlignConfig(), [row])
    assert kept[0]["output"] == "Here is what I know: llamas are camelids."
    assert counts["rewrites"] == {next(iter(PROVENANCE_REWRITE)): 1}


def test_a_canned_exemplar_reply_is_leakage_unless_on_its_topic(default):
    leak = ExemplarLeakage.from_constitution(default)
    canned = (
        "I need a few details to estimate that: where are you starting from, where are you going, "
        "and will you walk, cycle, drive or take public transport?"
    )
    assert leak.find(canned, "Explain how vaccines work.") is not None
    assert leak.find(canned, "How long will it take me to get there?") is None
    thanks = "You are welcome! Ask me anything else whenever you like."  # nothing distinctive
    assert leak.find(thanks, "Name three colours.") == "ask me anything else whenever you like"
    assert leak.find(GOOD + " " + thanks, "Name three colours.") is None  # not its main content


def test_internal_thoughts_and_short_answers_are_rejected(default):
    rules = AnswerRules.from_constitution(default, min_words=3, min_chars=40)
    thoughts = "I am a helpful, honest and careful assistant. " + GOOD
    assert answer_rejection(thoughts, OFF_TOPIC, rules).reason == "internal_thoughts"
    cited = GOOD + " I should follow principles 3 (helpful)."
    assert answer_rejection(cited, OFF_TOPIC, rules).reason == "internal_thoughts"
    rules_of_chess = GOOD + " The rules 3 and 4 of chess matter."
    assert answer_rejection(rules_of_chess, OFF_TOPIC, rules) is None
    assert answer_rejection("Ice moves very slowly.", OFF_TOPIC, rules) == (
        "too_short", "fewer than 40 characters"
    )  # fmt: skip


def test_repetition_is_one_family_cut_by_stage_2_and_counted_by_stage_4():
    loop = "Cats are curious animals indeed. " * 3
    assert cut_repetition(loop) == ("Cats are curious animals indeed.", True)
    assert loop[: find_repetition(loop)].strip() == "Cats are curious animals indeed."
    tandem = "The answer is good and the cats are happy the cats are happy the cats are happy"
    assert cut_repetition(tandem) == ("The answer is good and the cats are happy", True)
    # a phrase used too often, neither a whole clause nor in a row: only the n-gram count sees it
    spread = (
        "I like the red house on the hill, you like the red house on the hill, "
        "so we like the red house on the hill too."
    )
    assert find_repetition(spread) is None
    at = find_repetition(spread, ngram=6, max_repeats=2)
    assert at is not None and spread[at:] == "like the red house on the hill too."
    code = "Run:\n```python\nprint(x)\nprint(x)\nprint(x)\nprint(x)\n```\nDone."
    assert find_repetition(code, 2, ngram=2, max_repeats=1) is None  # code repeats lines
    assert find_repetition("In binary: 0 1 0 1 0 1 0 1 is a pattern.") is None


def test_shared_rejections_in_order(default):
    rules = AnswerRules.from_constitution(default, min_words=3)
    assert answer_rejection("Sorry, " + ROSETTA, OFF_TOPIC, rules) == ("apology", "")
    assert answer_rejection("Sorrento is a town in Italy.", OFF_TOPIC, rules) is None
    four = AnswerRules.from_constitution(default, min_words=4)
    assert answer_rejection("Yes, it is.", OFF_TOPIC, four).reason == "too_short"
    none = AnswerRules.from_constitution(default, min_words=0)
    assert answer_rejection("  ", OFF_TOPIC, none).reason == "too_short"  # one word at least
    leaked = answer_rejection(ROSETTA, OFF_TOPIC, rules)
    assert leaked.reason == "exemplar_leakage" and "1799" in leaked.detail
    assert answer_rejection(ROSETTA, ON_TOPIC, rules) is None


@pytest.mark.parametrize(
    ("answer", "question", "reason"),
    [
        ("Sorry, " + GOOD, OFF_TOPIC, "apology"),
        ("Ice moves.", OFF_TOPIC, "too_short"),
        (GOOD + " " + ROSETTA, OFF_TOPIC, "exemplar_leakage"),
        (GOOD + " " + ROSETTA, ON_TOPIC, None),
        (GOOD, OFF_TOPIC, None),
    ],
)
def test_stage_2_and_stage_4_reject_the_same_answers_alike(default, answer, question, reason):
    s2 = SelfAlignConfig(min_words=5)
    completion = (
        " I am a helpful, honest and careful assistant. The user asks a question. "
        f"I should follow principles 3 (helpful).\n\nOrion: {answer}"
    )
    verdict = judge(default, s2, answer_rules(default, s2), completion, "stop", question)
    assert verdict.reason == reason
    row = {"id": "v", "source_id": "a", "source": "aligned", "instruction": question, "input": "",
           "completion": answer, "finish_reason": "stop"}  # fmt: skip
    kept, rejected, _ = filter_answers([row], AnswerFilters(VerboseConfig(min_words=5), default))
    assert [r["reason"] for r in rejected] == ([reason] if reason else [])


# -- one ShareGPT role table -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("speaker", "role"),
    [("human", "user"), ("user", "user"), ("Human", "user"), ("gpt", "assistant"),
     ("assistant", "assistant"), ("bot", "assistant"), ("chatgpt", "assistant"),
     ("model", "assistant"), ("GPT", "assistant"), ("system", "system")],
)  # fmt: skip
def test_every_sharegpt_speaker_maps_to_its_role(speaker, role):
    assert sharegpt_messages([{"from": speaker, "value": "x"}]) == [{"role": role, "content": "x"}]


def test_stage_2_and_stage_3_read_sharegpt_speakers_alike(tmp_path):
    path = tmp_path / "ids.jsonl"
    write_jsonl_atomic(path, [
        {"id": "a", "conversations": [{"from": "human", "value": "Who are you?"},
                                      {"from": "bot", "value": "Quokka."}]},
        {"id": "b", "conversations": [{"from": "user", "value": "Who made you?"},
                                      {"from": "chatgpt", "value": "The Lab."}]},
    ])  # fmt: skip
    rows = load_identity_conversations(path, IDENTITY)
    assert [(r["instruction"], r["output"]) for r in rows] == [
        ("Who are you?", "Quokka."), ("Who made you?", "The Lab.")
    ]  # fmt: skip
    assert len(load_sft_rows(path)) == 2


def test_an_unknown_speaker_is_one_line_naming_the_file_and_record(tmp_path):
    path = tmp_path / "ids.jsonl"
    write_jsonl_atomic(path, [
        {"id": "a", "conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello"}]},
        {"id": "b", "conversations": [{"from": "human", "value": "Hi"}, {"from": "narrator", "value": "x"}]},
    ])  # fmt: skip
    for read in (lambda: load_identity_conversations(path, IDENTITY), lambda: load_sft_rows(path)):
        with pytest.raises(UserError) as e:
            read()
        message = str(e.value)
        assert message.startswith(f"{path}: record 2: conversations[1] is from 'narrator'; use ")
        assert "\n" not in message and "bot" in message


# -- one user turn, one id check -------------------------------------------------------------------


def test_every_stage_builds_the_user_turn_the_same_way(default):
    row = {"id": 1, "instruction": " Sum these. ", "input": " 1 2 ", "output": "3"}
    text = user_text(row["instruction"], row["input"])
    assert text == "Sum these.\n\n1 2" and user_text("Q", "") == "Q"
    assert render_prompt(default, row["instruction"], row["input"]).endswith(
        f"User: {text}\n\nOrion (internal thoughts):"
    )  # stage 2's prompt
    messages = sft_messages(row, IDENTITY, ["standard"], 0)
    assert messages[1]["content"] == text  # stages 3 and 4
    assert to_messages(row, messages)["messages"][1]["content"] == text  # export, after system
    assert to_sharegpt(row, messages)["conversations"][1]["value"] == text


def test_one_unique_id_check_for_every_reader(tmp_path):
    with pytest.raises(UserError) as e:
        check_unique_ids([{"id": "a"}, {"id": "b"}, {"id": "a"}], "f.jsonl", "rename one")
    assert str(e.value) == "f.jsonl: record 3: duplicate id 'a' (record 1 has it too); rename one"
    with pytest.raises(UserError, match=r"^f.jsonl: record 2 has no 'id'$"):
        check_unique_ids([{"id": 1}, {"x": 2}], "f.jsonl")
    check_unique_ids([{"id": 1}, {"id": "1"}], "f.jsonl")  # 1 and "1" are two ids
    path = tmp_path / "dup.jsonl"
    write_jsonl_atomic(path, [{"id": "x", "instruction": "q", "output": "a", "prompt": "p"}] * 2)
    for read in (load_instructions, load_sft_rows, lambda p: check_records(read_jsonl(p), p)):
        with pytest.raises(UserError, match=r"dup.jsonl: record 2: duplicate id 'x' \(record 1"):
            read(path)
    questions = tmp_path / "questions.yaml"
    one = {"id": "who", "question": "Who are you?", "answers": ["{name}."]}
    questions.write_text(yaml.safe_dump({"questions": [one, one]}))
    with pytest.raises(UserError, match=r"questions.yaml: questions: record 2: duplicate id 'who'"):
        load_identity_questions(str(questions))


# -- stage 4 through `selfalign run` and through `selfalign verbose-clone` -------------------------

QUESTIONS = {
    "Explain how tides work.": GOOD,
    ON_TOPIC: GOOD + " " + ROSETTA,  # leaks an exemplar, but on that exemplar's topic: kept
    OFF_TOPIC: GOOD + " " + ROSETTA,  # the same passage in another topic: exemplar_leakage
    "Why is the sky blue?": "Sorry, " + GOOD,
    "What is rain?": "Rain falls from clouds.",
    "How do bees talk?": GOOD + "\n  ### User\nAnd ants?",  # cut at the made-up turn
    "Describe a loop.": "It goes round and round. " * 10,
}
EXPECTED = {
    "kept": {"verbose-q0": GOOD, "verbose-q1": GOOD + " " + ROSETTA, "verbose-q5": GOOD},
    "rejected": {"verbose-q2": "exemplar_leakage", "verbose-q3": "apology",
                 "verbose-q4": "too_short", "verbose-q6": "repetition"},
}  # fmt: skip


def respond(prompt: str, seed: int) -> str:
    return QUESTIONS[prompt.rsplit("### User\n", 1)[1].split(ASSISTANT_HEADER)[0]]


PROMPTS: list[str] = []  # every prompt either way sent, in order
SERVED: dict[str, object] = {}  # the tokenizer the scripted backend says it serves with


def scripted_backend(cfg) -> ScriptedBackend:
    """Same completions for whichever model is asked, served with the BASE model's tokenizer
    (no chat template, like a server given model.tokenizer): both ways must still write the
    prompts with the engraved model's chat template, read from its directory."""
    backend = ScriptedBackend(respond, batch_size=3)
    backend.tokenizer = SERVED["tokenizer"]
    backend.calls = PROMPTS
    return backend


def make_engraved(folder, tiny_model_dir):
    """A stage-3 model directory: the tiny model, our chat template, and the train_stats.json
    that records the base model, the released identity and the constitution (bundled default)."""
    from selfalign.modeling import load_tokenizer

    shutil.copytree(tiny_model_dir, folder)
    tokenizer = load_tokenizer(str(folder))
    install_chat_template(tokenizer, IDENTITY)
    tokenizer.save_pretrained(folder)
    stats = {"base_model": str(tiny_model_dir), "identity": IDENTITY.model_dump(),
             "constitution": "default"}  # fmt: skip
    (folder / "train_stats.json").write_text(json.dumps(stats))


def write_aligned(path) -> None:
    write_jsonl_atomic(path, [
        {"id": f"q{i}", "instruction": q, "input": "", "output": "Short.", "source": "self_instruct"}
        for i, q in enumerate(QUESTIONS)
    ])  # fmt: skip


def stage4_through_the_pipeline(tmp_path, tiny_model_dir) -> tuple[list, list]:
    from selfalign.config import validate
    from selfalign.run.pipeline import Pipeline
    from selfalign.run.registry import STAGE
    from selfalign.run.settings import PipelineConfig, shared_defaults

    data = {
        "run_dir": str(tmp_path / "run"),
        "model": {"model": str(tiny_model_dir), "device": "cpu"},
        "self_align": {"identity": IDENTITY.model_dump()},
        "verbose": {"train": {"max_steps": 1, "effective_batch_size": 2, "device": "cpu",
                              "gradient_checkpointing": False}},
    }  # fmt: skip
    pipeline = Pipeline(validate(PipelineConfig, shared_defaults(data), "test config"))
    write_aligned(pipeline.dir("self_align") / "aligned.jsonl")
    make_engraved(pipeline.dir("engrave") / "model", tiny_model_dir)
    try:
        STAGE["verbose"].run(pipeline)  # what `selfalign run` calls for stage 4
    finally:
        pipeline.release()
    out = pipeline.dir("verbose")
    return read_jsonl(out / "verbose.jsonl"), read_jsonl(out / "rejected.jsonl")


def stage4_through_the_command(tmp_path, tiny_model_dir, monkeypatch, capsys):
    engraved, out = tmp_path / "engraved", tmp_path / "cli"
    make_engraved(engraved, tiny_model_dir)
    write_aligned(tmp_path / "aligned.jsonl")
    code, text = run_cli(
        monkeypatch, capsys, "verbose-clone", "--model", str(engraved), "--data",
        str(tmp_path / "aligned.jsonl"), "--output", str(out), "--generate-only", "--device", "cpu",
    )  # fmt: skip
    assert code == 0, text
    return read_jsonl(out / "verbose.jsonl"), read_jsonl(out / "rejected.jsonl")


def test_run_and_verbose_clone_keep_the_same_answers(tmp_path, tiny_model_dir, monkeypatch, capsys):
    from selfalign.modeling import load_tokenizer

    SERVED["tokenizer"] = load_tokenizer(str(tiny_model_dir))
    assert not SERVED["tokenizer"].chat_template
    monkeypatch.setattr("selfalign.run.pipeline.load_backend", scripted_backend)
    monkeypatch.setattr("selfalign.generation.load_backend", scripted_backend)
    PROMPTS.clear()
    kept_run, rejected_run = stage4_through_the_pipeline(tmp_path, tiny_model_dir)
    sent = len(PROMPTS)
    kept_cli, rejected_cli = stage4_through_the_command(
        tmp_path, tiny_model_dir, monkeypatch, capsys
    )
    assert sent == len(QUESTIONS) and PROMPTS[:sent] == PROMPTS[sent:]  # same verbose prompts
    assert kept_run == kept_cli
    assert rejected_run == rejected_cli
    assert {r["id"]: r["output"] for r in kept_run} == EXPECTED["kept"]
    assert {r["id"]: r["reason"] for r in rejected_run} == EXPECTED["rejected"]
