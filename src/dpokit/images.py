"""Sampled images on disk, whatever family drew them: one PNG per sample and a grid (rows = prompts, columns =
samples) to look at a run, or a run beside its base, at a glance. Written atomically, like every file dpokit keeps."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .errors import DpokitError
from .io import atomic_write


def _check(images: list[list[Any]]) -> None:
    """Every sample a PIL image, all the same size (a grid has one cell size)."""
    from PIL import Image

    flat = [img for row in images for img in (row if isinstance(row, (list, tuple)) else [row])]
    if not flat:
        raise DpokitError("no images to write")
    odd = next((img for img in flat if not isinstance(img, Image.Image)), None)
    if odd is not None:
        raise DpokitError(f"the samples are {type(odd).__name__}, not images (this writes images)")
    if len({img.size for img in flat}) > 1:
        raise DpokitError(f"samples of different sizes: {sorted({img.size for img in flat})}")


def write_png(image, path: str | Path) -> None:
    with atomic_write(path, "wb") as f:
        image.save(f, format="PNG")


def grid(images: list[list[Any]]):
    """One image: row i holds prompt i's samples, left to right, with no gaps (so its size is cols × rows cells)."""
    from PIL import Image

    _check(images)
    w, h = images[0][0].size
    cols = max(len(row) for row in images)
    mode = "L" if all(img.mode == "L" for row in images for img in row) else "RGB"
    out = Image.new(mode, (cols * w, len(images) * h))
    for i, row in enumerate(images):
        for k, img in enumerate(row):
            out.paste(img.convert(mode), (k * w, i * h))
    return out


def write_images(images: list[list[Any]], out_dir: str | Path) -> list[Path]:
    """`<prompt index>-<sample index>.png` for every sample (indices from 0) and `grid.png`; the paths written,
    the grid last."""
    _check(images)
    out = Path(out_dir)
    paths = []
    for i, row in enumerate(images):
        for k, img in enumerate(row):
            paths.append(out / f"{i}-{k}.png")
            write_png(img, paths[-1])
    paths.append(out / "grid.png")
    write_png(grid(images), paths[-1])
    return paths
