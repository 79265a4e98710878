"""What the trajectory-segment recipes (rollouts, minari) share: a segment's record and its jerk, random
seeded pairs, the labels (smoothness, return, a `module:function`), the pair-file writer (.jsonl / .npz) and
the command-line options for segments, labels and pairs.

A segment is a dict of numpy arrays obs [T, obs_dim], actions [T, act_dim] ([T] for a discrete space),
rewards [T], qpos [T, nq] or None, where it came from (e.g. env, episode, start), and info {return, jerk}.
The jerk definition, the pairing and the output formats are in `dpokit.recipes.rollouts`' docstring.
"""

from __future__ import annotations

import importlib
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from ..errors import DpokitError
from ..io import atomic_write
from .common import Built

LABELS = ("smoothness", "return")
SUFFIXES = (".jsonl", ".npz")
OUTPUT_HELP = "the file to write: .jsonl (one pair a row) or .npz (arrays)"


@dataclass
class SegmentPairs(Built):
    """The pair rows (segments as numpy arrays until written) and counts; `unlabelled` rows are {"a", "b"}."""

    unlabelled: bool = False


# ---------------------------------------------------------------- references: module:function


def import_function(ref: str, what: str) -> Callable:
    """`package.module:function` → the function; anything else is one line naming `what` it was for."""
    module, sep, attr = ref.partition(":")
    if not sep or not module or not attr:
        raise DpokitError(f"{what} {ref!r} must look like 'package.module:function'")
    try:
        fn = importlib.import_module(module)
        for part in attr.split("."):
            fn = getattr(fn, part)
    except (ImportError, AttributeError) as e:
        raise DpokitError(f"cannot import {what} {ref!r}: {e}") from None
    if not callable(fn):
        raise DpokitError(f"{what} {ref!r} is not callable")
    return fn


# ---------------------------------------------------------------- segments and jerk


def jerk(segment: dict) -> float | None:
    """Mean squared jerk of a segment (`dpokit.recipes.rollouts` has the definition): the third finite
    difference of qpos when the segment has it, else the second difference of the actions; mean over t of the
    squared norm. None when the segment is too short for the difference."""
    qpos = segment.get("qpos")
    if qpos is not None:
        x, order = np.asarray(qpos, dtype=np.float64), 3
    else:
        actions = np.asarray(segment["actions"], dtype=np.float64)
        x, order = actions.reshape(len(actions), -1), 2
    if len(x) <= order:
        return None
    d = np.diff(x, n=order, axis=0)
    return float((d ** 2).sum(axis=1).mean())


def min_smoothness_length(has_qpos: bool) -> int:
    return 4 if has_qpos else 3


def make_segment(obs, actions, rewards, qpos=None, **where) -> dict:
    """A segment record from its steps' arrays (obs as float32, rewards as float64), `where` it came from
    (e.g. env=, episode=, start=), and info {return, jerk}."""
    seg = {"obs": np.asarray(obs, dtype=np.float32), "actions": np.asarray(actions),
           "rewards": np.asarray(rewards, dtype=np.float64),
           "qpos": None if qpos is None else np.asarray(qpos, dtype=np.float64), **where}
    seg["info"] = {"return": float(seg["rewards"].sum()), "jerk": jerk(seg)}
    return seg


# ---------------------------------------------------------------- pairs and labels


