"""A segment's score: Σ_t log π(a_t | s_t) over its steps (the trajectory log-likelihood of the actions given the
observations; the environment's dynamics do not depend on the policy and cancel in every log-ratio), as in
preference-based RL with DPO-style objectives (e.g. Contrastive Preference Learning, Hejna et al. 2024, eq. 5,
without its discount). `chosen_len` is the number of steps."""

from __future__ import annotations

import torch

from ..base import Scorer, Scores


def step_log_probs(model: torch.nn.Module, obs: torch.Tensor, actions: torch.Tensor,
                   mask: torch.Tensor) -> torch.Tensor:
    """log π(a_t | s_t) of every valid step, [B, T] with 0 at padding: only the valid steps go through the
    policy, so padding neither costs a forward nor can put a NaN into a sum."""
    dtype = next(model.parameters()).dtype
    dist = model(obs[mask].to(dtype))
    steps = actions[mask]
    logp = dist.log_prob(steps.to(dtype) if steps.is_floating_point() else steps)
    out = torch.zeros(mask.shape, dtype=logp.dtype, device=logp.device)
    return out.masked_scatter(mask, logp)


class PolicyScorer(Scorer):
    """Scores of a batch: one policy forward over the chosen and the rejected segments' steps together."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, batch):
        B = batch["chosen_mask"].shape[0]
        T = max(batch["chosen_mask"].shape[1], batch["rejected_mask"].shape[1])

        def pad(x):
            out = x.new_zeros(x.shape[0], T, *x.shape[2:])
            out[:, :x.shape[1]] = x
            return out

        obs = torch.cat([pad(batch["chosen_obs"]), pad(batch["rejected_obs"])])
        actions = torch.cat([pad(batch["chosen_actions"]), pad(batch["rejected_actions"])])
        mask = torch.cat([pad(batch["chosen_mask"]), pad(batch["rejected_mask"])])
        logp = step_log_probs(self.model, obs, actions, mask).float().sum(-1)
        steps = mask.sum(-1).float()
        return Scores(logp[:B], logp[B:], steps[:B], steps[B:])
