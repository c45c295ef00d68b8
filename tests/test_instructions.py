"""Stage 1 (TGRT self-instruct): bundled and original inputs, every parser and filter on canned
completions, and each step's shell (funnel counts, sharding, crash + rerun) on a scripted backend
and on the tiny local model."""

from __future__ import annotations

import json
import os
import random
import re
from collections import Counter
from pathlib import Path

import pytest

from selfalign.errors import UserError
from selfalign.generation import Completion, SamplingParams
from selfalign.generation.scripted import ScriptedBackend
from selfalign.jsonl import read_jsonl
from selfalign.stages.stage1_instructions import (
    DEFAULT_BLOCKLIST,
    MergeConfig,
    QuestionsConfig,
    SelfInstructConfig,
    Shard,
    Stage1Config,
    TopicsConfig,
    balanced_topics,
    blocklist_patterns,
    build_question_prompt,
    build_self_instruct_prompt,
    build_topic_prompt,
    check_instruction,
    check_topic,
    eos_bias,
    load_seed_questions,
    load_seed_tasks,
    parse_questions,
    parse_self_instruct,
    parse_shard,
    parse_topics,
    plan_question_groups,
    question_pairs,
    read_text_input,
    render_template,
    run_merge,
    run_questions,
    run_self_instruct,
    run_topics,
)
from selfalign.text.novelty import NoveltyPool

REFERENCE = Path(
    os.environ.get(
        "SELFALIGN_REFERENCE",
        Path(__file__).resolve().parents[2] / "shared" / "reference" / "dromedary-v1",
    )
)
needs_reference = pytest.mark.skipif(
    not (REFERENCE / "prompts").is_dir(), reason=f"no reference files at {REFERENCE}"
)
BLOCKLIST = blocklist_patterns(DEFAULT_BLOCKLIST)


# ----------------------------------------------------------------------------- bundled inputs


def test_bundled_seed_tasks_are_many_complete_and_mutually_novel():
    tasks = load_seed_tasks()
    assert len(tasks) >= 120
    assert all(t["instruction"].strip() and t["output"].strip() for t in tasks)
    assert 0.25 < sum(bool(t["input"]) for t in tasks) / len(tasks) < 0.75  # both kinds
    # diverse: no seed would be rejected by the novelty filter against the others
    pool = NoveltyPool(0.7)
    assert all(keep for keep, _ in pool.filter([t["instruction"] for t in tasks]))
    # and every seed passes the stage's own filters
    assert all(check_instruction(t["instruction"], t["input"], 3, 150, BLOCKLIST) is None
               for t in tasks)  # fmt: skip


def test_bundled_seed_tasks_cover_the_kinds_of_work():
    raw = [json.loads(line) for line in _bundled_lines("self_instruct_seed_tasks.jsonl")]
    text = " ".join(r["instruction"] + " " + r["instances"][0]["input"] for r in raw).lower()
    for marker in ("python", "sql", "poem", "classify", "rewrite", "summarize", "probability",
                   "solve", "why", "dinner", "chemical", "history", "translate"):  # fmt: skip
        assert marker in text, marker
    assert sum(r["is_classification"] for r in raw) >= 10
    assert len({r["id"] for r in raw}) == len({r["name"] for r in raw}) == len(raw)


def test_bundled_question_types_twenty_each_with_topic_and_question():
    seeds = load_seed_questions()
    types = [s["question_type"] for s in seeds]
    assert len(set(types)) == 20
    assert all(s["topic"] and s["question"].endswith("?") for s in seeds)
    assert all(check_topic(s["topic"]) is None for s in seeds)  # seeds obey the topic rules
    lowered = " ".join(types).lower()
    for kind in ("real-time", "not happened yet", "legal", "moral", "little-known person",
                 "asker's own circumstances", "recent news"):  # fmt: skip
        assert kind in lowered, kind


def _bundled_lines(name: str) -> list[str]:
    from importlib import resources

    text = resources.files("selfalign").joinpath("data", "stage1", name).read_text()
    return [line for line in text.splitlines() if line.strip()]


@needs_reference
def test_bundled_defaults_are_our_own_words():
    """Our seeds and prompts are not close paraphrases of the CC BY-NC originals."""
    prompts = REFERENCE / "prompts"
    ref_tasks = NoveltyPool(0.7, [t["instruction"] for t in load_seed_tasks(
        prompts / "self_instruct_seed_tasks.jsonl")])  # fmt: skip
    assert all(ref_tasks.best(t["instruction"]).score <= 0.7 for t in load_seed_tasks())
    ref_q = NoveltyPool(0.7, [q["question"] for q in load_seed_questions(
        prompts / "tgrt_self_instruct_seed_questions.jsonl")])  # fmt: skip
    assert all(ref_q.best(q["question"]).score < 0.5 for q in load_seed_questions())
    for ours, theirs in (
        ("self_instruct_prompt.txt", "self_instruct_prompt.txt"),
        ("topic_brainstorm_prompt.txt", "tgrt_self_instruct_topic_brainstorm_prompt.txt"),
        ("question_prompt.txt", "tgrt_self_instruct_question_generation_prompt.txt"),
    ):
        score = (
            NoveltyPool(1.0, [(prompts / theirs).read_text()])
            .best(read_text_input(None, ours))
            .score
        )
        assert score < 0.4, (ours, score)


def _check_self_instruct_prompt(meta: str, tasks: list[dict]) -> None:
    examples = random.Random(0).sample(tasks, 5)
    prompt = build_self_instruct_prompt(meta, examples)
    assert prompt.startswith(meta.rstrip())
    for n, task in enumerate(examples, start=1):
        first_words = " ".join(task["instruction"].split()[:4])
        assert f"{n}. Instruction: {first_words}" in prompt
        assert f"{n}. Input:\n{task['input'] or '<noinput>'}\n" in prompt
    assert prompt.endswith("###\n6. Instruction:")  # the model writes task 6 from here


