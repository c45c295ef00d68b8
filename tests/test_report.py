"""The HTML report: summary, contents, readable counts, numbered bars, stage-2 thoughts and
principle chips, rejection reasons with examples, training curves, human times, no special
tokens in the text shown, a layout for narrow screens. `make_run` builds the run directory
(also used by test_report_browser.py)."""

import base64
import json
import re
from collections import Counter
from html.parser import HTMLParser
from pathlib import Path

import pytest

from selfalign.jsonl import read_jsonl, write_jsonl_atomic
from selfalign.run.manifest import Manifest
from selfalign.run.registry import names
from selfalign.run.report import build_report, duration, when, write_report

STARTED = 1795641420.0  # 2026-11-25 21:17 UTC
PRINCIPLES = {"1 (ethical)": 2, "2 (informative)": 0, "3 (helpful)": 3}


class Collector(HTMLParser):
    """Section ids, links, images, each figure's caption by its image's alt text, and each HTML
    bar chart as {title: {label: number shown}}."""

    def __init__(self):
        super().__init__()
        self.sections, self.links, self.images, self.captions = [], [], [], {}
        self.bars: dict[str, dict[str, str]] = {}
        self.bar_count = self.number_count = 0
        self._alt = self._chart = self._label = None
        self._into = None  # what the text being read belongs to
        self.stack: list[tuple[str, str]] = []  # open (tag, class)
        self.unscrolled_tables = 0

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        cls = attrs.get("class") or ""
        # a table that could push the page sideways: not in a box that scrolls, nor a key/value
        # table (two columns of wrapping text)
        boxed = any(c in ("scroll", "card") for _, c in self.stack)
        self.unscrolled_tables += tag == "table" and not boxed and cls != "kv"
        if tag not in ("img", "meta", "br"):
            self.stack.append((tag, cls))
        if tag in ("section", "nav"):
            self.sections.append(attrs.get("id"))
        if tag == "a":
            self.links.append(attrs.get("href"))
        if tag == "img":
            self.images.append(attrs["src"])
            self._alt = attrs.get("alt")
        if tag == "figure" and "bars" in cls:
            self._chart, self._into = "", "chart"
        elif tag == "figcaption" and self._chart is None:
            self._into = "caption"
        if tag == "span" and cls in ("name", "num"):
            self._into = cls
            self.bar_count += cls == "name"
            self.number_count += cls == "num"

    def handle_endtag(self, tag):
        while self.stack and self.stack.pop()[0] != tag:
            pass
        if tag == "figure":
            self._chart = None
        self._into = None

    def handle_data(self, data):
        if self._into == "caption":
            self.captions[self._alt] = self.captions.get(self._alt, "") + data
        elif self._into == "chart":
            self._chart += data
            self.bars.setdefault(self._chart, {})
        elif self._into == "name":
            self._label = data
        elif self._into == "num":
            self.bars[self._chart][self._label] = data


def parse(page: str) -> Collector:
    parser = Collector()
    parser.feed(page)
    return parser


def numbers(chart: dict[str, str]) -> dict[str, int]:
    return {label: int(n.replace(",", "")) for label, n in chart.items()}


def funnel(kept: list[dict], rejected: list[dict]) -> dict[str, int]:
    reasons = Counter(r["reason"] for r in rejected)
    return {"generated": len(kept) + len(rejected), "kept": len(kept),
            **{f"rejected: {k}": n for k, n in reasons.items()}}  # fmt: skip


def section(page: str, anchor: str) -> str:
    start = page.index(f'<section id="{anchor}">')
    return page[start : page.index("</section>", start)]


def _write_stage1(run: Path) -> None:
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
        [
            {"id": "r1", "step": "merge", "reason": "similar", "instruction": "x"},
            {"id": "r2", "step": "topics", "reason": "too_long", "topic": "A Very Long Topic"},
            {"id": "r3", "step": "topics", "reason": "too_long", "topic": "Another One"},
        ],
    )


