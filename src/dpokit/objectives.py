"""Preference objectives: pure tensor functions, log-likelihood terms in, loss and metrics out.

Every loss reads a `Terms` (per-example policy and reference log-likelihoods, lengths,
margins) and returns a per-example loss of shape [batch]. `objective` combines the chosen
losses with their weights, applies per-pair weights, and computes the metrics under TRL's
names. Adding a loss is one function with `@register("name")`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from .errors import DpokitError


@dataclass
class Terms:
    policy_chosen: torch.Tensor
    policy_rejected: torch.Tensor
    ref_chosen: torch.Tensor
    ref_rejected: torch.Tensor
    chosen_len: torch.Tensor
    rejected_len: torch.Tensor
    margin: torch.Tensor  # the chosen must win by this much (ODPO); zeros by default

    @property
    def chosen_logratios(self) -> torch.Tensor:
        return self.policy_chosen - self.ref_chosen

    @property
    def rejected_logratios(self) -> torch.Tensor:
        return self.policy_rejected - self.ref_rejected


@dataclass
class ObjectiveConfig:
    beta: float = 0.1
    label_smoothing: float = 0.0


LossFn = Callable[[Terms, ObjectiveConfig], torch.Tensor]
LOSSES: dict[str, LossFn] = {}


def register(name: str):
    def wrap(fn: LossFn) -> LossFn:
        LOSSES[name] = fn
        return fn
    return wrap


def _dpo_logits(t: Terms, c: ObjectiveConfig) -> torch.Tensor:
    return c.beta * (t.chosen_logratios - t.rejected_logratios) - t.margin


@register("sigmoid")
def sigmoid_loss(t: Terms, c: ObjectiveConfig) -> torch.Tensor:
    """DPO (Rafailov et al. 2023). With label_smoothing ε > 0 this is conservative DPO (cDPO):
    the label is trusted with probability 1 − ε."""
    z = _dpo_logits(t, c)
    return -(1 - c.label_smoothing) * F.logsigmoid(z) - c.label_smoothing * F.logsigmoid(-z)


@register("robust")
def robust_loss(t: Terms, c: ObjectiveConfig) -> torch.Tensor:
    """Robust DPO (Chowdhury et al. 2024): unbiased under labels flipped with probability ε."""
    z = _dpo_logits(t, c)
    eps = c.label_smoothing
    return (-(1 - eps) * F.logsigmoid(z) + eps * F.logsigmoid(-z)) / (1 - 2 * eps)


@register("hinge")
def hinge_loss(t: Terms, c: ObjectiveConfig) -> torch.Tensor:
    """SLiC-HF calibration loss (Zhao et al. 2023)."""
    return torch.relu(1 - _dpo_logits(t, c))


@register("ipo")
def ipo_loss(t: Terms, c: ObjectiveConfig) -> torch.Tensor:
    """IPO (Azar et al. 2023), eq. 17, on per-token-averaged log-ratios (as TRL and the IPO authors use)."""
    delta = t.chosen_logratios / t.chosen_len.clamp(min=1) - t.rejected_logratios / t.rejected_len.clamp(min=1)
    return (delta - t.margin - 1 / (2 * c.beta)) ** 2


def check_losses(loss_types: list[str], loss_weights: list[float] | None, label_smoothing: float) -> None:
    unknown = [name for name in loss_types if name not in LOSSES]
    if unknown:
        raise DpokitError(f"unknown loss_type {unknown[0]!r}; known: {', '.join(sorted(LOSSES))}")
    if loss_weights is not None and len(loss_weights) != len(loss_types):
        raise DpokitError(f"loss_weights has {len(loss_weights)} entries for {len(loss_types)} loss types")
    if "robust" in loss_types and not 0 <= label_smoothing < 0.5:
        raise DpokitError(f"robust DPO needs 0 <= label_smoothing < 0.5, got {label_smoothing}")
    if not 0 <= label_smoothing <= 1:
        raise DpokitError(f"label_smoothing must lie in [0, 1], got {label_smoothing}")


def objective(terms: Terms, weight: torch.Tensor, loss_types: list[str], loss_weights: list[float] | None,
              config: ObjectiveConfig) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Scalar loss and per-example metrics (each [batch], detached) under TRL's names."""
    loss_weights = loss_weights or [1.0] * len(loss_types)
    per_example = sum(w * LOSSES[name](terms, config) for name, w in zip(loss_types, loss_weights))
    loss = (weight * per_example).mean()
    with torch.no_grad():
        chosen_rewards = config.beta * terms.chosen_logratios.detach()
        rejected_rewards = config.beta * terms.rejected_logratios.detach()
        metrics = {
            "loss": (weight * per_example).detach(),
            "rewards/chosen": chosen_rewards,
            "rewards/rejected": rejected_rewards,
            "rewards/accuracies": (chosen_rewards > rejected_rewards).float(),
            "rewards/margins": chosen_rewards - rejected_rewards,
            "logps/chosen": terms.policy_chosen.detach(),
            "logps/rejected": terms.policy_rejected.detach(),
        }
    return loss, metrics
