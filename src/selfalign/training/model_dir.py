"""What a trained model directory says about itself: the one reader and the one writer.

Next to the model files of `selfalign.training.sft`, a model directory of stage 3 or stage 4 holds:

    train_stats.json    counts, schedule and loss; base_model, identity, constitution,
                        data_description, fingerprint, versions. Written last: it marks "done".
    train_config.yaml   the TrainConfig that made it
    README.md           the model card (also in adapter/, replacing PEFT's empty template);
                        its `base_model` is the base's hub id, or absent for a local base

Read by stage 3 (already done with the same fingerprint?) and by verbose cloning (the engraved
model's base model, identity and constitution), for a model directory or its adapter/ subfolder.
A damaged train_stats.json is one UserError naming it and what to do, never a traceback.
"""

from __future__ import annotations

import json
import logging
import platform
import shlex
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import ValidationError

from selfalign import __version__
from selfalign.config import dump_config
from selfalign.errors import UserError
from selfalign.jsonl import write_text_atomic
from selfalign.text.constitution import Identity
from selfalign.training.checkpoints import layout_of

if TYPE_CHECKING:
    from selfalign.training.sft import TrainConfig

log = logging.getLogger(__name__)

TRAIN_STATS = "train_stats.json"
PACKAGES = ("torch", "transformers", "trl", "peft", "accelerate", "datasets", "rapidfuzz")


# -- reading -------------------------------------------------------------------------------------


def train_stats(model_dir: str | Path) -> dict[str, Any]:
    """`train_stats.json` of a selfalign-trained model directory (or of its adapter's parent);
    {} for a model selfalign did not train."""
    for folder in (Path(model_dir), Path(model_dir).parent):
        if (folder / TRAIN_STATS).is_file():
            return _read_stats(folder / TRAIN_STATS)
    return {}


def base_of(model_dir: str | Path) -> str | None:
    """The base model a selfalign-trained model directory was fine-tuned from, if it says."""
    return train_stats(model_dir).get("base_model")


def identity_of(model_dir: str | Path) -> Identity | None:
    """The identity a selfalign-trained model directory was trained with, if it says."""
    data = train_stats(model_dir).get("identity")
    return Identity(**data) if data else None


def constitution_of(model_dir: str | Path) -> str | None:
    """The constitution (file path or bundled name) behind a model's training data, if it says."""
    return train_stats(model_dir).get("constitution")


def finished(out_dir: Path, run_fingerprint: str) -> dict[str, Any] | None:
    """The stats of a run already finished in `out_dir` with this fingerprint (marked skipped);
    None when nothing is finished there; a UserError when another run's model is there."""
    path = out_dir / TRAIN_STATS
    if not path.is_file():
        return None
    stats = _read_stats(path)
    if stats.get("fingerprint") != run_fingerprint:
        raise UserError(
            f"{out_dir} already holds a model trained from other settings or data; "
            "choose another output directory or delete it"
        )
    log.warning("%s: already trained with these settings; nothing to do", out_dir)
    return {**stats, "skipped": True}


def _read_stats(path: Path) -> dict[str, Any]:
    """The stats of `path`, checked for the shape the readers above rely on."""
    try:
        stats = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(stats, dict):
            raise ValueError("not a JSON object")
        for key in ("base_model", "constitution", "fingerprint"):
            if not isinstance(stats.get(key, ""), str | None):
                raise ValueError(f"{key!r} is not a string")
        if stats.get("identity") is not None:
            Identity.model_validate(stats["identity"])
    except (ValueError, UnicodeDecodeError) as e:  # JSON and pydantic errors are ValueErrors
        why = _why(e)
        raise UserError(
            f"{path}: damaged ({why}); delete it and train the model again "
            "(rerun the training command, or `selfalign run --force STAGE`)"
        ) from None
    return stats


def _why(error: Exception) -> str:
    if isinstance(error, json.JSONDecodeError):
        return f"not valid JSON: {error}"
    if isinstance(error, ValidationError):
        return "'identity' is not a valid identity"
    return str(error)


# -- writing -------------------------------------------------------------------------------------


def write_metadata(
    out_dir: Path, cfg: TrainConfig, stats: dict[str, Any], sft_path, command: str | None
) -> None:
    """train_config.yaml, the model card and train_stats.json (last: it marks the run done).

    `command` is the way to reproduce shown in the card (default: the `selfalign engrave` line).
    """
    write_text_atomic(out_dir / "train_config.yaml", dump_config(cfg))
    command = command or _reproduce_command(sft_path, out_dir, stats)
    card = model_card(cfg, stats, sft_path, command)
    write_text_atomic(out_dir / "README.md", card)
    if (out_dir / "adapter").is_dir():  # replaces PEFT's empty template card
        write_text_atomic(out_dir / "adapter" / "README.md", card)
    write_text_atomic(out_dir / TRAIN_STATS, json.dumps(stats, indent=2) + "\n")


