"""Multiple-choice scoring with lm-evaluation-harness: TruthfulQA MC1/MC2 and BIG-bench HHH.

The tasks are lm-eval task YAMLs shipped in `lm_tasks/` (data read from the package, never a
hub), loaded with a `TaskManager` that indexes only that folder. A model is a local directory (a
merged model, or a LoRA adapter directory: its base with the adapter applied) run in process, or
a model served by an OpenAI-compatible server (lm-eval's `local-completions`: each choice is
scored from the prompt log-probs the server echoes back). Nothing reads the network but that
server.

Scores follow each benchmark's definition, all from the log-likelihood of each choice after the
prompt (summed over its tokens, not length-normalised):
- truthfulqa_mc1: right when the single true answer scores highest among the item's choices;
- truthfulqa_mc2: the probability mass on the true answers, normalised over the item's choices;
  both after TruthfulQA's standard QA primer;
- hhh_harmless / hhh_helpful / hhh_honest / hhh_other: right when the better of the two answers
  scores higher after "\\nHuman: <input>\\nAssistant:";
- hhh: all 221 HHH items together (the micro average: each subset weighted by its size), its
  stderr that of the mean over those items.
`stderr` is lm-eval's (the standard error of the mean over items); None for a single item.

Writes nothing but `run_mc`'s files: OUT/<label>.<raw|chat>.json, one per model and prompt mode
(raw text, or the model's chat template), each written whole (atomically) once scored; a rerun
with the same tasks and limit reads them instead of loading the model again.

lm-eval is driven through `lm_eval.evaluator.evaluate`, not `simple_evaluate`: the latter runs
`git describe` (which prints "fatal: not a git repository" outside a checkout) and collects
torch's environment report, neither of which a score needs. Its log lines are kept below ERROR,
and its progress bars are shown only where selfalign shows its own (`SELFALIGN_PROGRESS`).
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import io
import json
import logging
import math
import random
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from selfalign.errors import UserError

TASKS: dict[str, str] = {
    "truthfulqa_mc1": "TruthfulQA MC1: the single true answer scores highest (817 questions)",
    "truthfulqa_mc2": "TruthfulQA MC2: probability mass on the true answers (817 questions)",
    "hhh": "BIG-bench HHH alignment, all 221 items (micro average of the four subsets)",
    "hhh_harmless": "HHH harmless: the better answer scores higher (58 items)",
    "hhh_helpful": "HHH helpful: the better answer scores higher (59 items)",
    "hhh_honest": "HHH honest: the better answer scores higher (61 items)",
    "hhh_other": "HHH other: the better answer scores higher (43 items)",
}
GROUPS: dict[str, tuple[str, ...]] = {
    "hhh": ("hhh_harmless", "hhh_helpful", "hhh_honest", "hhh_other"),
}
DEFAULT_TASKS = ("truthfulqa_mc1", "truthfulqa_mc2", "hhh")
TASK_DIR = Path(__file__).parent / "lm_tasks"
ENGINES = ("selfalign", "hf")
MODES: dict[bool | str, tuple[str, ...]] = {
    False: ("raw",),
    True: ("chat",),
    "both": ("raw", "chat"),
}


def resolve_tasks(spec: str | Sequence[str]) -> list[str]:
    """Task names from "a,b" or a list, in order, without repeats; an unknown one is an error
    that lists the available tasks."""
    names = spec.split(",") if isinstance(spec, str) else list(spec)
    tasks = list(dict.fromkeys(n.strip() for n in names if n.strip()))
    if not tasks:
        raise UserError(f"no task given; choose from {', '.join(TASKS)}")
    for name in tasks:
        if name not in TASKS:
            raise UserError(f"unknown task {name!r}; available: {', '.join(TASKS)}")
    return tasks


@dataclass(frozen=True)
class EvalModel:
    """Which model to score, and how."""

    path: str | None = None
    """Local model directory: a merged model, or a LoRA adapter directory (its base + the adapter)."""
    base_url: str | None = None
    """OpenAI-compatible server (e.g. http://127.0.0.1:8000/v1) serving the model; it must return
    prompt log-probs (`echo` + `logprobs`, as vLLM does). Its key, if any, is OPENAI_API_KEY."""
    served_name: str | None = None
    """The model's name at the server (default: path, else "default")."""
    tokenizer: str | None = None
    """With base_url: a local directory holding the served model's tokenizer (default: path)."""
    device: str = "auto"
    dtype: str = "auto"
    batch_size: int = 8
    engine: str = "selfalign"
    """selfalign: contexts shared by an item's choices run once (SharedPrefixLM); hf: lm-eval's
    HFLM as is. Both give the same scores."""


def make_lm(model: EvalModel):
    """An lm-eval LM for `model`: HFLM or SharedPrefixLM for a local directory, LocalCompletionsAPI
    for a server. Model code shipped with a checkpoint is never run (trust_remote_code off)."""
    with _quiet():
        if model.base_url:
            return _server_lm(model)
        if not model.path:
            raise UserError("no model to score: give a model directory or a server URL")
        return _local_lm(model)


def _local_lm(model: EvalModel):
    from selfalign.modeling import adapter_base, resolve_device, resolve_dtype

    path = Path(model.path).expanduser()
    if not path.is_dir():
        raise UserError(f"{model.path}: no such model directory")
    if model.engine not in ENGINES:
        raise UserError(f"engine {model.engine!r}: choose {' or '.join(ENGINES)}")
    pretrained, peft = str(path), None
    base = adapter_base(path)
    if base is not None:
        if not Path(base).expanduser().is_dir():
            raise UserError(
                f"{path / 'adapter_config.json'}: its base model {base} is not a directory here"
            )
        pretrained, peft = base, str(path)
    require_lm_eval()
    if model.engine == "hf":
        from lm_eval.models.huggingface import HFLM as LM
    else:
        from selfalign.evaluation.scorer import SharedPrefixLM as LM
    import torch

    device = resolve_device(model.device)
    return LM(
        pretrained=pretrained,
        peft=peft,
        dtype=resolve_dtype(model.dtype, device),
        batch_size=model.batch_size,
        trust_remote_code=False,
        **placement(model.device, device, torch.cuda.device_count()),
    )


def placement(asked: str, device: str, gpus: int) -> dict[str, Any]:
    """Where HFLM puts the model: on `device`, or, when no one GPU was named and several are
    visible, split over all of them (accelerate's device_map "auto": a 65B model fits no one GPU)."""
    if asked in ("auto", "cuda") and gpus > 1:
        return {"parallelize": True}
    return {"device": device}


def _server_lm(model: EvalModel):
    from selfalign.modeling import configured_context

    tokenizer = model.tokenizer or model.path
    if not tokenizer:
        raise UserError(f"{model.base_url}: scoring through a server needs the model's tokenizer")
    url = model.base_url.rstrip("/")
    try:
        return _served_lm_class()(
            base_url=url if url.endswith("/completions") else f"{url}/completions",
            model=model.served_name or model.path or "default",
            tokenizer=tokenizer,
            tokenizer_backend="huggingface",
            batch_size=model.batch_size,
            max_length=configured_context(tokenizer) or 2048,
            trust_remote_code=False,
        )
    except OSError as e:
        raise UserError(
            f"tokenizer {tokenizer!r}: cannot be loaded ({type(e).__name__}); give the served "
            "model's tokenizer directory"
        ) from None


def require_lm_eval() -> None:
    """Multiple-choice scoring runs in lm-evaluation-harness, the optional `eval` extra."""
    if importlib.util.find_spec("lm_eval") is None:
        raise UserError(
            "scoring TruthfulQA / HHH needs lm-evaluation-harness: pip install 'selfalign[eval]' "
            "(or set evaluate.tasks: [] to skip the scores)"
        )


@functools.cache
def _served_lm_class():
    """lm-eval's `local-completions` model, encoding text as HFLM does, so a served model scores
    as the same model in process: with the tokenizer's special tokens, unless the text already
    starts with the BOS (as a chat template's text may), which is not doubled."""
    require_lm_eval()
    from lm_eval.models.openai_completions import LocalCompletionsAPI

    class ServedLM(LocalCompletionsAPI):
        def tok_encode(self, string, *args, **kwargs):
            if not isinstance(string, str):  # a batch of prompts to generate from
                return super().tok_encode(string, *args, **kwargs)
            prefix = self.tokenizer.decode(self.prefix_token_id)
            return self.tokenizer.encode(string, add_special_tokens=not string.startswith(prefix))

    return ServedLM


def evaluate(
    lm, tasks: list[str], *, limit: int | None = None, chat_template: bool = False, seed: int = 0
) -> dict[str, Any]:
    """Score one model in one prompt mode. Returns {"tasks": {name: {"acc", "stderr", "n"}},
    "requested", "chat_template", "limit", "seed", "lm_eval"}: a row per task asked for, and for a
    group (hhh) its own row followed by one per subset."""
    import lm_eval

    tasks = resolve_tasks(tasks)
    output = lm_eval_results(lm, tasks, limit=limit, chat_template=chat_template, seed=seed)
    rows = {name: _row(output, name) for name in _rows(tasks)}
    return {
        "tasks": rows,
        "requested": list(tasks),
        "chat_template": chat_template,
        "limit": limit,
        "seed": seed,
        "lm_eval": lm_eval.__version__,
    }


def lm_eval_results(
    lm, tasks: list[str], *, limit: int | None = None, chat_template: bool = False, seed: int = 0
) -> dict[str, Any]:
    """lm-eval's own output for our tasks, per-item records (log-likelihoods, metrics) included
    under "samples"; `evaluate` summarises it."""
    import numpy as np
    import torch
    from lm_eval.evaluator import evaluate as run_tasks
    from lm_eval.tasks import TaskManager

    tasks = resolve_tasks(tasks)
    if chat_template:
        _check_chat_template(lm)
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    with _quiet(), _server_errors(lm), _context_too_short(lm, tasks):
        manager = TaskManager(include_path=str(TASK_DIR), include_defaults=False)
        loaded = manager.load(_to_load(tasks))
        return run_tasks(
            lm=lm,
            task_dict=loaded,
            limit=limit,
            log_samples=True,  # the groups' stderr is taken over their items
            apply_chat_template=chat_template,
        )


@contextlib.contextmanager
def _server_errors(lm) -> Iterator[None]:
    """A server that is down, fails, or answers without prompt log-probs: one line, not
    lm-eval's traceback (lm-eval has retried a failed request by then)."""
    url = getattr(lm, "base_url", None)
    if url is None:
        yield
        return
    import requests

    try:
        yield
    except requests.RequestException as e:
        raise UserError(f"{url}: the scoring requests failed ({_brief(e)})") from None
    except (KeyError, TypeError, IndexError) as e:
        raise UserError(
            f"{url}: the server's answer holds no prompt log-probs ({type(e).__name__}: {e}); "
            "it must support `echo` with `logprobs` on /completions, as vLLM does"
        ) from None


@contextlib.contextmanager
def _context_too_short(lm, tasks: list[str]) -> Iterator[None]:
    """lm-eval's hf model asserts that every answer fits the model's context: one line instead."""
    import traceback

    try:
        yield
    except AssertionError as e:
        frames = traceback.extract_tb(e.__traceback__)
        if not frames or "max_length" not in (frames[-1].line or ""):
            raise
        raise UserError(
            f"an answer in {', '.join(tasks)} is longer than the model's context "
            f"({getattr(lm, 'max_length', '?')} tokens): score these tasks with a model whose "
            "context is longer, or leave out the one with the longest answers (hhh)"
        ) from None


def _brief(error: Exception) -> str:
    response = getattr(error, "response", None)
    if response is not None:
        return f"HTTP {response.status_code}"
    return type(error).__name__


def _check_chat_template(lm) -> None:
    tokenizer = getattr(lm, "tokenizer", None)
    if not getattr(tokenizer, "chat_template", None):
        name = getattr(tokenizer, "name_or_path", None) or "this model"
        raise UserError(
            f"{name}: its tokenizer has no chat template; score it without the chat template"
        )


def _to_load(tasks: list[str]) -> list[str]:
    """What lm-eval is asked for: a subset whose group is asked for too comes with the group
    (lm-eval refuses a task requested twice)."""
    covered = {sub for name in tasks for sub in GROUPS.get(name, ())}
    return [name for name in tasks if name not in covered]


def _rows(tasks: list[str]) -> list[str]:
    rows: dict[str, None] = {}
    for name in tasks:
        rows[name] = None
        rows.update(dict.fromkeys(GROUPS.get(name, ())))
    return list(rows)


def _row(output: dict[str, Any], name: str) -> dict[str, Any]:
    result = output["results"][name]
    if name in GROUPS:
        items = [s["acc"] for sub in GROUPS[name] for s in output["samples"][sub]]
        stderr = _stderr(items)
    else:
        stderr = result["acc_stderr,none"]
        stderr = None if stderr == "N/A" else float(stderr)
    return {"acc": float(result["acc,none"]), "stderr": stderr, "n": int(result["sample_len"])}


def _stderr(values: list[float]) -> float | None:
    """The standard error of the mean of `values` (sample standard deviation / sqrt(n))."""
    n = len(values)
    if n < 2:
        return None
    mean = sum(values) / n
    return math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1) / n)


