"""Reacher-v5 pieces of the policy experiment (policy.py): the scripted demonstrator, behaviour cloning and the
evaluation rollouts, all on `gymnasium.make_vec("Reacher-v5", vectorization_mode="sync")`.

Reacher-v5's observation: cos q (2), sin q (2), the target (2), q̇ (2), fingertip − target (2); qpos is the two
arm angles then the target's position (constant in an episode). Links 0.1 m and 0.11 m (the fingertip's offset);
an episode is 50 steps (truncation, no termination), 0.02 s a step.
"""

from __future__ import annotations

import numpy as np
import torch

ENV_ID = "Reacher-v5"
EPISODE_STEPS = 50
LINKS = (0.1, 0.11)
GAIN, DAMPING = 30.0, 0.03  # τ = clip(GAIN·Jᵀ(target − fingertip) − DAMPING·q̇ + n, −1, 1)
NOISE, NOISE_PERIOD = 0.2, 5  # protocol version 2 (version 1: 0.3, under which BC reached only 28%)  # telegraph noise: ±NOISE with a random sign per joint, redrawn every NOISE_PERIOD steps
SUCCESS_DISTANCE = 0.05  # m, fingertip to target at the last step
# The demonstrator's actions are often exactly ±1 (clipped); a tanh-squashed head's log-density needs them strictly
# inside, so BC targets are clipped to ±(1 − BC_CLIP).
BC_CLIP = 1e-3


def make_vec(num_envs: int):
    import gymnasium as gym

    # NEXT_STEP autoreset (the default): the observation after an episode's last step is its final one.
    return gym.make_vec(ENV_ID, num_envs=num_envs, vectorization_mode="sync")


def angles(obs: np.ndarray) -> np.ndarray:
    """The two joint angles [N, 2] from the observation's cos and sin."""
    return np.arctan2(obs[:, 2:4], obs[:, 0:2])


def controller(obs: np.ndarray, noise: np.ndarray) -> np.ndarray:
    """The demonstrator's torque for a batch of observations [N, 10] with the current noise [N, 2]:
    clip(GAIN·Jᵀ(target − fingertip) − DAMPING·q̇ + n, −1, 1), J the arm's 2×2 position Jacobian."""
    q = angles(obs)
    l1, l2 = LINKS
    q12 = q[:, 0] + q[:, 1]
    s1, c1, s12, c12 = np.sin(q[:, 0]), np.cos(q[:, 0]), np.sin(q12), np.cos(q12)
    # fingertip = (l1 c1 + l2 c12, l1 s1 + l2 s12): J = [[∂x/∂q1, ∂x/∂q2], [∂y/∂q1, ∂y/∂q2]]
    jac = np.stack([np.stack([-l1 * s1 - l2 * s12, -l2 * s12], -1),
                    np.stack([l1 * c1 + l2 * c12, l2 * c12], -1)], 1)  # [N, 2 (x, y), 2 (q1, q2)]
    error = -obs[:, 8:10]  # target − fingertip
    tau = GAIN * np.einsum("nij,ni->nj", jac, error) - DAMPING * obs[:, 6:8] + noise
    return np.clip(tau, -1.0, 1.0)


class Telegraph:
    """±NOISE per joint with a random sign, redrawn every NOISE_PERIOD steps."""

    def __init__(self, n: int, rng: np.random.Generator):
        self.n, self.rng, self.t, self.value = n, rng, 0, np.zeros((n, 2))

    def __call__(self) -> np.ndarray:
        if self.t % NOISE_PERIOD == 0:
            self.value = NOISE * self.rng.choice([-1.0, 1.0], size=(self.n, 2))
        self.t += 1
        return self.value