def _check_topic_prompt(template: str, seeds: list[dict]) -> None:
    qtype = seeds[3]["question_type"]
    prompt = build_topic_prompt(template, qtype, ["Alpha", "Beta gamma"])
    assert qtype in prompt and "{}" not in prompt
    assert prompt.endswith("\n1. Alpha\n2. Beta gamma\n3.")


def _check_question_prompt(template: str, seeds: list[dict]) -> None:
    examples = seeds[:5]
    hints = [(seeds[7]["question_type"], "Harbour"), (seeds[8]["question_type"], "Lanterns")]
    prompt = build_question_prompt(template, examples, hints)
    assert "{}" not in prompt
    for n, e in enumerate(examples, start=1):
        label = e["question_type"].replace("Questions", "Instructions")
        assert f"{n}. type: {label}, topic: {e['topic']}, instruction: {e['question']}" in prompt
    label = hints[1][0].replace("Questions", "Instructions")
    assert f"\n7. type: {label}, topic: Lanterns\n" in prompt  # the second new hint is listed
    label = hints[0][0].replace("Questions", "Instructions")
    assert prompt.endswith(f"\n6. type: {label}, topic: Harbour, instruction:")


def test_bundled_prompts_render():
    seeds = load_seed_questions()
    _check_self_instruct_prompt(read_text_input(None, "self_instruct_prompt.txt"),
                                load_seed_tasks())  # fmt: skip
    _check_topic_prompt(read_text_input(None, "topic_brainstorm_prompt.txt"), seeds)
    _check_question_prompt(read_text_input(None, "question_prompt.txt"), seeds)


@needs_reference
def test_original_files_load_and_render():
    prompts = REFERENCE / "prompts"
    tasks = load_seed_tasks(prompts / "self_instruct_seed_tasks.jsonl")
    assert len(tasks) == 175 and all(t["instruction"] and t["output"] for t in tasks)
    seeds = load_seed_questions(prompts / "tgrt_self_instruct_seed_questions.jsonl")
    assert len(seeds) == 20 and len({s["question_type"] for s in seeds}) == 20
    _check_self_instruct_prompt(read_text_input(prompts / "self_instruct_prompt.txt", ""), tasks)
    _check_topic_prompt(
        read_text_input(prompts / "tgrt_self_instruct_topic_brainstorm_prompt.txt", ""), seeds
    )
    _check_question_prompt(
        read_text_input(prompts / "tgrt_self_instruct_question_generation_prompt.txt", ""), seeds
    )


@needs_reference
def test_original_files_drive_a_run(tmp_path):
    prompts = REFERENCE / "prompts"
    cfg = Stage1Config.model_validate({
        "self_instruct": {"seed_tasks": str(prompts / "self_instruct_seed_tasks.jsonl"),
                          "meta_prompt": str(prompts / "self_instruct_prompt.txt"),
                          "num_instructions": 3, "prompts_per_round": 2},
        "topics": {"seed_questions": str(prompts / "tgrt_self_instruct_seed_questions.jsonl"),
                   "prompt": str(prompts / "tgrt_self_instruct_topic_brainstorm_prompt.txt"),
                   "epochs": 1},
        "questions": {"prompt": str(prompts / "tgrt_self_instruct_question_generation_prompt.txt")},
    })  # fmt: skip
    # seed files named once are shared with the later steps
    assert cfg.questions.seed_questions == cfg.topics.seed_questions == cfg.merge.seed_questions
    assert cfg.merge.seed_tasks == cfg.self_instruct.seed_tasks
    backend = ScriptedBackend(canned_responder())
    run_self_instruct(cfg.self_instruct, backend, tmp_path)
    run_topics(cfg.topics, backend, tmp_path)
    run_questions(cfg.questions, backend, tmp_path)
    counts = run_merge(cfg.merge, tmp_path)
    assert counts["kept_per_source"]["self_instruct"] == 3 and counts["kept_per_source"]["tgrt"]


def test_seed_files_in_flat_format_and_bad_files(tmp_path):
    flat = tmp_path / "flat.jsonl"
    flat.write_text('{"instruction": "Name a planet.", "input": "", "output": "Mars"}\n')
    assert load_seed_tasks(flat) == [
        {"instruction": "Name a planet.", "input": "", "output": "Mars"}
    ]
    flat.write_text('{"instances": [{"input": "x", "output": "y"}]}\n')
    with pytest.raises(UserError, match="record 1 has no 'instruction'"):
        load_seed_tasks(flat)
    flat.write_text('{"question_type": "Questions about X", "topic": "Y"}\n')
    with pytest.raises(UserError, match="record 1 has no 'question'"):
        load_seed_questions(flat)
    with pytest.raises(UserError, match="not found"):
        read_text_input(tmp_path / "missing.txt", "x")


def test_render_template_keeps_other_braces_and_counts_placeholders():
    assert render_template("a {} b {json: 1} {}", "X", "Y") == "a X b {json: 1} Y"
    with pytest.raises(UserError, match="expected 2 '{}' placeholder"):
        render_template("only {} one", "a", "b", source="my.txt")


# ----------------------------------------------------------------------------- self-instruct core

BLOCKS = (
    " Name three rivers that flow into the Mediterranean.\n6. Input:\n<noinput>\n###\n"
    "7. Instruction: Rewrite the sentence in the passive voice.\n7. Input:\n"
    "The committee approved the new budget.\n###\n"
    "8. Instruction: Summarize the following news story for a"
)


def test_parse_self_instruct_drops_a_block_cut_by_the_length_limit():
    out = parse_self_instruct(BLOCKS, num_examples=5, finish_reason="length")
    assert [(c.instruction, c.input, c.reason) for c in out] == [
        ("Name three rivers that flow into the Mediterranean.", "", None),
        ("Rewrite the sentence in the passive voice.", "The committee approved the new budget.",
         None),
        ("", "", "truncated"),
    ]  # fmt: skip
    assert "Summarize" in out[2].text


