"""Images as TRL's vision rows hold them → RGB PIL images (the shared reader, dpokit.data.images, then RGB)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ...data.images import open_image as _open


def open_image(value: Any, base: Path | None, where: str):
    """The row's image (see `dpokit.data.images.open_image`), converted to RGB, as every image processor of an
    image-text-to-text model expects."""
    image = _open(value, base, where)
    return image if image.mode == "RGB" else image.convert("RGB")