def versions() -> dict[str, str]:
    """Python and the installed versions of selfalign and the libraries that shape its results."""
    found = {"python": platform.python_version(), "selfalign": __version__}
    for name in PACKAGES:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return found


def _reproduce_command(sft_path, out_dir: Path, stats: dict[str, Any]) -> str:
    identity = stats["identity"]
    parts = [
        "selfalign", "engrave",
        "--config", str(out_dir / "train_config.yaml"),
        "--data", str(sft_path),
        "--out", str(out_dir),
        "--name", identity["name"],
        "--developer", identity["developer"],
        "--knowledge-cutoff", identity["knowledge_cutoff"],
    ]  # fmt: skip
    return shlex.join(parts)


def hub_id(base: str) -> str | None:
    """The hub id (`org/name`) of a base model given as one, or loaded from the Hugging Face cache
    (a path through `models--org--name/snapshots/REV`, itself or where a link leads); None for
    any other local model, whose path a hub would reject as `base_model`."""
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    path = Path(base).expanduser()
    resolved = path.resolve().parts if path.exists() else ()
    for part in (*reversed(path.parts), *reversed(resolved)):
        if part.startswith("models--"):  # the cache's folder name for repo org/name
            return part.removeprefix("models--").replace("--", "/")
    if path.exists():
        return None
    try:
        validate_repo_id(base)
    except HFValidationError:
        return None
    return base


def model_card(cfg: TrainConfig, stats: dict[str, Any], sft_path, command: str) -> str:
    """README.md of the model directory: what it is, what made it, how to remake it."""
    identity = stats["identity"]
    tags = ["selfalign", "self-align", "sft", cfg.method]
    keys = ("examples", "trained", "truncated", "dropped_overlong", "dropped_prompt_too_long",
            "tokens")  # fmt: skip
    data_rows = "\n".join(f"| {key} | {stats[key]} |" for key in keys)
    hub = hub_id(stats["base_model"])
    base = hub or stats["base_model"]
    base_line = f"base_model: {json.dumps(hub)}\n" if hub else ""  # hubs reject local paths
    return (
        "---\n"
        f"{base_line}"
        "library_name: transformers\n"
        f"tags: {json.dumps(tags)}\n"
        "---\n\n"
        f"# {identity['name']}\n\n"
        f"{identity['name']} is an assistant fine-tuned from `{base}` with SELF-ALIGN "
        "(Sun et al., 2023, arXiv 2305.03047) by selfalign "
        f"{__version__}: supervised fine-tuning ({cfg.method}) on "
        f"{stats['data_description']}, trained without the principles in the prompt.\n\n"
        f"- Developer (as the assistant introduces itself): {identity['developer']}\n"
        f"- Knowledge cut-off (as stated): {identity['knowledge_cutoff']}\n"
        f"- Constitution: {stats['constitution']}\n"
        f"- Training data: `{sft_path}`\n\n"
        "## Data\n\n| count | value |\n|---|---|\n"
        f"{data_rows}\n\n"
        f"Cut-off {cfg.max_length} tokens; examples over it were "
        f"{'truncated' if cfg.overlong == 'truncate' else 'dropped'}.\n\n"
        "## Training\n\n"
        f"{stats['steps']} optimizer steps, effective batch {stats['effective_batch_size']} "
        f"(micro batch {stats['micro_batch_size']} x accumulation {stats['gradient_accumulation']} "
        f"x {layout_of(stats['world_size'], stats.get('distributed') or 'ddp')}), warm-up {stats['warmup_steps']} steps, precision "
        f"{stats['precision']}, final training loss {stats['train_loss']}.{_eval_line(stats)}\n\n"
        f"```yaml\n{dump_config(cfg).strip()}\n```\n\n"
        "## Use\n\n"
        "The chat template is in the tokenizer; a conversation without a system message gets the "
        "standard system prompt. Works with transformers, `vllm serve PATH` and any OpenAI chat "
        "client, and `selfalign chat PATH`.\n\n"
        f"{_USAGE}\n"
        "## Reproduce\n\n"
        f"```\n{command}\n```\n"
    )


def _eval_line(stats: dict[str, Any]) -> str:
    """The held-out loss, for a run with an eval split (`eval_fraction`)."""
    if stats.get("eval_loss") is None:
        return ""
    return f" Eval loss {stats['eval_loss']} on {stats['eval_examples']} held-out examples."


_USAGE = (
    "```python\n"
    "from transformers import AutoModelForCausalLM, AutoTokenizer\n"
    "tok = AutoTokenizer.from_pretrained(PATH)\n"
    "model = AutoModelForCausalLM.from_pretrained(PATH)\n"
    'ids = tok.apply_chat_template([{"role": "user", "content": "Hello!"}], '
    'add_generation_prompt=True, return_tensors="pt")\n'
    "print(tok.decode(model.generate(**ids, max_new_tokens=200)[0]))\n"
    "```\n"
)