def test_parse_self_instruct_when_the_model_stopped():
    done = BLOCKS.rsplit("###", 1)[0] + "###\n"
    assert [c.reason for c in parse_self_instruct(done, 5, "stop")] == [None, None]
    # a last block that stops without its Input line is unparseable, not truncated
    assert [c.reason for c in parse_self_instruct(BLOCKS, 5, "stop")] == [None, None, "unparseable"]


def test_parse_self_instruct_rejects_misnumbered_and_malformed_blocks():
    text = (
        " Tell me a joke about cats.\n6. Input:\n<NOINPUT>\n###\n"
        "9. Instruction: Wrong number here please.\n9. Input:\n<noinput>\n###\n"
        "8. Instruction: No input line in this block at all.\n###\n"
    )
    out = parse_self_instruct(text, 5, "stop")
    assert [(c.index, c.reason) for c in out] == [(0, None), (1, "unparseable"), (2, "unparseable")]
    assert out[0].input == ""  # <noinput> in any case means no input
    assert parse_self_instruct("", 5, "length") == []


@pytest.mark.parametrize(
    "instruction, given, reason",
    [
        ("Write a haiku about rain.", "", None),
        ("Write a haiku", "", "too_short"),  # 3 words: the paper keeps 4 or more
        ("Explain " + "very " * 149 + "slowly.", "", "too_long"),
        ("Draw a cat sitting on a fence.", "", "blocklist"),
        ("Please GO TO the shop and buy milk.", "", "blocklist"),
        ("Describe what the text says.", "See the attached file for details.", "blocklist"),
        ("Plot the data as a line chart.", "", "blocklist"),
        # blocklisted words inside other words pass
        ("Describe the profile of a typical user.", "", None),
        ("Explain how mapping software works offline.", "", None),
        ("Why is graphite a good lubricant?", "", None),
        ("Describe a cargo tomatoes shipment route.", "", None),
        ("Summarize the paragraph below briefly.", "The filed report mentions a plotter.", None),
        ('"Quote" this sentence back to me.', "", "punctuation"),
        ("- List four kinds of clouds.", "", "punctuation"),
        ("Écrivez un poème sur la mer.", "", "non_english"),
        ("¿Cómo se dice hello en francés?", "", "non_english"),
    ],
)
def test_check_instruction(instruction, given, reason):
    assert check_instruction(instruction, given, 4, 150, BLOCKLIST) == reason


def test_custom_blocklist_phrases_match_whole_words_in_any_case():
    patterns = blocklist_patterns(["c++", "set a reminder"])
    assert check_instruction("Write a C++ class for a queue.", "", 4, 150, patterns) == "blocklist"
    assert check_instruction("Please Set A Reminder for noon.", "", 4, 150, patterns)
    assert check_instruction("Please set reminders for noon.", "", 4, 150, patterns) is None


# ----------------------------------------------------------------------------- topics core


@pytest.mark.parametrize(
    "topic, reason",
    [
        ("Solar eclipses", None),
        ("Deep sea fishing", None),
        ("Deep sea fishing boats", "too_long"),
        ("solar eclipses", "not_capitalized"),
        ("1990s music", "not_capitalized"),
        ("Éclairs", "not_capitalized"),
        ("Solar eclipses.", "punctuation"),
        ("Volcanoes?", "punctuation"),
        ("", "empty"),
    ],
)
def test_check_topic_rules(topic, reason):
    assert check_topic(topic) == reason


def test_parse_topics_reads_numbered_lines_and_drops_a_truncated_last_line():
    completion = (
        " Solar wind\n7. ocean tides\n8. Deep sea fishing boats\n9. Comets!\n"
        "a line with no number\n\n10. Black holes\n11. Meteor sh"
    )
    out = parse_topics(completion, num_shown=6, finish_reason="length")
    assert out == [
        ("Solar wind", None),
        ("ocean tides", "not_capitalized"),
        ("Deep sea fishing boats", "too_long"),
        ("Comets!", "punctuation"),
        ("a line with no number", "unparseable"),
        ("Black holes", None),
        ("11. Meteor sh", "truncated"),
    ]
    # a completion that stopped keeps its last line; the cap marks lines beyond it
    out = parse_topics(" Nebulae\n8. Quasars\n9. Pulsars", 6, "stop", max_topics=2)
    assert out == [("Nebulae", None), ("Quasars", None), ("9. Pulsars", "over_limit")]


def test_balanced_topics_sample_new_topics_too_and_are_seeded():
    pool = {"A": [f"A{i}" for i in range(10)], "B": ["B0", "B1", "B2"]}
    first = balanced_topics(pool, seed=1, key="e0")
    assert len(first["A"]) == len(first["B"]) == 3 and first == balanced_topics(pool, 1, "e0")
    assert first["B"] == ["B0", "B1", "B2"]
    picked = {t for k in range(30) for t in balanced_topics(pool, 1, f"e{k}")["A"]}
    assert picked == set(pool["A"])  # the original always took A0..A2 (the oldest)
    assert len(balanced_topics(pool, 1, "e0", cap=2)["A"]) == 2


# ----------------------------------------------------------------------------- questions core

EXAMPLES = [
    {"question_type": "Questions about recent news", "topic": "Elections",
     "question": "Who won yesterday's election in Chile?"},
    {"question_type": "Questions that need legal expertise", "topic": "Leases",
     "question": "Can my landlord enter my flat without notice?"},
]  # fmt: skip
HINTS = [
    ("Questions that need real-time information", "Ferries"),
    ("Questions about events that have not happened yet", "Olympics"),
    ("Questions that need legal expertise", "Drones"),
]


