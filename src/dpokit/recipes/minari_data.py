"""Minari dataset → segment pairs: read an offline-RL dataset from a local folder, cut its episodes into
fixed-length segments, pair them at random and label each pair by a computable preference.

    dpokit data build minari DATASET OUT.jsonl|OUT.npz [--segment-length 32]
        [--label smoothness|return|module:function | --unlabelled] [--pairs N] [--seed 0] [--episodes N]

DATASET is local, never downloaded: a Minari dataset folder (the one holding `data/metadata.json`, or that
`data/` folder itself), or a dataset id such as `mujoco/pusher/expert-v0` found under Minari's local root,
$MINARI_DATASETS_PATH (default ~/.minari/datasets). An existing folder wins over an id of the same name.
The dataset is read by Minari's own reader (`minari.MinariDataset`), so any storage format the installed
minari reads (hdf5 with `minari[hdf5]`, arrow with `minari[arrow]`) works.

Episodes: the first `--episodes N` episodes in the dataset's order (default all). An episode of T steps
stores T + 1 observations; the last (the one after the final action) is dropped, so step t is
(obs_t, a_t, r_t). Observations must be a flat Box and actions a flat Box or Discrete (kept as [T]
integers); a Dict, Tuple or image space is one line naming it. When an episode's `infos` hold a `qpos`
array (one row per observation, as MuJoCo-based datasets that record it do), qpos_t is kept and the jerk
uses it, as the rollouts recipe does with a live MuJoCo environment.

Segments, jerk, pairs, labels and output formats are the rollouts recipe's (`dpokit.recipes.rollouts`):
segments of `--segment-length` consecutive steps that never cross an episode end (the steps left over after
an episode's last full segment are dropped and counted), labelled by `smoothness` (lower jerk wins),
`return` (higher summed reward wins) or a `module:function`, or written `--unlabelled`; JSON Lines or
.npz by the suffix of OUT, written atomically.

Bad input is one line: a missing folder or id, a folder that is not a Minari dataset, a segment length
longer than every episode, a non-finite observation, action, reward or qpos (naming the episode).
"""

from __future__ import annotations

import os
from collections import Counter
from pathlib import Path
from typing import Callable

import numpy as np

from ..errors import DpokitError
from .segment_pairs import (OUTPUT_HELP, SegmentPairs, add_pair_arguments, label_argument, label_pairs,  # noqa: F401
                            load_labeller, make_segment, min_smoothness_length, pair_indices, require_preferences,
                            write)

NAME = "minari"
HELP = "a local Minari offline-RL dataset → segment pairs labelled by smoothness, return or a function"
INPUT_HELP = ("a Minari dataset folder (holding data/metadata.json) or a dataset id under $MINARI_DATASETS_PATH "
              "(default ~/.minari/datasets); nothing is downloaded")
METADATA = "metadata.json"


def datasets_root() -> Path:
    """Minari's local root: $MINARI_DATASETS_PATH, else ~/.minari/datasets (not created here)."""
    root = os.environ.get("MINARI_DATASETS_PATH")
    return Path(root).expanduser() if root else Path("~/.minari/datasets").expanduser()


def _data_folder(folder: Path) -> Path | None:
    """The folder holding metadata.json: `folder` itself or its `data/`; None when neither has it."""
    for candidate in (folder / "data", folder):
        if (candidate / METADATA).is_file():
            return candidate
    return None


def find_dataset(dataset: str | Path) -> Path:
    """DATASET (a folder, or an id under Minari's local root) → the data folder that holds metadata.json."""
    path = Path(dataset).expanduser()
    if path.is_dir():
        data = _data_folder(path)
        if data is None:
            raise DpokitError(f"{dataset}: not a Minari dataset (neither {path / 'data' / METADATA} "
                              f"nor {path / METADATA} exists)")
        return data
    if path.exists():
        raise DpokitError(f"{dataset}: a Minari dataset is a folder (holding data/{METADATA}), not a file")
    root = datasets_root()
    under = root / str(dataset)
    if under.is_dir():
        data = _data_folder(under)
        if data is None:
            raise DpokitError(f"{dataset}: {under} is not a Minari dataset (no data/{METADATA})")
        return data
    raise DpokitError(f"Minari dataset {str(dataset)!r} not found: no such folder, and not under Minari's local "
                      f"root {root} (MINARI_DATASETS_PATH, default ~/.minari/datasets); dpokit reads local datasets "
                      "only and does not download (`minari download ID` fetches one)")


