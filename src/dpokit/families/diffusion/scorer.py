"""Diffusion-DPO's score (Wallace et al. 2023, eq. 14 and its implementation): per pair one timestep t and one
noise ε, shared by the preferred and the rejected image, and the score −½·mse(target, ε_θ(x_t, t, c)), the mse a
mean over every latent (or pixel) element. With that, dpokit's `sigmoid` loss with `beta` is the Diffusion-DPO
script's loss with `beta_dpo`: −log σ(−½·β·((mse_w − mse_l) − (ref_w − ref_l))).

Unpaired (KTO) rows go through unchanged: the labelled image in the chosen slot, the row's mismatched image in the
rejected one, on the row's one (t, ε); the objective reads the batch's `label`.
"""

from __future__ import annotations

import torch

from ..base import Scorer, Scores


def draw(seed: int, shape: tuple[int, ...], num_train_timesteps: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(t, ε) of one pair from its per-example seed: t uniform on 0..T−1 and ε ~ N(0, I) as the script draws
    them, from a generator of this pair's own, so a pair draws the same however a batch is split."""
    g = torch.Generator().manual_seed(seed % (2 ** 63))
    t = torch.randint(0, num_train_timesteps, (), generator=g)
    return t, torch.randn(shape, generator=g)


def target(scheduler, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """What the UNet predicts, by the scheduler's `prediction_type`: ε, the velocity v = α_t·ε − σ_t·x0
    (Salimans & Ho 2022) or x0 itself."""
    kind = scheduler.config.prediction_type
    if kind == "epsilon":
        return noise
    if kind == "v_prediction":
        return scheduler.get_velocity(x0, noise, t)
    if kind == "sample":
        return x0
    raise ValueError(f"unknown prediction_type {kind!r}")


def noised_batch(x0_w: torch.Tensor, x0_l: torch.Tensor, seeds: list[int], scheduler) -> dict[str, torch.Tensor]:
    """x_t of both images of every pair, on the pair's own (t, ε), and the targets."""
    ts, noises = zip(*(draw(s, tuple(x0_w.shape[1:]), scheduler.config.num_train_timesteps) for s in seeds))
    t, noise = torch.stack(ts), torch.stack(noises)
    return {"timesteps": t,
            "noisy_chosen": scheduler.add_noise(x0_w, noise, t), "noisy_rejected": scheduler.add_noise(x0_l, noise, t),
            "target_chosen": target(scheduler, x0_w, noise, t), "target_rejected": target(scheduler, x0_l, noise, t)}


def denoising_mse(pred: torch.Tensor, tgt: torch.Tensor) -> torch.Tensor:
    """Per-example mean over all elements of (target − prediction)², in fp32 as the script computes it."""
    return ((pred.float() - tgt.float()) ** 2).mean(dim=tuple(range(1, pred.dim())))


class DiffusionScorer(Scorer):
    """Scores of a batch: one UNet forward over [chosen; rejected] (the script's concatenated batch), with the
    caption embeddings or class ids repeated for both halves."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, batch):
        dtype = next(self.model.parameters()).dtype
        x = torch.cat([batch["noisy_chosen"], batch["noisy_rejected"]]).to(dtype)
        t = batch["timesteps"].repeat(2)
        kwargs = {}
        if "text" in batch:
            kwargs["encoder_hidden_states"] = batch["text"].repeat(2, 1, 1).to(dtype)
        if "class_labels" in batch:
            kwargs["class_labels"] = batch["class_labels"].repeat(2)
        pred = self.model(x, t, **kwargs).sample
        mse_w, mse_l = denoising_mse(pred, torch.cat([batch["target_chosen"], batch["target_rejected"]])).chunk(2)
        ones = torch.ones_like(mse_w)
        return Scores(-0.5 * mse_w, -0.5 * mse_l, ones, ones)
