"""Fault injection for `selfalign run` in a subprocess: `python faults.py CONFIG POINT [ARGS...]`.

Installs the scripted model of `pipeline_fakes`, arms one fault (POINT, or `none`), then runs
the real CLI `main` with `run CONFIG ARGS`. The faults:

- `kill:batch:<file>:<n>`   SIGKILL right after the n-th batch appended to a raw file <file>
- `torn:batch:<file>:<n>`   write half of the n-th batch's first line to <file>, then SIGKILL
- `kill:replace:<name>`     SIGKILL when a finished file <name> is about to be renamed into place
                            (its temp file is written, the rename never happens)
- `kill:finish:<stage>`     SIGKILL right after the manifest records <stage> as done
- `kill:save:<name>`        SIGKILL when torch saves a file called <name> (e.g. optimizer.pt: a
                            checkpoint half written)
- `kill:step:<n>:<k>`       SIGKILL when a trainer logs step n for the k-th time (k=1: stage 3,
                            k=2: stage 4's final SFT)
- `int:batch:<file>:<n>`    Ctrl-C (SIGINT to itself) after the n-th batch of <file>
- `enospc:<file>:<n>`       the n-th batch written to <file> fails with "No space left on device"
"""

from __future__ import annotations

import errno
import os
import signal
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))


def _die(sig=signal.SIGKILL) -> None:
    os.kill(os.getpid(), sig)


def _batches(target: str, n: int, action) -> None:
    """Call `action(appender, records)` instead of the n-th write_batch to a file named target."""
    from selfalign import jsonl

    original, seen = jsonl.JsonlAppender.write_batch, {"n": 0}

    def write_batch(self, records):
        records = list(records)
        if Path(self.path).name == target:
            seen["n"] += 1
            if seen["n"] == n:
                return action(self, records, lambda: original(self, records))
        return original(self, records)

    jsonl.JsonlAppender.write_batch = write_batch


def arm(point: str) -> None:
    kind, _, rest = point.partition(":")
    if point == "none":
        return
    if kind in ("kill", "torn", "int") and rest.startswith("batch:"):
        _, target, n = rest.split(":")

        def act(appender, records, write):
            if kind == "torn":
                line = (records[0] if records else {"id": "x"}).__repr__()
                appender._file.write(line[: len(line) // 2])
                appender._file.flush()
                _die()
            write()
            _die(signal.SIGINT if kind == "int" else signal.SIGKILL)

        _batches(target, int(n), act)
    elif kind == "enospc":
        target, n = rest.split(":")

        def full(appender, records, write):
            raise OSError(errno.ENOSPC, "No space left on device", str(appender.path))

        _batches(target, int(n), full)
    elif point.startswith("kill:replace:"):
        name, replace = rest.split(":", 1)[1], os.replace

        def guarded(src, dst, *a, **k):
            if Path(dst).name == name:
                _die()
            return replace(src, dst, *a, **k)

        os.replace = guarded
    elif point.startswith("kill:finish:"):
        from selfalign.run.manifest import Manifest

        stage, finish = rest.split(":", 1)[1], Manifest.finish

        def finish_then_die(self, name, *a, **k):
            finish(self, name, *a, **k)
            if name == stage:
                _die()

        Manifest.finish = finish_then_die
    elif point.startswith("kill:save:"):
        import torch

        name, save = rest.split(":", 1)[1], torch.save

        def save_or_die(obj, f, *a, **k):
            if isinstance(f, str | os.PathLike) and Path(f).name == name:
                Path(f).write_bytes(b"\0" * 16)  # a torn file, as a kill mid-write leaves it
                _die()
            return save(obj, f, *a, **k)

        torch.save = save_or_die
    elif point.startswith("kill:step:"):
        from transformers import Trainer

        step, nth = (int(x) for x in rest.split(":")[1:])
        log, seen = Trainer.log, {"n": 0}

        def log_or_die(self, logs, *a, **k):
            log(self, logs, *a, **k)
            if self.state.global_step == step and "loss" in logs:
                seen["n"] += 1
                if seen["n"] == nth:
                    _die()

        Trainer.log = log_or_die
    else:
        raise SystemExit(f"unknown fault {point!r}")


if __name__ == "__main__":
    import pipeline_fakes

    config, point, *args = sys.argv[1:]
    pipeline_fakes.install()
    arm(point)
    from selfalign.cli import main

    sys.argv = ["selfalign", "run", config, "--quiet", *args]
    main()
