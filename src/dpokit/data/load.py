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
from .formats import Pair, RowProblem, is_unpaired_row, row_to_item, row_to_pair
from .readers import describe, iter_rows
from .tokenize import Example, tokenize_item

log = logging.getLogger("dpokit")

POLICIES = ("error", "skip")
SHOWN_PROBLEMS, SHOWN_ROWS = 5, 5  # how much of the skipped rows the warning spells out


def text_columns(header: list[str]) -> str | None:
    """What a CSV of text rows lacks: chosen and rejected, or (unpaired rows) prompt, completion and label."""
    unpaired = "completion" in header or "label" in header
    missing = [k for k in (("prompt", "completion", "label") if unpaired else ("chosen", "rejected")) if k not in header]
    if not missing:
        return None
    return f"the header has no {' or '.join(map(repr, missing))} column (columns: {', '.join(header)})"


def load_pairs(source: Any, on_bad_row: str = "error") -> list[Pair]:
    return _load(source, row_to_pair, on_bad_row)


def load_examples(source: Any, tokenizer, max_length: int | None, max_prompt_length: int | None,
                  on_bad_row: str = "error") -> list[Example]:
    if max_prompt_length is not None and max_prompt_length < 1:
        raise DpokitError(f"max_prompt_length must be >= 1 (or null for no limit), got {max_prompt_length}")
    if max_length is not None and max_length < 2:
        raise DpokitError(f"max_length must be >= 2 (a prompt token and a completion token), got {max_length}")

    first_unpaired: list[bool] = []  # whether the first good row was unpaired: every row must agree

    def convert(row: dict) -> Example:
        unpaired = is_unpaired_row(row)
        if first_unpaired and unpaired != first_unpaired[0]:
            raise RowProblem("unpaired rows (completion, label) and preference rows (chosen, rejected) are mixed "
                             f"in one file; this row is {'unpaired' if unpaired else 'a preference row'}, the "
                             f"first good row was not")
        example = tokenize_item(row_to_item(row), tokenizer, max_length, max_prompt_length)
        first_unpaired[:] = first_unpaired or [unpaired]
        return example

    examples = _load(source, convert, on_bad_row)
    if any(ex.is_group for ex in examples):
        for ex in examples:  # a plain pair in an S-DPO file is a group of one
            if not ex.is_group:
                ex.rejected_ids = [ex.rejected_ids]
    if examples[0].label is not None:
        _pair_mismatched(examples, describe(source), max_length)
    return examples


def _pair_mismatched(examples: list[Example], name: str, max_length: int | None) -> None:
    """Give each unpaired example a completion from another row, for KTO's KL estimate.

    As TRL rotates completions within a batch — (x_1, y_n), (x_2, y_1), ... — row i takes the
    completion of row i − 1 (cyclically, over the whole file), stepping further back past rows
    with the same prompt, so that the pair is mismatched. Fixed at load time, so the reference
    log-probs of these pairs can be cached like any other.
    """
    n = len(examples)
    if n < 2:
        raise DataError(name, None, "unpaired (KTO) data needs at least 2 rows: each row's KL term is computed with "
                                    "another row's completion")
    same_prompt_everywhere = all(ex.prompt_ids == examples[0].prompt_ids for ex in examples)
    for i, ex in enumerate(examples):
        j = (i - 1) % n
        while not same_prompt_everywhere and examples[j].prompt_ids == ex.prompt_ids:
            j = (j - 1) % n
        room = max_length - len(ex.prompt_ids) if max_length is not None else None
        ex.rejected_ids = examples[j].chosen_ids[:room]


def _load(source: Any, convert: Callable[[dict], Any], on_bad_row: str) -> list:
    if on_bad_row not in POLICIES:
        raise DpokitError(f"on_bad_row must be 'error' or 'skip', got {on_bad_row!r}")
    name = describe(source)
    out: list = []
    skipped: dict[str, list[int]] = {}  # problem → rows
    for number, row in iter_rows(source, text_columns):
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
