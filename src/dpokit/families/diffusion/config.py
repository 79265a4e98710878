"""The diffusion family's own config keys (flat in the YAML beside the shared ones)."""

from __future__ import annotations

from dataclasses import dataclass

from ...errors import DpokitError


@dataclass
class DiffusionConfig:
    resolution: int | None = None  # image side in pixels; None: the model's (UNet sample_size × the VAE's downscale)
    encode_batch_size: int = 8  # images per VAE forward and captions per text-encoder forward, once, before training
    cache_encodings: bool = True  # latents and text embeddings kept on disk under ref_cache_dir/diffusion
    # After `dpokit train`: grids of the starting and the trained model on these prompts (captions, class ids, or
    # null for an unconditional model) under <output_dir>/samples/{base,trained}, shown in report.html.
    sample_prompts: list | None = None
    sample_num: int = 4  # samples per prompt in those grids (the grid's columns)

    def __post_init__(self):
        if self.resolution is not None and self.resolution < 1:
            raise DpokitError(f"resolution must be a positive number of pixels, got {self.resolution}")
        if self.encode_batch_size < 1:
            raise DpokitError(f"encode_batch_size must be >= 1, got {self.encode_batch_size}")
        if self.sample_num < 1:
            raise DpokitError(f"sample_num must be >= 1, got {self.sample_num}")
        self._check_sample_prompts()

    def _check_sample_prompts(self) -> None:
        """The shape only (a non-empty list of captions, class ids or nulls): whether the model takes them is
        checked against the model when it loads, before training, not after it."""
        prompts = self.sample_prompts
        if prompts is None:
            return
        if not isinstance(prompts, list) or not prompts:
            raise DpokitError(f"sample_prompts must be a non-empty list of captions or class ids, got {prompts!r}")
        odd = next((p for p in prompts if p is not None and (isinstance(p, bool) or not isinstance(p, (str, int)))),
                   None)
        if odd is not None:
            raise DpokitError(f"sample_prompts: each prompt is a caption, a class id or null, got {odd!r}")
