"""Images as rows hold them (a path, raw bytes, a PIL image, a `datasets` Image value) → uint8 tensors at the
model's resolution. Problems are returned as one-line strings for the caller's DataError (file and row)."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import torch


class ImageProblem(ValueError):
    """What is wrong with one image, in words; the row loader adds file and row."""


def open_image(value: Any, base: Path | None, key: str):
    """A PIL image from a row's value: a path (relative to the data file's folder), bytes, a PIL image, or
    `datasets`' Image encoding {"bytes": ..., "path": ...} (bytes win: the path may be the one it had elsewhere)."""
    from PIL import Image, UnidentifiedImageError

    if isinstance(value, Image.Image):
        return value
    if isinstance(value, dict) and ("bytes" in value or "path" in value):
        value = value.get("bytes") or value.get("path")
    try:
        if isinstance(value, (bytes, bytearray, memoryview)):
            image = Image.open(io.BytesIO(bytes(value)))
        elif isinstance(value, (str, Path)) and str(value).strip():
            path = Path(value)
            path = path if path.is_absolute() or base is None else base / path
            if not path.is_file():
                raise ImageProblem(f"field {key!r}: image file {str(path)!r} not found")
            image = Image.open(path)
        else:
            raise ImageProblem(f"field {key!r} must be an image (a path, bytes or an Image value), got "
                               f"{type(value).__name__}")
        image.load()
    except (UnidentifiedImageError, OSError) as e:
        raise ImageProblem(f"field {key!r}: unreadable image ({str(e).splitlines()[0]})") from None
    return image


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
