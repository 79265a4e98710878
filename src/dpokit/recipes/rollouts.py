"""Rollouts → segment pairs: roll a policy out in a gymnasium environment, cut the trajectories into
fixed-length segments, pair them at random and label each pair by a computable preference.

    dpokit data build rollouts ENV_ID OUT.jsonl|OUT.npz [--policy random|module:function|RUN_OR_ZIP]
        [--steps 10000] [--num-envs 8] [--segment-length 32]
        [--label smoothing|return|module:function | --unlabelled] [--pairs N] [--seed 0]

Rollout: `num_envs` copies of the environment step together (`gymnasium.make_vec`, sync) for
`steps` environment steps in all (rounded up to a multiple of `num_envs`). The policy is
`random` (the action space's own sampler), a Python function `module:function` (a batch of
observations, np.ndarray [num_envs, obs_dim] → actions [num_envs, act_dim], or [num_envs] for a
discrete space: scripted controllers plug in here), or a dpokit policy run folder or an SB3 zip,
loaded by the policy family (`module(obs [B, obs_dim]) → torch.distributions.Distribution`,
sampled, or its mode with `--deterministic`). Actions are recorded as the policy gave them and
clipped to a Box space's bounds only on their way to the environment.

Segments: each environment's trajectory is cut into pieces of `segment_length` consecutive steps
(obs_t, a_t, r_t); a segment never spans an episode end, so the steps of an episode left over
after its last full segment are dropped (counted in the summary). When the environment has
MuJoCo data (`env.unwrapped.data.qpos`), the joint positions qpos_t before each step are
recorded too (for Reacher: the two arm angles and the target's fixed position, which adds
nothing to the jerk).

Jerk (the `smoothness` label, and `info.jerk` of every segment), with x_t ∈ R^d:
  - with qpos: x_t = qpos_t and D_t = x_{t+3} − 3x_{t+2} + 3x_{t+1} − x_t (third finite
    difference, t = 0 … T−4), so the segment length must be >= 4;
  - without: x_t = a_t (the action, as a vector) and D_t = x_{t+2} − 2x_{t+1} + x_t (second
    difference, t = 0 … T−3), so the segment length must be >= 3;
  jerk = mean over t of Σ_k D_{t,k}², in units of x per step³ (or per step²), with no division by
  the time step: a mean squared jerk per step, comparable between segments of one environment.

Pairs: the segments are shuffled (seeded) and paired two by two, each segment in one pair; with
`--pairs N` the first N such pairs, or more distinct random pairs when N exceeds them. Labels:
`smoothness` (the lower jerk wins), `return` (the higher summed reward wins), or a Python function
`module:function` (segment dict with numpy arrays obs, actions, rewards, qpos (None without
MuJoCo) → a number, higher wins). Tied pairs, and pairs the function scored NaN, are dropped.
`--unlabelled` writes the pairs for people to label instead.

Output, by the suffix of OUT (written atomically):
  .jsonl  {"chosen": {"obs": [[...]], "actions": [[...]], "info": {"return": R, "jerk": J}},
           "rejected": {...}, "weight": 1.0}; unlabelled: {"a": segment, "b": segment}
  .npz    chosen_obs [N, T, obs_dim], chosen_actions [N, T, act_dim] ([N, T] for a discrete
          space), rejected_obs, rejected_actions, weight [N], chosen_return, rejected_return,
          chosen_jerk, rejected_jerk [N] (NaN where a segment is too short for a jerk);
          unlabelled: a_obs, a_actions, b_obs, b_actions, a_return, b_return, a_jerk, b_jerk.
"""

from __future__ import annotations

import importlib
import math
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

from ..errors import DpokitError
from ..io import atomic_write
from .common import Built

NAME = "rollouts"
HELP = "roll a policy out in a gymnasium environment → segment pairs labelled by smoothness, return or a function"
INPUT_HELP = "a gymnasium environment id, e.g. Pendulum-v1, CartPole-v1 or Reacher-v5"
OUTPUT_HELP = "the file to write: .jsonl (one pair a row) or .npz (arrays)"
LABELS = ("smoothness", "return")
SUFFIXES = (".jsonl", ".npz")


