"""Votes → pairs: threads whose replies carry community scores (Reddit-style up minus down
votes), paired the way SHP (Ethayarajh et al. 2022) pairs them.

Input: one row per thread,

    {"post_id": "abc", "prompt": "the post",
     "replies": [{"text": "...", "score": 12, "created_utc": 1700000000}, ...]}

`post_id` is optional (it is copied to the output, so a train/test split can keep a thread's
pairs together). `prompt` and each reply's `text` are strings; `score` and `created_utc` are
numbers (any time unit, only their order matters).

Two replies A and B of a thread make the pair (chosen A, rejected B) only when

- both scores are at least `min_score` (default 1; it must be positive for a ratio to mean
  something);
- score(A) / score(B) ≥ `min_ratio` (SHP uses 2): a clear preference, not noise;
- A was not written before B. An early reply is seen by more readers and collects votes for
  that alone; a later reply that still outscores it is preferred on its merits.

A thread with many replies yields many pairs; `max_pairs_per_post` keeps the ones with the
largest score ratios. With `margin_scale` s, each pair gets margin = s · ln(score A / score B).
Output rows: prompt, chosen, rejected, post_id, score_chosen, score_rejected[, margin].
"""

from __future__ import annotations

import math
from typing import Any

from ..data import RowProblem
from ..data.formats import text_field
from ..errors import DpokitError
from .common import Built, at_row, items, number, raw_rows, same_text

NAME = "votes"
HELP = "threads with scored replies (Reddit-style votes, as in SHP) → pairs"


def votes_to_pairs(source: Any, min_ratio: float = 2.0, min_score: float = 1.0, ignore_time: bool = False,
                   max_pairs_per_post: int | None = None, margin_scale: float | None = None) -> Built:
    if min_ratio < 1:
        raise DpokitError(f"min_ratio must be >= 1, got {min_ratio}")
    if min_score <= 0:
        raise DpokitError(f"min_score must be > 0 (scores are compared by ratio), got {min_score}")
    out = Built()
    for name, n, row in raw_rows(source):
        with at_row(name, n):
            prompt = text_field(row, "prompt")
            replies = []
            for k, reply in enumerate(items(row, "replies")):
                where = f"reply {k}: "
                if not isinstance(reply, dict):
                    raise RowProblem(f"{where}expected an object, got {type(reply).__name__}")
                created = None if ignore_time else number(reply, "created_utc", where)
                replies.append((text_field(reply, "text", where=where), number(reply, "score", where), created))
        out.counts["threads"] += 1
        out.counts["replies"] += len(replies)
        kept = []
        for a in range(len(replies)):
            for b in range(a + 1, len(replies)):
                hi, lo = (a, b) if replies[a][1] >= replies[b][1] else (b, a)
                (t_hi, s_hi, c_hi), (t_lo, s_lo, c_lo) = replies[hi], replies[lo]
                if s_lo < min_score:
                    out.counts["below_min_score"] += 1
                elif s_hi == s_lo or s_hi < min_ratio * s_lo:
                    out.counts["below_ratio"] += 1
                elif c_hi is not None and c_hi < c_lo:
                    out.counts["better_one_earlier"] += 1
                elif same_text(t_hi, t_lo):
                    out.counts["same_text"] += 1
                else:
                    kept.append((s_hi / s_lo, hi, lo))
        kept.sort(key=lambda x: -x[0])  # stable: equal ratios keep reply order
        if max_pairs_per_post is not None and len(kept) > max_pairs_per_post:
            out.counts["over_max_pairs_per_post"] += len(kept) - max_pairs_per_post
            kept = kept[:max_pairs_per_post]
        for ratio, a, b in kept:
            pair = {"prompt": prompt, "chosen": replies[a][0], "rejected": replies[b][0],
                    "post_id": row.get("post_id", n), "score_chosen": replies[a][1], "score_rejected": replies[b][1]}
            if margin_scale is not None:
                pair["margin"] = margin_scale * math.log(ratio)
            out.rows.append(pair)
        out.counts["pairs"] += len(kept)
    return out


def add_arguments(p) -> None:
    p.add_argument("--min-ratio", type=float, default=2.0, help="score(chosen) / score(rejected) at least this")
    p.add_argument("--min-score", type=float, default=1.0, help="replies scoring below this are not paired")
    p.add_argument("--ignore-time", action="store_true",
                   help="pair regardless of which reply came first (no created_utc needed)")
    p.add_argument("--max-pairs-per-post", type=int, default=None)
    p.add_argument("--margin-scale", type=float, default=None, help="write margin = scale * ln(score ratio)")


def build(args) -> Built:
    return votes_to_pairs(args.input, args.min_ratio, args.min_score, args.ignore_time, args.max_pairs_per_post,
                          args.margin_scale)
