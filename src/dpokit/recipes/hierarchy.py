"""Instruction-hierarchy pairs → GW-DPO margins (gravity-weighted DPO, Bolliger & Jäger 2026).

Input: preference rows in any layout the loader reads, each with the two conflicting
instruction sources:

    {"prompt": ..., "chosen": ..., "rejected": ...,
     "privileged_level": "system", "conflicting_level": "tool"}

`privileged_level` is the source the chosen reply obeys (the victim an injection tries to
override); `conflicting_level` is the less trusted source the rejected reply obeys. Levels
are 1 (least trusted) … K, or the names data < tool < user < system < platform (1…5). Each
row is written back with `margin` = `gw_margin(...)` (below) under the `linear` or
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
from .common import Built, at_row, raw_rows

# Instruction sources from least to most trusted; level k is HIERARCHY[k - 1].
HIERARCHY = ("data", "tool", "user", "system", "platform")
MAX_GAP = len(HIERARCHY) - 1  # platform over data
GW_SCHEDULES = ("linear", "bilateral")


def hierarchy_level(value, levels: int = len(HIERARCHY)) -> int:
    """A source's trust level, 1 (least) … `levels` (most): an integer, or (with the default five
    levels) a name from HIERARCHY."""
    if isinstance(value, str) and value.strip().lower() in HIERARCHY and levels == len(HIERARCHY):
        return HIERARCHY.index(value.strip().lower()) + 1
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= levels:
        raise ValueError(f"a level must be an integer in 1..{levels} or one of {', '.join(HIERARCHY)}; got {value!r}")
    return value


def gw_margin(privileged, conflicting, schedule: str = "linear", scale: float = 1.0,
              levels: int = len(HIERARCHY)) -> float:
    """Per-pair offset for gravity-weighted DPO (GW-DPO, Bolliger & Jäger 2026, arXiv 2606.10860).

    A pair comes from a conflict between two instruction sources: the chosen reply obeys the
    `privileged` source (the victim an injection tries to override), the rejected reply obeys
    the `conflicting`, less trusted one. The paper scales DPO's per-sample offset with the
    structural distance between the levels, under a linear schedule or a bilateral one that
    also weighs the privilege of the victim level. dpokit's explicit reading, with
    gap = privileged − conflicting ≥ 1 and K = `levels`:

        linear:     m = scale · gap
        bilateral:  m = scale · gap · privileged / K

    so the bilateral offset equals the linear one when the top level is the victim and
    shrinks for humbler victims. m is in reward units, the ODPO offset of the `sigmoid` loss:
    −log σ(β(Δ_w − Δ_l) − m). Not checked against the paper's own equations.
    """
    p, q = hierarchy_level(privileged, levels), hierarchy_level(conflicting, levels)
    if p <= q:
        raise ValueError(f"the privileged level ({p}) must be above the conflicting level ({q})")
    if schedule == "linear":
        return scale * (p - q)
    if schedule == "bilateral":
        return scale * (p - q) * p / levels
    raise ValueError(f"unknown GW-DPO schedule {schedule!r}; known: {', '.join(GW_SCHEDULES)}")


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