def test_parse_questions_keeps_only_answers_to_new_hints():
    completion = (
        " Is the ferry to Helsinki running on time right now?\n"
        "4. type: Instructions about events that have not happened yet, topic: Olympics, "
        "instruction: Which city will host the 2044 Olympics?\n"
        # the model echoes a few-shot hint (with a new question): never kept
        "1. type: Instructions about recent news, topic: Elections, instruction: Who leads now?\n"
        "2. type: Instructions that need legal expertise, topic: Leases, "
        "instruction: Can my landlord enter my flat without notice?\n"
        "4. type: Instructions about events that have not happened yet, topic: Olympics, "
        "instruction: A second answer to the same hint?\n"
        "9. type: Instructions about nothing, topic: Mars, instruction: Off-plan hint here?\n"
        "just chatter\n"
        "5. type: Instructions that need legal expertise, topic: Drones, instruction: Can I fly"
    )
    out = parse_questions(completion, EXAMPLES, HINTS, "length")
    kept = [(q.hint, q.instruction) for q in out if q.hint is not None and q.reason is None]
    assert kept == [
        (0, "Is the ferry to Helsinki running on time right now?"),
        (1, "Which city will host the 2044 Olympics?"),
    ]
    assert [q.reason for q in out if q.reason] == [
        "echoed_example", "echoed_example", "duplicate", "hint_mismatch", "unparseable",
        "truncated",
    ]  # fmt: skip


def test_parse_questions_rejects_a_seed_question_under_a_new_hint_and_bad_text():
    completion = (
        " Who won yesterday's election in Chile?\n"
        "4. type: instructions about events that have NOT happened yet, topic: olympics, "
        "instruction: Olympics?\n"
        "5. type: Instructions that need legal expertise, topic: Drones, instruction: \n"
    )
    out = parse_questions(completion, EXAMPLES, HINTS, "stop")
    assert [(q.hint, q.reason) for q in out] == [
        (0, "echoed_example"), (1, "too_short"), (2, "empty")
    ]  # fmt: skip
    out = parse_questions(" ¿Qué hora es en Lima?\n", EXAMPLES, HINTS, "stop")
    assert out[0].reason == "non_english"


def test_question_pairs_dedupe_balance_and_order_are_seeded():
    topics = [{"question_type": "A", "topic": t} for t in ("Cats", "cats", "Dogs", "Owls")]
    topics += [{"question_type": "B", "topic": t} for t in ("Cats", "Rain")]
    cfg = QuestionsConfig(seed=3)
    pairs = question_pairs(topics, cfg)
    assert len(pairs) == 4 and sorted(p for t, p in pairs if t == "B") == ["Cats", "Rain"]
    assert pairs == question_pairs(topics, cfg)
    unbalanced = question_pairs(topics, QuestionsConfig(balance_types=False))
    assert len(unbalanced) == 5  # "cats" is a duplicate of "Cats" within type A
    topics[2]["epoch"] = topics[3]["epoch"] = 4  # Dogs, Owls: from a later epoch
    early = question_pairs(topics, QuestionsConfig(balance_types=False, max_topic_epoch=3))
    assert sorted(early) == [("A", "Cats"), ("B", "Cats"), ("B", "Rain")]


def test_plan_question_groups_resumes_by_type_and_topic():
    pairs = [("A", f"T{i}") for i in range(7)]
    groups = plan_question_groups(pairs, 3, {})
    assert [len(g) for g in groups] == [3, 3, 1]
    # an earlier run (other topics file) asked T1 and T5 in a group no longer planned
    attempted = {"q-old": [("A", "t1"), ("A", "T5")]}
    regrouped = plan_question_groups(pairs, 3, attempted)
    asked = [h for g in regrouped for h in g]
    assert sorted(asked) == sorted(set(pairs) - {("A", "T1"), ("A", "T5")})
    assert groups[2] in regrouped  # untouched groups keep their ids


def test_parse_shard():
    assert parse_shard(None) == Shard(0, 1) and parse_shard("1/4") == Shard(1, 4)
    assert parse_shard(" 0 / 2 ").tag == ".shard0of2" and parse_shard("0/1").tag == ""
    for bad in ("4/4", "1", "a/b", "-1/2", "0/0"):
        with pytest.raises(UserError, match="--shard"):
            parse_shard(bad)
    assert [Shard(i, 3).share(10) for i in range(3)] == [4, 3, 3]


# ----------------------------------------------------------------------------- shells, scripted

WORDS = ("river mountain poem recipe budget planet garden engine museum galaxy bicycle sonnet "
         "violin harbor desert glacier lantern orchard compass").split()  # fmt: skip


def canned_responder(echo_seeds: bool = True):
    """Plausible completions for each of the three prompt kinds, varied by the row seed."""

    def respond(prompt: str, seed: int) -> str:
        rng = random.Random(seed)
        if prompt.endswith("Instruction:"):  # self-instruct
            n = int(re.search(r"(\d+)\. Instruction:$", prompt)[1])
            blocks = []
            for k in range(3):
                words = " ".join(rng.sample(WORDS, rng.randint(3, 8)))
                head = "" if k == 0 else f"{n + k}. Instruction:"
                blocks.append(f"{head} Describe the {words}.\n{n + k}. Input:\n<noinput>\n")
            text = "###\n".join(blocks) + f"###\n{n + 3}. Instruction: Cut short by the"
            return Completion(text, "length", 100, 60)  # EOS suppressed: the limit ends it
        if prompt.endswith("instruction:"):  # questions: answer every new hint, echo a seed
            lines = re.findall(r"^(\d+)\. type: (.*), topic: (.*)$", prompt, re.M)
            lines = [h for h in lines if "instruction:" not in h[2]]  # the hints list
            shown = len(re.findall(r"^\d+\. type: .*, instruction: ", prompt, re.M))
            out = [f" What is the latest news about {lines[shown][2]} today?"]
            for n, t, p in lines[shown + 1 :]:
                out.append(f"{n}. type: {t}, topic: {p}, instruction: Where can I learn "
                           f"about {p} {rng.choice(WORDS)} this week?")  # fmt: skip
            if echo_seeds:
                n, t, p = lines[0]
                out.append(f"{n}. type: {t}, topic: {p}, instruction: An echoed example?")
            return "\n".join(out) + "\n"
        n = int(re.search(r"(\d+)\.$", prompt)[1])  # topics
        topics = [w.capitalize() + " " + rng.choice(WORDS) for w in rng.sample(WORDS, 4)]
        topics += ["lowercase topic", "Way too many words here"]
        return " " + "\n".join(f"{n + i}. {t}" if i else t for i, t in enumerate(topics)) + "\n"

    return respond


