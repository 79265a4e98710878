"""Ratings → pairs, UltraFeedback-style: several replies to a prompt, each with a scalar rating.

Input: one row per prompt,

    {"prompt": "...", "responses": [{"text": "...", "rating": 4.5}, ...]}

The chosen reply is the best rated (a tie at the top is broken at random); the rejected is a
random reply rated at least `min_gap` lower (`rejected="random"`, as in the binarized
UltraFeedback that Zephyr used) or the worst rated (`rejected="worst"`). A prompt with no
reply far enough below the best yields nothing. With `margin_scale` s, each pair gets
margin = s · (rating chosen − rating rejected). Randomness is seeded by `seed` and the
prompt, so a row's pair does not depend on the rows around it or their order. Output rows: prompt, chosen, rejected,
rating_chosen, rating_rejected[, margin].
"""

from __future__ import annotations

import json
import random
from typing import Any

from ..data import RowProblem
from ..data.formats import text_field
from ..errors import DpokitError
from .common import Built, at_row, items, number, raw_rows, same_text

NAME = "ratings"
HELP = "prompts with several rated replies (UltraFeedback-style) → best vs a lower-rated reply"
CHOICES = ("random", "worst")


def ratings_to_pairs(source: Any, rejected: str = "random", min_gap: float = 1e-9, margin_scale: float | None = None,
                     seed: int = 0) -> Built:
    if rejected not in CHOICES:
        raise DpokitError(f"rejected must be one of {', '.join(CHOICES)}, got {rejected!r}")
    if min_gap <= 0:
        raise DpokitError(f"min_gap must be > 0 (an equal rating is no preference), got {min_gap}")
    out = Built()
    for name, n, row in raw_rows(source):
        with at_row(name, n):
            prompt = text_field(row, "prompt")
            rated = []
            for k, r in enumerate(items(row, "responses")):
                if not isinstance(r, dict):
                    raise RowProblem(f"response {k}: expected an object, got {type(r).__name__}")
                rated.append((text_field(r, "text", where=f"response {k}: "), number(r, "rating", f"response {k}: ")))
        out.counts["prompts"] += 1
        rng = random.Random(f"{seed}:{json.dumps(prompt, sort_keys=True)}")
        top = max(score for _, score in rated) if rated else None
        chosen = rng.choice([r for r in rated if r[1] == top]) if rated else None
        lower = [r for r in rated if chosen and r[1] <= top - min_gap and not same_text(r[0], chosen[0])]
        if not lower:
            out.counts["no_lower_reply"] += 1
            continue
        if rejected == "random":
            loser = rng.choice(lower)
        else:
            worst = min(score for _, score in lower)
            loser = rng.choice([r for r in lower if r[1] == worst])
        pair = {"prompt": prompt, "chosen": chosen[0], "rejected": loser[0], "rating_chosen": chosen[1],
                "rating_rejected": loser[1]}
        if margin_scale is not None:
            pair["margin"] = margin_scale * (chosen[1] - loser[1])
        out.rows.append(pair)
        out.counts["pairs"] += 1
    return out


def add_arguments(p) -> None:
    p.add_argument("--rejected", choices=CHOICES, default="random",
                   help="a random lower-rated reply (default) or the worst one")
    p.add_argument("--min-gap", type=float, default=1e-9, help="the rejected reply is rated at least this much lower")
    p.add_argument("--margin-scale", type=float, default=None, help="write margin = scale * rating gap")
    p.add_argument("--seed", type=int, default=0)


def build(args) -> Built:
    return ratings_to_pairs(args.input, args.rejected, args.min_gap, args.margin_scale, args.seed)
