"""Read preference rows from wherever users keep them.

Supported: JSON Lines (.jsonl, .ndjson), JSON (.json: a list of rows, an object of columns,
one row object, or JSON Lines under a .json name, which is what `Dataset.to_json` writes),
Parquet, CSV, a folder written by `datasets.Dataset.save_to_disk`, and an in-memory
`datasets.Dataset` / `DatasetDict` (its "train" split) or list of dicts.

Row numbers are 1-based and mean what the user sees: the line in a JSON Lines file, the
spreadsheet row in a CSV (the header is row 1, so the first record is row 2), the index + 1
elsewhere.

The readers know no field names: what a row must hold is the row validators' business
(`formats`, or a family's own). CSV has no types, so its cells stay text, except a cell
holding a JSON array (a conversation of `{role, content}` objects, as `json.dumps(messages)`
writes one, or a list of replies), which is read as that list; the validators read numbers
and true/false from text, and an empty number cell as "not given". The caller may pass
`columns`, a check of a CSV's header that names what is missing, in one line.

Text must be UTF-8. Files are decoded with `surrogateescape` so that one bad byte becomes a
problem of the row holding it (skippable) rather than of the whole file.
"""

from __future__ import annotations

import csv
import json
import sys
from pathlib import Path
from typing import Any, Callable, Iterator

from ..errors import DataError, DpokitError
from .formats import RowProblem, Untyped

SUFFIXES = (".jsonl", ".ndjson", ".json", ".parquet", ".csv")
Columns = Callable[[list[str]], "str | None"]  # a CSV header → the problem with it, or None


def describe(source: Any) -> str:
    return str(source) if isinstance(source, (str, Path)) else f"in-memory {type(source).__name__}"


def read_rows(source: Any, columns: Columns | None = None) -> Iterator[tuple[int, dict]]:
    """`(row_number, row)` pairs; a row that cannot be read raises `DataError`."""
    for number, row in iter_rows(source, columns):
        if isinstance(row, RowProblem):
            raise DataError(describe(source), number, str(row))
        yield number, row


def iter_rows(source: Any, columns: Columns | None = None) -> Iterator[tuple[int, dict | RowProblem]]:
    """Like `read_rows`, but an unreadable row comes back as a `RowProblem` for the caller's policy.

    Problems of the whole source (missing file, unknown format, broken JSON document) raise.
    """
    if source is None or (isinstance(source, str) and not source.strip()):
        raise DpokitError("no data given: set train_data (and eval_data, if used) to a file or folder")
    if not isinstance(source, (str, Path)):
        rows = _read_in_memory(source)
    else:
        rows = _read_path(Path(source), columns)
    for number, row in rows:
        if isinstance(row, dict):
            bad = _undecodable(row)
            if bad:
                row = RowProblem(bad)
        yield number, row


def _read_path(path: Path, columns: Columns | None) -> Iterator[tuple[int, dict | RowProblem]]:
    if not path.exists():
        raise DpokitError(f"{path}: no such file or folder")
    if path.is_dir():
        yield from _read_saved_dataset(path)
        return
    suffix = path.suffix.lower()
    readers = {".jsonl": _read_jsonl, ".ndjson": _read_jsonl, ".json": _read_json,
               ".parquet": _read_parquet, ".csv": _read_csv}
    if suffix not in readers:
        raise DpokitError(f"{path}: unknown data format {suffix or '(no suffix)'!r} "
                          f"(use {', '.join(SUFFIXES)} or a folder written by Dataset.save_to_disk)")
    try:
        yield from _read_csv(path, columns) if suffix == ".csv" else readers[suffix](path)
    except OSError as e:
        raise DpokitError(f"{path}: cannot read file ({e.strerror or e})") from None


def _open_text(path: Path, newline: str | None = None):
    # utf-8-sig: a byte-order mark from a Windows editor is not part of the first key
    return path.open(encoding="utf-8-sig", errors="surrogateescape", newline=newline)