class Crash(Exception):
    pass


class CrashingBackend(ScriptedBackend):
    """Dies (like a kill -9 would) after `after` batches have been handed out."""

    def __init__(self, inner, after: int):
        super().__init__(lambda p, s: "", batch_size=getattr(inner, "batch_size", 4))
        self.inner, self.after, self.tokenizer = inner, after, inner.tokenizer

    def iter_batches(self, prompts, params, seeds=None):
        for batch in self.inner.iter_batches(prompts, params, seeds):
            if self.after == 0:
                raise Crash
            self.after -= 1
            yield batch


def _files(out: Path) -> dict[str, list[dict]]:
    return {p.name: read_jsonl(p) for p in sorted(out.glob("*.jsonl"))}


def _funnel_closes(counts: dict) -> None:
    assert counts["generated"] == counts.get("new_topics", counts["kept"]) + sum(
        counts["rejected"].values()
    ), counts


def test_self_instruct_funnel_fields_and_novelty(tmp_path):
    cfg = SelfInstructConfig(num_instructions=20, prompts_per_round=4)
    backend = ScriptedBackend(canned_responder())
    counts = run_self_instruct(cfg, backend, tmp_path)
    _funnel_closes(counts)
    assert counts["kept"] == 20 and counts["shortfall"] == 0 and counts["rejected"]["truncated"]
    kept = read_jsonl(tmp_path / "self_instruct.jsonl")
    assert len({r["id"] for r in kept}) == 20
    pool = NoveltyPool(0.7, [t["instruction"] for t in load_seed_tasks()])
    for r in kept:  # each kept record is novel w.r.t. seeds and the ones kept before it
        assert r["source"] == "self_instruct" and r["input"] == ""
        assert pool.best(r["instruction"]).score == r["max_similarity"] <= 0.7
        pool.add([r["instruction"]])
    rejected = read_jsonl(tmp_path / "self_instruct.rejected.jsonl")
    assert all(r["reason"] and r["id"] and r["step"] == "self_instruct" for r in rejected)
    similar = [r for r in rejected if r["reason"] == "similar"]
    assert similar and all(r["max_similarity"] > 0.7 and r["most_similar"] for r in similar)
    # EOS cannot be suppressed on a backend without a tokenizer; prompts show 5 seeds
    assert backend.calls[0].count(". Instruction:") == 6


def test_self_instruct_stops_after_max_rounds_with_a_shortfall(tmp_path):
    backend = ScriptedBackend(lambda p, s: " Hi.\n6. Input:\n<noinput>\n###\n")
    counts = run_self_instruct(SelfInstructConfig(num_instructions=5, prompts_per_round=2,
                                                  max_rounds=3), backend, tmp_path)  # fmt: skip
    assert counts["rounds"] == 3 and counts["kept"] == 0 and counts["shortfall"] == 5
    assert counts["rejected"] == {"too_short": 6} and len(backend.calls) == 6


def test_self_instruct_refuses_raw_file_from_other_prompts(tmp_path):
    cfg = SelfInstructConfig(num_instructions=2, prompts_per_round=2)
    run_self_instruct(cfg, ScriptedBackend(canned_responder()), tmp_path)
    other = tmp_path / "meta.txt"
    other.write_text("A different meta prompt.")
    cfg = cfg.model_copy(update={"meta_prompt": str(other)})
    before = (tmp_path / "self_instruct.raw.jsonl").read_text()
    backend = ScriptedBackend(canned_responder())
    with pytest.raises(UserError, match="different prompt"):
        run_self_instruct(cfg, backend, tmp_path)
    assert not backend.calls and (tmp_path / "self_instruct.raw.jsonl").read_text() == before


def test_eos_is_suppressed_with_the_backend_tokenizer():
    assert eos_bias(ScriptedBackend(lambda p, s: "")) == {}
    tokenizer = type("Tok", (), {"eos_token_id": 2})()
    assert eos_bias(ScriptedBackend(lambda p, s: "", tokenizer=tokenizer)) == {2: -100.0}


def test_topics_grow_per_type_dedupe_and_show_previous_topics(tmp_path):
    backend = ScriptedBackend(canned_responder())
    counts = run_topics(TopicsConfig(epochs=3, max_prompts_per_type=2), backend, tmp_path)
    _funnel_closes(counts)
    topics = read_jsonl(tmp_path / "topics.jsonl")
    assert counts["kept"] == len(topics) and counts["seed_topics"] == 20
    keys = [(t["question_type"], t["topic"].casefold()) for t in topics]
    assert len(keys) == len(set(keys))
    assert all(check_topic(t["topic"]) is None for t in topics)
    assert {t["epoch"] for t in topics} == {0, 1, 2, 3}
    assert counts["rejected"]["not_capitalized"] and counts["rejected"]["too_long"]
    # later epochs show topics brainstormed in earlier ones
    generated = {t["topic"] for t in topics if t["epoch"] == 1}
    later = [c for c in backend.calls if c in {r["prompt"] for r in _raw(tmp_path, "topics", 1)}]
    assert any(topic in prompt for prompt in later for topic in generated)


def _raw(out: Path, step: str, epoch: int | None = None) -> list[dict]:
    rows = read_jsonl(out / f"{step}.raw.jsonl")
    if epoch is not None:
        rows = [r for r in rows if r["id"].startswith(f"topic-e{epoch:02d}")]
    return rows


