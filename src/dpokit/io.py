"""Atomic writes: a reader (or a resumed run) sees the old file or the new one, never half of one.

Every file dpokit writes for keeps goes through `atomic_write`: a temporary file beside the
target, flushed to disk, then renamed over it. (A checkpoint is a folder: checkpoint.save
renames a whole temporary folder the same way.)
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import IO, Iterator


@contextlib.contextmanager
def atomic_write(path: str | Path, mode: str = "w") -> Iterator[IO]:
    """Open a temporary file beside `path` for writing (`mode` "w" text, UTF-8, or "wb"); on a clean exit it
    is flushed, synced and renamed over `path`; on an exception it is removed and `path` is untouched."""
    if mode not in ("w", "wb"):
        raise ValueError(f"atomic_write mode must be 'w' or 'wb', got {mode!r}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, mode, **({"encoding": "utf-8"} if mode == "w" else {})) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_text(path: str | Path, text: str) -> None:
    with atomic_write(path) as f:
        f.write(text)


def save_tensors(path: str | Path, tensors: dict, metadata: dict[str, str] | None = None) -> None:
    """A safetensors file, written atomically."""
    from safetensors.torch import save

    with atomic_write(path, "wb") as f:
        f.write(save(tensors, metadata=metadata))
