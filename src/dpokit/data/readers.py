"""Read preference rows from wherever users keep them.

Every reader yields `(row_number, dict)` with 1-based row numbers, so a later problem can
be reported as "file, row N". Supported: JSONL, JSON (a list of objects), Parquet, CSV, a
folder written by `datasets.Dataset.save_to_disk`, and an in-memory `datasets.Dataset` or
list of dicts.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any, Iterator

from ..errors import DataError, DpokitError


def describe(source: Any) -> str:
    return str(source) if isinstance(source, (str, Path)) else type(source).__name__


def read_rows(source: Any) -> Iterator[tuple[int, dict]]:
    if not isinstance(source, (str, Path)):
        yield from _read_in_memory(source)
        return
    path = Path(source)
    if not path.exists():
        raise DpokitError(f"{path}: no such file or folder")
    if path.is_dir():
        yield from _read_saved_dataset(path)
        return
    suffix = path.suffix.lower()
    readers = {".jsonl": _read_jsonl, ".json": _read_json, ".parquet": _read_parquet, ".csv": _read_csv}
    if suffix not in readers:
        raise DpokitError(f"{path}: unknown data format {suffix!r} (use .jsonl, .json, .parquet, .csv or a saved datasets folder)")
    try:
        yield from readers[suffix](path)
    except (OSError, UnicodeDecodeError) as e:
        raise DpokitError(f"{path}: cannot read file ({e})") from None


def _read_jsonl(path: Path) -> Iterator[tuple[int, dict]]:
    with path.open(encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(str(path), number, f"not valid JSON ({e.msg} at column {e.colno})") from None
            if not isinstance(row, dict):
                raise DataError(str(path), number, f"expected a JSON object, got {type(row).__name__}")
            yield number, row


def _read_json(path: Path) -> Iterator[tuple[int, dict]]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise DataError(str(path), None, f"not valid JSON ({e.msg} at line {e.lineno})") from None
    if isinstance(data, dict) and all(isinstance(v, list) for v in data.values()):  # column-oriented
        keys = list(data)
        data = [dict(zip(keys, values)) for values in zip(*data.values())]
    if not isinstance(data, list):
        raise DataError(str(path), None, "expected a list of objects (or an object of columns)")
    for number, row in enumerate(data, start=1):
        if not isinstance(row, dict):
            raise DataError(str(path), number, f"expected an object, got {type(row).__name__}")
        yield number, row


def _read_parquet(path: Path) -> Iterator[tuple[int, dict]]:
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except Exception as e:  # pyarrow raises several types for a damaged file
        raise DpokitError(f"{path}: cannot read Parquet ({e})") from None
    for number, row in enumerate(table.to_pylist(), start=1):
        yield number, row


def _read_csv(path: Path) -> Iterator[tuple[int, dict]]:
    with path.open(encoding="utf-8", newline="") as f:
        reader = csv.DictReader(f)
        for number, row in enumerate(reader, start=2):  # row 1 is the header
            yield number, {k: _csv_value(k, v) for k, v in row.items()}


def _csv_value(key: str, value: str | None) -> Any:
    if key in ("weight", "margin") and value not in (None, ""):
        try:
            return float(value)
        except ValueError:
            return value
    return value


def _read_saved_dataset(path: Path) -> Iterator[tuple[int, dict]]:
    import datasets

    try:
        ds = datasets.load_from_disk(str(path))
    except Exception as e:  # datasets raises FileNotFoundError or its own types
        raise DpokitError(f"{path}: not a saved datasets folder ({e})") from None
    if isinstance(ds, datasets.DatasetDict):
        if "train" not in ds:
            raise DpokitError(f"{path}: a DatasetDict without a 'train' split; point at one split's folder")
        ds = ds["train"]
    yield from _read_in_memory(ds)


def _read_in_memory(data: Any) -> Iterator[tuple[int, dict]]:
    for number, row in enumerate(data, start=1):
        if not isinstance(row, dict):
            raise DataError(describe(data), number, f"expected a mapping, got {type(row).__name__}")
        yield number, row