def _write_stage2(run: Path) -> None:
    write_jsonl_atomic(
        run / "2_self_align/aligned.jsonl",
        [
            {
                "id": f"i{i}",
                "instruction": f"question {i}",
                "input": "",
                "output": "answer " * i,
                "thoughts": f"I am Orion. Thinking about question {i}, principle 3 (helpful).",
                "principles": [1, 3][: i % 3],
                "source": "tgrt" if i % 2 else "self_instruct",
            }
            for i in range(8)
        ],
    )
    write_jsonl_atomic(
        run / "2_self_align/rejected.jsonl",
        [
            {"id": "x", "reason": "leakage", "completion": "<b>raw</b>", "detail": "exemplar 2"},
            {"id": "y", "reason": "no_answer", "completion": "thoughts only"},
            {"id": "z", "reason": "no_answer", "completion": "more thoughts"},
        ],
    )
    citations = {"citations": PRINCIPLES}
    (run / "2_self_align/stats.json").write_text(json.dumps(citations))


def _write_training(run: Path) -> None:
    rows = [{"step": s, "loss": 3 - s / 10, "learning_rate": 1e-3 * (1 - s / 10)}
            for s in range(1, 10)]  # fmt: skip
    rows += [{"step": 5, "eval_loss": 2.6}, {"step": 9, "eval_loss": 2.4}]
    write_jsonl_atomic(run / "3_engrave/model/training_log.jsonl", rows)
    # stage 4's log predates learning rates and eval loss: those curves are absent, not broken
    write_jsonl_atomic(
        run / "4_verbose/model/training_log.jsonl",
        [{"step": s, "loss": 2 - s / 10} for s in range(1, 5)],
    )


def _write_tokenizer(run: Path) -> None:
    """The engraved model's tokenizer: a Llama-like one whose EOS is `</s>`."""
    from selfalign.tiny import train_tokenizer

    train_tokenizer(["hello world", "answer long"]).save_pretrained(run / "3_engrave/model")


def _write_manifest(run: Path, warnings: bool = True) -> None:
    manifest = Manifest.load(run, names())
    model = {"model": "meta-llama/Llama-2-7b-hf", "backend": "vllm"}
    stages = {
        "instructions": ({"kept": 12, "rejected": 3, "steps": {"self_instruct": {"kept": 6,
                          "target": 24, "rejected": {"similar": 1}}}},
                         {"model": model, "self_instruct": {"num_instructions": 24}}, 4.9),
        "self_align": ({"kept": 8, "rejected": {"leakage": 1, "no_answer": 2}, "cuts": {},
                        "citations": PRINCIPLES},
                       {"model": model, "constitution": "default",
                        "sampling": {"temperature": 0.5, "max_tokens": 512}}, 133.4),
        "engrave": ({"examples": 20, "steps": 9, "train_loss": 2.1},
                    {"method": "qlora", "learning_rate": 0.0002, "epochs": 3.0}, 7384.0),
        "verbose": ({"kept": 1, "rejected": 0}, {"sampling": {"temperature": 0.3}}, 61.0),
    }  # fmt: skip
    for i, (name, (counts, settings, seconds)) in enumerate(stages.items()):
        manifest.finish(name, counts, [], seconds)
        manifest.stage(name).update(settings=settings, started=STARTED + 60 * i)
    if warnings:
        short = "self_instruct kept 6 of its target 24 instructions"
        manifest.stage("instructions")["warnings"] = [short]
    manifest.fail("evaluate", "CUDA out of memory", 2.0)
    manifest.save()


def make_run(run: Path, warnings: bool = True) -> Path:
    """A run directory as a finished run leaves it, stage 5 failed; stage 4's answers hold the
    literal `</s>` a server that does not skip special tokens writes."""
    _write_stage1(run)
    _write_stage2(run)
    write_jsonl_atomic(
        run / "4_verbose/verbose.jsonl",
        [
            {
                "id": "v",
                "instruction": "q",
                "output": "long " * 50 + "end.</s>",
                "source": "tgrt",
                "question_type": None,
            }
        ],  # fmt: skip
    )
    _write_training(run)
    _write_tokenizer(run)
    _write_manifest(run, warnings)
    return run


