"""The run report: one self-contained HTML page (`RUN/report/index.html`, images embedded).

Reads only the run directory: `manifest.json` (per stage: status, settings, counts, timings,
warnings), each stage's kept records and `rejected.jsonl`, stage 1's `topics.jsonl`, stage 2's
`stats.json` (principle names), `**/training_log.jsonl` (loss, learning rate, eval loss), stage 5's
`results.json`, and the run's tokenizer files (its special tokens, kept out of the text shown).
Writes `RUN/report/index.html`. So `selfalign report RUN` works on a finished run, a half-finished
one, or one copied from a cluster.

The page opens with a summary (model, constitution, key settings, counts per stage, warnings) and
a table of contents; then every section that has data: "Did it work?" (stage 5), stages, funnels,
instruction sources and red-teaming types, topics, ROUGE-L similarity, lengths, principle
citations, training curves, stage-2 samples (thoughts and cited principles), rejection reasons
(each with its count and an example), sample records, the raw manifest. Bar charts are HTML (their
numbers are text at any width); histograms and curves are PNGs. The style is
`selfalign/data/report/report.css`.
"""

from __future__ import annotations

import base64
import html
import io
import json
import re
import time
from collections import Counter
from importlib import resources
from pathlib import Path
from typing import Any

from selfalign.jsonl import read_jsonl, write_text_atomic
from selfalign.run.manifest import read_manifest
from selfalign.run.registry import STAGE, STAGES

SAMPLE_COLUMNS = ("id", "instruction", "input", "output", "question_type", "source")
# fields holding model text, in the order one is picked as a rejected record's example
TEXT_FIELDS = ("completion", "text", "output", "answer", "thoughts", "instruction", "topic")
# used when the run holds no tokenizer files (a report of a run copied without its models)
DEFAULT_SPECIALS = ("</s>", "<s>", "<|endoftext|>", "<|im_end|>", "<|eot_id|>", "<|end_of_text|>")
# stage -> (label, dotted path in the stage's manifest settings) shown in the summary
KEY_SETTINGS = {
    "instructions": (("self-instruct target", "self_instruct.num_instructions"),
                     ("TGRT topics per type", "questions.max_topics_per_type"),
                     ("temperature", "self_instruct.sampling.temperature")),
    "self_align": (("temperature", "sampling.temperature"), ("max tokens", "sampling.max_tokens"),
                   ("citation required", "require_citation")),
    "engrave": (("method", "method"), ("learning rate", "learning_rate"), ("epochs", "epochs"),
                ("max steps", "max_steps"), ("batch size", "effective_batch_size"),
                ("LoRA rank", "lora_r"), ("max length", "max_length")),
    "verbose": (("temperature", "sampling.temperature"), ("max tokens", "sampling.max_tokens"),
                ("method", "train.method"), ("learning rate", "train.learning_rate")),
    "evaluate": (("models", "models"), ("tasks", "tasks"), ("items per task", "limit")),
}  # fmt: skip

esc = html.escape


def _load(path: Path) -> list[dict[str, Any]]:
    return read_jsonl(path) if path.exists() else []


# -- formatting -----------------------------------------------------------------------------------


def _fmt(value: Any) -> str:
    """A value as a person reads it: 1,234 / 0.0004 / yes / –."""
    if value is None:
        return "–"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        return f"{value:,.0f}" if value.is_integer() and abs(value) >= 1 else f"{value:.4g}"
    if isinstance(value, list | tuple):
        return ", ".join(_fmt(v) for v in value) or "–"
    return str(value)


def duration(seconds: float | None) -> str:
    """'0.4 s', '2 min 13 s', '3 h 05 min'."""
    if seconds is None:
        return ""
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, secs = divmod(round(seconds), 60)
    if minutes < 60:
        return f"{minutes} min {secs} s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min"


def when(epoch: float | None) -> str:
    """An epoch time as '2026-11-25 21:17 UTC' (UTC: a run copied from a cluster reads the same)."""
    if not isinstance(epoch, int | float):
        return ""
    return time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(epoch))


def _dig(data: Any, dotted: str) -> Any:
    for key in dotted.split("."):
        if not isinstance(data, dict) or key not in data:
            return None
        data = data[key]
    return data


