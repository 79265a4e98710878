"""What a model family is.

A family turns validated examples into batches and a batch into per-example
log-likelihood terms, for the policy and for the reference. The loop and the objectives
never see tokens, pixels or actions: only `LogpTerms`. A new kind of model (diffusion,
control policy, recommender, vision-language) is one new module implementing `ModelFamily`;
see docs/architecture.md.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import nn


@dataclass
class LogpTerms:
    """Per-example log-likelihood terms, each of shape [batch]; the rejected ones are [batch, K] for
    S-DPO groups (K rejected replies per prompt; the batch's `rejected_mask` marks the slots in use)."""

    chosen: torch.Tensor  # log p(y_w | x), summed over the completion
    rejected: torch.Tensor  # log p(y_l | x)
    chosen_len: torch.Tensor  # units the sums run over (tokens, denoising steps, actions, ...)
    rejected_len: torch.Tensor
    chosen_logits: torch.Tensor | None = None  # mean logit, for TRL's logits/* metrics; detached
    rejected_logits: torch.Tensor | None = None


class ModelFamily(Protocol):
    name: str

    def load_policy(self, cfg) -> tuple[nn.Module, Any]:
        """The trainable model and its processor (tokenizer, image processor, ...)."""

    def load_model(self, path: str, cfg) -> nn.Module:
        """A frozen model from a path, for a separate reference."""

    def examples(self, source: Any, processor: Any, cfg) -> list:
        """Rows from a file or dataset → validated, encoded examples (DataError on bad rows)."""

    def collate(self, examples: list, cfg, processor: Any) -> dict[str, torch.Tensor]:
        """Examples → one batch of tensors; it must carry `weight` and `margin` of shape [batch]."""

    def scorer(self, model: nn.Module, cfg) -> nn.Module:
        """A module whose forward(batch) returns LogpTerms; the loop trains this module."""

    def save(self, model: nn.Module, processor: Any, path: str, merge_lora: bool = False) -> None:
        """Write the model in its library's own format."""