def test_questions_keep_type_and_topic_and_never_the_echoed_examples(tmp_path):
    run_topics(TopicsConfig(epochs=1, max_prompts_per_type=1), ScriptedBackend(canned_responder()),
               tmp_path)  # fmt: skip
    counts = run_questions(QuestionsConfig(), ScriptedBackend(canned_responder()), tmp_path)
    _funnel_closes(counts)
    kept = read_jsonl(tmp_path / "tgrt_questions.jsonl")
    assert counts["kept"] == len(kept) == counts["hints"] > 0
    assert counts["rejected"] == {"echoed_example": counts["prompts"]}
    seeds = {(s["question_type"], s["topic"]) for s in load_seed_questions()}
    topics = {(t["question_type"], t["topic"]) for t in read_jsonl(tmp_path / "topics.jsonl")}
    for q in kept:
        assert q["source"] == "tgrt" and (q["question_type"], q["topic"]) in topics
        assert q["topic"] in q["instruction"] and "echoed" not in q["instruction"]
    assert len({(q["question_type"], q["topic"]) for q in kept}) == len(kept)
    assert {(q["question_type"], q["topic"]) for q in kept} >= seeds  # every hint, seeds too


def test_questions_rerun_with_more_topics_asks_only_new_ones(tmp_path):
    run_topics(TopicsConfig(epochs=1, max_prompts_per_type=1), ScriptedBackend(canned_responder()),
               tmp_path)  # fmt: skip
    cfg = QuestionsConfig(balance_types=False)
    run_questions(cfg, ScriptedBackend(canned_responder()), tmp_path)
    first = {tuple(h) for r in _raw(tmp_path, "tgrt_questions") for h in r["hints"]}
    with (tmp_path / "topics.jsonl").open("a") as f:
        for n in range(7):
            f.write(json.dumps({"question_type": "Questions about recent news",
                                "topic": f"Harbour {n}"}) + "\n")  # fmt: skip
    counts = run_questions(cfg, ScriptedBackend(canned_responder()), tmp_path)
    hints = [tuple(h) for r in _raw(tmp_path, "tgrt_questions") for h in r["hints"]]
    assert len(hints) == len(set(hints)) == len(first) + 7  # each (type, topic) asked once
    assert counts["kept"] == len(hints)
    kept = read_jsonl(tmp_path / "tgrt_questions.jsonl")
    assert len({r["id"] for r in kept}) == len(kept)


def test_merge_novelty_across_shards_duplicates_and_rejections(tmp_path):
    def respond(prompt, seed):  # every instruction a near-duplicate of every other one
        return (f" Describe the long history of the old city number {seed} in great detail.\n"
                "6. Input:\n<noinput>\n###\n")  # fmt: skip

    cfg = SelfInstructConfig(num_instructions=2, prompts_per_round=2, max_rounds=2)
    for i in range(2):
        counts = run_self_instruct(cfg, ScriptedBackend(respond), tmp_path, shard=f"{i}/2")
        assert counts["rounds"] == 1 and counts["last_round"] == i and counts["shard"] == f"{i}/2"
    assert (tmp_path / "self_instruct.shard1of2.raw.jsonl").exists()
    counts = run_merge(MergeConfig(), tmp_path, cfg)
    # one ROUGE-L pool over both shards' rounds: round 1 (shard 1) is similar to round 0's
    assert counts["kept"] == 1 and counts["self_instruct"]["rejected"] == {"similar": 3}
    assert counts["self_instruct"]["shortfall"] == 1  # max_rounds spent, as one process reports
    merged = read_jsonl(tmp_path / "instructions.jsonl")
    assert set(merged[0]) >= {"id", "instruction", "input", "source", "question_type", "topic"}
    rejected = read_jsonl(tmp_path / "rejected.jsonl")
    assert {r["step"] for r in rejected} == {"self_instruct"}
    assert any(r["prompt_id"].startswith("si-r00001-") for r in rejected)
    assert (
        sum(r["reason"] == "similar" for r in rejected) == counts["rejected_all_steps"]["similar"]
    )
    # the merge's own novelty filter: an exact duplicate across sources goes, near ones by threshold
    text = merged[0]["instruction"]
    questions = [{"id": "q-1-0", "instruction": text, "source": "tgrt"},
                 {"id": "q-1-1", "instruction": text + " Now.", "source": "tgrt"}]  # fmt: skip
    (tmp_path / "tgrt_questions.jsonl").write_text("".join(json.dumps(q) + "\n" for q in questions))
    counts = run_merge(MergeConfig(), tmp_path, cfg)
    assert counts["kept"] == 1 and counts["rejected"] == {"duplicate": 1, "similar": 1}
    assert run_merge(MergeConfig(similarity_threshold=None), tmp_path, cfg)["kept"] == 2


def test_merge_needs_every_shard(tmp_path):
    cfg = SelfInstructConfig(num_instructions=2, prompts_per_round=2)
    run_self_instruct(cfg, ScriptedBackend(canned_responder()), tmp_path, shard="1/3")
    with pytest.raises(UserError, match="shard\\(s\\) 0/3, 2/3 have no output"):
        run_merge(MergeConfig(), tmp_path, cfg)
    counts = run_merge(MergeConfig(allow_missing_shards=True), tmp_path, cfg)
    assert counts["kept"] == 2 and counts["self_instruct"]["rounds"] == 1  # round 1 only
    assert {r["prompt_id"][:9] for r in read_jsonl(tmp_path / "self_instruct.jsonl")} == {
        "si-r00001"
    }
    with pytest.raises(UserError, match="nothing|no self_instruct"):
        run_merge(MergeConfig(), tmp_path / "empty")


def _si_outputs(out: Path) -> dict[str, list[dict]]:
    return {name: read_jsonl(out / name)
            for name in ("self_instruct.jsonl", "self_instruct.rejected.jsonl")}  # fmt: skip