# -- building blocks ------------------------------------------------------------------------------


def _section(title: str, body: str, anchor: str) -> str:
    return f'<section id="{anchor}"><h2>{esc(title)}</h2>{body}</section>'


def _grid(title: str, figures: list[str], anchor: str) -> str:
    return _section(title, f'<div class="grid">{"".join(figures)}</div>', anchor) if figures else ""


def _scroll(table: str) -> str:
    """A table that scrolls sideways inside its box on a narrow screen, not the whole page."""
    return f'<div class="scroll">{table}</div>'


def _bars(counts: dict[str, float], title: str, peak: float | None = None,
          shown: dict[str, str] | None = None) -> str:  # fmt: skip
    """A horizontal bar chart in HTML: every bar with its label and its number as text (`shown`
    when given); bar lengths relative to `peak` (default: the largest value)."""
    peak = peak or max((v for v in counts.values() if isinstance(v, int | float)), default=0) or 1
    rows = []
    for label, value in counts.items():
        kind = "rejected" if label.startswith("rejected") else "kept" if label == "kept" else ""
        width = min(100, 100 * max(value, 0) / peak)
        number = (shown or {}).get(label, _fmt(value))
        rows.append(
            f'<div class="bar"><span class="name">{esc(str(label))}</span>'
            f'<span class="track"><span class="fill {kind}" style="width:{width:.1f}%"></span>'
            f'</span><span class="num">{esc(number)}</span></div>'
        )
    return f'<figure class="bars"><figcaption>{esc(title)}</figcaption>{"".join(rows)}</figure>'


def _kv(data: dict[str, Any]) -> str:
    """Nested counts as a key/value table; a big nested dict folds away under its size."""
    rows = []
    for key, value in data.items():
        if isinstance(value, dict):
            if not value:  # an empty dict ("cuts": {}) says nothing
                continue
            inner = _kv(value)
            cell = inner if len(value) <= 6 else (
                f"<details><summary>{len(value)} entries</summary>{inner}</details>")  # fmt: skip
        else:
            cell = esc(_fmt(value))
        rows.append(f"<tr><th>{esc(str(key))}</th><td>{cell}</td></tr>")
    return f'<table class="kv">{"".join(rows)}</table>'


def _figure(draw, title: str, caption: str = "") -> str:
    """Render `draw(ax)` to an embedded PNG <figure>, with `caption` as text under it. Sized so
    that its labels stay readable when a phone shrinks it to the screen's width."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with plt.rc_context({"font.size": 13, "axes.titlesize": 13, "xtick.labelsize": 12,
                         "ytick.labelsize": 12, "legend.fontsize": 11}):  # fmt: skip
        fig, ax = plt.subplots(figsize=(5.2, 3.3), dpi=100)
        draw(ax)
        ax.set_title(title)
        fig.tight_layout()
        buffer = io.BytesIO()
        fig.savefig(buffer, format="png")
        plt.close(fig)
    data = base64.b64encode(buffer.getvalue()).decode()
    img = f'<img alt="{esc(title)}" src="data:image/png;base64,{data}">'
    text = f"<figcaption>{esc(caption)}</figcaption>" if caption else ""
    return f"<figure>{img}{text}</figure>"


def _hist(values: list[float], title: str, bins: int = 12) -> str:
    def draw(ax):
        counts, _, patches = ax.hist(values, bins=bins, color="#3b6fd8")
        ax.bar_label(patches, labels=[f"{c:.0f}" if c else "" for c in counts], fontsize=11)
        ax.set_ylabel("records")
        ax.yaxis.get_major_locator().set_params(integer=True)  # records come whole
        ax.margins(y=0.15)  # room for the numbers over the tallest bar

    low, high = min(values), max(values)
    return _figure(draw, title, f"{len(values)} records, from {_fmt(low)} to {_fmt(high)}")


def _table(rows: list[dict[str, Any]], columns: list[str], clean=str) -> str:
    """Records as a table (wide: it scrolls sideways on a narrow screen); `clean` is applied to
    every text shown; a missing or null value is an empty cell."""
    head = "".join(f"<th>{esc(c)}</th>" for c in columns)
    body = []
    for row in rows:
        cells = []
        for c in columns:
            value = row.get(c)
            text = "" if value is None else clean(value if isinstance(value, str) else _fmt(value))
            kind = "cell id" if c == "id" else "cell"  # an id reads whole, on one line
            # data-label: on a phone each row is a block of labelled fields (see report.css)
            cells.append(f'<td data-label="{esc(c)}"><div class="{kind}">{esc(text)}</div></td>')
        body.append("<tr>" + "".join(cells) + "</tr>")
    return _scroll(f'<table class="wide"><tr>{head}</tr>{"".join(body)}</table>')


def _words(text: str | None) -> int:
    return len((text or "").split())


def funnel_counts(kept: list[dict], rejected: list[dict]) -> dict[str, int]:
    reasons = Counter(r.get("reason", "unknown") for r in rejected)
    counts = {"generated": len(kept) + len(rejected), "kept": len(kept)}
    counts.update({f"rejected: {k}": v for k, v in reasons.most_common()})
    return counts


# -- the run's data -------------------------------------------------------------------------------


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


def _principle_names(run: Path) -> dict[str, str]:
    """'3' -> 'helpful', from stage 2's citation histogram keys ('3 (helpful)')."""
    stats = STAGE["self_align"].path(run, "stats.json")
    try:
        histogram = json.loads(stats.read_text()).get("citations") or {}
    except (OSError, json.JSONDecodeError, AttributeError):
        return {}
    matches = (re.fullmatch(r"(\S+) \((.+)\)", str(key)) for key in histogram)
    return {m[1]: m[2] for m in matches if m}


