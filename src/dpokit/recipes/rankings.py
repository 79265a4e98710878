"""Rankings → pairs or S-DPO groups: replies to a prompt ordered best first.

Input: one row per prompt,

    {"prompt": "...", "ranking": ["best reply", "second", ..., "worst"]}

Replies are strings or message lists; ties are not expressible (order them, or drop one).

- `all`: every pair (i better than j), k(k−1)/2 rows per prompt; with `margin_scale` s,
  margin = s · (j − i), the rank gap;
- `adjacent`: only neighbours (i, i+1), k−1 rows;
- `sdpo`: one row per prompt, `chosen` the best and `rejected` the *list* of the others, for
  S-DPO (Chen et al. 2024: a softmax over several negatives). Only an S-DPO objective reads a
  list in `rejected`; the pairwise loader rejects such rows.

Replies equal (up to whitespace) to a better-ranked one are dropped first.
"""

from __future__ import annotations

from typing import Any

from ..data.formats import text_field
from ..errors import DpokitError
from .common import Built, at_row, items, raw_rows, same_text

NAME = "rankings"
HELP = "prompts with replies ranked best first → all pairs, adjacent pairs, or S-DPO groups"
MODES = ("all", "adjacent", "sdpo")


def rankings_to_pairs(source: Any, pairs: str = "all", margin_scale: float | None = None,
                      max_negatives: int | None = None) -> Built:
    if pairs not in MODES:
        raise DpokitError(f"pairs must be one of {', '.join(MODES)}, got {pairs!r}")
    out = Built()
    for name, n, row in raw_rows(source):
        with at_row(name, n):
            prompt = text_field(row, "prompt")
            ranking = [text_field({"reply": r}, "reply", where=f"ranking[{k}]: ")
                       for k, r in enumerate(items(row, "ranking"))]
        out.counts["prompts"] += 1
        distinct = []
        for reply in ranking:
            if any(same_text(reply, kept) for kept in distinct):
                out.counts["repeated_replies"] += 1
            else:
                distinct.append(reply)
        if len(distinct) < 2:
            out.counts["fewer_than_two_replies"] += 1
            continue
        if pairs == "sdpo":
            negatives = distinct[1:1 + max_negatives] if max_negatives else distinct[1:]
            out.rows.append({"prompt": prompt, "chosen": distinct[0], "rejected": negatives})
            out.counts["groups"] += 1
            continue
        for i in range(len(distinct)):
            for j in ([i + 1] if pairs == "adjacent" else range(i + 1, len(distinct))):
                if j >= len(distinct):
                    continue
                pair = {"prompt": prompt, "chosen": distinct[i], "rejected": distinct[j], "rank_chosen": i,
                        "rank_rejected": j}
                if margin_scale is not None:
                    pair["margin"] = margin_scale * (j - i)
                out.rows.append(pair)
                out.counts["pairs"] += 1
    return out


def add_arguments(p) -> None:
    p.add_argument("--pairs", choices=MODES, default="all")
    p.add_argument("--margin-scale", type=float, default=None, help="write margin = scale * rank gap (all, adjacent)")
    p.add_argument("--max-negatives", type=int, default=None, help="sdpo: keep at most this many rejected replies")


def build(args) -> Built:
    return rankings_to_pairs(args.input, args.pairs, args.margin_scale, args.max_negatives)