def open_dataset(dataset: str | Path):
    """(minari.MinariDataset, its data folder), read by Minari's own reader."""
    data = find_dataset(dataset)
    try:
        import minari
    except ImportError:
        raise DpokitError("reading Minari datasets needs minari: pip install 'minari[hdf5]'") from None
    try:
        return minari.MinariDataset(data), data
    except Exception as e:  # Minari's reader raises whatever its storage does: one line naming the folder
        raise DpokitError(f"{data}: cannot read as a Minari dataset ({type(e).__name__}: "
                          f"{' '.join(str(e).split())})") from None


def _check_spaces(ds, where: str) -> bool:
    """Flat Box observations; flat Box or Discrete actions. Returns whether the actions are discrete."""
    import gymnasium as gym

    obs, act = ds.observation_space, ds.action_space
    if not (isinstance(obs, gym.spaces.Box) and len(obs.shape) == 1):
        raise DpokitError(f"{where}: the observation space is {obs}; dpokit reads flat Box observations only "
                          "(not a Dict, Tuple or image space)")
    if isinstance(act, gym.spaces.Discrete):
        return True
    if not (isinstance(act, gym.spaces.Box) and len(act.shape) == 1):
        raise DpokitError(f"{where}: the action space is {act}; dpokit reads flat Box or Discrete actions only "
                          "(not a Dict, Tuple or image space)")
    return False


def _finite(array: np.ndarray, field: str, where: str, episode: int) -> None:
    if array.dtype.kind == "f" and not np.isfinite(array).all():
        step, dim = (int(v) for v in np.argwhere(~np.isfinite(array.reshape(len(array), -1)))[0])
        bad = array.reshape(len(array), -1)[step, dim]
        raise DpokitError(f"{where}, episode {episode}: {field} at step {step} (dimension {dim}) "
                          f"holds {'a NaN' if np.isnan(bad) else 'an inf'}")


def _qpos(infos, steps: int) -> np.ndarray | None:
    """infos['qpos'] as [T, nq] (the rows before each action) when the episode recorded it, else None."""
    q = infos.get("qpos") if isinstance(infos, dict) else None
    if q is None:
        return None
    q = np.asarray(q)
    if q.ndim != 2 or len(q) not in (steps, steps + 1) or q.dtype.kind not in "fiu":
        return None
    return q[:steps].astype(np.float64)


