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

import math
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

from ..errors import DpokitError
# the segment, pair, label and writing machinery is shared with the minari recipe; re-exported from here
from .segment_pairs import (LABELS, OUTPUT_HELP, SUFFIXES, SegmentPairs, add_pair_arguments, check_output,  # noqa: F401
                            import_function, jerk, label_argument, label_pairs, load_labeller, make_segment,
                            min_smoothness_length, pair_indices, require_preferences, write)

NAME = "rollouts"
HELP = "roll a policy out in a gymnasium environment → segment pairs labelled by smoothness, return or a function"
INPUT_HELP = "a gymnasium environment id, e.g. Pendulum-v1, CartPole-v1 or Reacher-v5"


@dataclass
class Rollouts(SegmentPairs):
    """The pair rows (segments as numpy arrays until written), counts, and the rollout's speed."""

    steps: int = 0
    seconds: float = 0.0

    @property
    def steps_per_second(self) -> float:
        return self.steps / self.seconds if self.seconds > 0 else float("inf")

    def summary(self) -> str:
        return f"{super().summary()}, rollout: {self.steps} steps at {self.steps_per_second:.0f} steps/s"


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
    return make_segment(np.stack(obs), np.stack(actions), rewards, np.stack(qpos) if qpos[0] is not None else None,
                        env=env, episode=episode, start=start)


# ---------------------------------------------------------------- pairs and labels


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
    return require_preferences(out, label)


# ---------------------------------------------------------------- command line


def add_arguments(p) -> None:
    p.add_argument("--policy", default="random",
                   help="random (default), a 'package.module:function' (obs batch → actions, numpy), or a dpokit "
                        "policy run folder / SB3 zip (loaded by the policy family)")
    p.add_argument("--deterministic", action="store_true",
                   help="a policy module acts by its distribution's mode instead of sampling")
    p.add_argument("--steps", type=int, default=10_000, help="environment steps in all, over every copy")
    p.add_argument("--num-envs", type=int, default=8, help="environment copies stepped together")
    add_pair_arguments(p, "smoothness: the lower mean squared jerk wins, jerk = mean over t of |third finite "
                          "difference of qpos|^2 when the env has MuJoCo qpos (segment length >= 4), else of the "
                          "second difference of the actions (>= 3); return: the higher summed reward wins; or a "
                          "'package.module:function' (segment dict → score, higher wins). Ties are dropped. "
                          "Default: smoothness")
    p.add_argument("--env-kwargs", default=None,
                   help="keyword arguments for the environment, as YAML, e.g. '{max_episode_steps: 50}'")


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
    return rollout_pairs(args.input, args.policy, args.steps, args.num_envs, args.segment_length,
                         label_argument(args), args.pairs, args.seed, _env_kwargs(args.env_kwargs),
                         args.deterministic)
