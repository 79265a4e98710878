"""Segment pairs → validated examples: two segments of (observation, action) steps, the preferred and the other.

JSON Lines (or any row source `read_rows` reads): {"chosen": {"obs": [[...], ...], "actions": [[...], ...]},
"rejected": {"obs": ..., "actions": ...}, "weight": 1.0 (optional)}; segments may differ in length (collate pads
and masks). A categorical head's actions are integers, [T] or [T, 1].

NumPy `.npz`: arrays chosen_obs [N, T, obs_dim], chosen_actions [N, T, act_dim] (int [N, T] for a categorical
head), rejected_obs, rejected_actions, and an optional weight [N]; row i + 1 is pair i.

A bad row raises DataError naming the file, the row and the problem: a wrong rank or size, observation and
action counts that differ, a NaN or inf, actions outside a squashed head's bounds, non-integer or unknown actions
of a categorical head.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ...data import read_rows
from ...data.readers import describe
from ...errors import DataError
from .models import Spec

NPZ_KEYS = ("chosen_obs", "chosen_actions", "rejected_obs", "rejected_actions")
BOUND_SLACK = 1e-5  # actions this far past a squashed head's bound are read as on it (float rounding)


class SegmentProblem(ValueError):
    """A row's problem, before the file and row are known to say it with."""


@dataclass
class PolicyExample:
    """A pair of segments; the Example protocol's fields and the family's own tensors."""

    chosen_obs: torch.Tensor  # float32 [T, obs_dim]
    chosen_actions: torch.Tensor  # float32 [T, act_dim], or int64 [T] for a categorical head
    rejected_obs: torch.Tensor
    rejected_actions: torch.Tensor
    weight: float = 1.0
    margin: float = 0.0
    label: bool | None = None
    is_group: bool = False

    @property
    def n_rejected(self) -> int:
        return 1


def _numbers(value: Any, field: str) -> np.ndarray:
    """An array of numbers (not booleans, not text) from nested lists or an array."""
    try:
        array = np.asarray(value)
    except ValueError:
        raise SegmentProblem(f"field {field!r} is ragged: its rows have different lengths") from None
    if array.dtype.kind not in "iuf":
        raise SegmentProblem(f"field {field!r} must hold numbers, got {array.dtype.name} values"
                             if array.dtype.kind != "O" else f"field {field!r} must be an array of numbers")
    return array


def _finite(array: np.ndarray, field: str) -> None:
    if array.dtype.kind == "f" and not np.isfinite(array).all():
        bad = array[~np.isfinite(array)].flat[0]
        raise SegmentProblem(f"field {field!r} holds a {'NaN' if np.isnan(bad) else 'inf'}")


def _obs(value: Any, field: str, spec: Spec) -> torch.Tensor:
    array = _numbers(value, field)
    if array.ndim != 2 or array.shape[0] == 0:
        raise SegmentProblem(f"field {field!r} must be a non-empty [T, obs_dim] array, got shape {list(array.shape)}")
    if spec.obs_dim is not None and array.shape[1] != spec.obs_dim:
        raise SegmentProblem(f"field {field!r} has observations of size {array.shape[1]}; the policy takes "
                             f"{spec.obs_dim}")
    _finite(array, field)
    return torch.as_tensor(array, dtype=torch.float32)


def _discrete(array: np.ndarray, field: str, spec: Spec) -> torch.Tensor:
    if array.ndim == 2 and array.shape[1] == 1:
        array = array[:, 0]
    if array.ndim != 1:
        raise SegmentProblem(f"field {field!r} must be [T] action ids for a categorical policy, got shape "
                             f"{list(array.shape)}")
    _finite(array, field)
    if array.dtype.kind == "f" and (array != np.round(array)).any():
        raise SegmentProblem(f"field {field!r}: a categorical policy's actions are integers, got "
                             f"{array[array != np.round(array)][0]!r}")
    ids = array.astype(np.int64)
    if spec.act_dim is not None and ((ids < 0) | (ids >= spec.act_dim)).any():
        bad = ids[(ids < 0) | (ids >= spec.act_dim)][0]
        raise SegmentProblem(f"field {field!r}: unknown action {bad} (the policy has actions 0..{spec.act_dim - 1})")
    return torch.as_tensor(ids)


def _actions(value: Any, field: str, spec: Spec) -> torch.Tensor:
    array = _numbers(value, field)
    if spec.discrete:
        return _discrete(array, field, spec)
    if array.ndim == 1 and spec.act_dim == 1:
        array = array[:, None]
    if array.ndim != 2 or array.shape[0] == 0:
        raise SegmentProblem(f"field {field!r} must be a non-empty [T, act_dim] array, got shape "
                             f"{list(array.shape)}")
    if spec.act_dim is not None and array.shape[1] != spec.act_dim:
        raise SegmentProblem(f"field {field!r} has actions of size {array.shape[1]}; the policy's are {spec.act_dim}")
    _finite(array, field)
    if spec.low is not None:
        low, high = np.asarray(spec.low), np.asarray(spec.high)
        outside = (array < low - BOUND_SLACK) | (array > high + BOUND_SLACK)
        if outside.any():
            raise SegmentProblem(f"field {field!r}: action {array[outside][0]:g} lies outside the squashed policy's "
                                 f"bounds [{low.min():g}, {high.max():g}]")
        array = np.clip(array, low, high)
    return torch.as_tensor(array, dtype=torch.float32)