def dataset_segments(dataset: str | Path, segment_length: int = 32, episodes: int | None = None,
                     min_length: Callable[[bool], int] | None = None) -> tuple[list[dict], SegmentPairs]:
    """Cut the dataset's episodes (the first `episodes`, default all) into segments of `segment_length` steps,
    never across an episode end. Each segment: obs [T, obs_dim], actions [T, act_dim] or [T], rewards [T],
    qpos [T, nq] or None, episode (the dataset's episode id), start (step within the episode), info
    {return, jerk}. `min_length(has_qpos)` is the shortest segment the caller can use."""
    if segment_length < 1:
        raise DpokitError(f"segment_length must be >= 1, got {segment_length}")
    if episodes is not None and episodes < 1:
        raise DpokitError(f"episodes must be >= 1, got {episodes}")
    ds, data = open_dataset(dataset)
    where = str(dataset)
    discrete = _check_spaces(ds, where)
    indices = [int(i) for i in ds.episode_indices]
    if episodes is not None:
        indices = indices[:episodes]
    if not indices:
        raise DpokitError(f"{where}: the dataset holds no episodes")
    segments: list[dict] = []
    counts: Counter = Counter()
    longest = 0
    has_qpos: bool | None = None
    for ep in ds.iterate_episodes(indices):
        T = len(ep)
        obs, actions = np.asarray(ep.observations), np.asarray(ep.actions)
        rewards = np.asarray(ep.rewards, dtype=np.float64).reshape(-1)
        if obs.ndim != 2 or len(obs) != T + 1 or len(actions) != T:
            raise DpokitError(f"{where}, episode {ep.id}: {T} rewards need {T + 1} observations and {T} actions, "
                              f"got observations {obs.shape} and actions {actions.shape}")
        obs = obs[:T]  # the observation after the last action belongs to no step
        actions = actions.reshape(T) if discrete else actions.reshape(T, -1)
        actions = actions.astype(np.int64) if discrete else actions.astype(np.float32)
        qpos = _qpos(ep.infos, T)
        for field, array in (("observations", obs), ("actions", actions), ("rewards", rewards), ("qpos", qpos)):
            if array is not None:
                _finite(array, field, where, ep.id)
        if has_qpos is None:
            has_qpos = qpos is not None
            if min_length is not None and segment_length < min_length(has_qpos):
                raise DpokitError(
                    f"segment_length must be >= {min_length(has_qpos)} for the smoothness label on {where} (jerk is the "
                    + ("third finite difference of qpos" if has_qpos else "second finite difference of the actions")
                    + f"), got {segment_length}")
        counts["episodes"] += 1
        counts["steps"] += T
        longest = max(longest, T)
        n = T // segment_length
        if n == 0:
            counts["episodes_shorter_than_a_segment"] += 1
        for k in range(n):
            s = slice(k * segment_length, (k + 1) * segment_length)
            segments.append(make_segment(obs[s], actions[s], rewards[s], None if qpos is None else qpos[s],
                                         episode=int(ep.id), start=k * segment_length))
        counts["steps_outside_segments"] += T - n * segment_length
    if not segments:
        raise DpokitError(f"{where}: segment_length {segment_length} is longer than every episode (the longest of "
                          f"{counts['episodes']} has {longest} steps); shorten the segments")
    out = SegmentPairs()
    out.counts = Counter(episodes=counts["episodes"], steps=counts["steps"], segments=len(segments),
                         steps_outside_segments=counts["steps_outside_segments"])
    if counts["episodes_shorter_than_a_segment"]:
        out.counts["episodes_shorter_than_a_segment"] = counts["episodes_shorter_than_a_segment"]
    return segments, out


def minari_pairs(dataset: str | Path, segment_length: int = 32, label: str | Callable | None = "smoothness",
                 pairs: int | None = None, seed: int = 0, episodes: int | None = None) -> SegmentPairs:
    """Read the dataset, cut segments, pair and label them (`label` None: unlabelled pairs). The whole recipe."""
    if label is not None and not callable(label):
        load_labeller(label)  # a bad label fails before the dataset is read
    min_length = min_smoothness_length if label == "smoothness" else None
    segments, out = dataset_segments(dataset, segment_length, episodes, min_length)
    too_few = (f"{dataset} gave {{n}} segment(s) of {segment_length} steps, and a pair needs 2: "
               "shorten the segments or read more episodes")
    out = label_pairs(segments, pair_indices(len(segments), pairs, seed, too_few), label, out)
    return require_preferences(out, label)


# ---------------------------------------------------------------- command line


def add_arguments(p) -> None:
    add_pair_arguments(p, "smoothness: the lower mean squared jerk wins, jerk = mean over t of |third finite "
                          "difference of qpos|^2 when the episodes' infos record qpos (segment length >= 4), else "
                          "of the second difference of the actions (>= 3); return: the higher summed reward wins; "
                          "or a 'package.module:function' (segment dict → score, higher wins). Ties are dropped. "
                          "Default: smoothness")
    p.add_argument("--episodes", type=int, default=None,
                   help="read only the dataset's first N episodes (default: all)")


def build(args) -> SegmentPairs:
    return minari_pairs(args.input, args.segment_length, label_argument(args), args.pairs, args.seed, args.episodes)
