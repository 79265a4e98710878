"""The diffusion family's own config keys (flat in the YAML beside the shared ones)."""

from __future__ import annotations

from dataclasses import dataclass

from ...errors import DpokitError


@dataclass
class DiffusionConfig:
    resolution: int | None = None  # image side in pixels; None: the model's (UNet sample_size × the VAE's downscale)
    encode_batch_size: int = 8  # images per VAE forward and captions per text-encoder forward, once, before training
    cache_encodings: bool = True  # latents and text embeddings kept on disk under ref_cache_dir/diffusion

    def __post_init__(self):
        if self.resolution is not None and self.resolution < 1:
            raise DpokitError(f"resolution must be a positive number of pixels, got {self.resolution}")
        if self.encode_batch_size < 1:
            raise DpokitError(f"encode_batch_size must be >= 1, got {self.encode_batch_size}")
