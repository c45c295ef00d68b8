"""Child processes selfalign starts and must not leave behind (a vLLM server, training ranks).

`start(command, **popen)` runs one in its own process group that gets SIGTERM when selfalign
dies, even by SIGKILL (Linux parent-death signal); `stop(process)` ends that whole group, SIGTERM
then SIGKILL; `free_port()` is a free 127.0.0.1 port for it to listen on.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys

STOP_TIMEOUT = 30.0  # seconds between SIGTERM and SIGKILL


def start(command: list[str], **popen) -> subprocess.Popen:
    return subprocess.Popen(
        command,
        start_new_session=True,  # its own process group: stop() reaches what it starts
        preexec_fn=_die_with_parent if sys.platform == "linux" else None,
        **popen,
    )


def stop(process: subprocess.Popen, timeout: float = STOP_TIMEOUT) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _die_with_parent() -> None:
    """In the child, before exec: get SIGTERM when selfalign dies, even by SIGKILL (Linux)."""
    import ctypes

    PR_SET_PDEATHSIG = 1
    ctypes.CDLL(None).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
