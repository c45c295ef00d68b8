"""Checkpoints of the SFT recipe: which one a rerun resumes from, and what it says about the run.

Reads and moves folders under `out_dir/checkpoints/` (the Trainer's `output_dir`):

    checkpoint-N/                     written by the Trainer every `save_steps` and at the end
    selfalign_fingerprint.txt         the run the checkpoints belong to (written by `sft.train`)
    selfalign_processes.txt           how many processes wrote them, and how they shared the model
                                      ("2 processes (fsdp)"): each process saves its own RNG state
                                      (and its shard of the weights and optimizer under FSDP or
                                      ZeRO-3), so they resume only under the same layout
    incomplete-checkpoint-N-<time>/   a checkpoint that cannot be resumed, set aside (never deleted
                                      here; it goes with checkpoints/ when the run succeeds)

What the Trainer (transformers 5.24, TRL 1.16) writes into checkpoint-N, in this order:
  1. the weights, as `save_model` writes them: adapter_model.safetensors + adapter_config.json
     (LoRA) or model.safetensors / its shards + index (full); tokenizer files, README.md, config
     files beside them; FSDP writes pytorch_model_fsdp* and DeepSpeed global_step* instead
  2. optimizer.pt (FSDP: optimizer*.bin or optimizer_0/; DeepSpeed: inside global_step*)
  3. scheduler.pt, then scaler.pt (fp16 only)
  4. rng_state.pth (rng_state_<rank>.pth with several processes)
  5. trainer_state.json (step, log_history, max_steps), last; then training_args.bin, not needed.
A kill or a full disk anywhere in between leaves a folder the Trainer would refuse ("Can't find a
valid checkpoint") or, worse, resume with a fresh optimizer. So a checkpoint counts only when every
part is present and whole: JSON parses, a safetensors file is as long as its header says, a
torch.save file (a zip) has its central directory and every member inside the file.
"""

from __future__ import annotations

import json
import logging
import re
import struct
import time
import zipfile
from pathlib import Path
from typing import Any

from selfalign.errors import UserError
from selfalign.jsonl import write_text_atomic

log = logging.getLogger(__name__)

FINGERPRINT_FILE = "selfalign_fingerprint.txt"
LAYOUT_FILE = "selfalign_processes.txt"
TRAINER_STATE = "trainer_state.json"
CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")  # the Trainer's own pattern

# Each part a resume needs, with the names (globs) it may have; the first is the usual one.
PARTS = {
    "weights": ("adapter_model.safetensors", "model.safetensors", "model.safetensors.index.json",
                "pytorch_model_fsdp*", "global_step*"),
    "optimizer state": ("optimizer.pt", "optimizer*.bin", "optimizer_0", "global_step*"),
    "scheduler state": ("scheduler.pt",),
    "RNG state": ("rng_state.pth", "rng_state_*.pth"),
}  # fmt: skip
# Files that come with another (PEFT writes the adapter's config after its weights): needed to
# write the model from a final checkpoint, though the Trainer itself resumes without it.
COMPANIONS = {"adapter_model.safetensors": "adapter_config.json"}
# Read when present, so they must be whole too.
OPTIONAL = ("adapter_config.json", "scaler.pt")
# The Trainer's own files (besides rng_state*): not part of the model.
TRAINER_FILES = {"optimizer.pt", "scheduler.pt", "scaler.pt", TRAINER_STATE, "training_args.bin"}


def resume_point(
    checkpoints: Path, run_fingerprint: str, layout: str, move: bool = True
) -> Path | None:
    """The newest complete checkpoint of this run, None for a fresh start; a UserError when the
    checkpoints are another run's, or were written by another number of processes (`layout`, as
    `layout_of` says it). Incomplete newer ones are set aside with a warning naming where they
    went (when `move`: the other processes of a multi-GPU run only skip them)."""
    found = sorted(_checkpoints(checkpoints), key=lambda p: -step_of(p))
    if not found:
        return None
    saved = checkpoints / FINGERPRINT_FILE
    if saved.is_file() and saved.read_text().strip() != run_fingerprint:
        raise UserError(
            f"{checkpoints} holds checkpoints of a run with other settings or data; "
            "delete that folder or set resume: false"
        )
    written = checkpoints / LAYOUT_FILE
    if written.is_file() and (was := written.read_text().strip()) != layout:
        raise UserError(
            f"{checkpoints} was written by {was}, this run has {layout}: resume with the same "
            "processes and distributed settings, or delete that folder (or set resume: false) "
            "to train from the start"
        )
    for folder in found:
        problem = checkpoint_problem(folder)
        if problem is None:
            log.warning("resuming from %s", folder)
            return folder
        if move:
            log.warning("%s is incomplete (%s); set aside as %s (deleted with checkpoints/ once "
                        "this run succeeds, unless keep_checkpoints)", folder, problem,
                        set_aside(folder))  # fmt: skip
    log.warning("no complete checkpoint in %s: training from the start", checkpoints)
    return None


