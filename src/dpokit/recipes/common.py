"""What every recipe shares: reading raw rows with file-and-row errors, checking their fields,
and writing the pairs out as standard JSON Lines."""

from __future__ import annotations

import json
import math
import os
from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator

from ..data import RowProblem, read_rows
from ..data.readers import describe
from ..errors import DataError, DpokitError


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


def text(row: dict, key: str, where: str = "") -> str | list:
    """A non-empty string (or message list) field."""
    value = row.get(key)
    label = f"{where}field {key!r}"
    if value is None:
        raise RowProblem(f"{where}missing field {key!r}")
    if isinstance(value, str):
        if not value.strip():
            raise RowProblem(f"{label} is empty")
        return value
    if isinstance(value, list) and value and all(isinstance(m, dict) for m in value):
        return value
    raise RowProblem(f"{label} must be a string or a list of messages, got {type(value).__name__}")


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
    """Write rows as JSON Lines, all or nothing (a temporary file renamed into place)."""
    path = Path(path)
    if isinstance(source, (str, Path)) and Path(source).resolve() == path.resolve():
        raise DpokitError(f"{path}: the output would overwrite the input")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    n = 0
    try:
        with tmp.open("w", encoding="utf-8") as f:
            for row in rows:
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
                n += 1
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return n
