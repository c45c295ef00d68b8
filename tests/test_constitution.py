"""The constitution: schema, validation errors naming the place, the one render function, the
original watson prompt as a raw template, citations, and `selfalign constitution show|check`."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from cli_run import run_cli

from selfalign.errors import UserError
from selfalign.text.constitution import (
    Identity,
    describe_cutoff,
    fill_identity,
    find_citations,
    load_constitution,
    render_prefix,
    render_prompt,
    thoughts_cue,
)

WATSON = Path(__file__).resolve().parents[2] / "shared/reference/dromedary-v1/prompts/watson_self_align_prompt.txt"  # fmt: skip
needs_watson = pytest.mark.skipif(not WATSON.exists(), reason="reference prompt not available")


def small(**changes) -> dict:
    data = {
        "identity": {"name": "Kestrel", "developer": "Acme Labs", "knowledge_cutoff": "2024-03"},
        "self_identification": "I am a careful assistant.",
        "principles": [
            {"id": 1, "name": "honest", "text": "{name} tells the truth."},
            {"id": 2, "name": "helpful", "text": "{name} helps."},
        ],
        "exemplars": [
            {
                "name": "greeting",
                "turns": [
                    {
                        "user": "Hi!",
                        "thoughts": "A greeting.",
                        "principles": [2],
                        "answer": "Hello!",
                    },
                    {"user": "Thanks.", "auto_reply": "You're welcome."},
                ],
            }
        ],
    }
    data.update(changes)
    return data


def write(tmp_path: Path, data: dict, name: str = "c.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


# -- the default constitution --------------------------------------------------------------------


def test_default_constitution_covers_the_paper_behaviours():
    c = load_constitution("default")
    names = [p.name for p in c.principles]
    assert len(names) == 16 and len(set(p.id for p in c.principles)) == 16
    for needed in ("ethical", "informative", "helpful", "question assessment", "reasoning",
                   "multi-aspect", "candor", "knowledge recitation", "static", "clarification",
                   "numerical sensitivity", "dated knowledge", "step-by-step",
                   "balanced perspectives", "creative", "operational"):  # fmt: skip
        assert needed in names
    assert len(c.exemplars) >= 5
    # multi-turn exemplars with auto replies, as in the paper
    assert any(t.auto_reply for ex in c.exemplars for t in ex.turns)
    assert any(sum(1 for t in ex.turns if t.answer) >= 2 for ex in c.exemplars)


def test_default_prompt_contains_every_principle_and_exemplar_and_ends_with_the_cue():
    c = load_constitution("default")
    prompt = render_prompt(c, "Name three rivers.", "In Europe.")
    for p in c.principles:
        assert c.fill(p.text) in prompt
        assert f"{p.id} ({p.name})." in prompt
    for ex in c.exemplars:
        for text in ex.texts():
            assert c.fill(text).strip() in prompt
    assert prompt.endswith("User: Name three rivers.\n\nIn Europe.\n\nOrion (internal thoughts):")
    assert prompt.endswith(thoughts_cue(c))
    assert "{name}" not in prompt and "{knowledge_cutoff}" not in prompt
    # the identity is filled in: the codename in the prompt, the cut-off spelled out
    assert "Orion" in prompt and "September 2023" in prompt and "Dromedary" not in prompt


def test_every_prompt_starts_with_the_same_prefix():
    c = load_constitution("default")
    prefix = render_prefix(c)
    a, b = render_prompt(c, "One?"), render_prompt(c, "Two?", "with input")
    assert a.startswith(prefix + " ") and b.startswith(prefix + " ")
    assert prefix.endswith("User:")


def test_thoughts_cite_the_principles_of_their_turn():
    c = load_constitution("default")
    prompt = render_prompt(c, "x")
    assert "I should follow principles 3 (helpful), 7 (candor), 12 (dated knowledge)." in prompt
    assert c.fill(c.self_identification) in prompt


# -- the original watson prompt as a raw template ------------------------------------------------


@needs_watson
def test_watson_prompt_renders_verbatim_with_every_principle_and_exemplar():
    c = load_constitution(WATSON)
    text = WATSON.read_text()
    prompt = render_prompt(c, "Tell me a joke.")
    assert prompt == text.rstrip() + " Tell me a joke.\n\nWatson (internal thoughts):"
    assert len(c.principles) == 16 and len(c.exemplars) == 5
    for p in c.principles:
        assert f"{p.id} ({p.name}). {p.text}" in prompt
    for ex in c.exemplars:
        for t in ex.texts():
            assert t in prompt
    assert c.codename == "Watson"
    assert c.self_identification == "I am a helpful, ethical, and reliable assistant."
    # the thoughts' citations were read back from the text
    assert c.exemplars[0].turns[0].principles == [3, 7, 12]


def test_raw_prompt_without_a_user_turn_at_the_end_is_refused(tmp_path):
    bad = tmp_path / "p.txt"
    bad.write_text(
        "1 (honest). Be honest.\n\nUser: hi\n\nBot (internal thoughts): I am nice. Fine.\n\n"
        "Bot: Hello."
    )
    with pytest.raises(UserError, match="must end with 'User:'"):
        load_constitution(bad)


# -- validation errors name the place -------------------------------------------------------------


def test_missing_principle_text_names_the_principle(tmp_path):
    data = small()
    del data["principles"][1]["text"]
    with pytest.raises(UserError, match=r"principles\[1\]\.text"):
        load_constitution(write(tmp_path, data))


def test_blank_principle_text_names_the_principle(tmp_path):
    data = small()
    data["principles"][0]["text"] = "   "
    with pytest.raises(UserError, match=r"principles\[0\] \(id 1\): 'text' is empty"):
        load_constitution(write(tmp_path, data))


def test_duplicate_principle_ids_are_named(tmp_path):
    data = small()
    data["principles"][1]["id"] = 1
    with pytest.raises(UserError, match=r"principles\[1\]: duplicate principle id 1"):
        load_constitution(write(tmp_path, data))


def test_exemplar_citing_a_missing_principle_is_named(tmp_path):
    data = small()
    data["exemplars"][0]["turns"][0]["principles"] = [2, 9]
    with pytest.raises(
        UserError, match=r"exemplars\[0\] \('greeting'\)\.turns\[0\]: cites principle 9"
    ):
        load_constitution(write(tmp_path, data))


def test_unknown_keys_and_half_turns_are_refused(tmp_path):
    with pytest.raises(UserError, match="unknown key 'principals'"):
        load_constitution(write(tmp_path, small(principals=[])))
    data = small()
    del data["exemplars"][0]["turns"][0]["answer"]
    with pytest.raises(UserError, match=r"exemplars\[0\]\.turns\[0\]"):
        load_constitution(write(tmp_path, data))


def test_unknown_bundled_name_lists_the_bundled_ones():
    with pytest.raises(UserError, match="bundled: default"):
        load_constitution("nonesuch")


# -- filling, citations ---------------------------------------------------------------------------


def test_custom_constitution_fills_identity_and_leaves_other_braces(tmp_path):
    data = small()
    data["exemplars"][0]["turns"][0]["answer"] = "def f(): return {'a': 1}  # {name}"
    c = load_constitution(write(tmp_path, data))
    prompt = render_prompt(c, "Hi")
    assert "Kestrel tells the truth." in prompt
    assert "def f(): return {'a': 1}  # Kestrel" in prompt
    assert prompt.endswith("Kestrel (internal thoughts):")


def test_fill_identity_and_cutoff():
    ident = Identity(name="Kestrel", developer="Acme", knowledge_cutoff="2024-03")
    assert (
        describe_cutoff("2024-03") == "March 2024" and describe_cutoff("early 2024") == "early 2024"
    )
    text = fill_identity("{name} by {developer}, {knowledge_cutoff} ({cutoff_year}) {other}", ident)
    assert text == "Kestrel by Acme, March 2024 (2024) {other}"
    assert fill_identity("{name}", ident, name="Orion") == "Orion"


def test_find_citations_forms():
    c = load_constitution("default")
    ps = c.principles
    assert find_citations("I should follow principles 3 (helpful), 7 (candor).", ps) == [3, 7]
    assert find_citations("Rules 2, 5 and 13 apply.", ps) == [2, 5, 13]
    assert find_citations("This needs (candor) and principle 12.", ps) == [7, 12]
    # years and quantities are not citations; unknown ids are ignored
    assert find_citations("In 2021 there were 3 cats; rule 99.", ps) == []


# -- the commands ---------------------------------------------------------------------------------


def test_check_command_accepts_a_good_file(tmp_path, monkeypatch, capsys):
    status, out = run_cli(
        monkeypatch, capsys, "constitution", "check", str(write(tmp_path, small()))
    )
    assert status == 0
    assert "ok: Kestrel, 2 principles, 1 exemplars" in out


@pytest.mark.parametrize(
    "change, expected",
    [
        (lambda d: d["principles"][0].pop("text"), "principles[0].text"),
        (lambda d: d["principles"][1].update(id=1), "duplicate principle id 1"),
        (lambda d: d["exemplars"][0]["turns"][0].update(principles=[7]), "cites principle 7"),
    ],
)
def test_check_command_names_the_place(tmp_path, monkeypatch, capsys, change, expected):
    data = small()
    change(data)
    status, out = run_cli(monkeypatch, capsys, "constitution", "check", str(write(tmp_path, data)))
    assert status == 2
    assert out.startswith("error: ") and expected in out and "Traceback" not in out


def test_show_command_renders_the_prompt(monkeypatch, capsys):
    status, out = run_cli(
        monkeypatch, capsys, "constitution", "show", "default", "--instruction", "Hello?"
    )
    assert status == 0
    assert out.rstrip().endswith("User: Hello?\n\nOrion (internal thoughts):")
    status, out = run_cli(monkeypatch, capsys, "constitution", "show", "default", "--yaml")
    assert status == 0 and yaml.safe_load(out)["codename"] == "Orion"