def _tokenizer_dirs(run: Path, manifest: dict[str, Any]) -> list[Path]:
    """Folders that may hold the run's tokenizer: the trained models', then the base model's."""
    dirs = [STAGE["engrave"].path(run, "model"), STAGE["verbose"].path(run, "model")]
    for entry in manifest.get("stages", {}).values():
        model = _dig(entry, "settings.model.model")
        if isinstance(model, str):
            dirs.append(Path(model))
    return [d for d in dirs if d.is_dir()]


def _token_strings(folder: Path) -> set[str]:
    """The special tokens named in a tokenizer folder's JSON files (no tokenizer is loaded)."""
    found: set[str] = set()
    for name in ("tokenizer_config.json", "special_tokens_map.json", "tokenizer.json"):
        try:
            data = json.loads((folder / name).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        for key, value in data.items():
            if key.endswith("_token"):
                found.add(value.get("content", "") if isinstance(value, dict) else str(value))
        added = list((data.get("added_tokens_decoder") or {}).values())
        added += data.get("added_tokens") or []
        found |= {t.get("content", "") for t in added if isinstance(t, dict) and t.get("special")}
    return {t for t in found if t and t != "None"}


def special_tokens(run: Path, manifest: dict[str, Any]) -> tuple[str, ...]:
    """The run's tokenizer's special tokens (longest first, so '<s>' never cuts into '</s>');
    common ones when the run has no tokenizer files."""
    found = set().union(*(_token_strings(d) for d in _tokenizer_dirs(run, manifest)))
    return tuple(sorted(found or DEFAULT_SPECIALS, key=len, reverse=True))


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
        self.specials = special_tokens(run, self.manifest)
        self._special = re.compile("|".join(map(re.escape, self.specials)))

    def clean(self, text: str) -> str:
        """Model text without the tokenizer's special tokens (a server that does not skip them
        writes '</s>' into the data; the summary warns about it)."""
        return self._special.sub("", text)

    def with_specials(self, rows: list[dict[str, Any]]) -> Counter:
        """Special token -> records whose model text holds it."""
        found = Counter()
        for row in rows:
            text = "\n".join(v for f in TEXT_FIELDS if isinstance(v := row.get(f), str))
            found.update(set(self._special.findall(text)))
        return found


# -- summary --------------------------------------------------------------------------------------


def warnings(d: _Data) -> list[tuple[str, str]]:
    """(stage, warning): the stages' own (manifest `warnings`), their errors, and model text that
    holds the tokenizer's special tokens."""
    found = []
    for name, entry in d.manifest.get("stages", {}).items():
        listed = entry.get("warnings") or []
        found += [(name, str(w)) for w in (listed if isinstance(listed, list) else [listed])]
        if entry.get("status") in ("failed", "interrupted") and entry.get("error"):
            found.append((name, f"{entry['status']}: {entry['error']}"))
    for name, kept, rejected in d.stages:
        tokens = d.with_specials(kept + rejected)
        if tokens:
            listed = ", ".join(f"{t} in {n} records" for t, n in tokens.most_common())
            found.append((name, f"model text holds the tokenizer's special tokens ({listed}); "
                          "they are hidden on this page but are in the data files: the backend "
                          "or server did not skip special tokens when decoding"))  # fmt: skip
    return found


def _stage_numbers(entry: dict[str, Any]) -> tuple[Any, Any]:
    """(kept, rejected) of a stage's manifest counts, whatever shape its counts take."""
    counts = entry.get("counts") or {}
    kept = counts.get("kept", counts.get("examples"))
    rejected = counts.get("rejected")
    if isinstance(rejected, dict):
        rejected = sum(v for v in rejected.values() if isinstance(v, int | float))
    return kept, rejected


def _overview(d: _Data) -> str:
    """Model, constitution, seed, when and how long: one key/value table."""
    stages = d.manifest.get("stages", {})
    settings = [entry.get("settings") or {} for entry in stages.values()]
    model = next((m for s in settings if (m := _dig(s, "model.model"))), None)
    backend = next((b for s in settings if (b := _dig(s, "model.backend"))), None)
    constitution = _dig(stages.get("self_align", {}), "settings.constitution")
    started = [e["started"] for e in stages.values() if isinstance(e.get("started"), int | float)]
    seconds = sum(e.get("seconds") or 0 for e in stages.values())
    rows = {
        "model": f"{model} ({backend} backend)" if model and backend else model,
        "constitution": constitution,
        "seed": d.manifest.get("seed"),
        "started": when(min(started)) if started else None,
        "time in stages": duration(seconds) if seconds else None,
        "selfalign": _dig(d.manifest, "versions.selfalign"),
    }
    return _kv({k: v for k, v in rows.items() if v is not None})


def _key_settings(d: _Data) -> str:
    rows = []
    for name, entry in d.manifest.get("stages", {}).items():
        settings = entry.get("settings") or {}
        shown = [(label, value) for label, path in KEY_SETTINGS.get(name, ())
                 if (value := _dig(settings, path)) is not None]  # fmt: skip
        if shown:
            text = "; ".join(f"{label} {_fmt(value)}" for label, value in shown)
            rows.append(f"<tr><th>{esc(name)}</th><td>{esc(text)}</td></tr>")
    return f'<h3>Key settings</h3><table class="kv">{"".join(rows)}</table>' if rows else ""


def _stage_counts(d: _Data) -> str:
    rows = []
    for name, entry in d.manifest.get("stages", {}).items():
        status = str(entry.get("status", ""))
        kept, rejected = _stage_numbers(entry)
        cells = [f'<td class="{esc(status)}">{esc(status)}</td>',
                 *(f'<td class="num">{esc(_fmt(v)) if v is not None else ""}</td>'
                   for v in (kept, rejected)),
                 f'<td class="num">{esc(duration(entry.get("seconds")))}</td>']  # fmt: skip
        rows.append(f"<tr><td>{esc(name)}</td>{''.join(cells)}</tr>")
    head = ('<tr><th>stage</th><th>status</th><th class="num">kept</th>'
            '<th class="num">rejected</th><th class="num">took</th></tr>')  # fmt: skip
    table = f"<table>{head}{''.join(rows)}</table>"
    return f"<h3>Counts per stage</h3>{_scroll(table)}"


def _summary(d: _Data) -> str:
    if not d.manifest.get("stages"):
        return ""
    found = warnings(d)
    items = "".join(f"<li><b>{esc(stage)}</b>: {esc(text)}</li>" for stage, text in found)
    body = f'<ul class="warnings">{items}</ul>' if found else '<p class="muted">No warnings.</p>'
    return _section(
        "Summary",
        _overview(d) + _key_settings(d) + _stage_counts(d) + f"<h3>Warnings</h3>{body}",
        "summary",
    )


# -- stage 5: did it work? ------------------------------------------------------------------------


def _score(row: dict[str, Any] | None) -> str:
    if not row:
        return ""
    return f"{row['acc']:.3f} ± {row.get('stderr') or 0:.3f}"


def _score_table(mc: dict[str, Any], mode: str) -> tuple[str, list[str], list[str]]:
    """(HTML table, models, tasks) of the `mode` scores: a row per task, a column per model."""
    models = [m for m in mc if mode in mc[m]]
    tasks = list(dict.fromkeys(t for m in models for t in mc[m][mode].get("tasks", {})))
    head = "<tr><th>task</th>" + "".join(f"<th>{esc(m)}</th>" for m in models)
    change = f"<th>{esc(models[-1])} − {esc(models[0])}</th>"
    head += "<th>n</th>" + (change if len(models) > 1 else "") + "</tr>"
    rows = []
    for task in tasks:
        cells = [mc[m][mode]["tasks"].get(task) for m in models]
        n = max((c.get("n", 0) for c in cells if c), default=0)
        row = f"<td>{esc(task)}</td>" + "".join(f'<td class="num">{_score(c)}</td>' for c in cells)
        row += f'<td class="num">{n}</td>'
        if len(models) > 1 and cells[0] and cells[-1]:
            row += f'<td class="num">{cells[-1]["acc"] - cells[0]["acc"]:+.3f}</td>'
        rows.append(f"<tr>{row}</tr>")
    return _scroll(f"<table>{head}{''.join(rows)}</table>"), models, tasks


def _score_chart(mc: dict[str, Any], models: list[str], tasks: list[str]) -> str:
    """Accuracy per task, a bar per model on a 0..1 scale, each with its score ± stderr."""
    figures = []
    for task in tasks:
        rows = {m: mc[m]["raw"]["tasks"].get(task) for m in models}
        scores = {m: r["acc"] for m, r in rows.items() if r}
        shown = {m: _score(r) for m, r in rows.items() if r}
        figures.append(_bars(scores, task, peak=1.0, shown=shown))
    title = "<h3>Accuracy per task (raw prompts; ± 1 stderr)</h3>"
    return f'{title}<div class="grid">{"".join(figures)}</div>'


def _side_by_side(d: _Data, results: dict[str, Any]) -> str:
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
    return "<h3>Answers side by side</h3>" + _table(rows, ["question", *answers], d.clean)


def _judged(results: dict[str, Any]) -> str:
    parts = []
    for pair, summary in (results.get("judge") or {}).items():
        total = summary.get("total", {})
        counts = ", ".join(f"{k} {total.get(k, 0)}" for k in ("win", "tie", "loss", "invalid"))
        parts.append(f"<li>{esc(pair)}: {esc(counts)}</li>")
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
    body += _judged(results) + _side_by_side(d, results)
    return _section("Did it work?", body, "evaluation") if body else ""


# -- stages, funnels, distributions ---------------------------------------------------------------


def _stages(d: _Data) -> str:
    cards = []
    for name, entry in d.manifest.get("stages", {}).items():
        status = str(entry.get("status", ""))
        times = [t for t in (when(entry.get("started")), duration(entry.get("seconds"))) if t]
        error = entry.get("error")
        cards.append(
            f'<div class="card"><h4>{esc(name)} <span class="{esc(status)}">{esc(status)}</span>'
            f'</h4><p class="muted">{esc(", took ".join(times))}</p>'
            + (f"<p>{esc(str(error))}</p>" if error else "")
            + (_kv(entry["counts"]) if entry.get("counts") else "")
            + "</div>"
        )
    return (
        _section("Stages", f'<div class="cards">{"".join(cards)}</div>', "stages") if cards else ""
    )


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
        _hist([_words(d.clean(r.get(field) or "")) for r in rows], title)
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


# -- training -------------------------------------------------------------------------------------


def _series(rows: list[dict[str, Any]], key: str) -> tuple[list[float], list[float]]:
    """(steps, values) of the log rows that carry a number under `key`."""
    pairs = [(r["step"], r[key]) for r in rows
             if isinstance(r.get(key), int | float) and isinstance(r.get("step"), int | float)]  # fmt: skip
    return [s for s, _ in pairs], [v for _, v in pairs]


def _span(name: str, values: list[float]) -> str:
    return f"{name} {_fmt(values[0])} → {_fmt(values[-1])} ({len(values)} points)"


def _curves(rows: list[dict[str, Any]], where: str) -> list[str]:
    """Loss (and eval loss) over steps, and the learning rate, of one training log."""
    loss, evals, rate = (_series(rows, k) for k in ("loss", "eval_loss", "learning_rate"))
    figures = []
    if loss[0] or evals[0]:

        def draw(ax):
            if loss[0]:
                ax.plot(*loss, color="#d8573b", label="training loss")
            if evals[0]:
                ax.plot(*evals, "o-", color="#3b6fd8", label="eval loss")
            ax.set_xlabel("step")
            ax.set_ylabel("loss")
            ax.legend()

        spans = [_span(n, s[1]) for n, s in (("loss", loss), ("eval loss", evals)) if s[1]]
        figures.append(_figure(draw, f"loss: {where}", "; ".join(spans)))
    if rate[0]:
        from matplotlib.ticker import FuncFormatter

        def draw_rate(ax):
            ax.plot(*rate, color="#138a36")
            ax.set_xlabel("step")
            ax.set_ylabel("learning rate")
            # plain tick labels: matplotlib's '1e-3' offset text collides with the title
            ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:.2g}"))

        figures.append(
            _figure(draw_rate, f"learning rate: {where}", _span("learning rate", rate[1]))
        )
    return figures


