"""Instruction-hierarchy pairs → GW-DPO margins (gravity-weighted DPO, Bolliger & Jäger 2026).

Input: preference rows in any layout the loader reads, each with the two conflicting
instruction sources:

    {"prompt": ..., "chosen": ..., "rejected": ...,
     "privileged_level": "system", "conflicting_level": "tool"}

`privileged_level` is the source the chosen reply obeys (the victim an injection tries to
override); `conflicting_level` is the less trusted source the rejected reply obeys. Levels
are 1 (least trusted) … K, or the names data < tool < user < system < platform (1…5). Each
row is written back with `margin` = `dpokit.objectives.gw_margin(...)` under the `linear` or
`bilateral` schedule (see there for the formulas); train it with the `sigmoid` loss, whose
margin is the ODPO offset. A row that already has a margin is an error.

A row whose two levels are equal has no privilege gap — a benign prompt (one source, or sources
that agree), or a conflict within one level — and gets margin 0 under either schedule (both
formulas are proportional to the gap), so such rows train as plain DPO next to the GW-DPO ones.
"""

from __future__ import annotations

from typing import Any

from ..data import RowProblem
from ..errors import DpokitError
from ..objectives import GW_SCHEDULES, HIERARCHY, gw_margin, hierarchy_level
from .common import Built, at_row, raw_rows

NAME = "hierarchy"
HELP = "rows with privileged_level / conflicting_level → GW-DPO margins (linear or bilateral schedule)"


def hierarchy_margins(source: Any, schedule: str = "bilateral", scale: float = 1.0,
                      levels: int = len(HIERARCHY)) -> Built:
    if schedule not in GW_SCHEDULES:
        raise DpokitError(f"schedule must be one of {', '.join(GW_SCHEDULES)}, got {schedule!r}")
    if levels < 2:
        raise DpokitError(f"levels must be >= 2, got {levels}")
    out = Built()
    for name, n, row in raw_rows(source):
        with at_row(name, n):
            if row.get("margin") is not None:
                raise RowProblem("the row already has a 'margin'; GW-DPO would overwrite it")
            for key in ("privileged_level", "conflicting_level"):
                if row.get(key) is None:
                    raise RowProblem(f"missing field {key!r}")
            try:
                same = hierarchy_level(row["privileged_level"], levels) == hierarchy_level(row["conflicting_level"],
                                                                                            levels)
                margin = 0.0 if same else gw_margin(row["privileged_level"], row["conflicting_level"], schedule,
                                                    scale, levels)
            except ValueError as e:
                raise RowProblem(str(e)) from None
        out.rows.append({**row, "margin": margin})
        out.counts["pairs"] += 1
        if same:
            out.counts["no_gap"] += 1
    return out


def add_arguments(p) -> None:
    p.add_argument("--schedule", choices=GW_SCHEDULES, default="bilateral")
    p.add_argument("--scale", type=float, default=1.0, help="offset per level of privilege gap, in reward units")
    p.add_argument("--levels", type=int, default=len(HIERARCHY), help="number of trust levels K")


def build(args) -> Built:
    return hierarchy_margins(args.input, args.schedule, args.scale, args.levels)
