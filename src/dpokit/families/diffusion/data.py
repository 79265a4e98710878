"""Preference rows → raw pairs: the condition (a caption or a class id) and the chosen and rejected images as
uint8 tensors at the model's resolution.

Layouts: {"prompt", "chosen", "rejected"} (images as paths relative to the data file, bytes, or `datasets` Image
values), and Pick-a-Pic's {"caption", "jpg_0", "jpg_1", "label_0"}, where label_0 = 1 means jpg_0 is preferred,
0 means jpg_1 is, and 0.5 (a tie) prefers neither: ties are dropped and counted. A class-conditional UNet takes
the condition from "class", "label" or an integer prompt.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ...data import read_rows
from ...data.readers import describe
from ...errors import DataError
from .images import ImageProblem, check_mode, open_image, to_tensor

log = logging.getLogger(__name__)


@dataclass
class RawPair:
    row: int
    caption: str  # "" for an unconditional or class-conditional model
    class_id: int | None
    chosen: torch.Tensor  # uint8 [C, H, W]
    rejected: torch.Tensor
    weight: float = 1.0


@dataclass(frozen=True)
class ImageSpec:
    """What the model takes: image channels and side, whether it reads a caption, how many classes."""

    channels: int
    resolution: int
    text: bool
    num_classes: int | None


def _orientation(row: dict) -> tuple[str, str] | None:
    """(chosen key, rejected key), or None for a Pick-a-Pic tie."""
    if "jpg_0" not in row and "jpg_1" not in row:
        return "chosen", "rejected"
    label = row.get("label_0")
    try:
        label = float(label)
    except (TypeError, ValueError):
        raise ImageProblem(f"label_0 must be 0, 0.5 or 1, got {label!r}") from None
    if label not in (0.0, 0.5, 1.0):
        raise ImageProblem(f"label_0 must be 0, 0.5 or 1, got {row.get('label_0')!r}")
    return None if label == 0.5 else (("jpg_0", "jpg_1") if label == 1.0 else ("jpg_1", "jpg_0"))


def _class_id(row: dict, spec: ImageSpec) -> int | None:
    if spec.num_classes is None:
        return None
    for key in ("class", "label", "prompt"):
        value = row.get(key)
        if value is None:
            continue
        if isinstance(value, str) and value.strip().lstrip("-").isdigit():
            value = int(value)  # CSV cells are text
        if isinstance(value, bool) or not isinstance(value, int):
            raise ImageProblem(f"field {key!r}: a class-conditional model needs an integer class id, got {value!r}")
        if not 0 <= value < spec.num_classes:
            raise ImageProblem(f"field {key!r}: unknown class id {value} "
                               f"(the model has classes 0..{spec.num_classes - 1})")
        return value
    raise ImageProblem("a class-conditional model needs a class id in 'class', 'label' or 'prompt'")


def _caption(row: dict, spec: ImageSpec) -> str:
    if not spec.text:
        return ""
    value = row.get("prompt", row.get("caption"))
    if not isinstance(value, str):
        raise ImageProblem(f"field 'prompt' (or 'caption') must be text, got {type(value).__name__}")
    return value


def row_to_pair(number: int, row: dict, spec: ImageSpec, base: Path | None) -> RawPair | None:
    """One row → a RawPair (None for a tie). Chosen and rejected must have the same size before resizing: a pair
    of different sizes is usually a mislabelled or mismatched pair, and resizing would hide it."""
    keys = _orientation(row)
    if keys is None:
        return None
    images = [check_mode(open_image(row.get(k), base, k), spec.channels, k) for k in keys]
    if images[0].size != images[1].size:
        raise ImageProblem(f"{keys[0]!r} is {images[0].size[0]}x{images[0].size[1]} but {keys[1]!r} is "
                           f"{images[1].size[0]}x{images[1].size[1]}; a pair's images must have the same size")
    weight = row.get("weight", 1.0)
    return RawPair(number, _caption(row, spec), _class_id(row, spec), to_tensor(images[0], spec.resolution),
                   to_tensor(images[1], spec.resolution), float(weight) if weight is not None else 1.0)


def load_pairs(source: Any, spec: ImageSpec) -> list[RawPair]:
    """Every pair of `source`; a bad row raises DataError naming the file, the row and the problem."""
    name = describe(source)
    base = None  # image paths of in-memory rows are relative to the working directory
    if isinstance(source, (str, Path)):
        base = Path(source).parent if Path(source).is_file() else Path(source)
    pairs, ties = [], 0
    for number, row in read_rows(source):
        try:
            pair = row_to_pair(number, row, spec, base)
        except ImageProblem as e:
            raise DataError(name, number, str(e)) from None
        if pair is None:
            ties += 1
        else:
            pairs.append(pair)
    if ties:
        log.warning("%s: dropped %d tied pair(s) (label_0 = 0.5)", name, ties)
    return pairs
