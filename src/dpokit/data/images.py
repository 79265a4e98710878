"""Images as rows hold them — a path, raw bytes, a PIL image, or a `datasets` Image value — → PIL images, for every
family whose data holds images (diffusion, vision-language). A problem is a `RowProblem`: the loader adds the file
and row and says it in one line."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

from .formats import RowProblem


def image_base(source: Any) -> Path | None:
    """Where a row's relative image paths start: the data file's folder (or the data folder); None for in-memory
    rows, whose paths are relative to the working directory."""
    if isinstance(source, (str, Path)):
        return Path(source).parent if Path(source).is_file() else Path(source)
    return None


def open_image(value: Any, base: Path | None, where: str):
    """A PIL image (loaded, its mode as stored) from a row's value: a path (relative to the data file's folder
    `base`), bytes, a PIL image, or `datasets`' Image encoding {"bytes": ..., "path": ...} (bytes win: the path may
    be the one it had elsewhere). `where` names the value in a problem's message, e.g. "field 'chosen'"."""
    from PIL import Image, UnidentifiedImageError

    if isinstance(value, dict) and ("bytes" in value or "path" in value):
        value = value.get("bytes") or value.get("path")
    try:
        if isinstance(value, Image.Image):
            image = value
        elif isinstance(value, (bytes, bytearray, memoryview)):
            image = Image.open(io.BytesIO(bytes(value)))
        elif isinstance(value, (str, Path)) and str(value).strip():
            path = Path(value)
            path = path if path.is_absolute() or base is None else base / path
            if not path.is_file():
                raise RowProblem(f"{where}: image file {str(path)!r} not found")
            image = Image.open(path)
        else:
            raise RowProblem(f"{where} must be an image (a path, bytes or an Image value), got {type(value).__name__}")
        image.load()
    except (UnidentifiedImageError, OSError) as e:
        raise RowProblem(f"{where}: unreadable image ({str(e).splitlines()[0]})") from None
    return image
