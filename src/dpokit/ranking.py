"""Ranking measures of recommendation lists: accuracy on held-out items and the guards against collapse.

Pure functions of plain lists: `lists[i]` is the ranked list of item ids recommended in context i (best first),
`targets[i]` the item the user went on to choose. A family that recommends (the recommender family's `sample`
capability returns such lists) and an experiment combine them; nothing here knows a model.
"""

from __future__ import annotations

import math
from itertools import combinations
from typing import Callable, Hashable, Mapping, Sequence

from .errors import DpokitError


def _check(lists: Sequence[Sequence], targets: Sequence | None = None) -> None:
    if not lists:
        raise DpokitError("no recommendation lists to measure")
    if targets is not None and len(targets) != len(lists):
        raise DpokitError(f"{len(lists)} recommendation lists but {len(targets)} target items")


def hit_rate_at_k(lists: Sequence[Sequence], targets: Sequence, k: int = 10) -> float:
    """HR@k: the share of contexts whose target item is among the first k recommended."""
    _check(lists, targets)
    return sum(t in list(r)[:k] for r, t in zip(lists, targets)) / len(lists)


def ndcg_at_k(lists: Sequence[Sequence], targets: Sequence, k: int = 10) -> float:
    """NDCG@k with one relevant item per context (Järvelin & Kekäläinen 2002, with the binary gain SASRec's
    evaluation uses): 1 / log2(rank + 2) for the target at 0-based rank < k, else 0; the ideal DCG is 1."""
    _check(lists, targets)
    total = 0.0
    for r, t in zip(lists, targets):
        top = list(r)[:k]
        if t in top:
            total += 1.0 / math.log2(top.index(t) + 2)
    return total / len(lists)


def coverage(lists: Sequence[Sequence], catalogue_size: int, k: int | None = None) -> float:
    """Catalogue coverage: the share of the catalogue's items recommended at least once (in the first k)."""
    _check(lists)
    if catalogue_size < 1:
        raise DpokitError(f"catalogue_size must be >= 1, got {catalogue_size}")
    return len({i for r in lists for i in list(r)[:k]}) / catalogue_size


def exposure_gini(lists: Sequence[Sequence], catalogue: Sequence[Hashable], k: int | None = None) -> float:
    """The Gini coefficient of exposure over the whole catalogue: how unequally recommendations fall on items
    (0: every item shown equally often; → 1: all on one item). Items never recommended count with exposure 0.
    G = Σ_i (2i − n − 1)·x_(i) / (n·Σ x) over the exposures sorted ascending, i = 1..n."""
    _check(lists)
    counts = dict.fromkeys(catalogue, 0)
    for r in lists:
        for item in list(r)[:k]:
            if item not in counts:
                raise DpokitError(f"recommended item {item!r} is not in the catalogue")
            counts[item] += 1
    x = sorted(counts.values())
    n, total = len(x), sum(x)
    if total == 0:
        return 0.0
    return sum((2 * i - n - 1) * v for i, v in enumerate(x, start=1)) / (n * total)


def intra_list_diversity(lists: Sequence[Sequence], distance: Callable[[Hashable, Hashable], float],
                         k: int | None = None) -> float:
    """Intra-list diversity (Ziegler et al. 2005): the mean pairwise distance between the items of a list,
    averaged over the lists with at least two items. `distance(a, b)` is the caller's (e.g. 1 − cosine of item
    embeddings, or 1 − genre overlap)."""
    _check(lists)
    per_list = []
    for r in lists:
        top = list(r)[:k]
        if len(top) > 1:
            pairs = list(combinations(top, 2))
            per_list.append(sum(distance(a, b) for a, b in pairs) / len(pairs))
    if not per_list:
        raise DpokitError("intra-list diversity needs lists of at least two items")
    return sum(per_list) / len(per_list)


def popularity_bias(lists: Sequence[Sequence], popularity: Mapping[Hashable, float], k: int | None = None) -> float:
    """Average recommendation popularity (ARP, Abdollahpouri et al. 2019): the mean, over lists, of the mean
    popularity (e.g. interaction count in the training log) of the recommended items; unseen items count 0."""
    _check(lists)
    means = [sum(popularity.get(i, 0.0) for i in list(r)[:k]) / max(len(list(r)[:k]), 1) for r in lists]
    return sum(means) / len(means)


def genre_distance(genres: Mapping[Hashable, frozenset]) -> Callable[[Hashable, Hashable], float]:
    """A distance for `intra_list_diversity`: 1 − the Jaccard overlap of two items' genre sets (an item without
    genres is at distance 1 from everything)."""
    def distance(a: Hashable, b: Hashable) -> float:
        ga, gb = genres.get(a, frozenset()), genres.get(b, frozenset())
        union = ga | gb
        return 1.0 - (len(ga & gb) / len(union) if union else 0.0)
    return distance
