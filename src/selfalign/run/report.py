"""The run report: one self-contained HTML page (`RUN/report/index.html`, images embedded).

It reads only the run directory's files, so `selfalign report RUN` works on a finished run, a
half-finished one, or one copied from a cluster. Sections appear when their data exists: "Did it
work?" (stage 5: benchmark scores base -> engraved -> final, answers side by side), funnels per stage, instruction sources and red-teaming types, topics per type, ROUGE-L
similarity, lengths, principle citations, training loss, sample records, the manifest.
"""

from __future__ import annotations

import base64
import html
import io
import json
from collections import Counter
from pathlib import Path
from typing import Any

from selfalign.jsonl import read_jsonl, write_text_atomic
from selfalign.run.manifest import read_manifest
from selfalign.run.registry import STAGE, STAGES

SAMPLE_COLUMNS = ("id", "reason", "instruction", "input", "output", "completion", "question_type")

CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:0;color:#1d2330;background:#f6f7fb}
header{background:#1d2330;color:#fff;padding:24px 40px}header h1{margin:0 0 6px;font-size:24px}
header p{margin:0;color:#b8c0d4}main{padding:24px 40px;max-width:1200px}
section{background:#fff;border-radius:10px;padding:20px 24px;margin:0 0 20px;box-shadow:0 1px 3px #0001}
h2{margin:0 0 12px;font-size:18px}.grid{display:flex;flex-wrap:wrap;gap:16px}
.grid figure{margin:0;flex:1 1 360px}img{max-width:100%;height:auto}
table{border-collapse:collapse;width:100%;font-size:13px}td,th{border-bottom:1px solid #e4e7ef;padding:6px 8px;
text-align:left;vertical-align:top}th{background:#f0f2f8}.done{color:#138a36;font-weight:600}
.failed,.interrupted{color:#c62828;font-weight:600}.running{color:#b26a00;font-weight:600}
.pending{color:#777}.stale{color:#8e44ad;font-weight:600}
pre{white-space:pre-wrap;font-size:12px;background:#f6f7fb;padding:10px;border-radius:6px;max-height:420px;overflow:auto}
.cell{max-height:140px;overflow:auto;white-space:pre-wrap}.muted{color:#777}
"""


def _load(path: Path) -> list[dict[str, Any]]:
    return read_jsonl(path) if path.exists() else []


def _figure(draw, title: str, caption: str = "") -> str:
    """Render `draw(ax)` to an embedded PNG <figure>, with `caption` as text under it."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.4), dpi=100)
    draw(ax)
    ax.set_title(title, fontsize=11)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    plt.close(fig)
    data = base64.b64encode(buffer.getvalue()).decode()
    img = f'<img alt="{html.escape(title)}" src="data:image/png;base64,{data}">'
    text = f"<figcaption>{html.escape(caption)}</figcaption>" if caption else ""
    return f"<figure>{img}{text}</figure>"


def _bars(counts: dict[str, float], title: str, color: str = "#3b6fd8") -> str:
    labels = list(counts)

    def draw(ax):
        ax.barh(labels[::-1], [counts[k] for k in labels][::-1], color=color)
        ax.tick_params(labelsize=8)

    # the numbers as text too: an image cannot be searched, copied or read by a screen reader
    return _figure(draw, title, ", ".join(f"{k} {v}" for k, v in counts.items()))


def _hist(values: list[float], title: str, bins: int = 30) -> str:
    def draw(ax):
        ax.hist(values, bins=bins, color="#3b6fd8")
        ax.set_ylabel("records")

    return _figure(draw, title)


def _section(title: str, body: str, anchor: str) -> str:
    return f'<section id="{anchor}"><h2>{html.escape(title)}</h2>{body}</section>'


def _table(rows: list[dict[str, Any]], columns: list[str]) -> str:
    head = "".join(f"<th>{html.escape(c)}</th>" for c in columns)
    body = []
    for row in rows:
        cells = []
        for c in columns:
            value = row.get(c, "")
            if not isinstance(value, str):
                value = json.dumps(value, ensure_ascii=False)
            cells.append(f'<td><div class="cell">{html.escape(value[:1500])}</div></td>')
        body.append("<tr>" + "".join(cells) + "</tr>")
    return f"<table><tr>{head}</tr>{''.join(body)}</table>"


def _words(text: str | None) -> int:
    return len((text or "").split())


def funnel_counts(kept: list[dict], rejected: list[dict]) -> dict[str, int]:
    reasons = Counter(r.get("reason", "unknown") for r in rejected)
    counts = {"generated": len(kept) + len(rejected), "kept": len(kept)}
    counts.update({f"rejected: {k}": v for k, v in reasons.most_common()})
    return counts


def _kept_and_rejected(run: Path) -> list[tuple[str, list[dict], list[dict]]]:
    """(stage, kept records, rejected records) of every stage that keeps a dataset."""
    return [
        (s.name, _load(s.path(run, s.kept)), _load(s.path(run, "rejected.jsonl")))
        for s in STAGES
        if s.kept
    ]


def _citations(run: Path, aligned: list[dict[str, Any]]) -> dict[str, int]:
    """Principle -> kept answers citing it: stage 2's histogram ('3 (helpful)', every principle)
    when its stats.json is there, else counted from the rows."""
    stats = STAGE["self_align"].path(run, "stats.json")
    if stats.exists():
        try:
            histogram = json.loads(stats.read_text()).get("citations")
        except (json.JSONDecodeError, AttributeError):
            histogram = None
        if isinstance(histogram, dict) and any(histogram.values()):
            return histogram
    counts = Counter(str(p) for r in aligned for p in (r.get("principles") or []))
    return dict(counts.most_common())


def _losses(run: Path) -> str:
    figures = []
    for stage in STAGES:
        for log in sorted(stage.path(run).glob("**/training_log.jsonl")):
            rows = [r for r in _load(log) if "loss" in r and "step" in r]
            if rows:

                def draw(ax, rows=rows):
                    ax.plot([r["step"] for r in rows], [r["loss"] for r in rows], color="#d8573b")
                    ax.set_xlabel("step")
                    ax.set_ylabel("loss")

                figures.append(_figure(draw, f"training loss: {log.relative_to(run)}"))
    return "".join(figures)


class _Data:
    """The run's files the sections draw on, read once."""

    def __init__(self, run: Path):
        self.run = run
        path = run / "manifest.json"
        self.manifest = read_manifest(path) if path.exists() else {}
        self.stages = _kept_and_rejected(run)
        kept = {name: rows for name, rows, _ in self.stages}
        self.instructions, self.aligned = kept["instructions"], kept["self_align"]
        self.verbose = kept["verbose"]
        self.topics = _load(STAGE["instructions"].path(run, "topics.jsonl"))


def _score(row: dict[str, Any] | None) -> str:
    if not row:
        return ""
    return f"{row['acc']:.3f} ± {row.get('stderr') or 0:.3f}"


def _score_table(mc: dict[str, Any], mode: str) -> tuple[str, list[str], list[str]]:
    """(HTML table, models, tasks) of the `mode` scores: a row per task, a column per model."""
    models = [m for m in mc if mode in mc[m]]
    tasks = list(dict.fromkeys(t for m in models for t in mc[m][mode].get("tasks", {})))
    head = "<tr><th>task</th>" + "".join(f"<th>{html.escape(m)}</th>" for m in models)
    change = f"<th>{html.escape(models[-1])} − {html.escape(models[0])}</th>"
    head += "<th>n</th>" + (change if len(models) > 1 else "") + "</tr>"
    rows = []
    for task in tasks:
        cells = [mc[m][mode]["tasks"].get(task) for m in models]
        n = max((c.get("n", 0) for c in cells if c), default=0)
        row = f"<td>{html.escape(task)}</td>" + "".join(f"<td>{_score(c)}</td>" for c in cells)
        row += f"<td>{n}</td>"
        if len(models) > 1 and cells[0] and cells[-1]:
            row += f"<td>{cells[-1]['acc'] - cells[0]['acc']:+.3f}</td>"
        rows.append(f"<tr>{row}</tr>")
    return f"<table>{head}{''.join(rows)}</table>", models, tasks


def _score_chart(mc: dict[str, Any], models: list[str], tasks: list[str]) -> str:
    colors = ("#9aa4b8", "#3b6fd8", "#138a36", "#d8573b")

    def draw(ax):
        width = 0.8 / len(models)
        for i, model in enumerate(models):
            rows = [mc[model]["raw"]["tasks"].get(t) or {} for t in tasks]
            xs = [x + (i - (len(models) - 1) / 2) * width for x in range(len(tasks))]
            ax.bar(xs, [r.get("acc", 0) for r in rows], width,
                   yerr=[r.get("stderr") or 0 for r in rows], capsize=2, label=model,
                   color=colors[i % len(colors)])  # fmt: skip
        ax.set_xticks(range(len(tasks)), tasks, rotation=30, ha="right", fontsize=8)
        ax.set_ylabel("accuracy")
        ax.set_ylim(0, 1)
        ax.legend(fontsize=8)

    caption = "; ".join(
        f"{m}: " + ", ".join(f"{t} {_score(mc[m]['raw']['tasks'].get(t))}" for t in tasks)
        for m in models
    )
    return _figure(draw, "accuracy per task (raw prompts; error bars: 1 stderr)", caption)


def _side_by_side(results: dict[str, Any]) -> str:
    files = (results.get("answers") or {}).get("files") or {}
    answers = {m: {r["id"]: r for r in _load(Path(f))} for m, f in files.items()}
    if not answers:
        return ""
    first = next(iter(answers.values()))
    rows = []
    for qid, record in first.items():
        row = {"question": "\n\n".join(record.get("turns", []))}
        for model, by_id in answers.items():
            row[model] = "\n\n".join((by_id.get(qid) or {}).get("answers", []))
        rows.append(row)
    return "<h3>Answers side by side</h3>" + _table(rows, ["question", *answers])


def _judged(results: dict[str, Any]) -> str:
    parts = []
    for pair, summary in (results.get("judge") or {}).items():
        total = summary.get("total", {})
        counts = ", ".join(f"{k} {total.get(k, 0)}" for k in ("win", "tie", "loss", "invalid"))
        parts.append(f"<li>{html.escape(pair)}: {html.escape(counts)}</li>")
    return f"<h3>Pairwise judge (both orders)</h3><ul>{''.join(parts)}</ul>" if parts else ""


def _did_it_work(d: _Data) -> str:
    path = STAGE["evaluate"].path(d.run, "results.json")
    if not path.exists():
        return ""
    results = json.loads(path.read_text(encoding="utf-8"))
    mc = results.get("mc") or {}
    body = ""
    if mc:
        table, models, tasks = _score_table(mc, "raw")
        limit = results.get("limit")
        subset = f" on the first {limit} items of each task" if limit else ""
        body += (
            f"<p>Accuracy{subset}, every model scored on raw prompts (no chat template), the "
            "one format the base model shares with the tuned ones. TruthfulQA MC1: the single "
            "true answer has the highest log-likelihood; MC2: the normalised probability mass "
            "on the true answers; HHH: the better answer has the higher log-likelihood (hhh: its "
            "four subsets' items pooled).</p>" + table + _score_chart(mc, models, tasks)
        )
        if any("chat" in modes for modes in mc.values()):
            body += "<h3>With the chat template</h3>" + _score_table(mc, "chat")[0]
    body += _judged(results) + _side_by_side(results)
    return _section("Did it work?", body, "evaluation") if body else ""


def _stages(d: _Data) -> str:
    stages = d.manifest.get("stages", {})
    if not stages:
        return ""
    rows = [
        f'<tr><td>{html.escape(name)}</td><td class="{html.escape(s.get("status", ""))}">'
        f"{html.escape(s.get('status', ''))}</td><td>{s.get('seconds', '')}</td>"
        f"<td>{html.escape(json.dumps(s.get('counts', {}), ensure_ascii=False)[:600])}</td></tr>"
        for name, s in stages.items()
    ]
    head = "<tr><th>stage</th><th>status</th><th>seconds</th><th>counts</th></tr>"
    return _section("Stages", f"<table>{head}{''.join(rows)}</table>", "stages")


def _funnels(d: _Data) -> str:
    figures = [_bars(funnel_counts(kept, rejected), f"{name}: funnel")
               for name, kept, rejected in d.stages if kept or rejected]  # fmt: skip
    return _grid("Funnel per stage", figures, "funnels")


def _instruction_sources(d: _Data) -> str:
    if not d.instructions:
        return ""
    sources = Counter(r.get("source", "?") for r in d.instructions)
    figures = [_bars(dict(sources.most_common()), "instructions per source")]
    types = Counter(r.get("question_type") for r in d.instructions if r.get("question_type"))
    if types:
        figures.append(_bars(dict(types.most_common()), "TGRT instructions per question type"))
    return _grid("Instructions", figures, "instructions")


def _topics(d: _Data) -> str:
    if not d.topics:
        return ""
    per_type = Counter(r.get("question_type", "?") for r in d.topics)
    return _section(
        "Topics per question type", _bars(dict(per_type.most_common()), "topics per type"), "topics"
    )


def _similarity(d: _Data) -> str:
    values = [float(r["max_similarity"]) for r in d.instructions
              if isinstance(r.get("max_similarity"), int | float)]  # fmt: skip
    if not values:
        return ""
    title = "max ROUGE-L F1 to the pool (kept instructions)"
    return _section("ROUGE-L similarity", _hist(values, title), "similarity")


def _lengths(d: _Data) -> str:
    figures = [
        _hist([_words(r.get(field)) for r in rows], title)
        for rows, field, title in (
            (d.instructions, "instruction", "instruction length (words)"),
            (d.aligned, "output", "self-aligned answer length (words)"),
            (d.verbose, "output", "verbose answer length (words)"),
        )
        if rows
    ]
    return _grid("Lengths", figures, "lengths")


def _principles(d: _Data) -> str:
    citations = _citations(d.run, d.aligned)
    if not citations:
        return ""
    title = "principles cited in internal thoughts"
    return _section("Principle citations", _bars(citations, title), "principles")


def _training(d: _Data) -> str:
    losses = _losses(d.run)
    return _section("Training", f'<div class="grid">{losses}</div>', "training") if losses else ""


def _samples(d: _Data) -> str:
    parts = []
    for name, kept, rejected in d.stages:
        for label, rows in (("kept", kept[:5]), ("rejected", rejected[:5])):
            if rows:
                columns = [c for c in SAMPLE_COLUMNS if any(c in r for r in rows)]
                parts.append(f"<h3>{html.escape(name)}: {label}</h3>" + _table(rows, columns))
    return _section("Sample records", "".join(parts), "samples") if parts else ""


def _manifest(d: _Data) -> str:
    if not d.manifest:
        return ""
    text = html.escape(json.dumps(d.manifest, indent=2, ensure_ascii=False))
    return _section("Manifest", f"<pre>{text}</pre>", "manifest")


def _grid(title: str, figures: list[str], anchor: str) -> str:
    return _section(title, f'<div class="grid">{"".join(figures)}</div>', anchor) if figures else ""


SECTIONS = (_did_it_work, _stages, _funnels, _instruction_sources, _topics, _similarity, _lengths,
            _principles, _training, _samples, _manifest)  # fmt: skip


def build_report(run: str | Path) -> str:
    """The report's HTML for the run directory `run`: every section that has data."""
    run = Path(run)
    data = _Data(run)
    sections = [html_ for section in SECTIONS if (html_ := section(data))]
    if not sections:
        empty = '<p class="muted">This run has produced no data yet.</p>'
        sections.append(_section("Nothing yet", empty, "empty"))
    return (
        '<!doctype html><html lang="en"><head><meta charset="utf-8">'
        f"<title>selfalign report: {html.escape(run.name)}</title><style>{CSS}</style></head><body>"
        f"<header><h1>selfalign report: {html.escape(run.name)}</h1>"
        f"<p>{html.escape(str(run.resolve()))}</p></header><main>{''.join(sections)}</main></body></html>"
    )


def write_report(run: str | Path) -> Path:
    path = Path(run) / "report" / "index.html"
    write_text_atomic(path, build_report(run))
    return path