def _training(d: _Data) -> str:
    figures = []
    for stage in STAGES:
        for log in sorted(stage.path(d.run).glob("**/training_log.jsonl")):
            figures += _curves(_load(log), str(log.relative_to(d.run).parent))
    return _grid("Training", figures, "training")


# -- records --------------------------------------------------------------------------------------


def _chips(values: list[str], kind: str = "") -> str:
    chips = "".join(f'<span class="chip {kind}">{esc(v)}</span>' for v in values)
    return f'<div class="chips">{chips}</div>' if chips else ""


def _aligned_card(d: _Data, row: dict[str, Any], names: dict[str, str], types: dict) -> str:
    """One stage-2 record: instruction (and its red-teaming type when it has one), the internal
    thoughts, the principles they cite as chips, the answer."""
    qtype = row.get("question_type") or types.get(row.get("id"))
    cited = [f"{p} · {names[str(p)]}" if str(p) in names else str(p)
             for p in row.get("principles") or []]  # fmt: skip
    question = row.get("instruction") or ""
    if row.get("input"):
        question += "\n\n" + row["input"]
    parts = [
        f'<div class="label">instruction <span class="id">{esc(str(row.get("id", "")))}</span></div>',
        f'<div class="text">{esc(d.clean(question))}</div>',
        _chips([f"type: {qtype}"], "type") if qtype else "",
        '<div class="label">internal thoughts</div>',
        f'<div class="thoughts">{esc(d.clean(row.get("thoughts") or "")) or "–"}</div>',
        '<div class="label">cited principles</div>',
        _chips(cited) or '<div class="muted">none</div>',
        '<div class="label">answer</div>',
        f'<div class="text">{esc(d.clean(row.get("output") or ""))}</div>',
    ]
    return f'<article class="sample">{"".join(parts)}</article>'


