"""The one line a process leaves when it stops, and the traceback behind it.

`failure_reason(error)` is what the manifest records and the user reads: "interrupted", a full disk
naming the file being written and the space left there, or the error's first line.
`log_failure` writes the full traceback of an unexpected error to RUN/logs/TIME.log (else a temp
file), so the terminal gets one line and the log the rest.
"""

from __future__ import annotations

import errno
import os
import shutil
import sys
import tempfile
import time
import traceback
from pathlib import Path

from selfalign.errors import UserError

DISK_FULL = (errno.ENOSPC, errno.EDQUOT)


def disk_full(error: BaseException) -> OSError | None:
    """The 'no space' (or quota) OSError behind `error`, itself or one it was raised from."""
    seen: set[int] = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, OSError) and current.errno in DISK_FULL:
            return current
        context = None if current.__suppress_context__ else current.__context__
        current = current.__cause__ or context
    return None


def failure_reason(error: BaseException) -> str:
    """Why a command stopped, in one line: 'interrupted' (Ctrl-C), the user error, the disk
    that filled (the file and the space left there), or the exception's type and first line.
    The first answer sticks to the error: the space left is as it was when the write failed, not
    after the run gave its reserve back."""
    if (said := getattr(error, "selfalign_reason", None)) is not None:
        return said
    if isinstance(error, KeyboardInterrupt):
        reason = "interrupted"
    elif isinstance(error, UserError):
        reason = _first_line(str(error), error)
    elif (full := disk_full(error)) is not None:
        reason = _disk_full_line(full)
    else:
        reason = _first_line(f"{type(error).__name__}: {error}", error)
    error.selfalign_reason = reason
    return reason


def _first_line(text: str, error: BaseException) -> str:
    return text.strip().splitlines()[0] if text.strip() else type(error).__name__


def unexpected(error: BaseException) -> bool:
    """A bug or a crash, not something the one line explains: its traceback goes to a log."""
    return not isinstance(error, UserError | KeyboardInterrupt) and disk_full(error) is None


def _disk_full_line(error: OSError) -> str:
    path = _written_path(error)
    where = Path(path) if path else Path.cwd()
    while not where.exists() and where != where.parent:
        where = where.parent
    try:
        free = f"{_size(shutil.disk_usage(where).free)} free there"
    except OSError:
        free = "free space unknown"
    return (
        f"{error.strerror or os.strerror(error.errno)} while writing {path or 'a file'} ({free}); "
        "free some space, then rerun to resume"
    )


def _written_path(error: OSError) -> str | None:
    """The file being written. An OSError from write() or fsync() carries no name, so look for
    it where it was raised: the innermost frame with a `path` (or `self.path`) names it."""
    if error.filename:
        return os.fsdecode(error.filename)
    for frame, _ in reversed(list(traceback.walk_tb(error.__traceback__))):
        local = frame.f_locals
        for value in (local.get("path"), getattr(local.get("self"), "path", None)):
            if isinstance(value, str | os.PathLike):
                return os.fspath(value)
    return None


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def log_failure(error: BaseException, run: str | Path | None = None) -> Path | None:
    """Write the full traceback to RUN/logs/TIME.log (a temp file without a run) and remember the
    path on the error, so the command's last line can name it; None if it cannot be written."""
    from selfalign import __version__

    text = f"selfalign {__version__}: {' '.join(sys.argv)}\n\n" + "".join(
        traceback.format_exception(error)
    )
    try:
        if run is None:
            fd, name = tempfile.mkstemp(prefix="selfalign-", suffix=".log")
            path = Path(name)
            os.close(fd)
        else:
            path = Path(run) / "logs" / time.strftime("%Y%m%d-%H%M%S.log")
            path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
    except OSError:
        return None
    error.selfalign_log = path
    return path


def logged(error: BaseException) -> Path | None:
    """Where `log_failure` wrote this error's traceback, if it did."""
    return getattr(error, "selfalign_log", None)
