"""`selfalign ARGS` run in-process for tests: the real `main`, its exit code and its output."""

from __future__ import annotations

import io
import sys
from typing import NamedTuple


class Result(NamedTuple):
    code: int
    out: str
    err: str


def run_main(monkeypatch, capsys, *args: str, stdin: str = "") -> Result:
    """Exit code 0 when `main` returns; a user error exits 2 with one line on stderr."""
    from selfalign.cli import main

    monkeypatch.setattr(sys, "argv", ["selfalign", *args])
    monkeypatch.setattr(sys, "stdin", io.StringIO(stdin))
    try:
        main()
        code = 0
    except SystemExit as e:
        code = e.code or 0
    captured = capsys.readouterr()
    return Result(code, captured.out, captured.err)


def run_cli(monkeypatch, capsys, *args: str) -> tuple[int, str]:
    """(exit code, stdout + stderr)."""
    code, out, err = run_main(monkeypatch, capsys, *args)
    return code, out + err