def _aligned_samples(d: _Data, n: int = 5) -> str:
    if not d.aligned:
        return ""
    names = _principle_names(d.run)
    types = {r.get("id"): r["question_type"] for r in d.instructions if r.get("question_type")}
    cards = "".join(_aligned_card(d, row, names, types) for row in d.aligned[:n])
    intro = (f'<p class="muted">The first {min(n, len(d.aligned))} of {len(d.aligned):,} kept '
             "answers, with the internal thoughts that led to each and the principles they "
             "cite.</p>")  # fmt: skip
    return _section("Self-aligned samples (stage 2)", intro + cards, "aligned")


def _example(d: _Data, row: dict[str, Any]) -> str:
    """A rejected record as a table cell: where it comes from (id, step, detail), then its text."""
    text = next((v for f in TEXT_FIELDS if isinstance(v := row.get(f), str) and v.strip()), "")
    where = " · ".join(str(row[k]) for k in ("id", "step", "detail") if row.get(k))
    shown = esc(d.clean(text).strip()) or '<span class="muted">(empty)</span>'
    return f'<div class="muted">{esc(where)}</div><div class="cell">{shown}</div>'


def _rejections(d: _Data) -> str:
    parts = []
    for name, _, rejected in d.stages:
        if not rejected:
            continue
        by_reason: dict[str, list[dict]] = {}
        for row in rejected:
            by_reason.setdefault(str(row.get("reason", "unknown")), []).append(row)
        rows = sorted(by_reason.items(), key=lambda item: -len(item[1]))
        body = "".join(
            f'<tr><td data-label="reason">{esc(reason)}</td>'
            f'<td data-label="count" class="num">{len(group):,}</td>'
            f'<td data-label="one example">{_example(d, group[0])}</td></tr>'
            for reason, group in rows
        )
        head = '<tr><th>reason</th><th class="num">count</th><th>one example</th></tr>'
        table = f'<table class="wide">{head}{body}</table>'
        parts.append(f"<h3>{esc(name)}</h3>" + _scroll(table))
    return _section("Rejection reasons", "".join(parts), "rejections") if parts else ""


