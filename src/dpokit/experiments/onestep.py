"""DrPO against one-step DPO on a one-step digit generator (issue 16's DrPO arm; `dpokit experiment onestep`).

The protocol (written into docs/experiments.md before the runs; `PROTOCOL` below is that text):

1. the digits world of diffusion.py: the same MNIST split, the same evaluator, and its base model (reused from
   `dpokit experiment diffusion`'s output when given, else trained the same way);
2. a one-step generator distilled from the base: the base UNet's weights, called once at the last timestep with
   its output read as the image, trained to regress the base's 20-step DDIM sample from the same noise and digit
   (Luhman & Luhman 2021, knowledge distillation of an iterative sampler); this is the one-step base G₀;
3. the reward is the evaluator's probability of the asked-for digit, used only as a ranking (never differentiated);
   DrPO's frozen feature space is a second CNN of the evaluator's shape trained on the *generator's* digits (a
   stand-in for a pretrained image encoder, distinct from the judge);
4. DrPO and one-step DPO from G₀, online, with the same budget and the same draws: every step takes two digits in
   turn, samples N = 24 images each, ranks them by the reward, and trains on the best and worst k = 8 (the official
   scripts' N, k, learning rate; DrPO's reference weight 0.2; DPO's β = 30 in output space);
5. every model samples the same fresh noise; measures as in diffusion.py (unwanted rate, Fréchet distance,
   within-digit diversity) plus the mean reward.
"""

from __future__ import annotations

import copy
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from ..drpo import OneStepUNet, OnlineOneStepConfig, frozen_copy, train_drpo
from . import finish, say
from .diffusion import FULL as DIFFUSION_FULL
from .digits import CLASSES, SIZE, judge, load_mnist, measure, train_base, train_evaluator

NAME = "onestep"
FULL = dict(distil_samples=400, distil_steps=2000, distil_lr=1e-4, sample_steps=20, steps=300, prompts_per_step=2,
            num_samples=24, top_k=8, lr=1e-4, ref_weight=0.2, beta=30.0, eval_samples=100)
QUICK = dict(FULL, distil_samples=8, distil_steps=20, sample_steps=4, steps=6, num_samples=8, top_k=2,
             eval_samples=6)
DISTIL_SEED, EVAL_SEED = 3, 2
READING = "<!-- onestep:reading -->"  # docs text after this marker is hand-written and survives a rerun  # distillation noise apart from the evaluation noise



def load_base(base_dir: str):
    """The base pipeline folder's UNet (eval, frozen) and its noise schedule."""
    from diffusers import DDPMScheduler, UNet2DModel

    unet = UNet2DModel.from_pretrained(str(Path(base_dir) / "unet")).eval().requires_grad_(False)
    return unet, DDPMScheduler.from_pretrained(str(Path(base_dir) / "scheduler"))


@torch.no_grad()
def ddim_targets(unet, scheduler, noise: torch.Tensor, digits: torch.Tensor, steps: int,
                 batch_size: int = 500) -> torch.Tensor:
    """The base's DDIM (η = 0) sample from each noise: what the one-step generator learns to produce in one call."""
    from diffusers import DDIMScheduler

    ddim = DDIMScheduler.from_config(scheduler.config)
    ddim.set_timesteps(steps)
    out = []
    for s in range(0, len(noise), batch_size):
        x, c = noise[s:s + batch_size].clone(), digits[s:s + batch_size]
        for t in ddim.timesteps:
            x = ddim.step(unet(x, t, class_labels=c).sample, t, x).prev_sample
        out.append(x.clamp(-1, 1))
    return torch.cat(out)


