"""Progress bars that stay out of the way: rich bars on a terminal, nothing when quiet.

`SELFALIGN_PROGRESS=0` (or a non-terminal stderr) turns the bars off, for cluster logs.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager


class _Bar:
    def __init__(self, progress, task):
        self._progress, self._task = progress, task

    @property
    def active(self) -> bool:
        return self._progress is not None

    def advance(self, n: int = 1, status: str = "") -> None:
        if self._progress is not None:
            self._progress.update(self._task, advance=n, status=status)


def enabled() -> bool:
    setting = os.environ.get("SELFALIGN_PROGRESS")
    if setting is not None:
        return setting not in ("0", "false", "no")
    return sys.stderr.isatty()


@contextmanager
def progress_bar(label: str, total: int) -> Iterator[_Bar]:
    if not enabled():
        yield _Bar(None, None)
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TextColumn("{task.fields[status]}"),
    )
    with Progress(*columns, transient=False) as progress:
        yield _Bar(progress, progress.add_task(label, total=total, status=""))