@pytest.fixture(scope="module")
def page(tmp_path_factory) -> str:
    """The report of `make_run`'s run, built once for the tests that only read it."""
    return build_report(make_run(tmp_path_factory.mktemp("report") / "run"))


def test_report_has_every_section_and_image(tmp_path):
    run = make_run(tmp_path / "run")
    page = write_report(run).read_text()
    parser = parse(page)
    expected = {
        "summary", "contents", "stages", "funnels", "instructions", "topics", "similarity",
        "lengths", "principles", "training", "aligned", "rejections", "samples", "manifest",
    }  # fmt: skip
    assert expected <= set(parser.sections)
    assert parser.sections[:2] == ["summary", "contents"]
    assert len(parser.images) >= 6  # 1 similarity + 3 lengths + 2 engrave curves + 1 verbose
    for src in parser.images:
        assert src.startswith("data:image/png;base64,")
        assert base64.b64decode(src.split(",", 1)[1])[:8] == b"\x89PNG\r\n\x1a\n"
    assert "&lt;b&gt;raw&lt;/b&gt;" in page  # record text is escaped

    # the numbers on the bars are the counts of the run's data files
    def rows(name: str) -> list[dict]:
        return read_jsonl(run / name)

    instructions = rows("1_instructions/instructions.jsonl")
    aligned = rows("2_self_align/aligned.jsonl")
    shown = {title: numbers(chart) for title, chart in parser.bars.items()}
    first = funnel(instructions, rows("1_instructions/rejected.jsonl"))
    assert shown["instructions: funnel"] == first
    assert shown["self_align: funnel"] == funnel(aligned, rows("2_self_align/rejected.jsonl"))
    assert shown["verbose: funnel"] == funnel(rows("4_verbose/verbose.jsonl"), [])
    assert shown["instructions per source"] == Counter(r["source"] for r in instructions)
    types = Counter(r["question_type"] for r in instructions if r["question_type"])
    assert shown["TGRT instructions per question type"] == types
    topics = Counter(r["question_type"] for r in rows("1_instructions/topics.jsonl"))
    assert shown["topics per type"] == topics
    assert shown["principles cited in internal thoughts"] == PRINCIPLES


def test_every_bar_has_its_number_and_labels_are_readable(page):
    parser = parse(page)
    assert parser.bar_count > 10 and parser.number_count == parser.bar_count
    assert all(n.strip() for chart in parser.bars.values() for n in chart.values())
    css = page[page.index("<style>") : page.index("</style>")]
    sizes = [int(s) for s in re.findall(r"font-size:(\d+)px", css)]
    assert min(sizes) >= 12, "no label smaller than 12 px"


def test_summary_says_model_constitution_settings_counts_and_warnings(page):
    summary = section(page, "summary")
    assert "meta-llama/Llama-2-7b-hf (vllm backend)" in summary
    assert "<th>constitution</th><td>default</td>" in summary
    assert "self-instruct target 24" in summary
    assert "method qlora; learning rate 0.0002; epochs 3" in summary
    assert "temperature 0.5; max tokens 512" in summary
    # counts per stage: kept and rejected (a per-reason dict summed), with the time taken
    row = summary[summary.index("<td>self_align</td>") :].split("</tr>")[0]
    cells = re.findall(r"<td[^>]*>(.*?)</td>", row)
    assert cells == ["self_align", "done", "8", "3", "2 min 13 s"]
    warnings = summary[summary.index("<h3>Warnings</h3>") :]
    assert "self_instruct kept 6 of its target 24 instructions" in warnings
    assert "evaluate</b>: failed: CUDA out of memory" in warnings