@dataclass
class Rollouts(Built):
    """The pair rows (segments as numpy arrays until written), counts, and the rollout's speed."""

    steps: int = 0
    seconds: float = 0.0
    unlabelled: bool = False

    @property
    def steps_per_second(self) -> float:
        return self.steps / self.seconds if self.seconds > 0 else float("inf")

    def summary(self) -> str:
        return f"{super().summary()}, rollout: {self.steps} steps at {self.steps_per_second:.0f} steps/s"


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


# ---------------------------------------------------------------- environment and policy


def make_env(env_id: str, num_envs: int, env_kwargs: dict | None = None):
    """A synchronous vector of `num_envs` environments that reset in the same step an episode ends."""
    import gymnasium as gym

    if num_envs < 1:
        raise DpokitError(f"num_envs must be >= 1, got {num_envs}")
    try:
        vec = gym.make_vec(env_id, num_envs=num_envs, vectorization_mode="sync",
                           vector_kwargs={"autoreset_mode": gym.vector.AutoresetMode.SAME_STEP},
                           **(env_kwargs or {}))
    except gym.error.Error as e:
        raise DpokitError(f"environment {env_id!r}: {' '.join(str(e).split())}") from None
    except TypeError as e:  # a keyword the environment does not take
        raise DpokitError(f"environment {env_id!r}: {e}") from None
    obs_space, act_space = vec.single_observation_space, vec.single_action_space
    if not (isinstance(obs_space, gym.spaces.Box) and len(obs_space.shape) == 1):
        vec.close()
        raise DpokitError(f"environment {env_id!r}: rollouts need a flat Box observation space, got {obs_space}")
    if not (isinstance(act_space, gym.spaces.Discrete)
            or (isinstance(act_space, gym.spaces.Box) and len(act_space.shape) == 1)):
        vec.close()
        raise DpokitError(f"environment {env_id!r}: rollouts need a flat Box or a Discrete action space, "
                          f"got {act_space}")
    return vec


def _has_qpos(vec) -> bool:
    data = getattr(vec.envs[0].unwrapped, "data", None)
    return data is not None and hasattr(data, "qpos")


def load_policy(policy: Any, vec, deterministic: bool = False) -> Callable[[np.ndarray], np.ndarray]:
    """obs batch [N, obs_dim] → actions [N, act_dim] (or [N] for a discrete space), from `policy`:
    "random"; "module:function" or a Python callable on numpy arrays; a dpokit policy run folder or
    SB3 zip (the policy family's `load_trained`); or a torch module returning a Distribution."""
    if isinstance(policy, str):
        if policy == "random":
            return lambda obs: vec.action_space.sample()
        if Path(policy).exists():
            from ..families import get_family

            policy, _ = get_family("policy").load_trained(policy)  # (the policy module, its spec)
        elif ":" in policy:
            policy = import_function(policy, "policy function")
        else:
            raise DpokitError(f"policy {policy!r} is not 'random', a 'package.module:function', "
                              "nor an existing policy run folder or SB3 zip")
    if not callable(policy):
        raise DpokitError(f"policy must be 'random', a callable or a policy module, got {type(policy).__name__}")
    import torch

    is_module = isinstance(policy, torch.nn.Module)
    if is_module:
        policy.eval()

    def act(obs: np.ndarray) -> np.ndarray:
        if is_module:
            with torch.no_grad():
                out = policy(torch.as_tensor(obs, dtype=torch.float32))
        else:
            out = policy(obs)
        if isinstance(out, torch.distributions.Distribution):
            with torch.no_grad():
                out = out.mode if deterministic else out.sample()
        if isinstance(out, torch.Tensor):
            out = out.detach().cpu().numpy()
        return np.asarray(out)

    return act


def _check_actions(actions: np.ndarray, vec) -> np.ndarray:
    import gymnasium as gym

    space, n = vec.single_action_space, vec.num_envs
    want = (n,) if isinstance(space, gym.spaces.Discrete) else (n, *space.shape)
    if actions.shape != want:
        if actions.size == math.prod(want):
            actions = actions.reshape(want)
        else:
            raise DpokitError(f"the policy returned actions of shape {tuple(actions.shape)} for {n} observations; "
                              f"the action space {space} needs {want}")
    if isinstance(space, gym.spaces.Discrete):
        if not np.issubdtype(actions.dtype, np.integer):
            if not np.all(actions == np.round(actions)):
                raise DpokitError(f"the policy returned non-integer actions for the discrete space {space}")
            actions = actions.astype(np.int64)
        if actions.min() < space.start or actions.max() >= space.start + space.n:
            raise DpokitError(f"the policy returned actions outside the discrete space {space}")
        return actions
    return actions.astype(np.float32)


