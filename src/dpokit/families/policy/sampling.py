"""Rollouts of a policy as pictures: the family's `sample`, behind `dpokit sample` and the before/after grids that
`dpokit train` draws into report.html when the config names `sample_prompts` (see report_samples).

A prompt is an episode's reset seed. The policy acts in `env_id` with its deterministic action (the mean, a
squashed head's squashed mean, the likeliest action: models.deterministic_action), so a seed gives the same
episode every time, and the starting and the trained policy compare seed by seed. Each prompt's row holds
`num_generations` rendered frames at evenly spaced steps of the episode (step 0 … its last state), each labelled
"t=K". Where the environment cannot render (no EGL or OSMesa for MuJoCo, no pygame for classic control) each row
is instead one figure of the joint positions (MuJoCo's `qpos`, else the observation) and the actions over time.

The episode runs twice: once to act and record (so its length is known), then again on the recorded actions,
rendering only the chosen steps (environments are deterministic given the reset seed).
"""

from __future__ import annotations

import os
from typing import Any, Sequence

import numpy as np
import torch

from ...errors import DpokitError
from .models import Spec, deterministic_action, spec_of

MAX_STEPS = 1000  # an episode's cap when the environment sets no time limit of its own
FIGURE_SIZE, FIGURE_DPI = (6.4, 4.8), 80  # the fallback figure: 512 × 384 pixels


def make_env(env_id: str, render_mode: str | None = None):
    """A gymnasium environment; one line when gymnasium is missing or the id cannot be made."""
    try:
        import gymnasium as gym
    except ImportError:
        raise DpokitError("env_id needs gymnasium: pip install 'dpokit[policy]'") from None
    try:
        return gym.make(env_id, render_mode=render_mode) if render_mode else gym.make(env_id)
    except Exception as e:  # noqa: BLE001 - an unknown id or a missing simulator
        raise DpokitError(f"env_id {env_id!r}: cannot make the environment ({str(e).splitlines()[0]})") from None


def space_dims(env, env_id: str, head: str | None) -> tuple[int, int]:
    """(obs_dim, act_dim) of an environment's spaces, for a policy with `head` (None: continuous, unknown)."""
    obs, act = env.observation_space, env.action_space
    if len(getattr(obs, "shape", None) or ()) != 1:
        raise DpokitError(f"env_id {env_id!r}: observations {obs} are not a flat vector")
    if head == "categorical":
        if not hasattr(act, "n"):
            raise DpokitError(f"env_id {env_id!r}: a categorical head needs Discrete actions, the env has {act}")
        return int(obs.shape[0]), int(act.n)
    if hasattr(act, "n") or len(getattr(act, "shape", None) or ()) != 1:
        raise DpokitError(f"env_id {env_id!r}: a {head or 'continuous'} head needs flat Box actions, the env has "
                          f"{act}")
    return int(obs.shape[0]), int(act.shape[0])


def check_fits(spec: Spec, env, env_id: str) -> None:
    """One line when the policy's observation or action size is not the environment's."""
    obs_dim, act_dim = space_dims(env, env_id, spec.head)
    for what, ours, theirs in (("observations", spec.obs_dim, obs_dim), ("actions", spec.act_dim, act_dim)):
        if ours is not None and ours != theirs:
            raise DpokitError(f"env_id {env_id!r} has {what} of size {theirs}, the policy's are of size {ours}")


def check_env(spec: Spec, env_id: str) -> None:
    """Before training: the environment the report's rollouts will run in exists and fits the policy."""
    env = make_env(env_id)
    try:
        check_fits(spec, env, env_id)
    finally:
        env.close()


def episode_seed(prompt: Any, number: int) -> int:
    """A prompt as a reset seed: a non-negative integer, or its digits (`dpokit sample --prompts 0 1`)."""
    if isinstance(prompt, str) and prompt.strip().isdigit():
        prompt = int(prompt)
    if isinstance(prompt, bool) or not isinstance(prompt, int) or prompt < 0:
        raise DpokitError(f"prompt {number}: {prompt!r} is not an episode seed (a non-negative integer; "
                          "dpokit sample --prompts 0 1)")
    return prompt


def sample(model: torch.nn.Module, spec: Spec | None, prompts: Sequence, num_generations: int = 4, seed: int = 0,
           env_id: str | None = None, max_steps: int = MAX_STEPS, **settings: Any) -> list[list]:
    """Per prompt (an episode's reset seed), `num_generations` PIL frames of the policy's deterministic rollout in
    `env_id` (default: the one `spec` carries, which load_trained reads off the run's config) at evenly spaced
    steps, labelled "t=K"; where the environment cannot render, one figure of joint positions and actions per
    prompt instead. `seed` is accepted for the shared signature and unused: the prompts are the seeds."""
    if settings:
        raise DpokitError(f"policy rollouts take no {', '.join(sorted(settings))} (their settings: env_id, "
                          "max_steps)")
    if num_generations < 1:
        raise DpokitError(f"pictures per episode must be >= 1, got {num_generations}")
    env_id = env_id or getattr(spec, "env_id", None)
    if not env_id:
        raise DpokitError("policy rollouts need env_id: the gymnasium environment the policy acts in")
    seeds = [episode_seed(p, i) for i, p in enumerate(prompts, 1)]
    os.environ.setdefault("MUJOCO_GL", "egl")  # MuJoCo renders headless; read when the first frame is drawn
    try:
        env, renders = make_env(env_id, "rgb_array"), True
    except DpokitError:  # an environment that cannot take a render mode (its renderer will not import)
        env, renders = make_env(env_id), False
    try:
        check_fits(spec if isinstance(spec, Spec) else spec_of(model), env, env_id)
        episodes = []
        for episode in seeds:
            actions, joints, what = rollout(model, env, episode, max_steps)
            frames = _frames(env, episode, actions, num_generations) if renders else None
            renders = renders and frames is not None  # the first failure decides for every prompt
            episodes.append((episode, actions, joints, what, frames))
    finally:
        try:
            env.close()
        except Exception:  # noqa: BLE001 - a renderer that never started may fail to close
            pass
    if renders:
        return [frames for *_, frames in episodes]
    return [[_figure(episode, joints, what, actions)] for episode, actions, joints, what, _ in episodes]