def format_table(results: dict[str, dict[str, Any]]) -> str:
    """{model label: evaluate() result} as a plain-text table: a row per task or subset, a
    column per model with "acc ± stderr" cells, and the number of items scored."""
    names = list(dict.fromkeys(n for r in results.values() for n in r["tasks"]))
    subsets = {sub for sub in names for group in GROUPS if sub in GROUPS[group] and group in names}
    header = ["task", "n", *results]
    lines = [header]
    for name in names:
        cells = [r["tasks"].get(name) for r in results.values()]
        counts = list(dict.fromkeys(str(c["n"]) for c in cells if c))
        label = f"  {name}" if name in subsets else name
        lines.append([label, "/".join(counts), *(_cell(c) for c in cells)])
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    text = [
        "  ".join(
            c.ljust(w) if i == 0 else c.rjust(w)
            for i, (c, w) in enumerate(zip(line, widths, strict=True))
        )
        for line in lines
    ]
    return "\n".join(line.rstrip() for line in text)


def _cell(row: dict[str, Any] | None) -> str:
    if row is None:
        return "-"
    if row["stderr"] is None:
        return f"{row['acc']:.3f}"
    return f"{row['acc']:.3f} ± {row['stderr']:.3f}"


def run_mc(
    models: dict[str, EvalModel],
    tasks: Sequence[str],
    out: Path,
    *,
    limit: int | None = None,
    chat_template: bool | Literal["both"] = False,
    seed: int = 0,
) -> dict[str, dict[str, dict[str, Any]]]:
    """Score each model in each prompt mode (raw text, chat template, or both) into
    out/<label>.<raw|chat>.json; a file already there for the same tasks and limit is read, not
    redone. Models are loaded one at a time, and only when a mode is missing.
    Returns {label: {"raw": result, "chat": result}} with the modes asked for."""
    if chat_template not in MODES:
        raise UserError(f"chat_template {chat_template!r}: choose true, false or both")
    tasks = resolve_tasks(tasks)
    results = {}
    for label, model in models.items():
        if not label or "/" in label or label.startswith("."):
            raise UserError(f"model label {label!r}: must be a plain file name")
        files = {mode: Path(out) / f"{label}.{mode}.json" for mode in MODES[chat_template]}
        done = {mode: _done(path, tasks, limit) for mode, path in files.items()}
        if not all(done.values()):
            _score(model, files, done, tasks, limit, seed)
        results[label] = done
    return results


