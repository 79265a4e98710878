"""Interaction rows → validated examples: a user's history, the item chosen next and the item(s) not chosen.

JSON Lines (or any row source `read_rows` reads): {"user": optional, "history": [item ids, oldest first],
"chosen": item, "rejected": item or [items], "candidates": optional [items] (the slate shown), "weight": optional}.
Item ids are strings or integers in the file and compare as strings. Several rejected items make an S-DPO group
(scored as [B, K] with `rejected_mask`); a single item, a pair.

The vocabulary (`Items`) is `item_catalogue` when given (a text file of one id per line, a RecBole `.item` atomic
file whose `item_id:token` column lists the ids, or a CSV with an `item` column), else every id the training data
names, in order of first appearance. Histories longer than `max_history` keep the most recent items.

A bad row raises DataError naming the file, the row and the problem: an unknown item, an empty history, the chosen
item among the rejected, rejected or candidates that are not lists of ids, the chosen or a rejected item missing
from the candidates, duplicate ids in rejected or candidates.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ...data import read_rows
from ...data.readers import describe
from ...errors import DataError, DpokitError
from .models import PAD, Items


class RowProblem(ValueError):
    """A row's problem, before the file and row are known to say it with."""


@dataclass
class RecExample:
    """A context and its items as indices; the Example protocol's fields."""

    history: tuple[int, ...]  # oldest first, at most max_history
    chosen: int
    rejected: tuple[int, ...]
    candidates: tuple[int, ...] | None = None  # the slate the score is normalised over (score_over: slate)
    weight: float = 1.0
    margin: float = 0.0
    label: bool | None = None
    is_group: bool = False  # `rejected` was a list

    @property
    def n_rejected(self) -> int:
        return len(self.rejected)


# ---------------------------------------------------------------- the vocabulary


def _is_id(value: Any) -> bool:
    return isinstance(value, str) or (isinstance(value, int) and not isinstance(value, bool))


def read_catalogue(path: str) -> Items:
    """Item ids from a text file, a RecBole `.item` file or a CSV with an `item` column."""
    p = Path(path)
    if not p.is_file():
        raise DpokitError(f"item_catalogue: {path}: no such file")
    try:
        text = p.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise DpokitError(f"item_catalogue: {path}: cannot read ({e})") from None
    lines = text.splitlines()
    if p.suffix.lower() == ".item":
        header = lines[0].split("\t") if lines else []
        column = next((i for i, h in enumerate(header) if h.strip().split(":")[0] == "item_id"), None)
        if column is None:
            raise DpokitError(f"item_catalogue: {path}: a RecBole .item file needs an item_id:token column in its "
                              f"header, got {header!r}")
        ids = [line.split("\t")[column].strip() for line in lines[1:] if line.strip()]
    elif p.suffix.lower() == ".csv":
        rows = list(csv.DictReader(lines))
        if not rows or "item" not in rows[0]:
            raise DpokitError(f"item_catalogue: {path}: a CSV catalogue needs an 'item' column")
        ids = [row["item"].strip() for row in rows if (row["item"] or "").strip()]
    else:
        ids = [line.strip() for line in lines if line.strip()]
    if not ids:
        raise DpokitError(f"item_catalogue: {path}: lists no items")
    return Items(ids, f"item_catalogue {path}")


def items_of_data(source: Any) -> Items:
    """Every item id the rows name (history, chosen, rejected, candidates), in order of first appearance; what
    is not an id is left for `load_examples` to report."""
    seen: dict[str, None] = {}
    for _, row in read_rows(source):
        values = []
        for key in ("history", "chosen", "rejected", "candidates"):
            v = row.get(key)
            values += v if isinstance(v, list) else [v]
        for v in values:
            if _is_id(v):
                seen.setdefault(str(v), None)
    if not seen:
        raise DpokitError(f"{describe(source)}: names no items to build the vocabulary from")
    return Items(list(seen), f"the items of the training data {describe(source)}")


# ---------------------------------------------------------------- rows


def _ids(value: Any, field: str, items: Items) -> list[int]:
    if not isinstance(value, list) or not all(_is_id(v) for v in value):
        raise RowProblem(f"field {field!r} must be a list of item ids (strings or integers), got {value!r}")
    return [_index(v, field, items) for v in value]


def _index(value: Any, field: str, items: Items) -> int:
    if not _is_id(value):
        raise RowProblem(f"field {field!r} must be an item id (a string or an integer), got {value!r}")
    i = items.index.get(str(value))
    if i is None:
        raise RowProblem(f"field {field!r}: unknown item {str(value)!r} (not in {items.source})")
    return i


def _weight(value: Any) -> float:
    import math

    if value is None:
        return 1.0
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise RowProblem(f"field 'weight' must be a finite number, got {value!r}")
    return float(value)