# ---------------------------------------------------------------- rollout and segments


def jerk(segment: dict) -> float | None:
    """Mean squared jerk of a segment (the module docstring has the definition): the third finite difference
    of qpos when the segment has it, else the second difference of the actions; mean over t of the squared
    norm. None when the segment is too short for the difference."""
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


def rollout_segments(env_id: str, policy: Any = "random", steps: int = 10_000, num_envs: int = 8,
                     segment_length: int = 32, seed: int = 0, env_kwargs: dict | None = None,
                     deterministic: bool = False, min_length: Callable[[bool], int] | None = None,
                     ) -> tuple[list[dict], Rollouts]:
    """Roll `policy` out and cut each environment's trajectory into segments of `segment_length` steps,
    never across an episode end. Each segment: obs [T, obs_dim], actions, rewards [T], qpos [T, nq] or None,
    env, episode (that environment's episode number), start (step within the episode), info {return, jerk}.
    `min_length(has_qpos)` is the shortest segment the caller can use (checked before rolling out)."""
    if steps < 1:
        raise DpokitError(f"steps must be >= 1, got {steps}")
    if segment_length < 1:
        raise DpokitError(f"segment_length must be >= 1, got {segment_length}")
    vec = make_env(env_id, num_envs, env_kwargs)
    try:
        qpos_on = _has_qpos(vec)
        if min_length is not None and segment_length < min_length(qpos_on):
            raise DpokitError(
                f"segment_length must be >= {min_length(qpos_on)} for the smoothness label on {env_id} (jerk is the "
                + ("third finite difference of qpos" if qpos_on else "second finite difference of the actions")
                + f"), got {segment_length}")
        act = load_policy(policy, vec, deterministic)
        vec.action_space.seed(seed)
        import gymnasium as gym
        import torch

        space = vec.single_action_space
        low = high = None
        if isinstance(space, gym.spaces.Box):
            low, high = space.low, space.high
        out = Rollouts()
        segments: list[dict] = []
        buffers: list[list[tuple]] = [[] for _ in range(num_envs)]
        episode, t_in_episode = [0] * num_envs, [0] * num_envs
        iterations = -(-steps // num_envs)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            start = time.perf_counter()
            obs, _ = vec.reset(seed=seed)
            for _ in range(iterations):
                qpos = [np.array(e.unwrapped.data.qpos, dtype=np.float64) for e in vec.envs] if qpos_on else None
                actions = _check_actions(act(obs), vec)
                sent = np.clip(actions, low, high) if low is not None else actions
                next_obs, rewards, terminated, truncated, _ = vec.step(sent)
                for i in range(num_envs):
                    buffers[i].append((obs[i], actions[i], float(rewards[i]), qpos[i] if qpos_on else None))
                    t_in_episode[i] += 1
                    if len(buffers[i]) == segment_length:
                        segments.append(_segment(buffers[i], i, episode[i], t_in_episode[i] - segment_length))
                        buffers[i] = []
                    if terminated[i] or truncated[i]:
                        out.counts["steps_outside_segments"] += len(buffers[i])
                        buffers[i] = []
                        episode[i] += 1
                        t_in_episode[i] = 0
                        out.counts["episodes_ended"] += 1
                obs = next_obs
            out.seconds = time.perf_counter() - start
        out.steps = iterations * num_envs
        outside = out.counts["steps_outside_segments"] + sum(len(b) for b in buffers)  # and unfinished at the end
        out.counts = Counter(segments=len(segments), episodes_ended=out.counts["episodes_ended"],
                             steps_outside_segments=outside)
        return segments, out
    finally:
        vec.close()


def _segment(buffer: list[tuple], env: int, episode: int, start: int) -> dict:
    obs, actions, rewards, qpos = zip(*buffer)
    seg = {"obs": np.stack(obs).astype(np.float32), "actions": np.stack(actions),
           "rewards": np.asarray(rewards, dtype=np.float64),
           "qpos": np.stack(qpos) if qpos[0] is not None else None,
           "env": env, "episode": episode, "start": start}
    seg["info"] = {"return": float(seg["rewards"].sum()), "jerk": jerk(seg)}
    return seg


# ---------------------------------------------------------------- pairs and labels


def pair_indices(n: int, pairs: int | None = None, seed: int = 0) -> list[tuple[int, int]]:
    """Random pairs of distinct segments among n, seeded: a shuffle paired two by two (each segment once),
    then, when `pairs` asks for more, further distinct random pairs."""
    if n < 2:
        raise DpokitError(f"the rollout gave {n} segment(s), and a pair needs 2: roll out more steps "
                          "or shorten the segments")
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
                out: Rollouts | None = None) -> Rollouts:
    """Pair rows: the higher-scored segment chosen (ties and NaN scores dropped), or with label None
    unlabelled rows {"a", "b"}."""
    out = out if out is not None else Rollouts()
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


