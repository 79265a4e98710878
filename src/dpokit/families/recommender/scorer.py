"""An item's score in a context: log p(item | history), the log-softmax of its logit over the catalogue
(`score_over: catalogue`) or over the row's candidate slate (`score_over: slate`), as S-DPO (Chen et al. 2024)
scores a recommendation. One forward per context scores the chosen item and every rejected one; `chosen_len`
is 1 (one item)."""

from __future__ import annotations

import torch

from ..base import Scorer, Scores
from .models import catalogue_log_probs, slate_log_probs


class RecommenderScorer(Scorer):
    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, batch):
        rejected = batch["rejected"]
        if "candidates" in batch:
            logp = slate_log_probs(self.model, batch["history"], batch["candidates"], batch["candidates_mask"])
            chosen_at, rejected_at = batch["chosen_pos"], batch["rejected_pos"]
        else:
            logp = catalogue_log_probs(self.model, batch["history"])
            chosen_at, rejected_at = batch["chosen"], rejected
        chosen = logp.gather(1, chosen_at[:, None])[:, 0]
        if rejected.dim() == 2:
            r = logp.gather(1, rejected_at)
            r = torch.where(batch["rejected_mask"], r, torch.zeros_like(r))  # empty slots of smaller groups
        else:
            r = logp.gather(1, rejected_at[:, None])[:, 0]
        ones = torch.ones_like(chosen)
        return Scores(chosen, r, ones, torch.ones_like(r))
