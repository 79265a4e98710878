"""The `list_metrics` capability: the top-k lists the recommender gives the eval contexts, measured as a whole.

At every eval (and with `eval_on_start`, before the first step) the loop logs these beside the per-example eval
metrics, so report.html plots them over training: ranking quality on the eval rows' chosen items (NDCG@k, HR@k)
and the collapse guards of issue 18 — catalogue coverage, the Gini of exposure, popularity bias and, where the
catalogue file names genres, intra-list diversity. The measures are dpokit.ranking's; popularity here is how often
an item appears in the eval contexts' histories (the log the eval rows came from), the only log the family sees.
"""

from __future__ import annotations

from collections import Counter
from typing import Sequence

from ...ranking import (coverage, exposure_gini, genre_distance, hit_rate_at_k, intra_list_diversity, ndcg_at_k,
                        popularity_bias)
from .models import Items
from .sampling import recommend


def list_metrics(model, items: Items, examples: Sequence, k: int = 10,
                 genres: dict[str, frozenset[str]] | None = None) -> dict[str, float]:
    """The measures of the top-k lists for the examples' histories (the history's items left out): ndcg@k, hr@k
    against each example's chosen item, coverage@k, gini@k, popularity@k (mean count of the recommended items in
    the examples' histories, per context) and, with `genres`, ild@k."""
    if not examples:
        return {}
    k = min(k, len(items))
    histories = [[items.ids[i - 1] for i in ex.history] for ex in examples]
    lists = recommend(model, items, histories, num_generations=k)
    targets = [items.ids[ex.chosen - 1] for ex in examples]
    seen = Counter(i for h in histories for i in h)
    popularity = {i: c / len(histories) for i, c in seen.items()}
    out = {f"ndcg@{k}": ndcg_at_k(lists, targets, k), f"hr@{k}": hit_rate_at_k(lists, targets, k),
           f"coverage@{k}": coverage(lists, len(items), k), f"gini@{k}": exposure_gini(lists, items.ids, k),
           f"popularity@{k}": popularity_bias(lists, popularity, k)}
    if genres and k > 1:
        out[f"ild@{k}"] = intra_list_diversity(lists, genre_distance(genres), k)
    return out
