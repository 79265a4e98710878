"""Online preference tuning of a one-step image generator: DrPO (Jiang, Wen, Liu 2026, arXiv 2606.02521) or, with
method="dpo", its one-step DPO baseline on the same on-policy best/worst samples (losses.py has the losses).

A step, for each of its `prompts_per_step` prompts (taken in turn from `prompts`):

1. N noises z_1..z_N from the step's own seed (`draw_noise`: the same seed, step and prompt give the same noises,
   so a DrPO and a DPO run with one seed see the same draws), images = G(z, c) in one forward with gradients, and
   the frozen base's G_0(z, c) without;
2. the reward is called on detached images under no_grad (`call_reward`): it is only a ranking, never
   differentiated, and may be any callable or a command (`command_reward`);
3. the best k and the worst k by score; DrPO regresses φ(G(z)) onto the detached drift target (`drpo_loss`,
   positives/negatives the best/worst k's features, reference the base's features); DPO scores all N samples
   against the best/worst k (`onestep_dpo_loss`);
4. the prompts' losses are averaged, then AdamW with gradients clipped to 1.0, as the DrPO code.

Each step logs the reward's mean over that step's on-policy samples (before the update), the best/worst k's means,
and diversity: the mean pairwise distance between a prompt's N samples, in feature space (in output space when no
feature function is given), averaged over the prompts; `output_diversity` is the same in output space.

Defaults are the official scripts' (scripts/train/drpo.sh, dpo.sh): N = 24, k = 8, lr 1e-4, AdamW weight decay
0.01, ref_weight 0.2, β = 30 in output space, no paired L2 to the base (`ref_l2_weight`, the official
`--ref_model_l2_weight`, 0 in both scripts).
"""

from __future__ import annotations

import copy
import json
import shlex
import subprocess
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import DpokitError
from .losses import TEMPERATURES, drpo_loss, onestep_dpo_loss

Features = Callable[[torch.Tensor], "torch.Tensor | dict[str, torch.Tensor]"]
Reward = Callable[[torch.Tensor, list], Any]


@dataclass
class OnlineOneStepConfig:
    method: str = "drpo"  # "drpo" or "dpo" (the DPO₁step baseline)
    num_samples: int = 24  # N images per prompt per step (official batchsize_gen)
    top_k: int = 8  # positives = the best k, negatives = the worst k (official num_pos_images, num_neg_images)
    prompts_per_step: int = 1
    steps: int = 100
    lr: float = 1e-4
    weight_decay: float = 1e-2
    max_grad_norm: float = 1.0
    temperatures: tuple[float, ...] = TEMPERATURES
    ref_weight: float = 0.2  # DrPO: weight of the reference drift
    ref_l2_weight: float = 0.0  # both: + w·mse(G(z), G_0(z)), the paired output L2 to the base
    beta: float = 30.0  # DPO
    dpo_space: str = "output"  # DPO: score in the generator's output space, or "features"
    seed: int = 0

    def __post_init__(self):
        if self.method not in ("drpo", "dpo"):
            raise DpokitError(f"method must be 'drpo' or 'dpo', got {self.method!r}")
        if self.dpo_space not in ("output", "features"):
            raise DpokitError(f"dpo_space must be 'output' or 'features', got {self.dpo_space!r}")
        if self.top_k < 1 or 2 * self.top_k > self.num_samples:
            raise DpokitError(f"need 1 <= top_k and 2·top_k <= num_samples, got top_k={self.top_k}, "
                              f"num_samples={self.num_samples}")
        if self.prompts_per_step < 1 or self.steps < 0:
            raise DpokitError("prompts_per_step must be >= 1 and steps >= 0")