def episodes(act, num_episodes: int, seed: int, noise: bool = False) -> dict:
    """`num_episodes` episodes side by side (env i reset with seed + i), acting with `act(obs [N, 10]) → [N, 2]`
    (plus telegraph noise inside the controller when `act` is the demonstrator: pass `controller` and noise=True).
    Returns obs [N, 50, 10], actions [N, 50, 2] (as given, before the environment's clip), rewards [N, 50], arm
    angles qpos[:2] [N, 51, 2] (before each step and after the last) and the final observation [N, 10]."""
    vec = make_vec(num_episodes)
    try:
        obs, _ = vec.reset(seed=seed)
        rng = np.random.default_rng(seed)
        tele = Telegraph(num_episodes, rng) if noise else None
        o, a, r, q = [], [], [], []
        for _ in range(EPISODE_STEPS):
            q.append(np.stack([np.array(e.unwrapped.data.qpos[:2]) for e in vec.envs]))
            action = controller(obs, tele()) if noise else np.asarray(act(obs), dtype=np.float64)
            o.append(obs)
            a.append(action)
            obs, reward, terminated, truncated, _ = vec.step(np.clip(action, -1, 1).astype(np.float32))
            r.append(reward)
        assert truncated.all(), "Reacher episodes end at step 50"
        q.append(np.stack([np.array(e.unwrapped.data.qpos[:2]) for e in vec.envs]))
    finally:
        vec.close()
    return {"obs": np.stack(o, 1).astype(np.float32), "actions": np.stack(a, 1), "rewards": np.stack(r, 1),
            "qpos": np.stack(q, 1), "final_obs": obs}


def demonstrations(num_episodes: int, seed: int) -> dict:
    return episodes(None, num_episodes, seed, noise=True)


def jerk(qpos: np.ndarray) -> np.ndarray:
    """Per episode: the mean over t of Σ_k (x_{t+3} − 3x_{t+2} + 3x_{t+1} − x_t)_k², x the two joint angles
    (rad per step³); qpos [N, T, 2] → [N]."""
    d = np.diff(np.asarray(qpos, dtype=np.float64), n=3, axis=1)
    return (d ** 2).sum(-1).mean(-1)


def measures(ep: dict) -> dict:
    """jerk, success rate and return, averaged over the episodes (and the final distance)."""
    distance = np.linalg.norm(ep["final_obs"][:, 8:10], axis=-1)
    return {"jerk": float(jerk(ep["qpos"]).mean()), "success_rate": float((distance < SUCCESS_DISTANCE).mean()),
            "return": float(ep["rewards"].sum(1).mean()), "final_distance": float(distance.mean()),
            "episodes": int(len(distance))}


def policy_actor(policy: torch.nn.Module, deterministic: bool = True):
    """obs [N, 10] → actions [N, 2] from a policy module (its deterministic action: the squashed mean)."""
    policy.eval()

    def act(obs: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            dist = policy(torch.as_tensor(obs, dtype=torch.float32))
            return (dist.mode if deterministic else dist.sample()).numpy()
    return act


def behaviour_clone(policy: torch.nn.Module, obs: np.ndarray, actions: np.ndarray, steps: int, batch_size: int,
                    lr: float, seed: int, log_every: int = 500, say=print) -> list[float]:
    """Per-step NLL of the demonstrator's actions (clipped to ±(1 − BC_CLIP)), AdamW; returns the logged losses.
    The head's log-std is held state-independent: the rows of the last layer that output it keep zero weights, so
    the log-std is their bias alone."""
    x = torch.as_tensor(obs.reshape(-1, obs.shape[-1]), dtype=torch.float32)
    y = torch.as_tensor(np.clip(actions.reshape(-1, actions.shape[-1]), -1 + BC_CLIP, 1 - BC_CLIP),
                        dtype=torch.float32)
    last = policy.net[-1]
    act_dim = y.shape[-1]
    with torch.no_grad():
        last.weight[act_dim:] = 0.0
    last.weight.register_hook(lambda g: torch.cat([g[:act_dim], torch.zeros_like(g[act_dim:])]))
    opt = torch.optim.AdamW(policy.parameters(), lr=lr)
    g = torch.Generator().manual_seed(seed)
    losses = []
    policy.train()
    for step in range(1, steps + 1):
        idx = torch.randint(len(x), (batch_size,), generator=g)
        loss = -policy(x[idx]).log_prob(y[idx]).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        with torch.no_grad():
            last.weight[act_dim:] = 0.0  # AdamW's weight decay would otherwise move them off zero
        if step % log_every == 0 or step == 1:
            losses.append(loss.item())
            say(f"  BC step {step}: NLL {losses[-1]:.3f}")
    policy.eval()
    return losses
