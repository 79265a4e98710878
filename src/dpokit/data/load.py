"""rows → validated pairs → token ids, with the bad-row policy in one place."""

from __future__ import annotations

import logging
from typing import Any, Callable

from ..errors import DataError
from .formats import Pair, RowProblem, row_to_pair
from .readers import describe, read_rows
from .tokenize import Example, tokenize_pair

log = logging.getLogger("dpokit")


def load_pairs(source: Any, on_bad_row: str = "error") -> list[Pair]:
    return _load(source, row_to_pair, on_bad_row)


def load_examples(source: Any, tokenizer, max_length: int | None, max_prompt_length: int | None,
                  on_bad_row: str = "error") -> list[Example]:
    def convert(row: dict) -> Example:
        return tokenize_pair(row_to_pair(row), tokenizer, max_length, max_prompt_length)

    return _load(source, convert, on_bad_row)


def _load(source: Any, convert: Callable[[dict], Any], on_bad_row: str) -> list:
    name = describe(source)
    out, skipped, first = [], 0, None
    for number, row in read_rows(source):
        try:
            out.append(convert(row))
        except RowProblem as e:
            if on_bad_row == "error":
                raise DataError(name, number, f"{e} (set on_bad_row=skip to drop such rows)") from None
            skipped += 1
            first = first or f"row {number}: {e}"
    if skipped:
        log.warning("%s: skipped %d bad row(s) of %d; first: %s", name, skipped, skipped + len(out), first)
    if not out:
        raise DataError(name, None, "no usable rows")
    return out