class OneStepUNet(nn.Module):
    """A diffusers UNet as a one-step generator, SD-Turbo style: called once at the last training timestep
    T − 1 on the noise, its output read as the x0 prediction by the scheduler's prediction_type (ε: (z − √(1−ᾱ)ε̂)/√ᾱ,
    v: √ᾱ z − √(1−ᾱ) v̂, sample: as is; ᾱ clamped to >= 1e-6 as the DrPO code). The condition: None, class ids
    (an integer tensor [B], UNet2DModel's class_labels) or text embeddings ([B, L, E], encoder_hidden_states).
    (The DrPO code's SD-Turbo rule renoises the x0 to t = 0 with ε̂; this returns x0.)"""

    def __init__(self, unet: nn.Module, scheduler, timestep: int | None = None):
        super().__init__()
        self.unet = unet
        self.timestep = scheduler.config.num_train_timesteps - 1 if timestep is None else int(timestep)
        alpha_bar = float(scheduler.alphas_cumprod[self.timestep].clamp(min=1e-6))
        self.a, self.s = alpha_bar ** 0.5, (1 - alpha_bar) ** 0.5
        self.prediction_type = scheduler.config.prediction_type

    def forward(self, noise: torch.Tensor, cond: torch.Tensor | None = None) -> torch.Tensor:
        t = torch.full((noise.shape[0],), self.timestep, device=noise.device, dtype=torch.long)
        kwargs = {}
        if cond is not None:
            key = "encoder_hidden_states" if cond.is_floating_point() and cond.dim() == 3 else "class_labels"
            kwargs[key] = cond
        out = self.unet(noise, t, **kwargs).sample
        if self.prediction_type == "epsilon":
            return (noise - self.s * out) / self.a
        if self.prediction_type == "v_prediction":
            return self.a * noise - self.s * out
        if self.prediction_type == "sample":
            return out
        raise DpokitError(f"unknown prediction_type {self.prediction_type!r}")


def noise_seed(seed: int, step: int, prompt_index: int) -> int:
    return ((seed * 1_000_003 + step) * 1_000_003 + prompt_index) % 2 ** 63


def draw_noise(seed: int, step: int, prompt_index: int, n: int, shape: Sequence[int]) -> torch.Tensor:
    """The N noises of prompt `prompt_index` (its place in the prompt list) at `step`: row k is sample k."""
    g = torch.Generator().manual_seed(noise_seed(seed, step, prompt_index))
    return torch.randn((n, *shape), generator=g)


def default_condition(prompts: list, device) -> torch.Tensor | None:
    """Prompts as the generator takes them: None for an unconditional one, class ids for a class-conditional
    one. Anything else (captions) needs a `cond_fn` of the caller's."""
    if all(p is None for p in prompts):
        return None
    if all(isinstance(p, int) and not isinstance(p, bool) for p in prompts):
        return torch.tensor(prompts, dtype=torch.long, device=device)
    raise DpokitError("prompts other than None or class ids need a cond_fn(prompts, device) -> condition")


def call_reward(reward: Reward, images: torch.Tensor, prompts: list) -> torch.Tensor:
    """The reward's scores of the images, [N] float on the CPU. It is called on a detached copy under no_grad:
    only called, never differentiated."""
    with torch.no_grad():
        scores = reward(images.detach().clone(), prompts)
    scores = (scores.detach().float().cpu() if torch.is_tensor(scores)
              else torch.tensor([float(v) for v in scores], dtype=torch.float32)).flatten()
    if scores.numel() != images.shape[0]:
        raise DpokitError(f"the reward gave {scores.numel()} scores for {images.shape[0]} images")
    if not torch.isfinite(scores).all():
        raise DpokitError("the reward gave a non-finite score")
    return scores


def command_reward(command: str | Sequence[str]) -> Reward:
    """A reward run as a command: the images are saved as a float32 .npy [N, C, H, W] and the prompts as a JSON
    list, the two paths appended to the command, and the command prints the N scores as a JSON list (its last
    line of stdout)."""
    import numpy as np

    argv = shlex.split(command) if isinstance(command, str) else list(command)

    def reward(images: torch.Tensor, prompts: list) -> list[float]:
        with tempfile.TemporaryDirectory() as d:
            img, pr = Path(d) / "images.npy", Path(d) / "prompts.json"
            np.save(img, images.float().cpu().numpy())
            pr.write_text(json.dumps(list(prompts)))
            run = subprocess.run([*argv, str(img), str(pr)], capture_output=True, text=True)
        if run.returncode != 0:
            raise DpokitError(f"reward command failed ({run.returncode}): {run.stderr.strip()[-500:]}")
        return json.loads(run.stdout.strip().splitlines()[-1])

    return reward