def checkpoint_problem(folder: Path) -> str | None:
    """Why the Trainer cannot resume exactly from `folder` (a checkpoint-N), or None."""
    try:
        state = read_state(folder)
    except FileNotFoundError:
        return f"{TRAINER_STATE} missing"
    except (OSError, ValueError) as e:
        return f"{TRAINER_STATE} unreadable: {e}"
    if state.get("global_step") != step_of(folder):
        return f"{TRAINER_STATE} is of step {state.get('global_step')}, not {step_of(folder)}"
    for part, names in PARTS.items():
        present = [p for name in names for p in sorted(folder.glob(name))]
        if not present:
            return f"{part} missing ({names[0]})"
        for path in present:
            if (damage := _damage(path)) is not None:
                return f"{path.name} {damage}"
    for name, companion in COMPANIONS.items():
        if (folder / name).exists() and not (folder / companion).exists():
            return f"{companion} missing"
    for name in OPTIONAL:
        if (folder / name).exists() and (damage := _damage(folder / name)) is not None:
            return f"{name} {damage}"
    return None


def read_state(folder: Path) -> dict[str, Any]:
    """The Trainer's trainer_state.json of a checkpoint (a ValueError when it is no JSON object)."""
    state = json.loads((folder / TRAINER_STATE).read_text(encoding="utf-8"))
    if not isinstance(state, dict):
        raise ValueError("not a JSON object")
    return state


def model_files(folder: Path) -> list[Path] | None:
    """The files `save_model` wrote into a checkpoint (weights, configs, tokenizer; not the
    Trainer's state); None when the weights are in FSDP's or DeepSpeed's own format."""
    if not any((folder / name).is_file() for name in PARTS["weights"][:3]):
        return None
    return [p for p in sorted(folder.iterdir())
            if p.is_file() and p.name not in TRAINER_FILES and not p.name.startswith("rng_state")]  # fmt: skip


def set_aside(folder: Path) -> Path:
    """Rename `folder` to incomplete-<name>-<time> beside it (a rename: works on a full disk)."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    target = folder.with_name(f"incomplete-{folder.name}-{stamp}")
    n = 1
    while target.exists():
        n += 1
        target = folder.with_name(f"incomplete-{folder.name}-{stamp}-{n}")
    folder.rename(target)
    return target


def write_fingerprint(checkpoints: Path, run_fingerprint: str, layout: str) -> None:
    write_text_atomic(checkpoints / FINGERPRINT_FILE, run_fingerprint + "\n")
    write_text_atomic(checkpoints / LAYOUT_FILE, layout + "\n")


def layout_of(processes: int, distributed: str) -> str:
    """How a run is spread, as the checkpoints record it: '1 process', '2 processes (fsdp)'."""
    return "1 process" if processes == 1 else f"{processes} processes ({distributed})"


def step_of(checkpoint: Path | str | None) -> int:
    return int(CHECKPOINT.match(Path(checkpoint).name).group(1)) if checkpoint else 0


def _checkpoints(checkpoints: Path) -> list[Path]:
    if not checkpoints.is_dir():
        return []
    return [p for p in checkpoints.iterdir() if p.is_dir() and CHECKPOINT.match(p.name)]


# -- is a file whole? ----------------------------------------------------------------------------


def _damage(path: Path) -> str | None:
    """What is wrong with one file (or folder) of a checkpoint, judged by its format; None if whole."""
    try:
        if path.is_dir():
            return None if any(path.iterdir()) else "is an empty folder"
        if path.stat().st_size == 0:
            return "is empty"
        if path.suffix == ".safetensors":
            return _safetensors_damage(path)
        if path.suffix in (".pt", ".pth", ".bin"):
            return _zip_damage(path)
        if path.suffix == ".json":
            return _json_damage(path)
    except OSError as e:
        return f"unreadable ({e.strerror or e})"
    return None


def _safetensors_damage(path: Path) -> str | None:
    """A safetensors file is 8 bytes of header length, the JSON header, then the tensor data whose
    last byte the header names: anything shorter (or longer) was not written to the end."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            return "is truncated"
        (length,) = struct.unpack("<Q", head)
        if 8 + length > size:
            return "is truncated"
        try:
            header = json.loads(f.read(length))
        except (ValueError, UnicodeDecodeError):
            return "has a damaged header"
    ends = [t["data_offsets"][1] for k, t in header.items() if k != "__metadata__"]
    if 8 + length + max(ends, default=0) != size:
        return "is truncated"
    return None


def _zip_damage(path: Path) -> str | None:
    """torch.save writes a zip whose directory comes last: a cut file has none, and no member may
    reach past the end."""
    size = path.stat().st_size
    try:
        with zipfile.ZipFile(path) as archive:
            members = archive.infolist()
    except (zipfile.BadZipFile, ValueError, EOFError):
        return "is truncated or not a torch.save file"
    if not members or any(m.header_offset + m.compress_size > size for m in members):
        return "is truncated"
    return None


def _json_damage(path: Path) -> str | None:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError):
        return "is not valid JSON"
    if path.name.endswith(".index.json"):  # sharded weights: every shard it names, whole
        shards = set((data.get("weight_map") or {}).values()) if isinstance(data, dict) else set()
        if not shards:
            return "names no shards"
        for shard in sorted(shards):
            if not (path.parent / shard).is_file():
                return f"names {shard}, which is missing"
            if (damage := _damage(path.parent / shard)) is not None:
                return f"names {shard}, which {damage}"
    return None
