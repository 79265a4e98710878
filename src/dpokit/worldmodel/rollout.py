"""Offline evaluation of a recommendation policy in rollouts against the world model, and the greedy baseline.

A rollout (AMRS, Chan et al. 2026, arXiv 2605.28810): from each start history, for `horizon` steps the policy
recommends k items for the history (item ids, oldest first); the simulated user takes one — the first of the list
(`choice="first"`, the default: deterministic, the policy's own ranking decides), or one drawn among the k with
probability proportional to the world model's predicted engagement (`choice="engaged"`, seeded) — the world model
predicts its outcomes, and the item with its predicted outcomes (the expected rating, the engagement probability)
is appended to the history. The step's utility is the utility of those predicted outcomes.

A policy is called with the histories as item ids (what a recommender, e.g. a closure over the recommender family's
`sample`, takes); one with an attribute `sees_outcomes = True` (as `greedy_policy`'s) gets them as events
(item id, {outcome: value}), the simulated outcomes included.

`greedy_policy` recommends the k items of highest predicted utility: the baseline that "collapses onto a few items"
(every user with a similar history is shown the same items), measurable with `dpokit.ranking.coverage` and
`exposure_gini` on the lists `evaluate_policy` returns.
"""

from __future__ import annotations

import random
from typing import Callable, Sequence

from ..errors import DpokitError
from .model import WorldModel, event_item, parse_event
from .utility import Utility

CHOICES = ("first", "engaged")


def greedy_policy(world: WorldModel, items: Sequence[str] | None = None, utility: Utility | None = None,
                  k: int = 10, exclude_history: bool = True) -> Callable[[Sequence], list[list[str]]]:
    """A policy (histories → top-k lists, best first) recommending the `items` (default: the world model's
    catalogue) of highest predicted utility, the history's items left out when `exclude_history`. It sees the
    histories' outcomes (`sees_outcomes`): the world model's own argmax."""
    utility = utility or Utility()
    catalogue = [str(i) for i in (items if items is not None else world.items)]
    for i in catalogue:
        world.item_index(i, "greedy_policy items")

    def recommend(histories: Sequence) -> list[list[str]]:
        if not histories:
            return []
        scores = utility.score(world, histories, [catalogue] * len(histories))
        out = []
        for h, row in zip(histories, scores):
            row = row.clone()
            if exclude_history:
                seen = {event_item(e) for e in h}
                for j, item in enumerate(catalogue):
                    if item in seen:
                        row[j] = -float("inf")
            top = row.topk(min(k, len(catalogue))).indices.tolist()
            out.append([catalogue[j] for j in top if row[j] > -float("inf")])
        return out

    recommend.sees_outcomes = True
    return recommend


def evaluate_policy(world: WorldModel, recommend: Callable[[Sequence], Sequence[Sequence]], start_histories: Sequence,
                    horizon: int = 10, k: int = 10, seed: int = 0, utility: Utility | None = None,
                    choice: str = "first") -> dict:
    """Roll the policy out from each start history. Returns {"utility": the mean over all steps and histories,
    "utility_per_step": [the mean at step t], "lists": every list shown (step by step, history by history, the
    first k of the policy's), "taken": the items taken in the same order, "histories": the final histories (item
    ids)}."""
    utility = utility or Utility()
    if choice not in CHOICES:
        raise DpokitError(f"choice must be one of {', '.join(CHOICES)}, got {choice!r}")
    if choice == "engaged" and "engaged" not in world.outcomes:
        raise DpokitError("choice='engaged' needs a world model that predicts engagement")
    if horizon < 1 or k < 1:
        raise DpokitError(f"horizon and k must be >= 1, got {horizon} and {k}")
    histories = []
    for n, h in enumerate(start_histories, start=1):
        events = [parse_event(e, f"start history {n}") for e in (h if isinstance(h, (list, tuple)) else [h])]
        if not events:
            raise DpokitError(f"start history {n}: an empty history (the world model needs at least one event)")
        for item, _ in events:
            world.item_index(item, f"start history {n}")
        histories.append(events)
    if not histories:
        raise DpokitError("no start histories to roll out from")
    rng = random.Random(seed)
    per_step, lists, taken = [], [], []
    for t in range(horizon):
        seen = [list(h) for h in histories] if getattr(recommend, "sees_outcomes", False) else \
            [[i for i, _ in h] for h in histories]
        shown = recommend(seen)
        if len(shown) != len(histories):
            raise DpokitError(f"step {t + 1}: the policy returned {len(shown)} lists for {len(histories)} histories")
        shown = [[str(i) for i in s][:k] for s in shown]
        for n, s in enumerate(shown, start=1):
            if not s:
                raise DpokitError(f"step {t + 1}: the policy recommended nothing for history {n}")
            for i in s:
                world.item_index(i, f"step {t + 1}, the policy's list for history {n}")
        if choice == "first":
            pick = [s[0] for s in shown]
        else:
            pick = []
            for h, s in zip(histories, shown):
                p = world.predict([h], [s])["engaged"][0].tolist()
                pick.append(rng.choices(s, weights=p)[0] if sum(p) > 0 else s[0])
        pred = world.predict(histories, [[p] for p in pick])
        u = utility(pred)[:, 0]
        per_step.append(float(u.mean()))
        lists += shown
        taken += pick
        for n, (h, item) in enumerate(zip(histories, pick)):
            h.append((item, {o: float(pred[o][n, 0]) for o in world.outcomes}))
    return {"utility": sum(per_step) / len(per_step), "utility_per_step": per_step, "lists": lists, "taken": taken,
            "histories": [[i for i, _ in h] for h in histories]}


def random_policy(items: Sequence[str], k: int = 10, seed: int = 0) -> Callable[[Sequence], list[list[str]]]:
    """A policy recommending k items drawn uniformly (without replacement) at every call, seeded once: a floor."""
    items = [str(i) for i in items]
    rng = random.Random(seed)
    return lambda histories: [rng.sample(items, min(k, len(items))) for _ in histories]


__all__ = ["CHOICES", "evaluate_policy", "greedy_policy", "random_policy"]
