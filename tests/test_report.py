"""The HTML report: every section present, every image a non-empty embedded PNG."""

import base64
import json
from collections import Counter
from html.parser import HTMLParser
from pathlib import Path

from selfalign.jsonl import read_jsonl, write_jsonl_atomic
from selfalign.run.manifest import Manifest
from selfalign.run.registry import names
from selfalign.run.report import write_report


class Collector(HTMLParser):
    """Section ids, image sources, and each figure's caption by its image's alt text."""

    def __init__(self):
        super().__init__()
        self.sections, self.images, self.captions = [], [], {}
        self._alt, self._in_caption = None, False

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "section":
            self.sections.append(attrs.get("id"))
        if tag == "img":
            self.images.append(attrs["src"])
            self._alt = attrs.get("alt")
        self._in_caption = tag == "figcaption"

    def handle_endtag(self, tag):
        self._in_caption = False

    def handle_data(self, data):
        if self._in_caption:
            self.captions[self._alt] = self.captions.get(self._alt, "") + data


def counts_of(caption: str) -> dict[str, int]:
    """'generated 13, kept 12, rejected: similar 1' -> {'generated': 13, ...}."""
    pairs = (item.rsplit(" ", 1) for item in caption.split(", "))
    return {label: int(n) for label, n in pairs}


def funnel(kept: list[dict], rejected: list[dict]) -> dict[str, int]:
    reasons = Counter(r["reason"] for r in rejected)
    return {"generated": len(kept) + len(rejected), "kept": len(kept),
            **{f"rejected: {k}": n for k, n in reasons.items()}}  # fmt: skip


def make_run(run):
    write_jsonl_atomic(
        run / "1_instructions/instructions.jsonl",
        [
            {
                "id": f"i{i}",
                "instruction": "word " * (i + 3),
                "input": "",
                "source": "tgrt" if i % 2 else "self_instruct",
                "question_type": "legal" if i % 2 else None,
                "topic": "Wills",
                "max_similarity": i / 20,
            }
            for i in range(12)
        ],
    )
    write_jsonl_atomic(
        run / "1_instructions/topics.jsonl",
        [{"id": "t1", "question_type": "legal", "topic": "Wills"}],
    )
    write_jsonl_atomic(
        run / "1_instructions/rejected.jsonl",
        [{"id": "r1", "reason": "similar", "instruction": "x"}],
    )
    write_jsonl_atomic(
        run / "2_self_align/aligned.jsonl",
        [
            {
                "id": f"i{i}",
                "instruction": "q",
                "input": "",
                "output": "answer " * i,
                "principles": ["ethical", "candor"][: i % 3],
            }
            for i in range(8)
        ],
    )
    write_jsonl_atomic(
        run / "2_self_align/rejected.jsonl",
        [{"id": "x", "reason": "leakage", "completion": "<b>raw</b>"}],
    )
    write_jsonl_atomic(
        run / "4_verbose/verbose.jsonl", [{"id": "v", "instruction": "q", "output": "long " * 50}]
    )
    write_jsonl_atomic(
        run / "3_engrave/model/training_log.jsonl",
        [{"step": s, "loss": 3 - s / 10} for s in range(1, 10)],
    )
    manifest = Manifest.load(run, names())
    manifest.finish("instructions", {"kept": 12}, ["1_instructions/instructions.jsonl"], 1.0)


def test_report_has_every_section_and_image(tmp_path):
    run = tmp_path / "run"
    make_run(run)
    page = write_report(run).read_text()
    parser = Collector()
    parser.feed(page)
    expected = {
        "stages",
        "funnels",
        "instructions",
        "topics",
        "similarity",
        "lengths",
        "principles",
        "training",
        "samples",
        "manifest",
    }
    assert expected <= set(parser.sections)
    assert len(parser.images) >= 10
    for src in parser.images:
        assert src.startswith("data:image/png;base64,")
        assert base64.b64decode(src.split(",", 1)[1])[:8] == b"\x89PNG\r\n\x1a\n"
    assert "&lt;b&gt;raw&lt;/b&gt;" in page  # record text is escaped

    # the counts on the page are the counts of the run's data files
    def rows(name: str) -> list[dict]:
        return read_jsonl(run / name)

    instructions = rows("1_instructions/instructions.jsonl")
    aligned = rows("2_self_align/aligned.jsonl")
    shown = {alt: counts_of(caption) for alt, caption in parser.captions.items()}
    first = funnel(instructions, rows("1_instructions/rejected.jsonl"))
    assert shown["instructions: funnel"] == first
    assert shown["self_align: funnel"] == funnel(aligned, rows("2_self_align/rejected.jsonl"))
    assert shown["verbose: funnel"] == funnel(rows("4_verbose/verbose.jsonl"), [])
    assert shown["instructions per source"] == Counter(r["source"] for r in instructions)
    types = Counter(r["question_type"] for r in instructions if r["question_type"])
    assert shown["TGRT instructions per question type"] == types
    topics = Counter(r["question_type"] for r in rows("1_instructions/topics.jsonl"))
    assert shown["topics per type"] == topics
    citations = Counter(str(p) for r in aligned for p in r["principles"])
    assert shown["principles cited in internal thoughts"] == citations