def distil(unet, scheduler, noise: torch.Tensor, digits: torch.Tensor, targets: torch.Tensor, steps: int, lr: float,
           seed: int, batch_size: int = 64) -> OneStepUNet:
    """The one-step generator G₀: a copy of the base UNet read as an x₀ predictor at the last timestep
    (prediction_type "sample"), regressed onto the base's multi-step samples (mse, AdamW, cosine decay)."""
    from diffusers import DDPMScheduler

    student = copy.deepcopy(unet).train().requires_grad_(True)
    generator = OneStepUNet(student, DDPMScheduler.from_config(scheduler.config, prediction_type="sample"))
    opt = torch.optim.AdamW(student.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, max(steps, 1))
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        idx = torch.randint(0, len(noise), (batch_size,), generator=g)
        loss = F.mse_loss(generator(noise[idx], digits[idx]), targets[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    return generator.eval()


@torch.no_grad()
def one_step_samples(generator, n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """n samples of every digit (digit-major) from fixed noise, clamped to the image range."""
    digits = torch.arange(CLASSES).repeat_interleave(n)
    noise = torch.randn((len(digits), 1, SIZE, SIZE), generator=torch.Generator().manual_seed(seed))
    return torch.cat([generator(noise[s:s + 500], digits[s:s + 500]) for s in range(0, len(digits), 500)]
                     ).clamp(-1, 1), digits


def verdict(drpo: dict, dpo: dict, base: dict) -> dict:
    """The decision rule: DrPO is ahead of one-step DPO when its mean reward is higher and its diversity no lower;
    behind when both are lower; otherwise a trade-off. Both count only if they raise the reward over G₀."""
    up = {"drpo_raises_reward": drpo["p_asked"] > base["p_asked"], "dpo_raises_reward": dpo["p_asked"] > base["p_asked"]}
    r, d = drpo["p_asked"] > dpo["p_asked"], drpo["diversity"] >= dpo["diversity"]
    reading = "DrPO ahead" if r and d else "DrPO behind" if not r and not d else "trade-off"
    return {**up, "drpo_higher_reward": r, "drpo_diversity_no_lower": d, "reading": reading}


def run(out_dir: str | Path = "runs/onestep", size: dict | None = None, seed: int = 0, base_dir: str | None = None,
        docs_dir: str | Path | None = None, command: str = "dpokit experiment onestep") -> dict:
    size = dict(size or FULL)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    digits = load_mnist()
    evaluator = train_evaluator(*digits.evaluator, seed=seed)
    features_net = train_evaluator(*digits.generator, seed=seed + 1)  # DrPO's frozen feature space, not the judge
    ref_images = digits.reference[0]
    if base_dir is None:
        base_dir = train_base(*digits.generator, out / "base", DIFFUSION_FULL["base_channels"],
                              DIFFUSION_FULL["base_steps"], seed=seed)
        say(t0, "base model trained")
    unet, scheduler = load_base(base_dir)

    n = size["distil_samples"] * CLASSES
    asked = torch.arange(CLASSES).repeat(size["distil_samples"])
    noise = torch.randn((n, 1, SIZE, SIZE), generator=torch.Generator().manual_seed(DISTIL_SEED + 10 * seed))
    targets = ddim_targets(unet, scheduler, noise, asked, size["sample_steps"])
    say(t0, f"{n} DDIM targets from the base")
    g0 = distil(unet, scheduler, noise, asked, targets, size["distil_steps"], size["distil_lr"], seed)
    say(t0, f"one-step generator distilled ({size['distil_steps']} steps)")

    def reward(images, prompts):  # only called: a ranking by the judge's probability of the asked digit
        return judge(evaluator, images.clamp(-1, 1), torch.tensor(prompts))[0]

    def features(images):
        return features_net.features(images)

    results = {"command": command, "seed": seed, "size": size, "base_dir": str(base_dir)}
    x, asked_eval = one_step_samples(g0, size["eval_samples"], EVAL_SEED + 10 * seed)
    results["onestep_base"] = measure(evaluator, x, asked_eval, ref_images)
    logs = {}
    for method in ("drpo", "dpo"):
        cfg = OnlineOneStepConfig(method=method, num_samples=size["num_samples"], top_k=size["top_k"],
                                  prompts_per_step=size["prompts_per_step"], steps=size["steps"], lr=size["lr"],
                                  ref_weight=size["ref_weight"], beta=size["beta"], seed=seed)
        (out / f"{method}.jsonl").unlink(missing_ok=True)  # train_drpo appends: a rerun starts a fresh log
        gen = copy.deepcopy(g0).train().requires_grad_(True)
        logs[method] = train_drpo(gen, list(range(CLASSES)), reward, features, cfg, noise_shape=(1, SIZE, SIZE),
                                  base=frozen_copy(g0), log_path=str(out / f"{method}.jsonl"))
        x, _ = one_step_samples(gen.eval(), size["eval_samples"], EVAL_SEED + 10 * seed)
        results[method] = measure(evaluator, x, asked_eval, ref_images)
        say(t0, f"{method}: " + ", ".join(f"{k} {v:.4g}" for k, v in results[method].items()))
    say(t0, "one-step base: " + ", ".join(f"{k} {v:.4g}" for k, v in results["onestep_base"].items()))
    results["verdict"] = verdict(results["drpo"], results["dpo"], results["onestep_base"])
    results["minutes"] = round((time.time() - t0) / 60, 1)
    finish(results, out, NAME, format_table(results), docs_dir, markdown_section(results), keep=READING)
    return results


ROWS = (("onestep_base", "one-step base G₀"), ("dpo", "one-step DPO"), ("drpo", "DrPO"))


def format_table(results: dict) -> str:
    lines = [f"learning rate {results['size']['lr']:g}, {results['size']['steps']} steps",
             f"{'model':<18}{'reward':>8}{'unwanted':>10}{'FID':>9}{'diversity':>11}"]
    for key, label in ROWS:
        r = results[key]
        lines.append(f"{label:<18}{r['p_asked']:>8.3f}{r['unwanted_rate']:>10.1%}{r['fid']:>9.2f}"
                     f"{r['diversity']:>11.2f}")
    lines.append(results["verdict"]["reading"])
    return "\n".join(lines)


PROTOCOL = f"""\
The issue's DrPO arm, on CPU with no downloads (`dpokit experiment onestep --base runs/diffusion/base`; without
`--base` it trains the base model first, as the Diffusion-DPO experiment does). The protocol and the decision rule
below were committed before the first run.

- **World**: the Diffusion-DPO experiment's digits, evaluator and base model (same split, same seeds).
- **One-step generator G₀**: the base UNet's weights, called once at the last timestep with its output read as the
  image, distilled by regression onto the base's DDIM samples ({FULL['sample_steps']} steps) from the same noise and
  digit: {FULL['distil_samples']} noises per digit, {FULL['distil_steps']:,} AdamW steps at batch 64 (Luhman &
  Luhman 2021's distillation of an iterative sampler; the stand-in for SD-Turbo).
- **Reward**: the evaluator's probability of the asked-for digit, only called: DrPO and DPO see a ranking of each
  prompt's samples, never a gradient of it.
- **Feature space** (DrPO's drift lives there): the penultimate layer of a second CNN of the evaluator's shape,
  trained on the generator's digits, frozen; a stand-in for the pretrained encoder the paper uses, and not the
  judge.
- **Training**, from G₀, the same budget and the same noise draws for both: {FULL['steps']} steps, each taking
  {FULL['prompts_per_step']} digits in turn, N = {FULL['num_samples']} samples per digit, the best and worst
  k = {FULL['top_k']} by reward, AdamW learning rate {FULL['lr']:g}, gradients clipped to 1. DrPO: the dipole drift
  target plus {FULL['ref_weight']:g}× the reference drift toward G₀'s outputs on the same noise. One-step DPO (the
  paper's DPO₁step baseline): every sample scored against the best and worst k in output space, β = {FULL['beta']:g},
  G₀ as the reference. Both are the official scripts' defaults.
- **Measures**, on the same fresh noise ({FULL['eval_samples']} per digit): mean reward (the evaluator's p(asked
  digit)), the unwanted rate, the Fréchet distance to the real reference digits and the within-digit diversity, all
  in the evaluator's feature space as in the Diffusion-DPO experiment.
- **Decision rule**: DrPO is **ahead** of one-step DPO (the paper's finding) when its mean reward is higher and its
  diversity no lower; **behind** when both are lower; otherwise a **trade-off**, reported as such. A method counts as
  having learned only if it raises the mean reward over G₀.
"""


def markdown_section(results: dict) -> str:
    table = ["| model | mean reward | unwanted rate | Fréchet distance | diversity |", "|---|---:|---:|---:|---:|"]
    for key, label in ROWS:
        r = results[key]
        table.append(f"| {label} | {r['p_asked']:.3f} | {r['unwanted_rate']:.1%} | {r['fid']:.2f} | "
                     f"{r['diversity']:.2f} |")
    v = results["verdict"]
    return f"""## DrPO vs one-step DPO: a one-step digit generator

{PROTOCOL}
### Results

Rerun: `{results['command']}` ({results['minutes']} min on this machine; learning rate {results['size']['lr']:g}).

{chr(10).join(table)}

Reading: **{v['reading']}** (DrPO higher reward: {v['drpo_higher_reward']}, diversity no lower:
{v['drpo_diversity_no_lower']}; DrPO raises the reward over G₀: {v['drpo_raises_reward']}, DPO:
{v['dpo_raises_reward']}).

{READING}
(The reading of these figures is written by hand after the runs; a rerun keeps it.)
"""