@torch.no_grad()
def rollout(model: torch.nn.Module, env, episode: int, max_steps: int = MAX_STEPS):
    """The policy's deterministic episode from reset seed `episode`: (actions taken [T, act], joint positions
    [T + 1, n] before each step and after the last, and what those are: "qpos" or "observation")."""
    was_training = model.training
    model.eval()
    param = next(model.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    dtype = param.dtype if param is not None and param.is_floating_point() else torch.float32
    space = env.action_space
    obs, _ = env.reset(seed=episode)
    actions, joints = [], [_joints(env, obs)]
    try:
        for _ in range(max_steps):
            x = torch.as_tensor(np.asarray(obs), dtype=dtype, device=device).reshape(1, -1)
            a = deterministic_action(model(x))[0].detach().cpu().numpy()
            a = int(a) if hasattr(space, "n") else np.clip(a.astype(space.dtype), space.low, space.high)
            obs, _, terminated, truncated, _ = env.step(a)
            actions.append(np.atleast_1d(np.asarray(a, dtype=np.float64)))
            joints.append(_joints(env, obs))
            if terminated or truncated:
                break
    finally:
        model.train(was_training)
    what = "qpos" if _qpos(env) is not None else "observation"
    return np.stack(actions) if actions else np.zeros((0, 1)), np.stack(joints), what


def _qpos(env):
    data = getattr(env.unwrapped, "data", None)
    qpos = getattr(data, "qpos", None)
    return None if qpos is None else np.array(qpos, dtype=np.float64).ravel()


def _joints(env, obs) -> np.ndarray:
    qpos = _qpos(env)
    return qpos if qpos is not None else np.asarray(obs, dtype=np.float64).ravel()


def steps_to_show(length: int, num: int) -> list[int]:
    """`num` evenly spaced steps of an episode of `length` actions: 0 … length (its last state)."""
    return [int(round(t)) for t in np.linspace(0, length, num)]


def _frames(env, episode: int, actions: np.ndarray, num: int) -> list | None:
    """The episode again on its recorded actions, rendered at the chosen steps; None when rendering fails."""
    wanted = steps_to_show(len(actions), num)
    shots: dict[int, Any] = {}
    try:
        env.reset(seed=episode)
        for t in range(len(actions) + 1):
            if t in wanted:
                frame = env.render()
                if frame is None or np.asarray(frame).ndim != 3:
                    return None
                shots[t] = np.asarray(frame, dtype=np.uint8).copy()
            if t < len(actions):
                a = actions[t]
                env.step(int(a[0]) if hasattr(env.action_space, "n") else a.astype(env.action_space.dtype))
    except Exception:  # noqa: BLE001 - no EGL/OSMesa context, no pygame: the figure instead
        return None
    return [_label(shots[t], f"t={t}") for t in wanted]


def _label(frame: np.ndarray, text: str):
    """A frame as a PIL image with `text` on a dark box in its top-left corner."""
    from PIL import Image, ImageDraw, ImageFont

    img = Image.fromarray(frame[..., :3]).convert("RGB")
    try:  # a size that reads on the frame (FreeType's default font); else Pillow's small bitmap one
        font = ImageFont.load_default(size=max(10, img.height // 24))
    except (TypeError, OSError, ImportError):
        font = ImageFont.load_default()
    draw = ImageDraw.Draw(img)
    left, top, right, bottom = draw.textbbox((6, 4), text, font=font)
    draw.rectangle((left - 4, top - 3, right + 4, bottom + 3), fill=(0, 0, 0))
    draw.text((6, 4), text, fill=(255, 255, 255), font=font)
    return img


def _figure(episode: int, joints: np.ndarray, what: str, actions: np.ndarray):
    """One PIL image: joint positions (top) and actions (bottom) against the step, drawn with matplotlib's Agg
    canvas (no pyplot, no global backend)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from PIL import Image

    fig = Figure(figsize=FIGURE_SIZE, dpi=FIGURE_DPI)
    canvas = FigureCanvasAgg(fig)
    top, bottom = fig.subplots(2, 1, sharex=True)
    top.plot(np.arange(len(joints)), joints, linewidth=1)
    top.set_ylabel(what)
    top.set_title(f"episode seed {episode}: {len(actions)} steps (no rendering here)", fontsize=10)
    if len(actions):
        bottom.step(np.arange(len(actions)), actions, where="post", linewidth=1)
    bottom.set_ylabel("action")
    bottom.set_xlabel("t")
    fig.tight_layout()
    canvas.draw()
    img = Image.frombuffer("RGBA", canvas.get_width_height(), canvas.buffer_rgba(), "raw", "RGBA", 0, 1)
    return img.convert("RGB")
