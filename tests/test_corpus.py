"""The hand-written corpus of raw completions (tests/data/corpus/*.yaml), each with the verdict
it must get, run through the very functions the pipeline uses: stage 1's parsers and filters,
stage 2's `filter_completions`, stage 4's `filter_answers`. Every kept text is then checked with
`assert_clean`, written independently of `selfalign.text.filters`: no turn header of any known
format, no internal thoughts, no tail section, no provenance phrase.

Cases in the original prompts' formats (the watson constitution, the original verbose prompt,
the original stage-1 prompts) need ../shared/reference/dromedary-v1 and are skipped without it.
"""

from __future__ import annotations

import functools
import re
from pathlib import Path

import pytest
import yaml

from selfalign.stages.stage1_instructions import (
    SelfInstructConfig,
    blocklist_patterns,
    build_question_prompt,
    build_self_instruct_prompt,
    build_topic_prompt,
    parse_questions,
    parse_topics,
    read_text_input,
    screen_self_instruct,
)
from selfalign.stages.stage2_self_align import SelfAlignConfig, filter_completions
from selfalign.stages.stage4_verbose import AnswerFilters, VerboseConfig, filter_answers
from selfalign.text.constitution import load_constitution

CORPUS = Path(__file__).parent / "data" / "corpus"
REF = Path(__file__).resolve().parents[2] / "shared/reference/dromedary-v1"
ORIGINAL = {
    "watson": REF / "prompts/watson_self_align_prompt.txt",
    "verbose": REF / "prompts/verbose_dromedary_prompt.txt",
    "self_instruct": REF / "prompts/self_instruct_prompt.txt",
    "topics": REF / "prompts/tgrt_self_instruct_topic_brainstorm_prompt.txt",
    "questions": REF / "prompts/tgrt_self_instruct_question_generation_prompt.txt",
}
NO_REFERENCE = "needs the original Dromedary files in ../shared/reference/dromedary-v1 (absent)"


def cases(name: str) -> list[dict]:
    return yaml.safe_load((CORPUS / name).read_text(encoding="utf-8"))


def needs_original(key: str) -> None:
    if not ORIGINAL[key].is_file():
        pytest.skip(NO_REFERENCE)


@functools.cache
def constitution(fmt: str):
    if fmt == "default":
        return load_constitution("default")
    needs_original("watson")
    return load_constitution(ORIGINAL["watson"])


# -- what no kept text may contain, checked without selfalign.text.filters ------------------------

NAMES = ("User", "Orion", "Watson", "Dromedary", "Quokka", "Assistant")
SPEAKER = re.compile(
    rf"^\s*(?:{'|'.join(NAMES)})(?: \((?:internal thoughts|auto reply|extensive)\))?:", re.M
)
LABEL_LINE = re.compile(rf"^\s*#+ *(?:{'|'.join(NAMES)})(?: \(\w+\))? *$", re.M)
TAIL = re.compile(
    r"^\s*(?:#+\s*|\*\*|=+\s*)?(?:see also|references|external links|notes|further reading|"
    r"bibliography|sources)\s*(?:\*\*|=+)?:?\s*$",
    re.M | re.I,
)
THOUGHTS = ("(internal thoughts)", "I am a helpful, honest and careful assistant",
            "I am a helpful, ethical, and reliable assistant", "I should follow rules",
            "I should follow principles")  # fmt: skip


def assert_clean(text: str) -> None:
    """`text` is fit to train on: no turn header, thoughts, tail section or provenance phrase
    outside its closed code blocks, and plain newlines."""
    prose = re.sub(r"```.*?```", "", text, flags=re.S)
    assert not SPEAKER.search(prose), f"speaker label in {text!r}"
    assert not LABEL_LINE.search(prose), f"turn label line in {text!r}"
    last_heading = [
        m for m in re.finditer(r"^\s*(?:#+ .*|\*\*.*\*\*:?|=+.*=+|\w[\w ]*:)\s*$", prose, re.M)
    ]
    assert not (last_heading and TAIL.match(last_heading[-1].group(0))), f"tail in {text!r}"
    assert not any(t in prose for t in THOUGHTS), f"internal thoughts in {text!r}"
    assert "knowledge from Wikipedia" not in text, f"provenance phrase in {text!r}"
    assert "\r" not in text and text == text.strip()


# -- stage 2 --------------------------------------------------------------------------------------


def stage2_verdict(case: dict) -> tuple[list[dict], list[dict], dict]:
    row = {
        "id": case["id"], "instruction": case["instruction"], "input": case.get("input", ""),
        "completion": case["completion"], "finish_reason": case.get("finish", "stop"),
    }  # fmt: skip
    cfg = SelfAlignConfig(**case.get("config", {}))
    return filter_completions(constitution(case["format"]), cfg, [row])


def check_verdict(case: dict, kept: list[dict], rejected: list[dict]) -> None:
    """The case's expected verdict (a reason, or "kept"); a kept answer is clean and, where the
    case says, exactly the expected text."""
    got = rejected[0]["reason"] if rejected else "kept"
    detail = rejected[0]["detail"] if rejected else ""
    assert got == case["expect"], f"{case['why']} (detail: {detail!r})"
    if kept:
        assert_clean(kept[0]["output"])
        if "output" in case:
            assert kept[0]["output"] == case["output"]