def select(scores: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices of the best k and the worst k (disjoint when 2k <= N)."""
    order = torch.argsort(scores, descending=True)
    return order[:k], order[-k:]


def mean_pairwise_distance(x: torch.Tensor) -> float:
    """Diversity of one prompt's samples: mean ‖x_i − x_j‖ over pairs i ≠ j."""
    x = x.detach().flatten(1).float()
    n = x.shape[0]
    return float(torch.cdist(x, x).sum() / (n * (n - 1))) if n > 1 else 0.0


def _as_dict(f) -> dict[str, torch.Tensor]:
    return f if isinstance(f, dict) else {"features": f}


def frozen_copy(generator: nn.Module) -> nn.Module:
    """The base: a frozen copy of the generator as it starts."""
    return copy.deepcopy(generator).eval().requires_grad_(False)


def make_optimizer(generator: nn.Module, cfg: OnlineOneStepConfig) -> torch.optim.Optimizer:
    params = [p for p in generator.parameters() if p.requires_grad]
    if not params:
        raise DpokitError("the generator has no trainable parameters")
    return torch.optim.AdamW(params, lr=cfg.lr, betas=(0.9, 0.999), weight_decay=cfg.weight_decay, eps=1e-8)


def prompt_loss(generator: nn.Module, base: nn.Module, prompt, prompt_index: int, step: int, reward: Reward,
                features: Features | None, cfg: OnlineOneStepConfig, noise_shape: Sequence[int],
                cond_fn=default_condition) -> tuple[torch.Tensor, dict]:
    """One prompt's loss (with gradients to the generator) and its stats."""
    device = next(generator.parameters()).device
    n = cfg.num_samples
    noise = draw_noise(cfg.seed, step, prompt_index, n, noise_shape).to(device)
    prompts = [prompt] * n
    cond = cond_fn(prompts, device)
    images = generator(noise, cond)
    with torch.no_grad():
        base_images = base(noise, cond)
    scores = call_reward(reward, images, prompts)
    best, worst = (i.to(device) for i in select(scores, cfg.top_k))
    need_features = cfg.method == "drpo" or cfg.dpo_space == "features"
    if need_features and features is None:
        raise DpokitError(f"method={cfg.method!r} (dpo_space={cfg.dpo_space!r}) needs a feature function")
    if need_features:
        feats = _as_dict(features(images))
        with torch.no_grad():
            base_feats = _as_dict(features(base_images))
        if not all(f.requires_grad for f in feats.values()):
            raise DpokitError("the feature function must be differentiable in the images (frozen weights, but no "
                              "no_grad or detach inside)")
    elif features is not None:
        with torch.no_grad():
            feats = _as_dict(features(images))
    else:
        feats = {"output": images}
    if cfg.method == "drpo":  # one drift per feature set, the losses summed (the DrPO code's multi-feature sum)
        loss = sum(drpo_loss(f, f[best].detach(), f[worst].detach(), base_feats[key],
                             ref_weight=cfg.ref_weight, temperatures=cfg.temperatures) for key, f in feats.items())
    elif cfg.dpo_space == "features":
        loss = sum(onestep_dpo_loss(f, base_feats[key], f[best], f[worst], cfg.beta) for key, f in feats.items())
    else:
        loss = onestep_dpo_loss(images, base_images, images[best], images[worst], cfg.beta)
    if cfg.ref_l2_weight:
        loss = loss + cfg.ref_l2_weight * F.mse_loss(images.float(), base_images.float())
    div = sum(mean_pairwise_distance(f) for f in feats.values()) / len(feats)
    stats = {"reward_mean": float(scores.mean()), "reward_best": float(scores[best.cpu()].mean()),
             "reward_worst": float(scores[worst.cpu()].mean()), "diversity": div,
             "output_diversity": mean_pairwise_distance(images)}
    return loss, stats


def drpo_step(generator: nn.Module, base: nn.Module, optimizer: torch.optim.Optimizer, prompts: Sequence,
              reward: Reward, features: Features | None, cfg: OnlineOneStepConfig, step: int,
              noise_shape: Sequence[int], cond_fn=default_condition) -> dict:
    """One update: the step's prompts (prompts[(step·B + b) mod len], B = prompts_per_step), their losses averaged,
    AdamW. Returns the step's log row."""
    if not prompts:
        raise DpokitError("no prompts")
    generator.train()
    optimizer.zero_grad(set_to_none=True)
    idx = [(step * cfg.prompts_per_step + b) % len(prompts) for b in range(cfg.prompts_per_step)]
    rows, total = [], 0.0
    for j in idx:
        loss, stats = prompt_loss(generator, base, prompts[j], j, step, reward, features, cfg, noise_shape, cond_fn)
        (loss / len(idx)).backward()
        total += float(loss.detach()) / len(idx)
        rows.append(stats)
    params = [p for g in optimizer.param_groups for p in g["params"]]
    grad_norm = float(torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm))
    optimizer.step()
    row = {"step": step, "method": cfg.method, "loss": total, "grad_norm": grad_norm}
    row.update({key: sum(r[key] for r in rows) / len(rows) for key in rows[0]})
    return row