def _samples(d: _Data) -> str:
    parts = []
    for name, kept, _ in d.stages:
        rows = kept[:5]
        # a column only where some row has a value: no column of nulls
        columns = [c for c in SAMPLE_COLUMNS if any(r.get(c) not in (None, "") for r in rows)]
        if rows and name != "self_align":  # stage 2 has its own section
            parts.append(f"<h3>{esc(name)}: kept</h3>" + _table(rows, columns, d.clean))
    return _section("Sample records", "".join(parts), "samples") if parts else ""


def _manifest(d: _Data) -> str:
    if not d.manifest:
        return ""
    text = esc(json.dumps(d.manifest, indent=2, ensure_ascii=False))
    body = f"<details><summary>manifest.json, as written</summary><pre>{text}</pre></details>"
    return _section("Manifest", body, "manifest")


# -- the page -------------------------------------------------------------------------------------

SECTIONS = (_summary, _did_it_work, _stages, _funnels, _instruction_sources, _topics, _similarity,
            _lengths, _principles, _training, _aligned_samples, _rejections, _samples,
            _manifest)  # fmt: skip


def _contents(sections: list[str]) -> str:
    """A table of contents linking every section, read back from the sections' own headings."""
    found = [re.match(r'<section id="([^"]+)"><h2>(.*?)</h2>', s) for s in sections]
    items = "".join(f'<li><a href="#{m[1]}">{m[2]}</a></li>' for m in found if m)
    return f'<nav id="contents"><h2>Contents</h2><ol>{items}</ol></nav>'


def build_report(run: str | Path) -> str:
    """The report's HTML for the run directory `run`: every section that has data."""
    run = Path(run)
    data = _Data(run)
    sections = [html_ for section in SECTIONS if (html_ := section(data))]
    if not sections:
        empty = '<p class="muted">This run has produced no data yet.</p>'
        sections.append(_section("Nothing yet", empty, "empty"))
    css = resources.files("selfalign").joinpath("data", "report", "report.css").read_text()
    title = f"selfalign report: {esc(run.name)}"
    made = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    return (
        '<!doctype html><html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{title}</title><style>{css}</style></head><body>"
        f"<header><h1>{title}</h1><p>{esc(str(run.resolve()))} · written {made}</p></header>"
        f"<main>{sections[0]}{_contents(sections)}{''.join(sections[1:])}</main></body></html>"
    )


def write_report(run: str | Path) -> Path:
    path = Path(run) / "report" / "index.html"
    write_text_atomic(path, build_report(run))
    return path
