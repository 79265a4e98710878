"""Preference rows → raw pairs: the condition (a caption or a class id) and the chosen and rejected images as
uint8 tensors at the model's resolution.

Layouts: {"prompt", "chosen", "rejected"} (images as paths relative to the data file, bytes, or `datasets` Image
values), and Pick-a-Pic's {"caption", "jpg_0", "jpg_1", "label_0"}, where label_0 = 1 means jpg_0 is preferred,
0 means jpg_1 is, and 0.5 (a tie) prefers neither: ties are dropped and counted. A class-conditional UNet takes
the condition from "class", "label" or an integer prompt.

Unpaired rows (KTO): {"prompt", "image", "label"}, the image under TRL's unpaired name "completion" as well, and
"label" true (the image is desirable) or false, 1 or 0. There "label" is the verdict, so a class id comes from
"class" or the prompt. Each such row is a raw pair whose chosen image is its own and whose rejected image is
another row's (`mismatch`): the mismatched pair KTO's KL reference point is estimated on. One file holds pairs
or unpaired rows, not both.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ...data import read_rows
from ...data.images import image_base
from ...data.readers import describe
from ...errors import DataError
from .images import ImageProblem, check_mode, open_image, to_tensor

log = logging.getLogger(__name__)


CLASS_KEYS = ("class", "label", "prompt")  # where a pair's class id may sit
UNPAIRED_CLASS_KEYS = ("class", "prompt")  # an unpaired row's 'label' is its verdict
IMAGE_KEYS = ("image", "completion")  # an unpaired row's image: dpokit's name, then TRL's unpaired layout's
PAIR_KEYS = ("chosen", "rejected", "jpg_0", "jpg_1")
LABELS = {"true": True, "false": False, "1": True, "0": False}


@dataclass
class RawPair:
    """A pair, or an unpaired row (`label` set): its image as `chosen`, row `mismatch`'s image as `rejected`."""

    row: int
    caption: str  # "" for an unconditional or class-conditional model
    class_id: int | None
    chosen: torch.Tensor  # uint8 [C, H, W]
    rejected: torch.Tensor
    weight: float = 1.0
    label: bool | None = None  # unpaired rows: whether the image is desirable
    mismatch: int | None = None  # unpaired rows: the index (in the loaded list) of the row whose image `rejected` is


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


def _class_id(row: dict, spec: ImageSpec, keys: tuple[str, ...] = CLASS_KEYS) -> int | None:
    if spec.num_classes is None:
        return None
    for key in keys:
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
    named = ", ".join(map(repr, keys[:-1])) + f" or {keys[-1]!r}"
    raise ImageProblem(f"a class-conditional model needs a class id in {named}")


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
    return RawPair(number, _caption(row, spec), _class_id(row, spec), to_tensor(images[0], spec.resolution),
                   to_tensor(images[1], spec.resolution), _weight(row))


def _weight(row: dict) -> float:
    """A row's weight (1 when not given); anything but a number is the row's problem, not a traceback."""
    weight = row.get("weight")
    if weight is None:
        return 1.0
    try:
        return float(weight)
    except (TypeError, ValueError):
        raise ImageProblem(f"field 'weight' must be a number, got {weight!r}") from None


def is_unpaired(row: dict) -> bool:
    """A labelled image (KTO) rather than a pair: it has an image field, or a label and no pair fields. 'label'
    alone cannot tell, since a class-conditional pair may hold its class id there."""
    return any(k in row for k in IMAGE_KEYS) or ("label" in row and not any(k in row for k in PAIR_KEYS))


def _desirable(value: Any) -> bool:
    """An unpaired row's verdict: true/false or 1/0, as JSON, CSV text or a `datasets` bool or integer column
    gives it."""
    if hasattr(value, "item") and not isinstance(value, (str, bytes)):
        value = value.item()  # numpy's bool_ and integer scalars
    if isinstance(value, bool):
        return value
    if isinstance(value, (int, float)) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in LABELS:
        return LABELS[value.strip().lower()]
    raise ImageProblem(f"field 'label' must be true (the image is desirable) or false (it is not), or 1 or 0; "
                       f"got {value!r}")


def row_to_unpaired(number: int, row: dict, spec: ImageSpec, base: Path | None) -> RawPair:
    """One unpaired row → a RawPair whose rejected image is, for now, its own (`pair_mismatched` sets it)."""
    if any(k in row for k in PAIR_KEYS):
        raise ImageProblem("a row is a pair (chosen, rejected) or an unpaired image (image, label), not both")
    key = next((k for k in IMAGE_KEYS if row.get(k) is not None), None)
    if key is None:
        raise ImageProblem("no image: an unpaired row needs 'image' (or 'completion') and 'label'; a pair needs "
                           "'chosen' and 'rejected'")
    if row.get("label") is None:
        raise ImageProblem("missing field 'label' (true: the image is desirable, false: it is not)")
    label = _desirable(row["label"])
    image = to_tensor(check_mode(open_image(row[key], base, key), spec.channels, key), spec.resolution)
    return RawPair(number, _caption(row, spec), _class_id(row, spec, UNPAIRED_CLASS_KEYS), image, image, _weight(row),
                   label)


def pair_mismatched(items: list[RawPair], name: str) -> None:
    """Give each unpaired row another row's image under its own condition, for KTO's KL estimate: row i takes
    row i − 1's (cyclically), stepping further back past rows with the same condition unless every row has it,
    the rule the text family uses for completions. Fixed at load time, so every epoch scores the same mismatch."""
    n = len(items)
    if n < 2:
        raise DataError(name, None, "unpaired (KTO) data needs at least 2 rows: each row's KL term is computed with "
                                    "another row's image")

    def condition(p: RawPair):
        return p.caption, p.class_id

    everywhere = all(condition(p) == condition(items[0]) for p in items)
    for i, item in enumerate(items):
        j = (i - 1) % n
        while not everywhere and condition(items[j]) == condition(item):
            j = (j - 1) % n
        item.rejected, item.mismatch = items[j].chosen, j


def _row(number: int, row: dict, spec: ImageSpec, base: Path | None, first: list[bool]) -> RawPair | None:
    """One row of either kind; the first row read sets the file's kind and a row of the other kind is refused."""
    unpaired = is_unpaired(row)
    if first and unpaired != first[0]:
        this, other = "an unpaired row (image, label)", "a pair (chosen, rejected)"
        this, other = (this, other) if unpaired else (other, this)
        raise ImageProblem(f"pairs and unpaired rows are mixed in one file: this row is {this}, the first row "
                           f"was {other}")
    first[:] = first or [unpaired]
    return row_to_unpaired(number, row, spec, base) if unpaired else row_to_pair(number, row, spec, base)


def load_pairs(source: Any, spec: ImageSpec) -> list[RawPair]:
    """Every pair (or unpaired row) of `source`; a bad row raises DataError naming the file, the row and the
    problem."""
    name, base = describe(source), image_base(source)
    pairs, ties, first = [], 0, []
    for number, row in read_rows(source):
        try:
            pair = _row(number, row, spec, base, first)
        except ImageProblem as e:
            raise DataError(name, number, str(e)) from None
        if pair is None:
            ties += 1
        else:
            pairs.append(pair)
    if ties:
        log.warning("%s: dropped %d tied pair(s) (label_0 = 0.5)", name, ties)
    if first and first[0]:
        pair_mismatched(pairs, name)
    return pairs