def _undecodable(value: Any, key: str | None = None) -> str | None:
    """A message if some text holds bytes that were not UTF-8 (decoded as lone surrogates)."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as e:
            char = value[e.start]
            what = f"byte 0x{ord(char) - 0xDC00:02x}" if 0xDC80 <= ord(char) <= 0xDCFF else f"character {char!r}"
            where = f" in field {key!r}" if key else ""
            return f"text{where} is not valid UTF-8 ({what} at character {e.start})"
        return None
    if isinstance(value, dict):
        for k, v in value.items():
            bad = _undecodable(v, key or (k if isinstance(k, str) else None))
            if bad:
                return bad
    elif isinstance(value, list):
        for v in value:
            bad = _undecodable(v, key)
            if bad:
                return bad
    return None


def _json_row(text: str) -> dict | RowProblem:
    try:
        row = json.loads(text.rstrip())
    except json.JSONDecodeError as e:
        return RowProblem(f"not valid JSON ({e.msg} at column {e.colno})")
    if not isinstance(row, dict):
        return RowProblem(f"expected a JSON object, got {_json_type(row)}")
    return row


def _json_type(value: Any) -> str:
    names = {dict: "an object", list: "an array", str: "a string", bool: "a boolean", type(None): "null"}
    return names.get(type(value), "a number")


def _read_jsonl(path: Path) -> Iterator[tuple[int, dict | RowProblem]]:
    with _open_text(path) as f:
        for number, line in enumerate(f, start=1):
            if line.strip():
                yield number, _json_row(line)


def _read_json(path: Path) -> Iterator[tuple[int, dict | RowProblem]]:
    with _open_text(path) as f:
        text = f.read()
    if not text.strip():
        return
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        if e.msg == "Extra data" and text.lstrip().startswith("{"):  # JSON Lines named .json
            for number, line in enumerate(text.splitlines(), start=1):
                if line.strip():
                    yield number, _json_row(line)
            return
        raise DataError(str(path), None, f"not valid JSON ({e.msg} at line {e.lineno}, column {e.colno})") from None
    if isinstance(data, dict):
        data = _rows_of_object(path, data)
    if not isinstance(data, list):
        raise DataError(str(path), None, f"expected a list of row objects, got {_json_type(data)}")
    for number, row in enumerate(data, start=1):
        yield number, row if isinstance(row, dict) else RowProblem(f"expected an object, got {_json_type(row)}")


def _is_messages(value: Any) -> bool:
    return isinstance(value, list) and bool(value) and all(isinstance(m, dict) and "role" in m for m in value)


def _rows_of_object(path: Path, data: dict) -> list:
    """One JSON object is a single row, or columns (lists, or pandas' {index: value} maps)."""
    if "chosen" in data and (isinstance(data["chosen"], str) or _is_messages(data["chosen"])):
        return [data]
    columns = {k: list(v.values()) if isinstance(v, dict) else v for k, v in data.items()}
    if not columns or not all(isinstance(v, list) for v in columns.values()):
        raise DataError(str(path), None, "expected a list of row objects, an object of columns, or one row "
                                         f"object with 'chosen' and 'rejected'; got an object with keys {sorted(data)}")
    lengths = {k: len(v) for k, v in columns.items()}
    if len(set(lengths.values())) > 1:
        raise DataError(str(path), None, f"columns have different lengths: {lengths}")
    keys = list(columns)
    return [dict(zip(keys, values)) for values in zip(*columns.values())]


def _read_parquet(path: Path) -> Iterator[tuple[int, dict]]:
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except Exception as e:  # pyarrow raises several types for a damaged or foreign file
        raise DpokitError(f"{path}: cannot read Parquet ({str(e).splitlines()[0]})") from None
    yield from enumerate(table.to_pylist(), start=1)


def _read_csv(path: Path, columns: Columns | None) -> Iterator[tuple[int, dict | RowProblem]]:
    # the default 128 KiB cell limit is smaller than some long dialogues
    csv.field_size_limit(min(sys.maxsize, 2**31 - 1))
    with _open_text(path, newline="") as f:  # the csv module handles line ends itself
        reader = csv.reader(f)
        try:
            header = next(reader, None)
            if header is None:
                return
            problem = columns(header) if columns else None
            if problem:
                raise DataError(str(path), 1, problem)
            for number, cells in enumerate(reader, start=2):
                if not any(c.strip() for c in cells):
                    continue
                if len(cells) != len(header):
                    yield number, RowProblem(f"has {len(cells)} fields, the header has {len(header)}")
                    continue
                yield number, {k: _csv_value(v) for k, v in zip(header, cells)}
        except csv.Error as e:
            raise DataError(str(path), reader.line_num, f"not valid CSV ({e})") from None


def _csv_value(value: str) -> Any:
    """A JSON array of messages, or of replies (an S-DPO group's rejected ones), is that list; the rest text."""
    if value.lstrip().startswith("["):
        try:
            decoded = json.loads(value)
        except json.JSONDecodeError:
            return value
        if _is_messages(decoded) or (decoded and all(isinstance(v, str) or _is_messages(v) for v in decoded)):
            return decoded
    return Untyped(value)


def _read_saved_dataset(path: Path) -> Iterator[tuple[int, dict | RowProblem]]:
    import datasets

    try:
        ds = datasets.load_from_disk(str(path))
    except Exception as e:  # datasets raises FileNotFoundError or its own types
        raise DpokitError(f"{path}: a folder, but not one written by Dataset.save_to_disk "
                          f"({str(e).splitlines()[0]})") from None
    yield from _read_in_memory(ds, str(path))


def _read_in_memory(data: Any, name: str | None = None) -> Iterator[tuple[int, dict | RowProblem]]:
    import datasets

    name = name or describe(data)
    if isinstance(data, (datasets.DatasetDict, datasets.IterableDatasetDict)):
        if "train" not in data:
            raise DpokitError(f"{name}: a DatasetDict with splits {sorted(data)} and no 'train'; pass one split")
        data = data["train"]
    if isinstance(data, (dict, str, bytes)) or not hasattr(data, "__iter__"):
        raise DpokitError(f"{name}: expected a file path, a datasets.Dataset or a list of row dicts, "
                          f"got {type(data).__name__}")
    for number, row in enumerate(data, start=1):
        yield number, row if isinstance(row, dict) else RowProblem(f"expected a mapping, got {type(row).__name__}")