def pair_indices(n: int, pairs: int | None = None, seed: int = 0,
                 too_few: str = "the rollout gave {n} segment(s), and a pair needs 2: roll out more steps "
                                "or shorten the segments") -> list[tuple[int, int]]:
    """Random pairs of distinct segments among n, seeded: a shuffle paired two by two (each segment once),
    then, when `pairs` asks for more, further distinct random pairs. `too_few` is the error under 2."""
    if n < 2:
        raise DpokitError(too_few.format(n=n))
    rng = np.random.default_rng(seed)
    perm = rng.permutation(n)
    out = [(int(perm[2 * k]), int(perm[2 * k + 1])) for k in range(n // 2)]
    if pairs is None:
        return out
    if pairs < 1:
        raise DpokitError(f"pairs must be >= 1, got {pairs}")
    total = n * (n - 1) // 2
    if pairs > total:
        raise DpokitError(f"pairs asks for {pairs} pairs, but {n} segments make only {total} distinct pairs")
    if pairs <= len(out):
        return out[:pairs]
    seen = {frozenset(p) for p in out}
    if pairs > total // 2:  # dense: draw from the full list rather than by rejection
        rest = [(i, j) for i in range(n) for j in range(i + 1, n) if frozenset((i, j)) not in seen]
        pick = rng.choice(len(rest), size=pairs - len(out), replace=False)
        return out + [rest[int(k)] if rng.random() < 0.5 else rest[int(k)][::-1] for k in pick]
    while len(out) < pairs:
        i, j = (int(v) for v in rng.choice(n, size=2, replace=False))
        if frozenset((i, j)) not in seen:
            seen.add(frozenset((i, j)))
            out.append((i, j))
    return out


def load_labeller(label: str | Callable) -> Callable[[dict], float]:
    """segment → score, higher preferred: `smoothness` (−jerk), `return` (summed reward), a callable or a
    'package.module:function'."""
    if callable(label):
        return label
    if label == "smoothness":
        return lambda seg: -seg["info"]["jerk"] if seg["info"]["jerk"] is not None else math.nan
    if label == "return":
        return lambda seg: seg["info"]["return"]
    if ":" in label:
        return import_function(label, "label function")
    raise DpokitError(f"label must be one of {', '.join(LABELS)} or a 'package.module:function', got {label!r}")


def _score(fn: Callable, seg: dict) -> float:
    value = fn(seg)
    if isinstance(value, np.ndarray) and value.size == 1:
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise DpokitError(f"the label function returned {type(value).__name__}, not a number")
    return float(value)


def label_pairs(segments: list[dict], pairs: list[tuple[int, int]], label: str | Callable | None,
                out: SegmentPairs | None = None) -> SegmentPairs:
    """Pair rows: the higher-scored segment chosen (ties and NaN scores dropped), or with label None
    unlabelled rows {"a", "b"}."""
    out = out if out is not None else SegmentPairs()
    if label is None:
        out.unlabelled = True
        out.rows = [{"a": segments[i], "b": segments[j]} for i, j in pairs]
        out.counts["pairs"] = len(out.rows)
        return out
    fn = load_labeller(label)
    scores: dict[int, float] = {}
    for i, j in pairs:
        for k in (i, j):
            if k not in scores:
                scores[k] = _score(fn, segments[k])
        a, b = scores[i], scores[j]
        if math.isnan(a) or math.isnan(b):
            out.counts["unscored"] += 1
        elif a == b:
            out.counts["ties"] += 1
        else:
            win, lose = (i, j) if a > b else (j, i)
            out.rows.append({"chosen": segments[win], "rejected": segments[lose], "weight": 1.0})
    out.counts["pairs"] = len(out.rows)
    return out


def require_preferences(out: SegmentPairs, label) -> SegmentPairs:
    """A labelled result with no rows (every pair tied or unscored) is one line naming the label."""
    if not out.unlabelled and not out.rows:
        raise DpokitError(f"no preference among the {out.counts['ties'] + out.counts['unscored']} pairs drawn: every "
                          f"one tied ({out.counts['ties']}) or went unscored ({out.counts['unscored']}); "
                          f"label {label!r} does not tell these segments apart")
    return out


# ---------------------------------------------------------------- writing


def check_output(path: str | Path) -> str:
    suffix = Path(path).suffix.lower()
    if suffix not in SUFFIXES:
        raise DpokitError(f"{path}: the output must end in .jsonl (rows) or .npz (arrays), not {suffix or 'nothing'!r}")
    return suffix


def _row_segment(seg: dict) -> dict:
    return {"obs": seg["obs"].tolist(), "actions": seg["actions"].tolist(), "info": dict(seg["info"])}


def write(built: SegmentPairs, path: str | Path) -> int:
    """Write the pairs as JSON Lines or .npz arrays (by suffix), all or nothing; returns how many."""
    suffix = check_output(path)
    sides = ("a", "b") if built.unlabelled else ("chosen", "rejected")
    if suffix == ".jsonl":
        with atomic_write(path) as f:
            for row in built.rows:
                out = {side: _row_segment(row[side]) for side in sides}
                if not built.unlabelled:
                    out["weight"] = row["weight"]
                f.write(json.dumps(out) + "\n")
        return len(built.rows)
    if not built.rows:
        raise DpokitError(f"{path}: no pairs to write")
    arrays: dict[str, np.ndarray] = {}
    for side in sides:
        segs = [row[side] for row in built.rows]
        arrays[f"{side}_obs"] = np.stack([s["obs"] for s in segs])
        arrays[f"{side}_actions"] = np.stack([s["actions"] for s in segs])
        arrays[f"{side}_return"] = np.array([s["info"]["return"] for s in segs], dtype=np.float64)
        arrays[f"{side}_jerk"] = np.array([math.nan if s["info"]["jerk"] is None else s["info"]["jerk"]
                                           for s in segs], dtype=np.float64)
    if not built.unlabelled:
        arrays["weight"] = np.array([row["weight"] for row in built.rows], dtype=np.float32)
    with atomic_write(path, "wb") as f:
        np.savez(f, **arrays)
    return len(built.rows)


# ---------------------------------------------------------------- command line


def add_pair_arguments(p, label_help: str) -> None:
    """--segment-length, --label, --unlabelled, --pairs and --seed."""
    p.add_argument("--segment-length", type=int, default=32,
                   help="steps per segment; a segment never spans an episode end")
    p.add_argument("--label", default=None, help=label_help)
    p.add_argument("--unlabelled", action="store_true", help="write {a, b} pairs for people to label, no preference")
    p.add_argument("--pairs", type=int, default=None,
                   help="how many pairs to draw (default: the segments shuffled and paired, each once)")
    p.add_argument("--seed", type=int, default=0)


def label_argument(args) -> str | None:
    """The label the options ask for: None with --unlabelled, smoothness by default. A bad label and a bad
    output suffix fail here, before any data is read."""
    check_output(args.output)
    if args.unlabelled and args.label is not None:
        raise DpokitError("--unlabelled writes pairs with no preference; drop --label")
    label = None if args.unlabelled else args.label or "smoothness"
    if label is not None:
        load_labeller(label)
    return label
