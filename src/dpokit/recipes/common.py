"""What every recipe shares: reading raw rows with file-and-row errors, checking their fields (text fields
with the loader's own `data.formats.text_field`), and writing the pairs out as standard JSON Lines."""

from __future__ import annotations

import json
import math
from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator

from ..data import RowProblem, read_rows
from ..data.formats import text_field
from ..data.readers import describe
from ..errors import DataError, DpokitError
from ..io import atomic_write



@dataclass
class Built:
    """A recipe's output rows, and counts of what it kept and dropped (for the summary line)."""

    rows: list[dict] = field(default_factory=list)
    counts: Counter = field(default_factory=Counter)

    def summary(self) -> str:
        return ", ".join(f"{k.replace('_', ' ')}: {v}" for k, v in self.counts.items())


def raw_rows(source: Any) -> Iterator[tuple[str, int, dict]]:
    """(source name, row number, row) for every row; an unreadable row stops with its file and row."""
    name = describe(source)
    for number, row in read_rows(source):
        yield name, number, row


@contextmanager
def at_row(name: str, number: int):
    """A RowProblem raised while reading one input row becomes a DataError naming file and row."""
    try:
        yield
    except RowProblem as e:
        raise DataError(name, number, str(e)) from None


def number(row: dict, key: str, where: str = "", default: float | None = None) -> float:
    value = row.get(key, default)
    label = f"{where}field {key!r}"
    if value is None:
        raise RowProblem(f"{where}missing field {key!r}")
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise RowProblem(f"{label} must be a finite number, got {value!r}")
    return float(value)


def items(row: dict, key: str) -> list:
    value = row.get(key)
    if not isinstance(value, list):
        got = type(value).__name__ if value is not None else "nothing"
        raise RowProblem(f"field {key!r} must be a list, got {got}")
    return value


def same_text(a: Any, b: Any) -> bool:
    """Equal up to whitespace: such a pair teaches nothing."""
    if isinstance(a, str) and isinstance(b, str):
        return " ".join(a.split()) == " ".join(b.split())
    return a == b


def write_jsonl(rows: Iterable[dict], path: str | Path, source: Any = None) -> int:
    """Write rows as JSON Lines, all or nothing (`dpokit.io.atomic_write`); returns how many."""
    path = Path(path)
    if isinstance(source, (str, Path)) and Path(source).resolve() == path.resolve():
        raise DpokitError(f"{path}: the output would overwrite the input")
    n = 0
    with atomic_write(path) as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
            n += 1
    return n