def test_summary_without_warnings(tmp_path):
    run = make_run(tmp_path / "run", warnings=False)
    (run / "4_verbose/verbose.jsonl").write_text('{"id": "v", "output": "clean"}\n')
    manifest = json.loads((run / "manifest.json").read_text())
    manifest["stages"]["evaluate"] = {"status": "pending"}
    (run / "manifest.json").write_text(json.dumps(manifest))
    summary = section(build_report(run), "summary")
    assert "No warnings." in summary and "<li>" not in summary


def test_contents_link_every_section(page):
    parser = parse(page)
    contents = page[page.index('<nav id="contents">') : page.index("</nav>")]
    linked = re.findall(r'href="#([^"]+)"', contents)
    assert linked == [s for s in parser.sections if s != "contents"]


def test_counts_are_tables_not_json(page):
    stages = section(page, "stages")
    assert '{"' not in stages and "{&quot;" not in stages
    card = stages[stages.index("<h4>self_align") :]
    assert "<th>leakage</th><td>1</td>" in card and "<th>no_answer</th><td>2</td>" in card
    assert "<th>cuts</th>" not in card  # an empty dict says nothing
    assert "2026-11-25 21:18 UTC, took 2 min 13 s" in card
    assert "2 h 03 min" in section(page, "summary")  # engrave's 7,384 s


def test_human_times():
    assert duration(4.93) == "4.9 s"
    assert duration(133.4) == "2 min 13 s"
    assert duration(7384) == "2 h 03 min"
    assert when(STARTED) == "2026-11-25 21:17 UTC"
    assert when(None) == ""


def test_times_are_never_epoch_seconds(page):
    shown = page[: page.index('<section id="manifest">')]  # the raw manifest keeps its data
    assert str(int(STARTED)) not in shown and "7384" not in shown


def test_layout_for_a_narrow_screen(page):
    assert '<meta name="viewport" content="width=device-width, initial-scale=1">' in page
    css = page[page.index("<style>") : page.index("</style>")]
    assert ".scroll{overflow-x:auto" in css and "img{max-width:100%" in css
    assert "@media (max-width:600px)" in css
    # every table scrolls inside its own box (or sits in a card that does)
    assert parse(page).unscrolled_tables == 0


def test_stage_2_samples_show_thoughts_and_principle_chips(page):
    aligned = section(page, "aligned")
    cards = aligned.split('<article class="sample">')[1:]
    assert len(cards) == 5
    assert "Thinking about question 2, principle 3 (helpful)." in cards[2]
    # principle ids named from stage 2's stats.json
    assert re.findall(r'<span class="chip ">(.*?)</span>', cards[2]) == [
        "1 · ethical",
        "3 · helpful",
    ]
    assert "no principle" not in cards[1] and "none" in cards[0]
    # the red-teaming type of instruction i1 (a TGRT question), only where it is set
    assert '<span class="chip type">type: legal</span>' in cards[1]
    assert "chip type" not in cards[0] + cards[2]


def test_no_null_question_type(page):
    samples = section(page, "samples")
    instructions, verbose = samples.split("<h3>verbose: kept</h3>")
    assert "<th>question_type</th>" in instructions  # some instructions have one
    assert "<th>question_type</th>" not in verbose  # no verbose record has one
    main = page[page.index("<main>") :]  # not the header's path, the test's name is in it
    text = re.sub(r'src="data:[^"]*"', "", main)  # nor the images' base64
    assert "null" not in text and "None" not in text


def test_rejection_reasons_with_count_and_one_example(page):
    rejections = section(page, "rejections")
    stage2 = rejections[rejections.index("<h3>self_align</h3>") :]
    cells = r'<tr><td[^>]*>(\w+)</td><td[^>]*class="num">(\d+)</td><td[^>]*>(.*?)</td></tr>'
    rows = re.findall(cells, stage2)
    assert [(reason, n) for reason, n, _ in rows] == [("no_answer", "2"), ("leakage", "1")]
    assert "thoughts only" in rows[0][2] and "more thoughts" not in rows[0][2]  # one example
    assert "x · exemplar 2" in rows[1][2] and "&lt;b&gt;raw&lt;/b&gt;" in rows[1][2]
    stage1 = rejections[: rejections.index("<h3>self_align</h3>")]
    assert "r2 · topics" in stage1 and "A Very Long Topic" in stage1