@pytest.mark.parametrize("shards", [2, 3])
def test_sharded_self_instruct_equals_one_process(tmp_path, shards):
    cfg = SelfInstructConfig(num_instructions=40, prompts_per_round=2)
    single = run_self_instruct(cfg, ScriptedBackend(canned_responder()), tmp_path / "single")
    assert single["rounds"] >= 2 * shards  # the target takes several rounds of every shard
    out = tmp_path / "sharded"
    for i in range(shards):
        counts = run_self_instruct(cfg, ScriptedBackend(canned_responder()), out, f"{i}/{shards}")
        rounds = {
            r["round"] for r in read_jsonl(out / f"self_instruct.shard{i}of{shards}.raw.jsonl")
        }
        assert rounds == set(range(i, counts["last_round"] + 1, shards))
    assert not (out / "self_instruct.jsonl").exists()  # the shards only generate
    counts = run_merge(MergeConfig(), out, cfg)["self_instruct"]
    assert _si_outputs(out) == _si_outputs(tmp_path / "single")
    assert {k: single[k] for k in counts if k in single} == {k: counts[k] for k in single
                                                              if k in counts}  # fmt: skip
    assert counts["shortfall"] == 0 and counts["rejected"]["surplus"]


def test_self_instruct_shards_that_stopped_short_are_named_with_the_rounds_to_rerun(
    tmp_path, monkeypatch
):
    import selfalign.stages.stage1_instructions as stage1

    cfg = SelfInstructConfig(num_instructions=40, prompts_per_round=2)
    run_self_instruct(cfg, ScriptedBackend(canned_responder()), tmp_path / "single")
    out = tmp_path / "sharded"
    monkeypatch.setattr(stage1, "SHARD_MARGIN", 0.3)  # the shards guess far too few rounds
    for i in range(3):
        run_self_instruct(cfg, ScriptedBackend(canned_responder()), out, f"{i}/3")
    monkeypatch.undo()
    short = r"stopped short: .* round \d+ \(shard \d/3\) is not complete; rerun the self-instruct "
    with pytest.raises(UserError, match=short + r"shards with --rounds \d+ \(Slurm: ROUNDS=") as e:
        run_merge(MergeConfig(), out, cfg)
    assert len(str(e.value).splitlines()) == 1 and not (out / "instructions.jsonl").exists()
    rounds = int(re.search(r"--rounds (\d+)", str(e.value))[1])
    for i in range(3):  # a rerun with --rounds generates at least those: the merge now matches
        run_self_instruct(cfg, ScriptedBackend(canned_responder()), out, f"{i}/3", rounds=rounds)
    run_merge(MergeConfig(), out, cfg)
    assert _si_outputs(out) == _si_outputs(tmp_path / "single")


def test_sharded_questions_merge_as_one_process(tmp_path):
    """The merge takes TGRT questions in id order, so shard files, each in its own order, keep
    and reject (near-duplicates by ROUGE-L) the same questions as one process's file."""
    single, sharded = tmp_path / "single", tmp_path / "sharded"
    run_topics(TopicsConfig(epochs=1, max_prompts_per_type=1), ScriptedBackend(canned_responder()),
               single)  # fmt: skip
    sharded.mkdir()
    for name in ("topics.jsonl", "topics.rejected.jsonl"):
        (sharded / name).write_bytes((single / name).read_bytes())
    cfg = QuestionsConfig(hints_per_prompt=2)
    run_questions(cfg, ScriptedBackend(canned_responder()), single)
    for i in range(3):
        run_questions(cfg, ScriptedBackend(canned_responder()), sharded, shard=f"{i}/3")
    counts = run_merge(MergeConfig(), single)
    assert counts["rejected"].get("similar")  # the order decides which of them is kept
    assert run_merge(MergeConfig(), sharded) == counts
    for name in ("instructions.jsonl", "rejected.jsonl"):
        rows = [read_jsonl(out / name) for out in (single, sharded)]
        assert sorted(rows[0], key=lambda r: r["id"]) == sorted(rows[1], key=lambda r: r["id"])


def test_merge_refuses_shard_rounds_made_with_other_settings(tmp_path):
    cfg = SelfInstructConfig(num_instructions=4, prompts_per_round=2)
    for i in range(2):
        run_self_instruct(cfg, ScriptedBackend(canned_responder()), tmp_path, f"{i}/2")
    other = cfg.model_copy(update={"seed": 7})
    with pytest.raises(UserError, match="shard0of2.raw.jsonl: record 'si-r00000-p000' was "
                       "generated from a different prompt; merge with the settings"):  # fmt: skip
        run_merge(MergeConfig(), tmp_path, other)


def test_merge_is_a_seeded_shuffle_of_both_sources(tmp_path):
    backend = ScriptedBackend(canned_responder())
    run_self_instruct(SelfInstructConfig(num_instructions=10, prompts_per_round=4), backend,
                      tmp_path)  # fmt: skip
    run_topics(TopicsConfig(epochs=1, max_prompts_per_type=1), backend, tmp_path)
    run_questions(QuestionsConfig(), backend, tmp_path)
    counts = run_merge(MergeConfig(seed=1), tmp_path)
    _funnel_closes({**counts, "rejected": counts["rejected"]})
    first = (tmp_path / "instructions.jsonl").read_text()
    run_merge(MergeConfig(seed=1), tmp_path)
    assert (tmp_path / "instructions.jsonl").read_text() == first
    records = read_jsonl(tmp_path / "instructions.jsonl")
    assert {r["source"] for r in records} == {"self_instruct", "tgrt"}
    assert [r["source"] for r in records] != sorted(r["source"] for r in records)
    run_merge(MergeConfig(seed=2), tmp_path)
    again = read_jsonl(tmp_path / "instructions.jsonl")
    assert again != records and sorted(again, key=lambda r: r["id"]) == sorted(
        records, key=lambda r: r["id"]
    )


