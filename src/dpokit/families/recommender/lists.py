"""The `list_metrics` capability: the top-k lists the recommender gives the eval contexts, measured as a whole.

At every eval (and with `eval_on_start`, before the first step) the loop logs these beside the per-example eval
metrics, so report.html plots them over training: ranking quality on the eval rows' chosen items (NDCG@k, HR@k)
and the collapse guards of issue 18 — catalogue coverage, the Gini of exposure, popularity bias and, where the
catalogue file names genres, intra-list diversity. The measures are dpokit.ranking's; popularity here is how often
an item appears in the eval contexts' histories (the log the eval rows came from), the only log the family sees.
"""

from __future__ import annotations

import csv
from collections import Counter
from pathlib import Path
from typing import Sequence

from ...errors import DpokitError
from ...ranking import coverage, exposure_gini, hit_rate_at_k, intra_list_diversity, ndcg_at_k, popularity_bias
from .models import Items
from .sampling import recommend

GENRE_COLUMNS = ("class", "genre", "genres", "category", "categories")


def read_genres(path: str | None) -> dict[str, frozenset[str]] | None:
    """Item id → its genres, from a RecBole `.item` file (a `class`/`genre`/`category` token_seq column, tokens
    separated by spaces) or a CSV with such a column (separated by `|`, else spaces); None when the file has no
    genre column (or is a plain list of ids)."""
    if not path:
        return None
    p = Path(path)
    suffix = p.suffix.lower()
    if suffix not in (".item", ".csv"):
        return None
    try:
        lines = p.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise DpokitError(f"item_catalogue: {path}: cannot read ({e})") from None
    if suffix == ".item":
        header = [h.strip().split(":")[0] for h in (lines[0].split("\t") if lines else [])]
        rows = [dict(zip(header, line.split("\t"))) for line in lines[1:] if line.strip()]
        key, sep = "item_id", None
    else:
        rows, key, sep = list(csv.DictReader(lines)), "item", "|"
        header = list(rows[0]) if rows else []
    column = next((c for c in header if c.lower() in GENRE_COLUMNS), None)
    if column is None:
        return None
    out = {}
    for row in rows:
        text = (row.get(column) or "").strip()
        parts = text.split(sep) if sep and sep in text else text.split()
        out[str(row.get(key, "")).strip()] = frozenset(g.strip() for g in parts if g.strip())
    return out


def genre_distance(genres: dict[str, frozenset[str]]):
    """1 − the Jaccard overlap of two items' genres (items without genres: distance 1 from everything)."""
    def distance(a: str, b: str) -> float:
        ga, gb = genres.get(a, frozenset()), genres.get(b, frozenset())
        union = ga | gb
        return 1.0 - (len(ga & gb) / len(union) if union else 0.0)
    return distance


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