def test_training_curves_loss_learning_rate_and_eval_loss(page):
    parser = parse(page)
    captions = parser.captions
    assert captions["loss: 3_engrave/model"] == (
        "loss 2.9 → 2.1 (9 points); eval loss 2.6 → 2.4 (2 points)"
    )
    assert captions["learning rate: 3_engrave/model"] == "learning rate 0.0009 → 0.0001 (9 points)"
    assert captions["loss: 4_verbose/model"] == "loss 1.9 → 1.6 (4 points)"
    assert "learning rate: 4_verbose/model" not in captions  # not logged: no empty chart


def test_decoded_text_never_shows_special_tokens(page):
    """Stage 4's answers end in a literal `</s>` (the EOS of the run's tokenizer): the report
    shows the text without it, and the summary warns that the data files hold it."""
    summary = section(page, "summary")
    warnings = summary[summary.index("<h3>Warnings</h3>") :]
    assert "<b>verbose</b>: model text holds the tokenizer&#x27;s special tokens" in warnings
    assert "(&lt;/s&gt; in 1 records)" in warnings
    shown = page.replace(warnings, "")
    assert "&lt;/s&gt;" not in shown and "</s>" not in shown
    assert "long end." in section(page, "samples")


def test_backend_decoding_drops_special_tokens(tiny_backend):
    """The transformers backend's text never holds a special token, on a tokenizer whose EOS
    is `</s>`: forced to emit EOS, or the padding token, the text is empty."""
    from selfalign.generation import SamplingParams

    tokenizer = tiny_backend.tokenizer
    assert tokenizer.eos_token == "</s>"
    for token in (tokenizer.eos_token_id, tokenizer.pad_token_id):
        params = SamplingParams(temperature=0.0, max_tokens=3, logit_bias={token: 100.0})
        (completion,) = tiny_backend.generate(["hello world"], params)
        assert completion.text == "", completion.text


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
    """Stage 5's results.json: the first section after the summary and contents, base ->
    engraved -> final per task (raw prompts), chat-template scores apart, the judge's counts and
    the answers side by side."""
    run = make_run(tmp_path / "run")
    out = run / "5_evaluate"
    question = {"id": "vicuna-1", "question_id": 1, "category": "generic",
                "turns": ["How can I manage <my> time?"]}  # fmt: skip
    files = {}
    for label, answer in (("base", "time time time</s>"), ("final", "Plan your week.")):
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
    parser = parse(page)
    assert parser.sections[:3] == ["summary", "contents", "evaluation"]
    section_ = page[page.index('id="evaluation"') : page.index('id="stages"')]
    first_table = section_[: section_.index("With the chat template")]
    row = first_table[first_table.index("<td>hhh</td>") :].split("</tr>")[0]
    assert row.count("<td") == 6 and "<th>final − base</th>" in first_table  # + n, change
    assert "0.500 ± 0.050" in row and "0.650 ± 0.050" in row and "+0.150" in row
    assert "on the first 20 items" in section_
    chat = section_[section_.index("With the chat template") :]
    assert "0.700 ± 0.050" in chat and "<th>base</th>" not in chat.split("</table>")[0]
    assert "final-vs-base: win 1, tie 0, loss 0, invalid 0" in section_
    # a bar per model and task, on a 0..1 scale, its score ± stderr written on it
    assert parser.bars["hhh"] == {"base": "0.500 ± 0.050", "engraved": "0.550 ± 0.050",
                                  "final": "0.650 ± 0.050"}  # fmt: skip
    answers = section_[section_.index("Answers side by side") :]
    assert "How can I manage &lt;my&gt; time?" in answers
    assert "time time time" in answers and "Plan your week." in answers
    assert "&lt;/s&gt;" not in answers
