"""Images as rows hold them (a path, raw bytes, a PIL image, a `datasets` Image value) → uint8 tensors at the
model's resolution. Problems are returned as one-line strings for the caller's DataError (file and row)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from ...data import RowProblem
from ...data.images import open_image as _open

# What is wrong with one image (or row), in words; the row loader adds file and row. The shared reader's kind.
ImageProblem = RowProblem


def open_image(value: Any, base: Path | None, key: str):
    """The row's image under `key` (see `dpokit.data.images.open_image`)."""
    return _open(value, base, f"field {key!r}")


def check_mode(image, channels: int, key: str):
    """RGB for a 3-channel model, grayscale (L) for a 1-channel one. A 1-channel model converts any image to L
    (grayscale is what it models); a 3-channel model refuses anything but RGB rather than guess how to drop an
    alpha channel or colour a grayscale image."""
    if channels == 1:
        return image.convert("L")
    if channels == 3 and image.mode == "RGB":
        return image
    raise ImageProblem(f"field {key!r}: image mode {image.mode!r}, but the model takes {channels}-channel "
                       f"{'RGB' if channels == 3 else 'images'}; convert the image to RGB")


def to_tensor(image, resolution: int) -> torch.Tensor:
    """Shorter side resized to `resolution` (bilinear), then a centred square crop: what the Diffusion-DPO
    training script's Resize + CenterCrop does. uint8 [C, H, W], so a data set is held at a quarter of float's size."""
    import numpy as np
    from PIL import Image

    w, h = image.size
    scale = resolution / min(w, h)
    size = (max(resolution, round(w * scale)), max(resolution, round(h * scale)))
    if size != (w, h):
        image = image.resize(size, Image.BILINEAR)
    left, top = (size[0] - resolution) // 2, (size[1] - resolution) // 2
    image = image.crop((left, top, left + resolution, top + resolution))
    array = np.asarray(image, dtype=np.uint8)
    array = array[:, :, None] if array.ndim == 2 else array
    return torch.from_numpy(array.copy()).permute(2, 0, 1).contiguous()


def to_unit_range(pixels: torch.Tensor) -> torch.Tensor:
    """uint8 → [-1, 1], as diffusers models are trained (ToTensor then Normalize([0.5], [0.5]))."""
    return pixels.float() / 255.0 * 2.0 - 1.0