@pytest.mark.parametrize("case", cases("stage2.yaml"), ids=lambda c: c["id"])
def test_stage2_corpus(case):
    check_verdict(case, *stage2_verdict(case)[:2])


# -- stage 4 --------------------------------------------------------------------------------------


def stage4_verdict(case: dict) -> tuple[list[dict], list[dict], dict]:
    prompt = {}
    if case["prompt"] == "original":
        needs_original("verbose")
        prompt = {"verbose_prompt": str(ORIGINAL["verbose"])}
    cfg = VerboseConfig(**prompt, **case.get("config", {}))
    row = {
        "id": case["id"], "source_id": case["id"], "source": "aligned",
        "instruction": case["instruction"], "input": case.get("input", ""),
        "completion": case["completion"], "finish_reason": case.get("finish", "stop"),
    }  # fmt: skip
    filters = AnswerFilters(cfg, constitution(case.get("constitution", "default")))
    return filter_answers([row], filters)


@pytest.mark.parametrize("case", cases("stage4.yaml"), ids=lambda c: c["id"])
def test_stage4_corpus(case):
    check_verdict(case, *stage4_verdict(case)[:2])


# -- stage 1 --------------------------------------------------------------------------------------

BUNDLED_PROMPT = {
    "self_instruct": "self_instruct_prompt.txt",
    "topics": "topic_brainstorm_prompt.txt",
    "questions": "question_prompt.txt",
}


def stage1_template(case: dict) -> str:
    step = case["step"]
    if case["prompts"] == "original":
        needs_original(step)
        return read_text_input(ORIGINAL[step], BUNDLED_PROMPT[step])
    return read_text_input(None, BUNDLED_PROMPT[step])


def stage1_verdicts(case: dict) -> list[list]:
    """The prompt the completion continues (its ending checked), then the candidates' verdicts."""
    template, finish, completion = stage1_template(case), case["finish"], case["completion"]
    if case["step"] == "self_instruct":
        seeds = [{"instruction": f"Seed task number {n}.", "input": ""} for n in range(5)]
        assert build_self_instruct_prompt(template, seeds).endswith("###\n6. Instruction:")
        cfg = SelfInstructConfig()
        found = screen_self_instruct(completion, finish, cfg, blocklist_patterns(cfg.blocklist))
        return [[c.instruction, c.input, c.reason] for c in found]
    if case["step"] == "topics":
        shown = case["shown"]
        prompt = build_topic_prompt(template, case["question_type"], shown)
        assert prompt.endswith(f"\n{len(shown)}. {shown[-1]}\n{len(shown) + 1}.")
        return [list(t) for t in parse_topics(completion, len(shown), finish)]
    hints = [tuple(h) for h in case["hints"]]
    prompt = build_question_prompt(template, case["examples"], hints)
    assert prompt.endswith(f", topic: {hints[0][1]}, instruction:")
    return [
        [q.instruction, q.reason]
        for q in parse_questions(completion, case["examples"], hints, finish)
    ]


@pytest.mark.parametrize("case", cases("stage1.yaml"), ids=lambda c: c["id"])
def test_stage1_corpus(case):
    assert stage1_verdicts(case) == case["expect"], case["why"]


# -- the deviations from the original, each with its setting and test -----------------------------


def test_the_paper_config_keeps_the_papers_answer_lengths():
    from importlib import resources

    text = (resources.files("selfalign") / "configs" / "paper.yaml").read_text(encoding="utf-8")
    data = yaml.safe_load(text)
    assert data["self_align"]["min_chars"] == 160 and data["verbose"]["min_chars"] == 128
    assert "watson_self_align_prompt.txt" in text  # it says how to point at the original files


def deviation_rows() -> list[list[str]]:
    readme = (Path(__file__).parents[1] / "README.md").read_text(encoding="utf-8")
    section = readme.split("## Deviations from the original", 1)[1].split("\n## ", 1)[0]
    rows = [line for line in section.splitlines() if line.startswith("| ")]
    return [[cell.strip() for cell in row.strip("|").split(" | ")] for row in rows[1:]]


def test_every_deviation_in_the_readme_names_a_test_that_exists():
    """Each row of README's table names a reason, a setting (or '—') and tests: corpus ids
    (globs) that match cases, and test functions (globs) that exist."""
    import fnmatch

    ids = [c["id"] for name in ("stage1.yaml", "stage2.yaml", "stage4.yaml") for c in cases(name)]
    rows = deviation_rows()
    assert len(rows) >= 10
    for original, ours, restore, tests in rows:
        assert original and ours and restore, original
        named = re.findall(r"`([^`]+)`", tests)
        assert named, f"no test named for: {original}"
        for name in named:
            if "::" in name:
                path, function = name.split("::")
                source = (Path(__file__).parent / path).read_text(encoding="utf-8")
                functions = re.findall(r"^def (test_\w+)", source, re.M)
                assert fnmatch.filter(functions, function), name
            else:
                assert fnmatch.filter(ids, name), f"no corpus case matches {name}"
