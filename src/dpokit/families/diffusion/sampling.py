"""Loading a trained run back and sampling images from it: the family's `load_trained` and `sample`, behind
`dpokit sample` (and `dpokit eval`, which scores the UNet `load_trained` returns).

A run's output folder holds one of three things (see models.save): a whole pipeline folder (full fine-tuning, or
LoRA merged), Stable Diffusion LoRA weights (`pytorch_lora_weights.safetensors`, on the run's starting pipeline),
or a peft adapter folder (LoRA on a pixel-space UNet2DModel, on the starting UNet). Sampling runs DDIM (η = 0) on
the training noise schedule: deterministic given the starting noise, and good in few steps.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn

from ...errors import DpokitError
from .data import ImageSpec, _class_id
from .images import ImageProblem
from .models import Frozen, load_frozen, load_unet

SD_LORA_FILE = "pytorch_lora_weights.safetensors"


def run_config(path: Path, cfg):
    """The settings to load with: the caller's, else the run's config.yaml, else the defaults."""
    from ...config import TrainConfig, load_config

    if cfg is not None:
        return cfg
    return load_config(path / "config.yaml") if (path / "config.yaml").is_file() else TrainConfig()


def _base(path: Path, cfg) -> str:
    """The starting pipeline a LoRA run's adapters go on: the run's `model`."""
    if not cfg.model:
        raise DpokitError(f"{path}: LoRA weights, but no base pipeline to put them on (the run's config.yaml "
                          "names it as 'model')")
    return cfg.model


def load_trained(path: str, cfg=None) -> tuple[nn.Module, Frozen]:
    """The trained UNet (frozen, eval mode, on the CPU) and the frozen parts it samples and scores with."""
    root = Path(path)
    if not root.is_dir():
        raise DpokitError(f"{path}: no such run directory")
    cfg = run_config(root, cfg)
    if (root / "unet" / "config.json").is_file():
        unet, frozen = load_unet(path, cfg), load_frozen(path, cfg)
    elif (root / SD_LORA_FILE).is_file():
        unet, frozen = _sd_lora(root, _base(root, cfg), cfg)
    elif (root / "adapter_config.json").is_file():
        from peft import PeftModel

        base = _base(root, cfg)
        unet, frozen = PeftModel.from_pretrained(load_unet(base, cfg), path), load_frozen(base, cfg)
    else:
        raise DpokitError(f"{path}: no trained diffusion model here (a pipeline folder with unet/, "
                          f"{SD_LORA_FILE}, or a peft adapter folder)")
    return unet.requires_grad_(False).eval(), frozen


def _sd_lora(root: Path, base: str, cfg) -> tuple[nn.Module, Frozen]:
    """Stable Diffusion LoRA weights on the base UNet, through the pipeline's own `load_lora_weights` (the form
    models.save writes them in)."""
    unet, frozen = load_unet(base, cfg), load_frozen(base, cfg)
    _sd_pipeline(unet, frozen).load_lora_weights(str(root))
    return unet, frozen


def _scheduler(frozen: Frozen):
    """DDIM from the pipeline folder's own scheduler config, so keys DDPM does not keep (Stable Diffusion's
    set_alpha_to_one, for one) still apply."""
    from diffusers import DDIMScheduler

    return DDIMScheduler.from_pretrained(frozen.path, subfolder="scheduler")


def _sd_pipeline(unet: nn.Module, frozen: Frozen):
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline(vae=frozen.vae, text_encoder=frozen.text_encoder, tokenizer=frozen.tokenizer,
                                   unet=unet, scheduler=_scheduler(frozen), safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def conditions(frozen: Frozen, prompts: Sequence) -> list:
    """Each prompt as the model takes it: a caption (Stable Diffusion), a class id (a class-conditional UNet; an
    integer or its digits), or None (an unconditional UNet). A prompt the model cannot take is one line."""
    spec = ImageSpec(frozen.image_channels, 0, frozen.latent, frozen.num_class_embeds)
    out = []
    for i, prompt in enumerate(prompts):
        try:
            if spec.text:
                if not isinstance(prompt, str):
                    raise ImageProblem(f"a text-conditioned model needs a caption, got {prompt!r}")
                out.append(prompt)
            elif spec.num_classes is not None:
                out.append(_class_id({"prompt": prompt}, spec))
            elif prompt not in (None, ""):
                raise ImageProblem(f"an unconditional model takes no prompt, got {prompt!r} (give none)")
            else:
                out.append(None)
        except ImageProblem as e:
            raise DpokitError(f"prompt {i + 1}: {e}") from None
    return out


def noise_generator(seed: int, k: int) -> torch.Generator:
    """The starting noise of sample k of any prompt: column k of every row starts from the same noise, so rows
    compare conditions (and a run compares with its base) on the same draws, whatever the batch size."""
    return torch.Generator().manual_seed(seed * 1_000_003 + k)


def to_pil(x: torch.Tensor) -> list:
    """Pixels in [-1, 1], [B, C, H, W] → PIL images (RGB, or L for one channel)."""
    from PIL import Image

    array = ((x.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    return [Image.fromarray(a[:, :, 0] if a.shape[2] == 1 else a) for a in array]


def _pixel_batch(unet: nn.Module, frozen: Frozen, labels: list, generators: list, steps: int) -> list:
    """DDPMPipeline's denoising loop on a pixel-space UNet2DModel, with DDIM and the class labels DDPMPipeline
    cannot pass."""
    device, dtype = next(unet.parameters()).device, next(unet.parameters()).dtype
    size = frozen.sample_size
    x = torch.stack([torch.randn(frozen.in_channels, size, size, generator=g) for g in generators]).to(device, dtype)
    kwargs = {} if labels[0] is None else {"class_labels": torch.tensor(labels, device=device)}
    scheduler = _scheduler(frozen)
    scheduler.set_timesteps(steps)
    for t in scheduler.timesteps:
        x = scheduler.step(unet(x, t, **kwargs).sample, t, x).prev_sample
    return to_pil(x)


def _sd_batch(pipe, captions: list, generators: list, steps: int, guidance_scale: float) -> list:
    return pipe(prompt=captions, num_inference_steps=steps, guidance_scale=guidance_scale, generator=generators,
                output_type="pil").images


@torch.no_grad()
def sample(unet: nn.Module, frozen: Frozen, prompts: Sequence, *, num_generations: int = 1,
           num_inference_steps: int = 50, guidance_scale: float = 7.5, seed: int = 0, batch_size: int = 8,
           **other: Any) -> list[list]:
    """`num_generations` PIL images of each prompt, one list per prompt; the same seed gives the same images.
    `guidance_scale` is classifier-free guidance, for Stable Diffusion only (a class-conditional UNet is trained
    without a null class). The UNet samples on its own device, in eval mode, and is left in the mode it was in."""
    if other:
        raise DpokitError(f"diffusion sampling takes no {', '.join(sorted(other))} (it takes num_generations, "
                          "num_inference_steps, guidance_scale, seed and batch_size)")
    if not prompts:
        raise DpokitError("no prompts to sample from")
    if num_generations < 1 or num_inference_steps < 1 or batch_size < 1:
        raise DpokitError("num_generations, num_inference_steps and batch_size must be >= 1")
    conds = conditions(frozen, prompts)
    jobs = [(i, k) for i in range(len(conds)) for k in range(num_generations)]
    pipe = _sd_pipeline(unet, frozen).to(next(unet.parameters()).device) if frozen.latent else None
    images: list[list] = [[None] * num_generations for _ in conds]
    was_training = unet.training
    unet.eval()
    try:
        for s in range(0, len(jobs), batch_size):
            chunk = jobs[s:s + batch_size]
            generators = [noise_generator(seed, k) for _, k in chunk]
            batch_conds = [conds[i] for i, _ in chunk]
            out = (_sd_batch(pipe, batch_conds, generators, num_inference_steps, guidance_scale) if pipe is not None
                   else _pixel_batch(unet, frozen, batch_conds, generators, num_inference_steps))
            for (i, k), img in zip(chunk, out):
                images[i][k] = img
    finally:
        unet.train(was_training)
    return images