def train_drpo(generator: nn.Module, prompts: Sequence, reward: Reward, features: Features | None = None,
               cfg: OnlineOneStepConfig | None = None, *, noise_shape: Sequence[int], base: nn.Module | None = None,
               cond_fn=default_condition, log_path: str | None = None) -> list[dict]:
    """Train the generator in place for cfg.steps steps (DrPO, or one-step DPO with cfg.method="dpo"). base: the
    frozen reference, by default a frozen copy of the generator as it starts. Returns the log rows, also appended
    to `log_path` as JSONL (the config first, as a row with "config")."""
    cfg = cfg or OnlineOneStepConfig()
    base = frozen_copy(generator) if base is None else base
    optimizer = make_optimizer(generator, cfg)
    out = Path(log_path) if log_path else None
    if out:
        out.parent.mkdir(parents=True, exist_ok=True)
        with out.open("a") as f:
            f.write(json.dumps({"config": asdict(cfg)}) + "\n")
    log = []
    for step in range(cfg.steps):
        row = drpo_step(generator, base, optimizer, prompts, reward, features, cfg, step, noise_shape, cond_fn)
        log.append(row)
        if out:
            with out.open("a") as f:
                f.write(json.dumps(row) + "\n")
    return log


@torch.no_grad()
def evaluate(generator: nn.Module, prompts: Sequence, reward: Reward, features: Features | None = None, *,
             noise_shape: Sequence[int], num_samples: int = 16, seed: int = 12345,
             cond_fn=default_condition) -> dict:
    """Fresh samples of every prompt (noises from `seed`, none a training draw unless seed is the training seed):
    the reward's mean over all of them and the mean per-prompt diversity (feature space when `features` is given,
    else output space), and `output_diversity` in output space. The generator is left in the mode it was in."""
    device = next(generator.parameters()).device
    was_training = generator.training
    generator.eval()
    scores, div, out_div = [], [], []
    try:
        for j, prompt in enumerate(prompts):
            noise = draw_noise(seed, 0, j, num_samples, noise_shape).to(device)
            images = generator(noise, cond_fn([prompt] * num_samples, device))
            scores.append(call_reward(reward, images, [prompt] * num_samples))
            feats = _as_dict(features(images)) if features is not None else {"output": images}
            div.append(sum(mean_pairwise_distance(f) for f in feats.values()) / len(feats))
            out_div.append(mean_pairwise_distance(images))
    finally:
        generator.train(was_training)
    return {"reward_mean": float(torch.cat(scores).mean()), "diversity": sum(div) / len(div),
            "output_diversity": sum(out_div) / len(out_div)}
