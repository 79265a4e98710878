"""The `sample` capability of recommenders: a ranked list of items for each context (history).

A recommender's output for a context is not drawn at random but ranked: the top k items by the model's logit over
the catalogue, best first, leaving out (by default) the items already in the history, as SASRec's evaluation and
most deployed recommenders do. `dpokit.ranking` measures such lists (HR@k, NDCG@k, coverage, Gini, diversity).
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import nn

from ...errors import DpokitError
from .models import PAD, Items

KNOWN = {"num_generations", "seed", "exclude_history", "batch_size"}


def _history(prompt, n: int, items: Items) -> list[int]:
    """A context as item indices: a list of item ids, oldest first (a single id is a history of one)."""
    ids = prompt if isinstance(prompt, (list, tuple)) else [prompt]
    if not ids:
        raise DpokitError(f"context {n}: an empty history (a recommender needs at least one earlier item)")
    out = []
    for item in ids:
        index = items.index.get(str(item))
        if index is None:
            raise DpokitError(f"context {n}: unknown item {str(item)!r} (not in {items.source})")
        out.append(index)
    return out


@torch.no_grad()
def recommend(model: nn.Module, items: Items, prompts: Sequence, num_generations: int | None = None, seed: int = 0,
              exclude_history: bool = True, batch_size: int = 256, **settings) -> list[list[str]]:
    """The top `num_generations` item ids for each context, best first (default: 10, or the whole catalogue when it
    is smaller). `seed` is accepted and unused: ranking is deterministic."""
    unknown = sorted(set(settings) - KNOWN)
    if unknown:
        raise DpokitError(f"a recommender's lists take num_generations (k), exclude_history and batch_size; not "
                          f"{', '.join(unknown)}")
    k = min(10, len(items)) if num_generations is None else int(num_generations)
    if not 1 <= k <= len(items):
        raise DpokitError(f"num_generations (k) must lie in 1..{len(items)} (the catalogue), got {num_generations}")
    histories = [_history(p, n, items) for n, p in enumerate(prompts, start=1)]
    device = next(model.parameters()).device
    max_history = getattr(model, "max_history", None)
    out: list[list[str]] = []
    for s in range(0, len(histories), batch_size):
        chunk = [h[-max_history:] if max_history else h for h in histories[s:s + batch_size]]
        L = max(len(h) for h in chunk)
        history = torch.full((len(chunk), L), PAD, dtype=torch.long)
        for i, h in enumerate(chunk):
            history[i, L - len(h):] = torch.tensor(h)
        logits = model(history.to(device)).float().clone()
        logits[:, PAD] = -math.inf
        if exclude_history:
            for i, h in enumerate(histories[s:s + batch_size]):
                logits[i, torch.tensor(h, device=device)] = -math.inf
        top = logits.topk(min(k, logits.shape[1] - 1), dim=-1)
        for idx, val in zip(top.indices.tolist(), top.values.tolist()):
            out.append([items.ids[i - 1] for i, v in zip(idx, val) if v > -math.inf])
    return out