def _no_duplicates(ids: list, raw: list, field: str) -> None:
    if len(set(ids)) != len(ids):
        seen = set()
        twice = next(r for i, r in zip(ids, raw) if i in seen or seen.add(i))
        raise RowProblem(f"field {field!r} lists item {str(twice)!r} twice")


def row_to_example(row: dict, items: Items, max_history: int, slate: bool) -> RecExample:
    if "history" not in row:
        raise RowProblem("missing field 'history' (the items before the choice, oldest first)")
    history = _ids(row["history"], "history", items)
    if not history:
        raise RowProblem("field 'history' is empty: a context needs at least one item")
    if "chosen" not in row:
        raise RowProblem("missing field 'chosen'")
    chosen = _index(row["chosen"], "chosen", items)
    raw = row.get("rejected")
    if raw is None:
        raise RowProblem("missing field 'rejected' (an item or a list of items)")
    group = isinstance(raw, list)
    raw_list = raw if group else [raw]
    if group and not raw:
        raise RowProblem("field 'rejected' is an empty list")
    rejected = _ids(raw_list, "rejected", items) if group else [_index(raw, "rejected", items)]
    _no_duplicates(rejected, raw_list, "rejected")
    if chosen in rejected:
        raise RowProblem(f"the chosen item {str(row['chosen'])!r} is also among the rejected")
    candidates = None
    if row.get("candidates") is not None:
        candidates = _ids(row["candidates"], "candidates", items)
        _no_duplicates(candidates, row["candidates"], "candidates")
        slate_set = set(candidates)
        if chosen not in slate_set:
            raise RowProblem(f"the chosen item {str(row['chosen'])!r} is not among the candidates")
        missing = next((r for i, r in zip(rejected, raw_list) if i not in slate_set), None)
        if missing is not None:
            raise RowProblem(f"the rejected item {str(missing)!r} is not among the candidates")
    elif slate:
        raise RowProblem("score_over: slate needs 'candidates' (the slate shown) in every row")
    return RecExample(tuple(history[-max_history:]), chosen, tuple(rejected),
                      tuple(candidates) if slate else None, _weight(row.get("weight")), is_group=group)


def load_examples(source: Any, items: Items, max_history: int = 50, slate: bool = False) -> list[RecExample]:
    """Every row of `source` (a file, a folder `read_rows` reads, or rows in memory); a bad row raises DataError
    naming the file, the row and the problem."""
    name = describe(source)
    out = []
    for number, row in read_rows(source):
        try:
            out.append(row_to_example(row, items, max_history, slate))
        except RowProblem as e:
            raise DataError(name, number, str(e)) from None
    return out


def collate(examples: list[RecExample]) -> dict[str, torch.Tensor]:
    """history [B, L] (left-padded with 0, the most recent item last), chosen [B], rejected [B] (pairs) or [B, K]
    with rejected_mask (groups; empty slots repeat the first rejected item), and for slate scoring candidates
    [B, S] with candidates_mask and the positions of the chosen and rejected items in it."""
    B = len(examples)
    L = max(len(ex.history) for ex in examples)
    history = torch.full((B, L), PAD, dtype=torch.long)
    for i, ex in enumerate(examples):
        history[i, L - len(ex.history):] = torch.tensor(ex.history)
    groups = any(ex.is_group for ex in examples)
    K = max(ex.n_rejected for ex in examples)
    rejected = torch.tensor([list(ex.rejected) + [ex.rejected[0]] * (K - ex.n_rejected) for ex in examples])
    batch = {
        "history": history,
        "chosen": torch.tensor([ex.chosen for ex in examples]),
        "rejected": rejected if groups else rejected[:, 0],
        "weight": torch.tensor([ex.weight for ex in examples], dtype=torch.float32),
        "margin": torch.tensor([ex.margin for ex in examples], dtype=torch.float32),
    }
    if groups:
        batch["rejected_mask"] = torch.tensor([[k < ex.n_rejected for k in range(K)] for ex in examples])
    if examples[0].candidates is not None:
        S = max(len(ex.candidates) for ex in examples)
        candidates = torch.full((B, S), PAD, dtype=torch.long)
        for i, ex in enumerate(examples):
            candidates[i, :len(ex.candidates)] = torch.tensor(ex.candidates)
        where = [{item: s for s, item in enumerate(ex.candidates)} for ex in examples]
        batch["candidates"] = candidates
        batch["candidates_mask"] = candidates != PAD
        batch["chosen_pos"] = torch.tensor([w[ex.chosen] for w, ex in zip(where, examples)])
        pos = torch.tensor([[w[r] for r in ex.rejected] + [w[ex.rejected[0]]] * (K - ex.n_rejected)
                            for w, ex in zip(where, examples)])
        batch["rejected_pos"] = pos if groups else pos[:, 0]
    return batch
