"""Crash-safe JSONL files: the only way stages talk to each other.

- `read_jsonl` reads records; a torn last line (a crash mid-write) is dropped with a warning, a
  malformed line anywhere else is an error naming file:line.
- `JsonlAppender` appends records and flushes per batch; on open it cuts a torn tail so the next
  record starts on a fresh line, and it knows which ids are already present (resume).
- `write_jsonl_atomic` writes a final file through a temp file and a rename.
- `check_unique_ids` is the one check that ids in a set of records are present and unique.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from selfalign.errors import UserError

log = logging.getLogger(__name__)


def _scan(path: Path) -> tuple[list[dict[str, Any]], int]:
    """Parse `path`; return its records and the byte offset where the good data ends."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise UserError(f"{path}: file not found") from None
    except IsADirectoryError:
        raise UserError(f"{path}: is a directory, expected a JSONL file") from None
    records: list[dict[str, Any]] = []
    offset = 0
    for number, raw in enumerate(data.split(b"\n"), start=1):
        end = min(offset + len(raw) + 1, len(data))
        if not raw.strip():
            offset = end
            continue
        try:
            record = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            if end == len(data) and not data.endswith(b"\n"):
                # no newline after it: the writer died mid-line
                log.warning("%s:%d: dropping a torn last line (%d bytes)", path, number, len(raw))
                return records, offset
            raise UserError(f"{path}:{number}: malformed JSON line ({e})") from None
        if not isinstance(record, dict):
            raise UserError(f"{path}:{number}: expected a JSON object, got {type(record).__name__}")
        records.append(record)
        offset = end
    return records, offset


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    """All records of a JSONL file (a torn last line is dropped with a warning)."""
    return _scan(Path(path))[0]


def read_records(path: str | Path) -> list[dict[str, Any]]:
    """Records of a JSONL file, or of a JSON array of objects (a `.json` file, or any file that
    starts with '[': e.g. ShareGPT data such as the original Dromedary identity file)."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UserError(f"{path}: file not found") from None
    if path.suffix != ".json" and not text.lstrip().startswith("["):
        return read_jsonl(path)
    try:
        data = json.loads(text or "[]")
    except json.JSONDecodeError as e:
        raise UserError(f"{path}: not valid JSON (line {e.lineno}: {e.msg})") from None
    if not isinstance(data, list) or not all(isinstance(r, dict) for r in data):
        raise UserError(f"{path}: expected a JSON array of records (or use JSONL)")
    return data


def check_unique_ids(records: Iterable[dict[str, Any]], where: str | Path, hint: str = "") -> None:
    """Every record has an 'id' and no two share one; otherwise a UserError naming `where`, the
    record (counted from 1) and, after a ';', `hint` (what to do about a duplicate)."""
    first: dict[Any, int] = {}
    for n, record in enumerate(records, start=1):
        key = record.get("id")
        if key is None:
            raise UserError(f"{where}: record {n} has no 'id'")
        if key in first:
            advice = f"; {hint}" if hint else ""
            raise UserError(
                f"{where}: record {n}: duplicate id {key!r} (record {first[key]} has it too){advice}"
            )
        first[key] = n


def _dumps(record: dict[str, Any]) -> str:
    return json.dumps(record, ensure_ascii=False)


class JsonlAppender:
    """Append records to a JSONL file, one flush (and fsync) per `write_batch`.

    Opening cuts a torn tail left by a crash, so appended records never merge with it. `ids` holds
    the ids already present, so a restarted job can skip them and never write an id twice.
    """

    def __init__(self, path: str | Path, id_field: str = "id"):
        self.path = Path(path)
        self.id_field = id_field
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if self.path.exists():
            records, good_end = _scan(self.path)
            if good_end < self.path.stat().st_size:
                with open(self.path, "r+b") as f:
                    f.truncate(good_end)
            self.records = records
        else:
            self.records = []
        self._ensure_trailing_newline()
        self.ids = {r.get(id_field) for r in self.records}
        self._file = open(self.path, "a", encoding="utf-8")

    def _ensure_trailing_newline(self) -> None:
        if self.path.exists() and self.path.stat().st_size > 0:
            with open(self.path, "rb") as f:
                f.seek(-1, os.SEEK_END)
                if f.read(1) != b"\n":
                    with open(self.path, "ab") as g:
                        g.write(b"\n")

    def write_batch(self, records: Iterable[dict[str, Any]]) -> int:
        """Append the records whose id is new; return how many were written."""
        lines = []
        for record in records:
            key = record.get(self.id_field)
            if key in self.ids:
                continue
            self.ids.add(key)
            self.records.append(record)
            lines.append(_dumps(record) + "\n")
        if lines:
            self._file.write("".join(lines))
            self._file.flush()
            os.fsync(self._file.fileno())
        return len(lines)

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> JsonlAppender:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def write_text_atomic(path: str | Path, text: str) -> None:
    """Write `text` to `path` through a temp file in the same folder and a rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o666 & ~_umask())  # mkstemp makes 0600; give the mode `open` would
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_jsonl_atomic(path: str | Path, records: Iterable[dict[str, Any]]) -> int:
    """Write all records to `path` atomically; return the count."""
    lines = [_dumps(r) + "\n" for r in records]
    write_text_atomic(path, "".join(lines))
    return len(lines)
