"""Several training processes: a run with `processes` > 1 is handed to `accelerate launch`.

`run_engrave` calls `train_launched` instead of training in its own process when the config asks
for more than one process and this process is not already one of a launched job. That starts

    python -m accelerate.commands.launch --num_processes N ... -m selfalign.training.launch JOB

as a subprocess (real processes: DDP over NCCL on GPUs, gloo on CPU; FSDP or DeepSpeed from the
config files shipped in `selfalign/configs/accelerate/`), lets its output through as it comes
(the progress bar and log lines of rank 0, the warnings of every rank), waits for it, and
returns what rank 0 wrote into the model directory. Reads and writes, in the model directory OUT:

    OUT/.launch/job.json          what the processes train: config, data, identity, card fields
    OUT/.launch/rank<R>.error     a failed rank's one-line reason (written by that rank)

Everything else in OUT is written as one process writes it (rank 0 only: `model_dir`).
A failure in any rank fails the run with the first failed rank's reason; the subprocess dies with
this one, even when this one is SIGKILLed (Linux parent-death signal).
"""

from __future__ import annotations

import codecs
import collections
import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

from selfalign import children
from selfalign.errors import UserError
from selfalign.text.constitution import Identity

log = logging.getLogger(__name__)

LAUNCH_DIR = ".launch"
JOB = "job.json"
ACCELERATE_CONFIGS = Path(__file__).resolve().parent.parent / "configs" / "accelerate"
SHIPPED = {"fsdp": "fsdp.yaml", "deepspeed": "deepspeed_zero3.yaml"}


def launched() -> bool:
    """True in a process that a launcher started as one of several (torchrun sets these)."""
    return "LOCAL_RANK" in os.environ and int(os.environ.get("WORLD_SIZE", "1") or 1) > 1


def processes(cfg) -> int:
    """How many training processes `cfg.processes` asks for: `auto` = every visible GPU (1 on a
    machine without one); a number above the GPUs present is refused on a GPU machine (on CPU
    any number runs, over gloo)."""
    import torch

    gpus = torch.cuda.device_count() if cfg.device != "cpu" else 0
    n = max(1, gpus) if cfg.processes == "auto" else cfg.processes
    if gpus and n > gpus:
        raise UserError(
            f"processes: {n} asks for more training processes than the {gpus} visible GPUs; set "
            "processes: auto (one per GPU) or a number up to that"
        )
    if n > 1 and not gpus and cfg.distributed != "ddp":
        # accelerate applies FSDP and DeepSpeed to GPUs only (on CPU it would quietly run DDP)
        raise UserError(
            f"distributed: {cfg.distributed} needs GPUs (none here); on CPU several processes "
            "train with distributed: ddp"
        )
    return n


def launch_command(cfg, n: int, job: Path) -> list[str]:
    """The `accelerate launch` command line that trains `job` with `n` processes."""
    from selfalign.training.sft import device_and_precision

    command = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", str(n),
               "--num_machines", "1", "--main_process_port", str(children.free_port())]  # fmt: skip
    config = _accelerate_config(cfg)
    if config is not None:
        command += ["--config_file", str(config)]
    elif cfg.distributed == "fsdp":
        command += ["--use_fsdp"]
    elif cfg.distributed == "deepspeed":
        command += ["--use_deepspeed"]
    elif n > 1:
        # torchrun's launcher (accelerate's `--cpu` would start one process): without CUDA the
        # Trainer (use_cpu) joins the processes over gloo. (accelerate refuses it for one process.)
        command += ["--multi_gpu"]
    _, precision = device_and_precision(cfg)
    command += ["--mixed_precision", {"fp32": "no"}.get(precision, precision)]
    command += ["--dynamo_backend", "no"]  # unset, accelerate warns that it chose it
    return [*command, "-m", "selfalign.training.launch", str(job)]


def _accelerate_config(cfg) -> Path | None:
    """The accelerate config file for `cfg.distributed` (yours, `accelerate_config`, first)."""
    if cfg.accelerate_config:
        path = Path(cfg.accelerate_config).expanduser()
        if not path.is_file():
            raise UserError(f"accelerate_config: {path}: file not found")
        return path
    if cfg.distributed == "deepspeed":
        import importlib.util

        if importlib.util.find_spec("deepspeed") is None:
            raise UserError(
                "distributed: deepspeed needs DeepSpeed: pip install 'selfalign[deepspeed]' "
                "(or use distributed: fsdp, which needs nothing more)"
            )
    name = SHIPPED.get(cfg.distributed)
    return ACCELERATE_CONFIGS / name if name else None


