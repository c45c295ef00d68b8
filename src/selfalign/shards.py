"""Deterministic slices of a job, for Slurm arrays and torchrun ranks: `--shard i/n` (0-based)."""

from __future__ import annotations

import re
from typing import NamedTuple

from selfalign.errors import UserError


class Shard(NamedTuple):
    index: int
    count: int

    @property
    def tag(self) -> str:
        return "" if self.count == 1 else f".shard{self.index}of{self.count}"

    def share(self, total: int) -> int:
        """This shard's part of `total` (the first shards take the remainder)."""
        return total // self.count + (1 if self.index < total % self.count else 0)


def parse_shard(value: str | Shard | tuple[int, int] | None) -> Shard:
    """`"i/n"` (0-based, as Slurm array ids and torchrun ranks) -> Shard."""
    if value is None:
        return Shard(0, 1)
    if isinstance(value, tuple):
        index, count = value
    else:
        m = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", str(value))
        if not m:
            raise UserError(f"--shard {value!r}: expected I/N, e.g. 0/4 (0-based)")
        index, count = int(m[1]), int(m[2])
    if count < 1 or not 0 <= index < count:
        raise UserError(f"--shard {index}/{count}: need 0 <= I < N")
    return Shard(index, count)
