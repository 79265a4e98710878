"""rows → validated pairs → token ids, with the bad-row policy in one place.

`on_bad_row="error"` stops at the first bad row with its file, row number and problem;
`"skip"` drops bad rows and logs one warning that counts them and names them, grouped by
problem. Problems of the whole source (a missing file, a broken JSON document, a tokenizer
without a chat template) always stop.
"""

from __future__ import annotations

import logging
from typing import Any, Callable

from ..errors import DataError, DpokitError
from .formats import Pair, RowProblem, row_to_pair
from .readers import describe, iter_rows
from .tokenize import Example, tokenize_pair

log = logging.getLogger("dpokit")

POLICIES = ("error", "skip")
SHOWN_PROBLEMS, SHOWN_ROWS = 5, 5  # how much of the skipped rows the warning spells out


def load_pairs(source: Any, on_bad_row: str = "error") -> list[Pair]:
    return _load(source, row_to_pair, on_bad_row)


def load_examples(source: Any, tokenizer, max_length: int | None, max_prompt_length: int | None,
                  on_bad_row: str = "error") -> list[Example]:
    if max_prompt_length is not None and max_prompt_length < 1:
        raise DpokitError(f"max_prompt_length must be >= 1 (or null for no limit), got {max_prompt_length}")
    if max_length is not None and max_length < 2:
        raise DpokitError(f"max_length must be >= 2 (a prompt token and a completion token), got {max_length}")

    def convert(row: dict) -> Example:
        return tokenize_pair(row_to_pair(row), tokenizer, max_length, max_prompt_length)

    return _load(source, convert, on_bad_row)


def _load(source: Any, convert: Callable[[dict], Any], on_bad_row: str) -> list:
    if on_bad_row not in POLICIES:
        raise DpokitError(f"on_bad_row must be 'error' or 'skip', got {on_bad_row!r}")
    name = describe(source)
    out: list = []
    skipped: dict[str, list[int]] = {}  # problem → rows
    for number, row in iter_rows(source):
        try:
            if isinstance(row, RowProblem):
                raise row
            out.append(convert(row))
        except RowProblem as e:
            if on_bad_row == "error":
                raise DataError(name, number, f"{e} (set on_bad_row=skip to drop such rows)") from None
            skipped.setdefault(str(e), []).append(number)
    n_skipped = sum(len(rows) for rows in skipped.values())
    if skipped:
        log.warning("%s: skipped %d bad row(s) of %d: %s", name, n_skipped, n_skipped + len(out), _summary(skipped))
    if not out:
        problem = f"all {n_skipped} rows are bad: {_summary(skipped)}" if skipped else "no rows (it is empty)"
        raise DataError(name, None, problem)
    return out


def _summary(skipped: dict[str, list[int]]) -> str:
    groups = sorted(skipped.items(), key=lambda kv: -len(kv[1]))
    parts = []
    for problem, rows in groups[:SHOWN_PROBLEMS]:
        listed = ", ".join(map(str, rows[:SHOWN_ROWS])) + (", ..." if len(rows) > SHOWN_ROWS else "")
        parts.append(f"{problem} ({len(rows)}: row{'s' if len(rows) > 1 else ''} {listed})")
    if len(groups) > SHOWN_PROBLEMS:
        parts.append(f"and {len(groups) - SHOWN_PROBLEMS} other problem(s)")
    return "; ".join(parts)