def make_job(
    cfg,
    sft_path,
    out_dir,
    identity: Identity,
    constitution: str | None = None,
    command: str | None = None,
    data_description: str = "",
) -> dict[str, Any]:
    """The arguments of `run_engrave`, as `job.json` carries them to every process (`main`)."""
    return {"config": cfg.model_dump(), "sft_path": str(Path(sft_path).resolve()),
            "out_dir": str(Path(out_dir).resolve()), "identity": identity.model_dump(),
            "constitution": constitution, "command": command,
            "data_description": data_description}  # fmt: skip


def train_launched(cfg, n: int, job: dict[str, Any], out_dir: Path) -> None:
    """Train `job` (`make_job`) in `n` processes; return when rank 0 has
    written the model directory; a UserError naming the first failed rank otherwise."""
    folder = out_dir / LAUNCH_DIR
    shutil.rmtree(folder, ignore_errors=True)  # a failed attempt's error files
    folder.mkdir(parents=True)
    (folder / JOB).write_text(json.dumps(job, indent=2, default=str), encoding="utf-8")
    command = launch_command(cfg, n, folder / JOB)
    log.warning("training with %d processes (%s): %s", n, cfg.distributed, " ".join(command))
    tail = _run_streaming(command, {**os.environ, "PYTHONUNBUFFERED": "1"})
    if tail is None:
        shutil.rmtree(folder, ignore_errors=True)
        return
    raise UserError(_failure(folder, n, tail))


def _run_streaming(command: list[str], env: dict[str, str]) -> collections.deque | None:
    """Run `command`, copying its output to our stderr as it comes; None when it succeeded,
    else its last lines. Ctrl-C or an error here stops its whole process group."""
    tail: collections.deque[str] = collections.deque(maxlen=20)
    process = children.start(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env)
    try:
        line, text = b"", codecs.getincrementaldecoder("utf-8")(errors="replace")
        for chunk in iter(lambda: process.stdout.read1(65536), b""):
            sys.stderr.write(text.decode(chunk))  # as it comes: bars redraw in place
            sys.stderr.flush()
            for part in (line + chunk).splitlines(keepends=True):
                if part.endswith((b"\n", b"\r")):
                    tail.append(part.decode(errors="replace").strip())
                    line = b""
                else:
                    line = part
        code = process.wait()
    except BaseException:
        children.stop(process)
        raise
    return None if code == 0 else tail


def _failure(folder: Path, n: int, tail: collections.deque) -> str:
    """The first failed rank's reason (ranks stopped because another failed come later), else
    the last line the launcher printed."""
    errors = sorted(folder.glob("rank*.error"), key=lambda p: p.stat().st_mtime_ns)
    if errors:
        rank = errors[0].stem.removeprefix("rank")
        reason = errors[0].read_text(encoding="utf-8").strip()
        return f"training process {rank} of {n} failed: {reason}"
    last = next((line for line in reversed(tail) if line), "no output")
    return f"the {n} training processes failed before training started: {last}"


# -- in each launched process ---------------------------------------------------------------------


def main(job_path: str) -> int:
    """One rank of a launched run: train the job as `run_engrave` would in one process."""
    from selfalign.cli import _quiet_libraries
    from selfalign.run.failures import failure_reason, log_failure
    from selfalign.stages.stage3_engrave import run_engrave
    from selfalign.training.sft import TrainConfig

    _quiet_libraries()
    rank = int(os.environ.get("RANK", "0"))
    if rank:  # one progress bar and one set of info lines: rank 0's
        logging.getLogger().setLevel(logging.ERROR)
    job = json.loads(Path(job_path).read_text(encoding="utf-8"))
    try:
        run_engrave(
            TrainConfig.model_validate(job["config"]), job["sft_path"], job["out_dir"],
            Identity.model_validate(job["identity"]), constitution=job["constitution"],
            command=job["command"], data_description=job["data_description"],
        )  # fmt: skip
    except BaseException as e:
        reason = failure_reason(e)
        if not isinstance(e, UserError | KeyboardInterrupt) and (where := log_failure(e)):
            reason += f" (traceback in {where})"
        error_file = Path(job_path).parent / f"rank{rank}.error"
        error_file.write_text(reason + "\n", encoding="utf-8")
        print(f"error: rank {rank}: {reason}", file=sys.stderr)
        return 130 if isinstance(e, KeyboardInterrupt) else 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
