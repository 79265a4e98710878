"""Raw pairs → examples: latents (VAE posterior mean × scaling_factor) and text embeddings, computed once by the
frozen encoders and cached on disk, so no step re-encodes them. Pixel-space models take the pixels in [-1, 1].
An unpaired row's rejected image is another row's image: it is encoded once and shared.

The cache file is keyed by everything that changes an encoding: the VAE's and text encoder's weights and config,
the tokenizer's settings, and every image's pixels and caption at the model's resolution.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from ...io import save_tensors
from ..base import digest
from .data import RawPair
from .images import to_unit_range
from .models import Frozen

log = logging.getLogger(__name__)
CACHE_VERSION = b"dpokit-diffusion-encodings-1"


@dataclass
class DiffusionExample:
    """One preference pair, or one unpaired image (`label` set), encoded. The Example protocol's fields, and the
    family's own tensors."""

    chosen: torch.Tensor  # x0 of the preferred (unpaired: the labelled) image: latents [4, h, w] or pixels [C, H, W]
    rejected: torch.Tensor  # unpaired: another row's image under this row's condition, for KTO's KL estimate
    text: torch.Tensor | None  # encoder hidden states [L, D] (shared among rows with the same caption)
    class_id: int | None
    weight: float = 1.0
    margin: float = 0.0
    label: bool | None = None
    is_group: bool = False
    n_rejected: int = 1


def cache_file(cfg, key: str) -> Path:
    root = cfg.ref_cache_dir or os.environ.get("DPOKIT_CACHE") or Path.home() / ".cache" / "dpokit"
    return Path(root) / "diffusion" / f"{key}.safetensors"


def encodings_key(pairs: list[RawPair], frozen: Frozen) -> str:
    from ...reference import weights_fingerprint

    tok = frozen.tokenizer
    parts = [CACHE_VERSION, weights_fingerprint(frozen.vae).encode(), weights_fingerprint(frozen.text_encoder).encode(),
             repr((tok.model_max_length, type(tok).__name__, len(tok))).encode()]
    for p in pairs:
        parts += [p.chosen.numpy().tobytes(), p.rejected.numpy().tobytes(), p.caption.encode(),
                  repr(tuple(p.chosen.shape)).encode()]
    return digest(*parts)


def _device() -> torch.device:
    """Where encoding runs, once, before training: this process's GPU when there is one."""
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return torch.device("cpu")


@torch.no_grad()
def encode_images(pixels: torch.Tensor, vae, batch_size: int) -> torch.Tensor:
    """Latents of uint8 images: the VAE posterior's mean × scaling_factor. The mean, not a sample (the
    Diffusion-DPO script samples): a deterministic latent is what makes encoding once and caching exact."""
    device, out = _device(), []
    vae.to(device)
    for i in range(0, len(pixels), batch_size):
        x = to_unit_range(pixels[i:i + batch_size]).to(device, vae.dtype)
        out.append(vae.encode(x).latent_dist.mean.float().cpu() * vae.config.scaling_factor)
    vae.to("cpu")
    return torch.cat(out)


@torch.no_grad()
def encode_captions(captions: list[str], text_encoder, tokenizer, batch_size: int) -> torch.Tensor:
    """The text encoder's last hidden state for each caption, padded to the tokenizer's max length, no attention
    mask: Stable Diffusion's conditioning, as the Diffusion-DPO script computes it."""
    device, out = _device(), []
    text_encoder.to(device)
    for i in range(0, len(captions), batch_size):
        ids = tokenizer(captions[i:i + batch_size], max_length=tokenizer.model_max_length, padding="max_length",
                        truncation=True, return_tensors="pt").input_ids
        out.append(text_encoder(ids.to(device))[0].float().cpu())
    text_encoder.to("cpu")
    return torch.cat(out)


def distinct_images(pairs: list[RawPair]) -> tuple[list[torch.Tensor], list[int], list[int]]:
    """The images to encode, each once, and per pair the index of its chosen and its rejected image among them:
    a pair's two images are its own; an unpaired row's rejected image is row `mismatch`'s own."""
    if pairs and pairs[0].label is not None:
        return [p.chosen for p in pairs], list(range(len(pairs))), [p.mismatch for p in pairs]
    n = len(pairs)
    return [img for p in pairs for img in (p.chosen, p.rejected)], list(range(0, 2 * n, 2)), list(range(1, 2 * n, 2))


def _example(chosen: torch.Tensor, rejected: torch.Tensor, text: torch.Tensor | None, p: RawPair) -> DiffusionExample:
    return DiffusionExample(chosen, rejected, text, p.class_id, p.weight, label=p.label)


def encode(pairs: list[RawPair], frozen: Frozen, cfg, batch_size: int, use_cache: bool) -> list[DiffusionExample]:
    images, chosen, rejected = distinct_images(pairs)
    if not frozen.latent:
        x0 = [to_unit_range(img) for img in images]
        return [_example(x0[c], x0[r], None, p) for p, c, r in zip(pairs, chosen, rejected)]
    from safetensors.torch import load_file

    path = cache_file(cfg, encodings_key(pairs, frozen)) if use_cache else None
    captions = sorted({p.caption for p in pairs})
    if path is not None and path.is_file():
        log.info("diffusion encodings: cache hit %s", path.name)
        saved = load_file(str(path))
    else:
        latents = encode_images(torch.stack(images), frozen.vae, batch_size) if images else torch.zeros(0)
        saved = {"chosen": latents[chosen].contiguous(), "rejected": latents[rejected].contiguous(),
                 "text": encode_captions(captions, frozen.text_encoder, frozen.tokenizer, batch_size)
                 if captions else torch.zeros(0)}
        if path is not None:
            save_tensors(path, saved)
    index = {c: i for i, c in enumerate(captions)}
    texts = list(saved["text"])  # one tensor per distinct caption, shared by its rows
    return [_example(saved["chosen"][i], saved["rejected"][i], texts[index[p.caption]], p) for i, p in enumerate(pairs)]