def rollout_pairs(env_id: str, policy: Any = "random", steps: int = 10_000, num_envs: int = 8,
                  segment_length: int = 32, label: str | Callable | None = "smoothness", pairs: int | None = None,
                  seed: int = 0, env_kwargs: dict | None = None, deterministic: bool = False) -> Rollouts:
    """Roll out, cut segments, pair and label them (`label` None: unlabelled pairs). The whole recipe."""
    if label is not None and not callable(label):
        load_labeller(label)  # a bad label fails before the rollout, not after
    min_length = min_smoothness_length if label == "smoothness" else None
    segments, out = rollout_segments(env_id, policy, steps, num_envs, segment_length, seed, env_kwargs,
                                     deterministic, min_length)
    out = label_pairs(segments, pair_indices(len(segments), pairs, seed), label, out)
    if not out.rows:
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


def write(built: Rollouts, path: str | Path) -> int:
    """Write the pairs as JSON Lines or .npz arrays (by suffix), all or nothing; returns how many."""
    import json

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


def add_arguments(p) -> None:
    p.add_argument("--policy", default="random",
                   help="random (default), a 'package.module:function' (obs batch → actions, numpy), or a dpokit "
                        "policy run folder / SB3 zip (loaded by the policy family)")
    p.add_argument("--deterministic", action="store_true",
                   help="a policy module acts by its distribution's mode instead of sampling")
    p.add_argument("--steps", type=int, default=10_000, help="environment steps in all, over every copy")
    p.add_argument("--num-envs", type=int, default=8, help="environment copies stepped together")
    p.add_argument("--segment-length", type=int, default=32,
                   help="steps per segment; a segment never spans an episode end")
    p.add_argument("--label", default=None,
                   help="smoothness: the lower mean squared jerk wins, jerk = mean over t of |third finite "
                        "difference of qpos|^2 when the env has MuJoCo qpos (segment length >= 4), else of the "
                        "second difference of the actions (>= 3); return: the higher summed reward wins; or a "
                        "'package.module:function' (segment dict → score, higher wins). Ties are dropped. Default: smoothness")
    p.add_argument("--unlabelled", action="store_true", help="write {a, b} pairs for people to label, no preference")
    p.add_argument("--pairs", type=int, default=None,
                   help="how many pairs to draw (default: the segments shuffled and paired, each once)")
    p.add_argument("--env-kwargs", default=None,
                   help="keyword arguments for the environment, as YAML, e.g. '{max_episode_steps: 50}'")
    p.add_argument("--seed", type=int, default=0)


def _env_kwargs(text: str | None) -> dict | None:
    if text is None:
        return None
    import yaml

    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError:
        value = None
    if not isinstance(value, dict):
        raise DpokitError(f"--env-kwargs must be a YAML mapping such as '{{max_episode_steps: 50}}', got {text!r}")
    return value


def build(args) -> Rollouts:
    check_output(args.output)
    if args.unlabelled and args.label is not None:
        raise DpokitError("--unlabelled writes pairs with no preference; drop --label")
    return rollout_pairs(args.input, args.policy, args.steps, args.num_envs, args.segment_length,
                         None if args.unlabelled else args.label or "smoothness", args.pairs, args.seed, _env_kwargs(args.env_kwargs),
                         args.deterministic)
