"""A utility over a world model's predicted outcomes, and preference pairs labelled by it.

`Utility(weights)` is a weighted sum of predicted outcomes, U = Σ_o w_o · ŷ_o (the predicted rating in the log's
scale, the predicted engagement probability), the configurable utility AMRS (Chan et al. 2026, arXiv 2605.28810)
labels pairs with. `label_pairs` scores candidate items for each context by it and writes the recommender family's
JSON Lines rows: {"user", "history", "chosen": the best candidate, "rejected": the worst (k = 1) or the k worst
(k > 1, an S-DPO group, worst first), "weight": 1.0}; a context whose chosen ties with a rejected is dropped.
"""

from __future__ import annotations

import random
from typing import Mapping, Sequence

import torch

from ..errors import DpokitError
from .model import WorldModel, event_item


class Utility:
    """U = Σ weights[o] · predicted o; default: the rating alone."""

    def __init__(self, weights: Mapping[str, float] | None = None):
        self.weights = dict(weights) if weights is not None else {"rating": 1.0, "engaged": 0.0}
        if not any(w != 0 for w in self.weights.values()):
            raise DpokitError(f"a utility needs a non-zero weight, got {self.weights}")

    def __call__(self, predictions: Mapping[str, torch.Tensor]) -> torch.Tensor:
        total = None
        for name, w in self.weights.items():
            if w == 0:
                continue
            if name not in predictions:
                raise DpokitError(f"the utility weighs {name!r} but the world model predicts only "
                                  f"{', '.join(predictions)}")
            term = w * predictions[name]
            total = term if total is None else total + term
        return total

    def score(self, world: WorldModel, histories: Sequence, candidates: Sequence[Sequence]) -> torch.Tensor:
        """Predicted utility [B, C] of each history's candidate items."""
        return self(world.predict(histories, candidates))


def _context(c, n: int) -> tuple:
    """A context: a recommender row-like dict {"user", "history"} or a history (list of events)."""
    if isinstance(c, dict):
        if "history" not in c:
            raise DpokitError(f"context {n}: a dict context needs a 'history'")
        return c.get("user", str(n - 1)), c["history"]
    return str(n - 1), c


def label_pairs(world: WorldModel, contexts: Sequence, candidates_per_context: int | Sequence[Sequence] = 20,
                k: int = 1, utility: Utility | None = None, seed: int = 0, exclude_history: bool = True) -> list[dict]:
    """Preference rows for `contexts`. `candidates_per_context`: a number (that many items drawn uniformly from the
    world model's catalogue without replacement, seeded by `seed` and the context's position, leaving out the
    history's items when `exclude_history`) or one list of candidate ids per context."""
    utility = utility or Utility()
    if k < 1:
        raise DpokitError(f"k must be >= 1, got {k}")
    contexts = [_context(c, n) for n, c in enumerate(contexts, start=1)]
    if not contexts:
        raise DpokitError("no contexts to label")
    if isinstance(candidates_per_context, int):
        cands = []
        for n, (_, h) in enumerate(contexts):
            seen = {event_item(e) for e in h} if exclude_history else set()
            pool = [i for i in world.items if i not in seen]
            if len(pool) < candidates_per_context:
                raise DpokitError(f"context {n + 1}: {len(pool)} catalogue items to draw from, fewer than "
                                  f"candidates_per_context {candidates_per_context}")
            cands.append(random.Random(f"{seed}:{n}").sample(pool, candidates_per_context))
    else:
        cands = [[str(i) for i in c] for c in candidates_per_context]
        if len(cands) != len(contexts):
            raise DpokitError(f"{len(contexts)} contexts but {len(cands)} candidate lists")
    if any(len(c) < k + 1 for c in cands):
        raise DpokitError(f"every context needs at least k + 1 = {k + 1} candidates")
    rows = []
    # group contexts by their number of candidates: predict takes one width a batch
    widths: dict[int, list[int]] = {}
    for n, c in enumerate(cands):
        widths.setdefault(len(c), []).append(n)
    scores: dict[int, list[float]] = {}
    for idx in widths.values():
        for s in range(0, len(idx), 256):
            chunk = idx[s:s + 256]
            u = utility.score(world, [contexts[n][1] for n in chunk], [cands[n] for n in chunk])
            for n, row in zip(chunk, u.tolist()):
                scores[n] = row
    for n, ((user, history), c) in enumerate(zip(contexts, cands)):
        order = sorted(range(len(c)), key=lambda i: -scores[n][i])  # stable: the earlier candidate first on a tie
        best, worst = order[0], order[::-1][:k]
        if any(scores[n][w] >= scores[n][best] for w in worst):
            continue  # a tie: no preference to learn
        rows.append({"user": user, "history": [event_item(e) for e in history], "chosen": c[best],
                     "rejected": c[worst[0]] if k == 1 else [c[w] for w in worst], "weight": 1.0})
    return rows