def segment(obs: Any, actions: Any, name: str, spec: Spec) -> tuple[torch.Tensor, torch.Tensor]:
    """One segment's observations and actions, checked against each other and the policy."""
    o, a = _obs(obs, f"{name}.obs", spec), _actions(actions, f"{name}.actions", spec)
    if len(o) != len(a):
        raise SegmentProblem(f"segment {name!r} has {len(o)} observations but {len(a)} actions")
    return o, a


def _weight(value: Any) -> float:
    if value is None:
        return 1.0
    if isinstance(value, bool) or not isinstance(value, (int, float, np.number)) or not np.isfinite(value):
        raise SegmentProblem(f"field 'weight' must be a finite number, got {value!r}")
    return float(value)


def row_to_example(row: dict, spec: Spec) -> PolicyExample:
    parts = []
    for name in ("chosen", "rejected"):
        seg = row.get(name)
        if not isinstance(seg, dict) or "obs" not in seg or "actions" not in seg:
            raise SegmentProblem(f"field {name!r} must be an object with 'obs' and 'actions'"
                                 + (" (groups of several rejected segments are not supported)"
                                    if isinstance(seg, list) else ""))
        parts += segment(seg["obs"], seg["actions"], name, spec)
    return PolicyExample(*parts, weight=_weight(row.get("weight")))


def _npz_rows(path: Path) -> list[tuple[int, dict]]:
    """Pair i of an .npz as row i + 1, in the JSON Lines row's shape; arrays of the wrong rank are the file's."""
    name = str(path)
    try:
        data = np.load(path, allow_pickle=False)
        arrays = {k: data[k] for k in data.files}
    except (OSError, ValueError) as e:
        raise DataError(name, None, f"cannot read as .npz ({e})") from None
    missing = [k for k in NPZ_KEYS if k not in arrays]
    if missing:
        raise DataError(name, None, f"missing array(s) {', '.join(missing)} (an .npz holds {', '.join(NPZ_KEYS)} "
                                    "and optionally weight)")
    n = len(arrays["chosen_obs"]) if arrays["chosen_obs"].ndim else 0
    for key in (*NPZ_KEYS, "weight"):
        if key in arrays and (arrays[key].ndim == 0 or len(arrays[key]) != n):
            raise DataError(name, None, f"array {key!r} has shape {list(arrays[key].shape)}, but chosen_obs holds "
                                        f"{n} pairs")
    return [(i + 1, {"chosen": {"obs": arrays["chosen_obs"][i], "actions": arrays["chosen_actions"][i]},
                     "rejected": {"obs": arrays["rejected_obs"][i], "actions": arrays["rejected_actions"][i]},
                     "weight": arrays["weight"][i].item() if "weight" in arrays else None})
            for i in range(n)]


def load_examples(source: Any, spec: Spec) -> list[PolicyExample]:
    """Every pair of `source` (a file, a folder `read_rows` reads, or rows in memory); a bad row raises DataError
    naming the file, the row and the problem."""
    name = describe(source)
    if isinstance(source, (str, Path)) and Path(source).suffix.lower() == ".npz":
        rows = _npz_rows(Path(source))
    else:
        rows = read_rows(source)
    out = []
    for number, row in rows:
        try:
            out.append(row_to_example(row, spec))
        except SegmentProblem as e:
            raise DataError(name, number, str(e)) from None
    return out


def collate(examples: list[PolicyExample]) -> dict[str, torch.Tensor]:
    """Segments padded to the batch's longest, with masks of their steps: {chosen,rejected}_{obs,actions,mask}."""
    batch = {}
    for side in ("chosen", "rejected"):
        obs = [getattr(ex, f"{side}_obs") for ex in examples]
        actions = [getattr(ex, f"{side}_actions") for ex in examples]
        T = max(len(o) for o in obs)
        mask = torch.zeros(len(obs), T, dtype=torch.bool)
        padded_obs = obs[0].new_zeros(len(obs), T, obs[0].shape[-1])
        padded_actions = actions[0].new_zeros(len(obs), T, *actions[0].shape[1:])
        for i, (o, a) in enumerate(zip(obs, actions)):
            padded_obs[i, :len(o)], padded_actions[i, :len(a)], mask[i, :len(o)] = o, a, True
        batch.update({f"{side}_obs": padded_obs, f"{side}_actions": padded_actions, f"{side}_mask": mask})
    batch["weight"] = torch.tensor([ex.weight for ex in examples], dtype=torch.float32)
    batch["margin"] = torch.tensor([ex.margin for ex in examples], dtype=torch.float32)
    return batch
