"""`dpokit bench --family diffusion`: dpokit's Diffusion-DPO against the diffusers research script's step.

The peer is diffusers' `examples/research_projects/diffusion_dpo/train_diffusion_dpo.py`, re-implemented here
step for step (the script itself needs a Hub dataset, wandb and torchvision, none of which a bench may fetch).
What it does at *every* step, and so what the peer does:

1. decode both images of each pair and transform them (resize, centre crop, [-1, 1]); tokenize the captions;
2. VAE-encode all 2B images (`latent_dist.sample()` × scaling_factor, in chunks of `vae_encode_batch_size`);
3. run the text encoder on the captions (its last hidden state, repeated for both halves);
4. draw one noise tensor and one timestep per pair, shared by the preferred and the rejected image;
5. one UNet forward over [preferred; rejected] with the LoRA adapters on (with grad), then the reference: the same
   UNet with `disable_adapters()` under no_grad, then `enable_adapters()`;
6. loss = −log σ(−½·beta_dpo · (model_diff − ref_diff)), the diffs being mse(preferred) − mse(rejected);
7. backward, clip the gradient norm to 1, AdamW (weight decay 1e-2) on the LoRA parameters, constant lr.

dpokit runs through its public training path (`dpokit.train.Loop`, `family: diffusion`): steps 1-3 once, before
training (latents are the posterior mean, cached; see families/diffusion/encode.py), then 4-7 at every step.
dpokit scores −½·mse, so its `beta` is the script's `beta_dpo` for the same loss. The two do the same work per
step but for the encoding: `tests/test_bench_diffusion.py` checks that, given the same latents and draws, the
peer's loss is dpokit's.

Everything is built on the spot with random weights (nothing is downloaded): a Stable-Diffusion-shaped pipeline
(VAE, CLIP text encoder, conditional UNet, SD's noise schedule) saved once with `save_pretrained`, and synthetic
pairs written as prompt/chosen/rejected JSON Lines with image paths, which dpokit reads and the peer reads the way
the script reads its dataset. Each run is a fresh subprocess (so its peak RSS is its own), dpokit and the peer
alternate, and each side's timed part is its whole training run from a cold start: for dpokit the encoding (its
cache starts empty in every run) plus the epochs and the final save, for the peer its loop plus the final save.
Model loading ("setup") is timed apart. `--device cuda` runs both in bf16 (the script casts the frozen weights to
bf16 under accelerate's bf16 autocast; dpokit keeps fp32 weights under bf16 autocast, its GPU default).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

# SD's text encoder reads at most 77 tokens, and the script pads every caption to that length.
TOKENS = 77
LORA_TARGETS = ["to_k", "to_q", "to_v", "to_out.0"]  # the script's LoRA targets (attention projections)

# Pipeline shapes, random weights. tiny: 64 px images, VAE downscale 4 (16 × 16 × 4 latents), a two-level UNet;
# its VAE-encode / UNet-forward FLOP ratio (1.3) is about Stable Diffusion 1.5's at 512 px (1.4), so the share of
# a script step spent encoding is SD's. sd1.5: SD 1.5's own shape (860M-parameter UNet) at 512 px, for a GPU.
SHAPES = {
    "tiny": dict(resolution=64, vae_channels=(16, 32, 64), unet_channels=(32, 64), cross_attention_dim=32,
                 heads=8, text_layers=2, text_heads=4, text_intermediate=64, norm_groups=8),
    "sd1.5": dict(resolution=512, vae_channels=(128, 256, 512, 512), unet_channels=(320, 640, 1280, 1280),
                  cross_attention_dim=768, heads=8, text_layers=12, text_heads=12, text_intermediate=3072,
                  norm_groups=32),
}


@dataclass
class DiffusionSettings:
    pairs: int = 256
    batch_size: int = 8
    learning_rate: float = 5e-4  # the script's default
    epochs: int = 4  # see add_arguments
    rank: int = 4  # LoRA rank (alpha = rank, gaussian init: the script's)
    beta_dpo: float = 2500.0  # the script's default; dpokit's beta is the same number
    vae_encode_batch_size: int = 8  # the script's default; dpokit's encode_batch_size is the same by default
    weight_decay: float = 1e-2  # the script's AdamW default
    max_grad_norm: float = 1.0
    shape: str = "tiny"
    seed: int = 0
    threads: int | None = None
    device: str = "cpu"
    dpokit_overrides: dict = field(default_factory=dict)


# ---------------------------------------------------------------- the pipeline and the data


def clip_tokenizer(folder: Path):
    """A character-level CLIP tokenizer (letters, no merges): CLIP's own class and padding, no vocabulary file to
    download."""
    from transformers import CLIPTokenizer

    folder.mkdir(parents=True, exist_ok=True)
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for suffix in ("", "</w>"):
        for c in "abcdefghijklmnopqrstuvwxyz":
            vocab[c + suffix] = len(vocab)
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    return CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=TOKENS)


def build_pipeline(path: Path, shape: dict, seed: int) -> None:
    """A Stable-Diffusion-shaped pipeline folder with random weights: VAE, CLIP text encoder, conditional UNet
    (cross-attention in every level but the lowest, as SD's) and SD's scaled-linear DDPM schedule."""
    import torch
    from diffusers import AutoencoderKL, DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    tokenizer = clip_tokenizer(path.parent / f"{path.name}-vocab")
    torch.manual_seed(seed)
    d = shape["cross_attention_dim"]
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=d, intermediate_size=shape["text_intermediate"],
        num_hidden_layers=shape["text_layers"], num_attention_heads=shape["text_heads"],
        max_position_embeddings=TOKENS, bos_token_id=0, eos_token_id=1, pad_token_id=1))
    levels = len(shape["vae_channels"])
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * levels,
                        up_block_types=("UpDecoderBlock2D",) * levels, block_out_channels=shape["vae_channels"],
                        latent_channels=4, norm_num_groups=shape["norm_groups"], sample_size=shape["resolution"],
                        layers_per_block=2, scaling_factor=0.18215)
    n = len(shape["unet_channels"])
    unet = UNet2DConditionModel(
        sample_size=shape["resolution"] // 2 ** (levels - 1), in_channels=4, out_channels=4,
        block_out_channels=shape["unet_channels"], layers_per_block=2, norm_num_groups=shape["norm_groups"],
        cross_attention_dim=d, attention_head_dim=shape["heads"],
        down_block_types=("CrossAttnDownBlock2D",) * (n - 1) + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * (n - 1))
    scheduler = DDPMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                              beta_schedule="scaled_linear", clip_sample=False, steps_offset=1)
    StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
                            safety_checker=None, feature_extractor=None,
                            requires_safety_checker=False).save_pretrained(path)


def synthetic_image(rng, size: int, bright: bool):
    """A smooth colour gradient with noise, brighter for the preferred image: images a VAE has structure to encode,
    and a preference the model can learn."""
    import numpy as np
    from PIL import Image

    ramp = np.linspace(0, 1, size, dtype=np.float32)
    colour = rng.uniform(0.2, 1.0, 3).astype(np.float32)
    base = (150 if bright else 60) + 60 * np.outer(ramp, ramp[::-1])[:, :, None] * colour
    pixels = np.clip(base + 25 * rng.standard_normal((size, size, 3)), 0, 255).astype(np.uint8)
    return Image.fromarray(pixels, "RGB")


def caption(rng: random.Random) -> str:
    words = ["".join(rng.choice("etaoinshrdlcumwfgypbvk") for _ in range(rng.randint(2, 7)))
             for _ in range(rng.randint(3, 12))]
    return " ".join(words)


def write_pairs(folder: Path, n: int, resolution: int, seed: int) -> Path:
    """n pairs as JSON Lines, images as PNG paths relative to the file."""
    import numpy as np

    (folder / "img").mkdir(parents=True, exist_ok=True)
    rng, words = np.random.default_rng(seed), random.Random(seed)
    rows = []
    for i in range(n):
        synthetic_image(rng, resolution, True).save(folder / "img" / f"{i}w.png")
        synthetic_image(rng, resolution, False).save(folder / "img" / f"{i}l.png")
        rows.append({"prompt": caption(words), "chosen": f"img/{i}w.png", "rejected": f"img/{i}l.png"})
    path = folder / "pairs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def flop_budget(model_dir: Path, rank: int, device: str = "cpu") -> dict:
    """GFLOP of each part of a step, per image (counted by torch's FlopCounterMode, batch 1, fp32, on the run's
    device: attention counts differ by kernel): VAE encode, text encoder, the LoRA UNet's forward, and its forward +
    backward. What bounds the speed-up from encoding once."""
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from peft import LoraConfig
    from torch.utils.flop_counter import FlopCounterMode
    from transformers import CLIPTextModel

    vae = AutoencoderKL.from_pretrained(model_dir, subfolder="vae")
    text_encoder = CLIPTextModel.from_pretrained(model_dir, subfolder="text_encoder")
    unet = UNet2DConditionModel.from_pretrained(model_dir, subfolder="unet").requires_grad_(False)
    unet.add_adapter(LoraConfig(r=rank, lora_alpha=rank, init_lora_weights="gaussian", target_modules=LORA_TARGETS))
    for m in (vae, text_encoder, unet):
        m.to(device)
    res, size = vae.config.sample_size, unet.config.sample_size
    x, z = torch.randn(1, 3, res, res, device=device), torch.randn(1, 4, size, size, device=device)
    ids, t = torch.ones(1, TOKENS, dtype=torch.long, device=device), torch.tensor([500], device=device)

    def count(fn) -> float:
        with FlopCounterMode(display=False) as counter:
            fn()
        return counter.get_total_flops() / 1e9

    with torch.no_grad():
        out = {"vae_encode": count(lambda: vae.encode(x)), "text_encoder": count(lambda: text_encoder(ids)),
               "unet_forward": count(lambda: unet(z, t, text_encoder(ids)[0]))}
    text = text_encoder(ids)[0].detach()
    out["unet_forward_backward"] = count(lambda: unet(z, t, text).sample.square().mean().backward())
    return out


def per_pair_gflop(budget: dict) -> dict:
    """A pair's work per epoch: the script encodes both images and the caption at every step; dpokit does the
    rest of the step, the same (policy forward + backward on both images, reference forward on both)."""
    unet = 2 * (budget["unet_forward_backward"] + budget["unet_forward"])
    encode = 2 * budget["vae_encode"] + budget["text_encoder"]
    return {"script": unet + encode, "dpokit_step": unet, "encode": encode,
            "encode_share": encode / (unet + encode), "ceiling": (unet + encode) / unet}


def prepare(workdir: Path, s: DiffusionSettings) -> dict:
    """The pipeline and the pairs under `workdir`; returns what they are."""
    from diffusers import UNet2DConditionModel
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    for library in (diffusers_logging, transformers_logging):
        library.disable_progress_bar()  # saving and loading shards: bars that say nothing about the comparison
    shape = SHAPES[s.shape]
    build_pipeline(workdir / "model", shape, s.seed)
    write_pairs(workdir, s.pairs, shape["resolution"], s.seed)
    unet = UNet2DConditionModel.from_pretrained(workdir / "model", subfolder="unet")
    n_params = sum(p.numel() for p in unet.parameters())
    del unet
    budget = flop_budget(workdir / "model", s.rank, s.device)
    return {"pairs": s.pairs, "shape": s.shape, "resolution": shape["resolution"],
            "latent_size": shape["resolution"] // 2 ** (len(shape["vae_channels"]) - 1),
            "unet_params": n_params, "gflop_per_image": budget, "gflop_per_pair": per_pair_gflop(budget)}


# ---------------------------------------------------------------- the peer: the script's step, re-implemented


def script_pixels(image, resolution: int):
    """The script's image transform with --no_hflip: shorter side to `resolution` (bilinear), centre crop,
    ToTensor, Normalize(0.5, 0.5). Flipping is left out because dpokit does not flip."""
    import numpy as np
    import torch
    from PIL import Image

    w, h = image.size
    if (w, h) != (resolution, resolution):
        scale = resolution / min(w, h)
        w, h = max(resolution, int(w * scale)), max(resolution, int(h * scale))
        image = image.resize((w, h), Image.BILINEAR)
        left, top = int(round((w - resolution) / 2)), int(round((h - resolution) / 2))
        image = image.crop((left, top, left + resolution, top + resolution))
    x = torch.from_numpy(np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0).permute(2, 0, 1)
    return (x - 0.5) / 0.5


class ScriptPairs:
    """The script's dataset after `with_transform`: every access decodes and transforms both images (preferred
    first, stacked on the channel axis) and tokenizes the caption, as its `preprocess_train` does."""

    def __init__(self, path: Path, tokenizer, resolution: int):
        self.rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        self.base, self.tokenizer, self.resolution = path.parent, tokenizer, resolution

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict:
        import torch
        from PIL import Image

        row = self.rows[i]
        images = [script_pixels(Image.open(self.base / row[k]), self.resolution) for k in ("chosen", "rejected")]
        ids = self.tokenizer([row["prompt"]], max_length=self.tokenizer.model_max_length, padding="max_length",
                             truncation=True, return_tensors="pt").input_ids[0]
        return {"pixel_values": torch.cat(images, dim=0), "input_ids": ids}


def collate(examples: list[dict]) -> dict:
    import torch

    return {"pixel_values": torch.stack([e["pixel_values"] for e in examples]).float(),
            "input_ids": torch.stack([e["input_ids"] for e in examples])}


def encode_batch(vae, text_encoder, pixel_values, input_ids, chunk: int, sample: bool = True):
    """Steps 2-3 of the script's step: latents of [all preferred; all rejected] (a posterior sample, or its mean
    with sample=False, which is what dpokit caches) × scaling_factor, and the caption states for both halves."""
    import torch

    with torch.no_grad():
        feed = torch.cat(pixel_values.chunk(2, dim=1))
        parts = []
        for i in range(0, len(feed), chunk):
            posterior = vae.encode(feed[i:i + chunk]).latent_dist
            parts.append(posterior.sample() if sample else posterior.mean)
        latents = torch.cat(parts) * vae.config.scaling_factor
        text = text_encoder(input_ids.to(text_encoder.device), attention_mask=None)[0].repeat(2, 1, 1)
    return latents, text


def script_draw(latents, num_train_timesteps: int):
    """Step 4: noise and a timestep per pair, each shared by the pair's two images."""
    import torch

    half = len(latents) // 2
    noise = torch.randn_like(latents).chunk(2)[0].repeat(2, 1, 1, 1)
    timesteps = torch.randint(0, num_train_timesteps, (half,), device=latents.device, dtype=torch.long).repeat(2)
    return noise, timesteps