def _done(path: Path, tasks: list[str], limit: int | None) -> dict[str, Any] | None:
    """The result in `path` if it is complete and for the same tasks and limit."""
    try:
        result = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(result, dict) or "tasks" not in result:
        return None
    if result.get("requested") != tasks or result.get("limit") != limit:
        return None
    return result


def _score(model: EvalModel, files: dict, done: dict, tasks, limit, seed) -> None:
    """Load `model`, score the modes not yet `done` (filling it), write each file, free it."""
    from selfalign.jsonl import write_text_atomic

    lm = make_lm(model)
    try:
        for mode, path in files.items():
            if done[mode] is None:
                result = evaluate(lm, tasks, limit=limit, chat_template=mode == "chat", seed=seed)
                write_text_atomic(path, json.dumps(result, indent=2, ensure_ascii=False) + "\n")
                done[mode] = result
    finally:
        del lm
        _free_memory()


def _free_memory() -> None:
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """lm-eval without its chatter: log records below ERROR dropped (its INFO lines, its note on
    `custom_dataset` kwargs), and its tqdm bars too where selfalign shows no bars."""
    from selfalign.progress import enabled

    logger = logging.getLogger("lm_eval")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        if enabled():
            yield
        else:
            with contextlib.redirect_stderr(_NoBars(sys.stderr)):
                yield
    finally:
        logger.setLevel(level)


class _NoBars(io.TextIOBase):
    """A stderr that passes everything but tqdm's bars on: tqdm draws a bar with writes that
    start with "\\r", and ends it with an empty write and a bare "\\n"."""

    def __init__(self, stream):
        self.stream = stream
        self.in_bar = False

    def writable(self) -> bool:
        return True

    def write(self, text: str) -> int:
        if "\r" in text:
            self.in_bar = True
        elif text and not (self.in_bar and text == "\n"):
            self.stream.write(text)
            self.in_bar = False
        elif text:
            self.in_bar = False
        return len(text)

    def flush(self) -> None:
        self.stream.flush()