def test_report_of_an_empty_run(tmp_path):
    page = write_report(tmp_path / "empty").read_text()
    assert "Nothing yet" in page


def test_principle_citations_use_stage_2_names(tmp_path):
    from selfalign.run.report import _citations

    rows = [{"principles": [1, 3]}, {"principles": [3]}]
    assert _citations(tmp_path, rows) == {"3": 2, "1": 1}
    (tmp_path / "2_self_align").mkdir()
    histogram = {"1 (ethical)": 1, "2 (informative)": 0, "3 (helpful)": 2}
    (tmp_path / "2_self_align/stats.json").write_text(json.dumps({"citations": histogram}))
    assert _citations(tmp_path, rows) == histogram


def scores(*accs: float) -> dict:
    tasks = ("truthfulqa_mc1", "truthfulqa_mc2", "hhh")
    return {
        "tasks": {t: {"acc": a, "stderr": 0.05, "n": 20} for t, a in zip(tasks, accs, strict=True)}
    }


def test_report_opens_with_did_it_work(tmp_path):
    """Stage 5's results.json: the first section, base -> engraved -> final per task (raw
    prompts), chat-template scores apart, the judge's counts and the answers side by side."""
    run = tmp_path / "run"
    make_run(run)
    out = run / "5_evaluate"
    question = {"id": "vicuna-1", "question_id": 1, "category": "generic",
                "turns": ["How can I manage <my> time?"]}  # fmt: skip
    files = {}
    for label, answer in (("base", "time time time"), ("final", "Plan your week.")):
        files[label] = str(out / f"answers/{label}.jsonl")
        write_jsonl_atomic(Path(files[label]), [{**question, "answers": [answer]}])
    results = {
        "tasks": ["truthfulqa_mc1", "truthfulqa_mc2", "hhh"], "limit": 20, "shown": "raw",
        "mc": {"base": {"raw": scores(0.2, 0.4, 0.5)},
               "engraved": {"raw": scores(0.25, 0.45, 0.55), "chat": scores(0.3, 0.5, 0.6)},
               "final": {"raw": scores(0.3, 0.5, 0.65), "chat": scores(0.35, 0.55, 0.7)}},
        "answers": {"questions": "vicuna", "files": files},
        "judge": {"final-vs-base": {"total": {"win": 1, "tie": 0, "loss": 0, "invalid": 0}}},
    }  # fmt: skip
    (out / "results.json").write_text(json.dumps(results))
    page = write_report(run).read_text()
    parser = Collector()
    parser.feed(page)
    assert parser.sections[0] == "evaluation"
    section = page[page.index('id="evaluation"') : page.index('id="stages"')]
    first_table = section[: section.index("With the chat template")]
    row = first_table[first_table.index("<td>hhh</td>") :].split("</tr>")[0]
    assert row.count("<td>") == 6 and "<th>final − base</th>" in first_table  # + n, change
    assert "0.500 ± 0.050" in row and "0.650 ± 0.050" in row and "+0.150" in row
    assert "on the first 20 items" in section
    chat = section[section.index("With the chat template") :]
    assert "0.700 ± 0.050" in chat and "<th>base</th>" not in chat.split("</table>")[0]
    assert "final-vs-base: win 1, tie 0, loss 0, invalid 0" in section
    caption = parser.captions["accuracy per task (raw prompts; error bars: 1 stderr)"]
    assert "final: truthfulqa_mc1 0.300 ± 0.050" in caption
    answers = section[section.index("Answers side by side") :]
    assert "How can I manage &lt;my&gt; time?" in answers
    assert "time time time" in answers and "Plan your week." in answers
