"""One process per directory.

Reads and writes, in a run directory RUN (or a stage command's out dir):

    RUN/.lock           an exclusive `flock` held while a process works there, holding its PID and
                        host so a refused second process can name it. The kernel drops the lock when
                        the process dies, even by SIGKILL, so a leftover file never blocks anyone.
                        A sharded stage command (`--shard I/N`) locks `.lock.shardIofN` instead
                        (shards of one job share their out dir), and a torchrun rank R > 0
                        `.lock.rankR` (all ranks of one job work in one directory).
    RUN/.reserve        `selfalign run` only: a little disk space set aside while the run works and
                        given back when the disk fills, so the manifest can still record why.

`holder(RUN)` says who holds a run now: a manifest's `running` stage whose run nobody holds was
interrupted (the manifest module asks when it reads one).
"""

from __future__ import annotations

import fcntl
import logging
import os
import socket
import time
from pathlib import Path

from selfalign.errors import UserError

log = logging.getLogger(__name__)

LOCK = ".lock"
RESERVE = ".reserve"
RESERVE_BYTES = 256 * 1024  # a manifest is a few KiB; its atomic rewrite needs room for a copy


# -- the lock --------------------------------------------------------------------------------------


class DirLock:
    """An exclusive lock on `directory` for this process: `with DirLock(d): ...`.

    `acquire` refuses at once (a UserError naming the holder's PID) when another process holds it;
    `reserve=True` also sets disk space aside for `free_reserve`."""

    def __init__(self, directory: str | Path, tag: str = "", reserve: bool = False):
        self.directory = Path(directory)
        self.path = self.directory / f"{LOCK}{tag}{_rank_tag()}"
        self.reserve = self.directory / RESERVE if reserve else None
        self._file = None

    def acquire(self) -> DirLock:
        self.directory.mkdir(parents=True, exist_ok=True)
        # opened without truncating: until we hold the lock, the file names the holder
        file = open(self.path, "a+", encoding="utf-8")  # held until release
        try:
            if _flock(file, fcntl.LOCK_EX, self.path):
                file.seek(0)
                file.truncate()
                file.write(f"{os.getpid()} {socket.gethostname()}\n")
                file.flush()
        except BaseException:
            file.close()
            raise
        self._file = file
        if self.reserve is not None:
            try:
                _fill(self.reserve, RESERVE_BYTES)
            except BaseException:
                self.release()
                raise
        return self

    def free_reserve(self) -> None:
        """Give the reserved space back (the disk is full: what follows must still be written)."""
        if self.reserve is not None:
            self.reserve.unlink(missing_ok=True)

    def release(self) -> None:
        self.free_reserve()
        if self._file is not None:
            # the file stays: removing it would let a process that opened it just before lock
            # a deleted file while a third one locks a new one
            self._file.close()
            self._file = None

    def __enter__(self) -> DirLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()


def _flock(file, mode: int, path: Path) -> bool:
    """Take the lock without waiting; False where the filesystem has no locks (with a warning).
    A `status` peeking at the lock holds it shared for an instant, so a refusal is retried twice."""
    for attempt in range(3):
        try:
            fcntl.flock(file, mode | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            if attempt == 2:
                raise UserError(_busy(path)) from None
            time.sleep(0.05)
        except OSError as e:  # ENOLCK, EOPNOTSUPP: e.g. a network filesystem mounted without locks
            log.warning("%s: no file locks here (%s); nothing stops two runs at once", path, e)
            return False
    raise AssertionError("unreachable")


def _busy(path: Path) -> str:
    who = _describe(path.read_text(encoding="utf-8", errors="replace")) or "another process"
    pid = who.split()[1] if who.startswith("PID ") else "it"
    return (
        f"{path.parent} is in use by {who} ({path.name}); wait for it to finish, or stop it "
        f"(kill {pid}) and rerun: it resumes"
    )


def _describe(text: str) -> str | None:
    """'PID 123' (plus 'on HOST' for another machine) from a lock file's text."""
    pid, _, host = text.strip().partition(" ")
    if not pid.isdigit():
        return None
    return f"PID {pid}" + (f" on {host}" if host and host != socket.gethostname() else "")


def _rank_tag() -> str:
    """Ranks of one torchrun job share the directory: rank 0 takes the plain lock (the one
    `holder` reads), the others one each, so a second job's ranks are all refused."""
    rank = int(os.environ.get("RANK", "0") or 0)
    return f".rank{rank}" if int(os.environ.get("WORLD_SIZE", "1") or 1) > 1 and rank else ""


def _fill(path: Path, size: int) -> None:
    with open(path, "wb") as f:
        f.write(b"\0" * size)
        f.flush()
        os.fsync(f.fileno())


def holder(directory: str | Path) -> str | None:
    """Who holds `directory` now ('PID 123'), or None when nobody does."""
    path = Path(directory) / LOCK
    try:
        file = open(path, encoding="utf-8", errors="replace")
    except OSError:
        return None
    with file:
        try:
            fcntl.flock(file, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return _describe(file.read()) or "another process"
        except OSError:  # no locks on this filesystem: nobody can tell, so assume it is alive
            return "an unknown process"
    return None  # closing the file dropped the shared lock


# The stage commands' locks, open until the process ends (the kernel then drops them) or until
# `release_held` (for `main` run in-process, as the tests do: one command's life).
_HELD: dict[Path, DirLock] = {}


def hold_out_dir(directory: str | Path, shard: object = None) -> None:
    """Lock a stage command's out dir for the rest of the process (one line in each command);
    `shard`: the command's `--shard I/N`, since shards of one job share their out dir."""
    from selfalign.shards import parse_shard

    lock = DirLock(directory, parse_shard(shard).tag)
    key = lock.path.absolute()
    if key not in _HELD:  # this process has it already (a second command run in-process)
        _HELD[key] = lock.acquire()


def release_held() -> None:
    while _HELD:
        _HELD.popitem()[1].release()