def per_image_mse(pred, target):
    return ((pred.float() - target.float()) ** 2).mean(dim=tuple(range(1, pred.dim())))


def script_loss(unet, scheduler, latents, text, noise, timesteps, beta_dpo: float, adapters=None) -> tuple:
    """Steps 5-6: the policy forward (with grad) and the reference forward (adapters off, no grad) on the same
    noisy batch, and the sigmoid loss. `adapters` is the module whose adapters switch (the unwrapped UNet).
    Returns (loss, the script's logged metrics as tensors)."""
    import torch
    import torch.nn.functional as F

    adapters = adapters if adapters is not None else unet
    noisy = scheduler.add_noise(latents, noise, timesteps)
    kind = scheduler.config.prediction_type
    if kind == "epsilon":
        target = noise
    elif kind == "v_prediction":
        target = scheduler.get_velocity(latents, noise, timesteps)
    else:
        raise ValueError(f"the script knows no prediction type {kind!r}")
    model_w, model_l = per_image_mse(unet(noisy, timesteps, text).sample, target).chunk(2)
    adapters.disable_adapters()
    try:
        with torch.no_grad():
            ref = per_image_mse(unet(noisy, timesteps, text).sample.detach(), target)
    finally:
        adapters.enable_adapters()
    ref_w, ref_l = ref.chunk(2)
    logits = (ref_w - ref_l) - (model_w - model_l)
    loss = -F.logsigmoid(0.5 * beta_dpo * logits).mean()  # the script's scale_term = −½·beta_dpo
    metrics = {"raw_model_loss": 0.5 * (model_w.mean() + model_l.mean()), "ref_loss": ref.mean(),
               "implicit_acc": (logits > 0).float().mean() + 0.5 * (logits == 0).float().mean()}
    return loss, metrics