@pytest.mark.parametrize("step", ["self_instruct", "topics", "questions"])
def test_crash_midway_then_rerun_equals_an_uninterrupted_run(tmp_path, step):
    def run(out: Path, backend):
        if step == "self_instruct":
            return run_self_instruct(SelfInstructConfig(num_instructions=24, prompts_per_round=6),
                                     backend, out)  # fmt: skip
        if step == "topics":
            return run_topics(TopicsConfig(epochs=2, max_prompts_per_type=2), backend, out)
        if not (out / "topics.jsonl").exists():
            run_topics(TopicsConfig(epochs=1, max_prompts_per_type=1),
                       ScriptedBackend(canned_responder()), out)  # fmt: skip
        return run_questions(QuestionsConfig(hints_per_prompt=3), backend, out)

    ref = run(tmp_path / "ref", ScriptedBackend(canned_responder(), batch_size=3))
    out = tmp_path / "crashed"
    for after in (1, 2):  # crash twice, then finish
        with pytest.raises(Crash):
            run(out, CrashingBackend(ScriptedBackend(canned_responder(), batch_size=3), after))
    assert run(out, ScriptedBackend(canned_responder(), batch_size=3)) == ref
    assert _files(out) == _files(tmp_path / "ref")
    for rows in _files(out).values():
        ids = [r["id"] for r in rows]
        assert len(ids) == len(set(ids))


# ----------------------------------------------------------------------------- tiny model


def _tiny_stage1(out: Path, backend) -> dict[str, dict]:
    sampling = SamplingParams(temperature=1.0, top_p=0.98, max_tokens=12)
    return {
        "self_instruct": run_self_instruct(
            SelfInstructConfig(
                num_instructions=2, prompts_per_round=4, max_rounds=2, sampling=sampling
            ),
            backend,
            out,
        ),  # fmt: skip
        "topics": run_topics(
            TopicsConfig(epochs=2, max_prompts_per_type=1, sampling=sampling), backend, out
        ),  # fmt: skip
        # seed 21: one of the random model's questions passes the filters, so the merge has
        # a record to check
        "questions": run_questions(
            QuestionsConfig(max_topics_per_type=1, sampling=sampling, seed=21), backend, out
        ),  # fmt: skip
    }


def _reasons(rows) -> dict[str, int]:
    return dict(Counter(r["reason"] for r in rows))


def check_step_files(counts: dict, out: Path, name: str) -> list[dict]:
    """A generating step's counts against its files: prompts = raw records, kept = kept records,
    rejected = the rejected file's reasons, and the funnel closes; returns the kept records."""
    raw, kept = read_jsonl(out / f"{name}.raw.jsonl"), read_jsonl(out / f"{name}.jsonl")
    assert counts["prompts"] == len(raw) and counts["kept"] == len(kept), counts
    assert counts["rejected"] == _reasons(read_jsonl(out / f"{name}.rejected.jsonl")), counts
    _funnel_closes(counts)
    assert len({r["id"] for r in kept}) == len(kept), name
    return kept


def check_merge_files(counts: dict, out: Path) -> list[dict]:
    """The merge's counts against the files: every merged record is a step's kept record (same
    id, text and source), ids are unique, each step record is merged or rejected by the merge,
    rejected.jsonl holds every step's rejections; returns the merged records."""
    final, rejected = read_jsonl(out / "instructions.jsonl"), read_jsonl(out / "rejected.jsonl")
    steps = {r["id"]: r for name in ("self_instruct", "tgrt_questions")
             for r in read_jsonl(out / f"{name}.jsonl")}  # fmt: skip
    assert counts["kept"] == len(final) == len({r["id"] for r in final})
    for r in final:
        source = steps[r["id"]]
        assert (r["instruction"], r["input"], r["source"]) == (
            source["instruction"], source.get("input") or "", source["source"]
        )  # fmt: skip
    by_merge = [r for r in rejected if r["step"] == "merge"]
    assert counts["generated"] == len(steps) == len(final) + len(by_merge)
    assert counts["rejected"] == _reasons(by_merge)
    assert {r["id"] for r in final} | {r["id"] for r in by_merge} == steps.keys()
    per_step = Counter(r["step"] for r in rejected if r["step"] != "merge")
    for name in ("self_instruct", "topics", "tgrt_questions"):
        assert per_step[name] == len(read_jsonl(out / f"{name}.rejected.jsonl")), name
    return final


@pytest.mark.slow
def test_tiny_model_end_to_end_with_crash_and_rerun(tiny_backend, tmp_path):
    ref = _tiny_stage1(tmp_path / "ref", tiny_backend)
    assert ref["self_instruct"]["prompts"] == 8 and ref["topics"]["prompts"] == 40
    assert ref["questions"]["hints"] == 20
    for step, name in (("self_instruct", "self_instruct"), ("topics", "topics"),
                       ("questions", "tgrt_questions")):  # fmt: skip
        check_step_files(ref[step], tmp_path / "ref", name)
    merged = run_merge(MergeConfig(), tmp_path / "ref")
    assert check_merge_files(merged, tmp_path / "ref")  # not empty: the checks saw a record
    # EOS was suppressed: every completion ran to the token limit
    raw = read_jsonl(tmp_path / "ref" / "topics.raw.jsonl")
    assert all(r["finish_reason"] == "length" and r["completion_tokens"] == 12 for r in raw)

    # crashed twice, then rerun: the same counts and the same records as the uninterrupted run
    out = tmp_path / "crashed"
    for after in (1, 3):
        with pytest.raises(Crash):
            _tiny_stage1(out, CrashingBackend(tiny_backend, after))
    assert _tiny_stage1(out, tiny_backend) == ref
    assert run_merge(MergeConfig(), out) == merged
    assert _files(out) == _files(tmp_path / "ref")