def load_script_parts(model_dir: Path, device, weight_dtype):
    """The script's loading: tokenizer, DDPM scheduler, and the text encoder, VAE and UNet frozen, on the device,
    in `weight_dtype` (bf16 under mixed precision: the script casts every weight LoRA does not train)."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    tokenizer = CLIPTokenizer.from_pretrained(model_dir, subfolder="tokenizer")
    scheduler = DDPMScheduler.from_pretrained(model_dir, subfolder="scheduler")
    text_encoder = CLIPTextModel.from_pretrained(model_dir, subfolder="text_encoder")
    vae = AutoencoderKL.from_pretrained(model_dir, subfolder="vae")
    unet = UNet2DConditionModel.from_pretrained(model_dir, subfolder="unet")
    for m in (vae, text_encoder, unet):
        m.requires_grad_(False).to(device, dtype=weight_dtype)
    return tokenizer, scheduler, text_encoder, vae, unet


def script_lora(rank: int, init="gaussian"):
    from peft import LoraConfig

    return LoraConfig(r=rank, lora_alpha=rank, init_lora_weights=init, target_modules=LORA_TARGETS)


def script_optimizer(unet, s: DiffusionSettings):
    """The script's AdamW on the UNet's trainable (LoRA) parameters; returns (parameters, optimizer)."""
    import torch

    params = [p for p in unet.parameters() if p.requires_grad]
    return params, torch.optim.AdamW(params, lr=s.learning_rate, betas=(0.9, 0.999), weight_decay=s.weight_decay,
                                     eps=1e-8)


def _work_peer(workdir: Path, s: DiffusionSettings) -> dict:
    import torch
    from accelerate import Accelerator
    from accelerate.utils import set_seed
    from diffusers import StableDiffusionPipeline
    from diffusers.optimization import get_scheduler
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft.utils import get_peft_model_state_dict

    from .bench import _sync

    run_dir = Path(tempfile.mkdtemp(dir=workdir))
    t0 = time.perf_counter()
    cuda = s.device == "cuda"
    accelerator = Accelerator(mixed_precision="bf16" if cuda else "no", cpu=not cuda)
    set_seed(s.seed)
    weight_dtype = torch.bfloat16 if cuda else torch.float32
    tokenizer, scheduler, text_encoder, vae, unet = load_script_parts(workdir / "model", accelerator.device,
                                                                      weight_dtype)
    unet.add_adapter(script_lora(s.rank))
    params, optimizer = script_optimizer(unet, s)
    dataset = ScriptPairs(workdir / "pairs.jsonl", tokenizer, SHAPES[s.shape]["resolution"])
    loader = torch.utils.data.DataLoader(dataset, batch_size=s.batch_size, shuffle=True, collate_fn=collate,
                                         num_workers=0)
    lr_scheduler = get_scheduler("constant", optimizer=optimizer)
    unet, optimizer, loader, lr_scheduler = accelerator.prepare(unet, optimizer, loader, lr_scheduler)
    raw = accelerator.unwrap_model(unet)
    t1, c1 = time.perf_counter(), time.process_time()
    losses, logs, encode_s = [], {}, 0.0
    unet.train()
    for _ in range(s.epochs):
        for batch in loader:
            with accelerator.accumulate(unet):
                e0 = time.perf_counter()
                latents, text = encode_batch(vae, text_encoder, batch["pixel_values"].to(weight_dtype),
                                             batch["input_ids"], s.vae_encode_batch_size)
                _sync()
                encode_s += time.perf_counter() - e0
                noise, timesteps = script_draw(latents, scheduler.config.num_train_timesteps)
                loss, metrics = script_loss(unet, scheduler, latents, text, noise, timesteps, s.beta_dpo, raw)
                accelerator.backward(loss)
                if accelerator.sync_gradients:
                    accelerator.clip_grad_norm_(params, s.max_grad_norm)
                optimizer.step()
                lr_scheduler.step()
                optimizer.zero_grad()
            losses.append(loss.detach().item())
            logs = {k: v.detach().item() for k, v in metrics.items()}  # the script logs these every step
    layers = convert_state_dict_to_diffusers(get_peft_model_state_dict(raw.to(torch.float32)))
    StableDiffusionPipeline.save_lora_weights(save_directory=str(run_dir / "out"), unet_lora_layers=layers)
    _sync()
    t2, c2 = time.perf_counter(), time.process_time()
    return {"setup_s": t1 - t0, "encode_s": encode_s, "seconds": t2 - t1, "wall_s": t2 - t0,
            "train_cpu_s": c2 - c1, "steps": len(losses), "mean_loss": sum(losses) / len(losses),
            "last_implicit_acc": logs.get("implicit_acc")}


# ---------------------------------------------------------------- dpokit's side


def dpokit_config(workdir: Path, s: DiffusionSettings, run_dir: Path, **extra):
    """dpokit's config for the same run: the script's LoRA, optimizer and schedule; beta = beta_dpo (dpokit
    scores −½·mse); the encodings cache in a fresh folder, so every run encodes."""
    from .config import load_config

    values = dict(
        family="diffusion", model=str(workdir / "model"), train_data=str(workdir / "pairs.jsonl"),
        lora={"r": s.rank, "lora_alpha": s.rank}, beta=s.beta_dpo, loss_type="sigmoid",
        learning_rate=s.learning_rate, lr_scheduler_type="constant", weight_decay=s.weight_decay,
        max_grad_norm=s.max_grad_norm, per_device_train_batch_size=s.batch_size, num_train_epochs=s.epochs,
        dtype="float32", bf16=s.device == "cuda", seed=s.seed, output_dir=str(run_dir / "out"),
        ref_cache_dir=str(run_dir / "cache"), disable_tqdm=True, logging_steps=1, save_steps=0,
        encode_batch_size=s.vae_encode_batch_size)
    values.update(s.dpokit_overrides)
    values.update(extra)
    return load_config(None, **values)


def _work_dpokit(workdir: Path, s: DiffusionSettings) -> dict:
    import importlib

    from .bench import _sync
    from .families import FAMILIES

    train_mod = importlib.import_module("dpokit.train")
    run_dir = Path(tempfile.mkdtemp(dir=workdir))
    cfg = dpokit_config(workdir, s, run_dir)
    encode_s = encode_cpu = 0.0
    family_cls = FAMILIES["diffusion"]  # through the registry: shared code never imports a family's internals
    examples = family_cls.examples

    def timed_examples(*a, **k):
        nonlocal encode_s, encode_cpu
        t, c = time.perf_counter(), time.process_time()
        out = examples(*a, **k)
        _sync()
        encode_s += time.perf_counter() - t
        encode_cpu += time.process_time() - c
        return out

    family_cls.examples = timed_examples  # images read, VAE and text encoder run: the one-time encoding
    t0 = time.perf_counter()
    loop = train_mod.Loop(cfg)
    t1, c1 = time.perf_counter(), time.process_time()
    result = loop.run()
    _sync()
    t2, c2 = time.perf_counter(), time.process_time()
    losses = [row["loss"] for row in result.history if "loss" in row]
    # The encoding happens inside Loop(): it is moved from setup into the timed part.
    return {"setup_s": t1 - t0 - encode_s, "encode_s": encode_s, "seconds": encode_s + t2 - t1, "wall_s": t2 - t0,
            "train_cpu_s": encode_cpu + c2 - c1, "steps": result.global_step,
            "mean_loss": sum(losses) / len(losses)}


def worker(kind: str, workdir: str, settings: dict) -> None:
    from .bench import report_run

    s = DiffusionSettings(**settings)
    report_run(_work_dpokit if kind == "dpokit" else _work_peer, s.threads, Path(workdir), s)


# ---------------------------------------------------------------- the comparison

KINDS = ("peer", "dpokit")
NAMES = {"peer": "diffusers script (re-implemented)", "dpokit": "dpokit"}


def summarize(runs: list[dict], pairs: int, epochs: int) -> dict:
    """Medians over the repeats: pairs/s counts every pair of every epoch."""
    secs = [r["seconds"] for r in runs]
    med = statistics.median(secs)
    work = pairs * epochs
    return {
        "seconds": med, "min_s": min(secs), "max_s": max(secs),
        "pairs_per_s": work / med, "pairs_per_s_min": work / max(secs), "pairs_per_s_max": work / min(secs),
        "encode_s": statistics.median(r["encode_s"] for r in runs),
        "setup_s": statistics.median(r["setup_s"] for r in runs),
        "cpu_s": statistics.median(r["train_cpu_s"] for r in runs),
        "peak_rss_mb": statistics.median(r["peak_rss_mb"] for r in runs),
        "gpu_peak_mb": statistics.median(r["gpu_peak_mb"] for r in runs) if runs[0].get("gpu_peak_mb") else None,
        "mean_loss": statistics.median(r["mean_loss"] for r in runs),
        "runs": runs,
    }


def compare(s: DiffusionSettings, repeats: int, say=print) -> dict:
    """Both trainers `repeats` times each, alternating which goes first; the median of each."""
    from .bench import _load, spawn_worker

    with tempfile.TemporaryDirectory(prefix="dpokit-bench-diffusion-") as tmp:
        work = Path(tmp)
        info = prepare(work, s)
        flops = info["gflop_per_pair"]
        say(f"pipeline {s.shape}: {info['resolution']} px images, latents 4 x {info['latent_size']} x "
            f"{info['latent_size']}, UNet {info['unet_params'] / 1e6:.2f}M parameters, LoRA rank {s.rank}; "
            f"{info['pairs']} synthetic pairs, batch {s.batch_size}, lr {s.learning_rate}, beta_dpo {s.beta_dpo:g}, "
            f"{s.epochs} epoch(s), {'bf16 on the GPU' if s.device == 'cuda' else 'fp32'}")
        if flops:
            say(f"work per pair: script {flops['script']:.2f} GFLOP, of which encoding {flops['encode']:.2f} "
                f"({100 * flops['encode_share']:.0f}%); a step without encoding is at most "
                f"{flops['ceiling']:.2f}x faster by FLOPs")
        runs: dict[str, list] = {k: [] for k in KINDS}
        for i in range(repeats):
            for kind in (KINDS if i % 2 == 0 else KINDS[::-1]):
                r = spawn_worker("dpokit.bench_diffusion", kind, work, s.device, asdict(s))
                r["load"] = _load()
                runs[kind].append(r)
                gpu = f", peak GPU memory {r['gpu_peak_mb']:.0f} MB" if r.get("gpu_peak_mb") else ""
                say(f"  run {i + 1}/{repeats} {kind:6s} {r['seconds']:7.1f} s, encoding {r['encode_s']:.1f} s "
                    f"({s.pairs * s.epochs / r['seconds']:.2f} pairs/s, {r['train_cpu_s']:.0f} CPU s, peak RSS "
                    f"{r['peak_rss_mb']:.0f} MB{gpu}, mean loss {r['mean_loss']:.4f}; load {r['load']})")
        out = {"info": info, "settings": asdict(s), **{k: summarize(v, s.pairs, s.epochs) for k, v in runs.items()}}
        out["ratio"] = out["dpokit"]["pairs_per_s"] / out["peer"]["pairs_per_s"]
        out["memory_ratio"] = out["dpokit"]["peak_rss_mb"] / out["peer"]["peak_rss_mb"]
        out["goal_met"] = out["ratio"] >= 2.0 and out["memory_ratio"] <= 1.0
        return out


def format_table(result: dict) -> str:
    gpu = result["peer"].get("gpu_peak_mb") is not None
    lines = ["| trainer | pairs/s median (min - max) | seconds | of which encoding | CPU seconds | peak RSS | "
             + ("peak GPU memory | " if gpu else "") + "mean loss |",
             "|---|---|---|---|---|---|---|" + "---|" * gpu]
    for kind in KINDS:
        r = result[kind]
        lines.append(f"| {NAMES[kind]} | {r['pairs_per_s']:.2f} ({r['pairs_per_s_min']:.2f} - "
                     f"{r['pairs_per_s_max']:.2f}) | {r['seconds']:.1f} | {r['encode_s']:.1f} | {r['cpu_s']:.1f} | "
                     f"{r['peak_rss_mb']:.0f} MB | " + (f"{r['gpu_peak_mb']:.0f} MB | " if gpu else "")
                     + f"{r['mean_loss']:.4f} |")
    verdict = "met" if result["goal_met"] else "missed"
    lines.append(f"\ndpokit / script: {result['ratio']:.2f}x pairs/s; peak RSS {result['dpokit']['peak_rss_mb']:.0f} "
                 f"MB vs {result['peer']['peak_rss_mb']:.0f} MB ({result['memory_ratio']:.2f}x); goal "
                 f"(>= 2x pairs/s, peak memory no higher) {verdict}")
    return "\n".join(lines)


def settings_from_args(args, device: str) -> DiffusionSettings:
    from .bench import _overrides

    return DiffusionSettings(pairs=args.pairs, batch_size=args.batch_size, learning_rate=args.learning_rate,
                             epochs=args.epochs, rank=args.rank, beta_dpo=args.beta_dpo, shape=args.diffusion_shape,
                             threads=args.threads, device=device, dpokit_overrides=_overrides(args.dpokit_set))


def run_bench(args, device: str) -> None:
    import torch

    from .bench import _load
    from .errors import DpokitError

    text_only = [flag for flag, value in (("--data", args.data), ("--synthetic", args.synthetic),
                                          ("--prompt-lengths", args.prompt_lengths), ("--trl-set", args.trl_set))
                 if value]
    if text_only:
        raise DpokitError(f"{', '.join(text_only)}: for the causal_lm bench only (--family diffusion builds its own "
                          "images and compares with the diffusers script)")
    s = settings_from_args(args, device)
    if s.pairs < 1 or s.epochs < 1 or s.rank < 1:
        raise DpokitError("--pairs, --epochs and --rank must be >= 1")
    if args.threads:
        torch.set_num_threads(args.threads)
    where = torch.cuda.get_device_name() if device == "cuda" else f"{os.cpu_count()} CPUs"
    print(f"torch {torch.__version__}, {where}, torch threads {torch.get_num_threads()}, load average {_load()}",
          flush=True)
    result = compare(s, args.repeats, say=lambda m: print(m, flush=True))
    print(format_table(result))
    print(f"load average after: {_load()}")
    if args.json:
        Path(args.json).write_text(json.dumps({"main": result}, indent=1, default=str))


def add_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("--family diffusion")
    g.add_argument("--diffusion-shape", choices=sorted(SHAPES), default="tiny",
                   help="pipeline shape, random weights (tiny: 64 px, 16 x 16 latents; sd1.5: SD 1.5's, 512 px)")
    g.add_argument("--epochs", type=int, default=4,
                   help="epochs of each run (default 4: the Diffusion-DPO paper's SD 1.5 run is about five passes "
                        "over Pick-a-Pic v2, and the script re-encodes every pass)")
    g.add_argument("--rank", type=int, default=4, help="LoRA rank, alpha = rank (the script's default 4)")
    g.add_argument("--beta-dpo", type=float, default=2500.0,
                   help="the script's beta_dpo (default 2500); dpokit runs with the same beta")

