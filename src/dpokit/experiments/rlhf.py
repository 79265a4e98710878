"""The RLHF arm of the policy experiment: a Bradley–Terry reward model fitted to the same segment pairs, then
stable-baselines3 PPO on that reward with a BC anchor — the pipeline DPO and CPL replace (Christiano et al. 2017;
the reward model's loss is the Bradley–Terry likelihood of the labels, eq. 1 there).

Research code: it imports stable-baselines3 and gymnasium directly, and the library never imports it.
"""

from __future__ import annotations

import time

import numpy as np
import torch
from torch import nn

from . import reacher as R


def reward_model(obs_dim: int, act_dim: int) -> nn.Module:
    """r_ψ(s, a): an MLP 64-64 (tanh) on the concatenated observation and action."""
    return nn.Sequential(nn.Linear(obs_dim + act_dim, 64), nn.Tanh(), nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 1))


def segment_return(model: nn.Module, obs: torch.Tensor, actions: torch.Tensor) -> torch.Tensor:
    """Σ_t r_ψ(s_t, a_t) for segments [N, T, ·] → [N]."""
    return model(torch.cat([obs, actions], -1)).squeeze(-1).sum(-1)


def fit_reward_model(pairs: dict, steps: int, batch_size: int = 128, lr: float = 1e-3, seed: int = 0
                     ) -> tuple[nn.Module, float]:
    """Bradley–Terry: maximise log σ(R(chosen) − R(rejected)) over the pairs; returns the model and its accuracy
    on the pairs it was fitted to."""
    torch.manual_seed(seed)
    t = {k: torch.as_tensor(np.asarray(pairs[k]), dtype=torch.float32)
         for k in ("chosen_obs", "chosen_actions", "rejected_obs", "rejected_actions")}
    model = reward_model(t["chosen_obs"].shape[-1], t["chosen_actions"].shape[-1])
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    g = torch.Generator().manual_seed(seed)
    n = len(t["chosen_obs"])
    for _ in range(steps):
        idx = torch.randint(n, (min(batch_size, n),), generator=g)
        margin = (segment_return(model, t["chosen_obs"][idx], t["chosen_actions"][idx])
                  - segment_return(model, t["rejected_obs"][idx], t["rejected_actions"][idx]))
        loss = -torch.nn.functional.logsigmoid(margin).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        margin = (segment_return(model, t["chosen_obs"], t["chosen_actions"])
                  - segment_return(model, t["rejected_obs"], t["rejected_actions"]))
    return model.eval().requires_grad_(False), float((margin > 0).float().mean())


def learned_reward_env(venv, model: nn.Module, anchor_policy, anchor: float):
    """The vectorised environment with its reward replaced: r_ψ(s_t, a_t) + anchor·log π_BC(a_t | s_t), the
    action as the environment received it (PPO clips to the action space first). Batched over the environments."""
    from stable_baselines3.common.vec_env import VecEnvWrapper

    class LearnedReward(VecEnvWrapper):
        def reset(self):
            self._obs = self.venv.reset()
            return self._obs

        def step_async(self, actions):
            self._actions = np.asarray(actions)
            self.venv.step_async(actions)

        def step_wait(self):
            obs, _, dones, infos = self.venv.step_wait()
            with torch.no_grad():
                o = torch.as_tensor(self._obs, dtype=torch.float32)
                a = torch.as_tensor(self._actions, dtype=torch.float32)
                reward = model(torch.cat([o, a], -1)).squeeze(-1)
                if anchor:
                    reward = reward + anchor * anchor_policy.get_distribution(o).log_prob(a)
            self._obs = obs  # after an episode ends this is the next episode's first observation, as it should be
            return obs, reward.numpy().astype(np.float32), dones, infos

    return LearnedReward(venv)


def bc_sb3(model, demos: dict, steps: int, batch_size: int, lr: float, seed: int) -> None:
    """Behaviour cloning of an SB3 policy's actor on the demonstrations (per-step NLL under its Gaussian)."""
    policy = model.policy
    x = torch.as_tensor(demos["obs"].reshape(-1, demos["obs"].shape[-1]), dtype=torch.float32)
    y = torch.as_tensor(np.clip(demos["actions"].reshape(-1, demos["actions"].shape[-1]), -1, 1), dtype=torch.float32)
    opt = torch.optim.Adam(policy.parameters(), lr=lr)
    g = torch.Generator().manual_seed(seed)
    policy.set_training_mode(True)
    for _ in range(steps):
        idx = torch.randint(len(x), (batch_size,), generator=g)
        loss = -policy.get_distribution(x[idx]).log_prob(y[idx]).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    policy.set_training_mode(False)


def run_rlhf(pairs: dict, demos: dict, size: dict, seed: int, eval_seed: int, say=print) -> dict:
    """The whole arm: reward model, BC-initialised SB3 PPO on the learned reward with the BC anchor, evaluated like
    the other policies. Returns the measures plus CPU seconds of the reward model and of PPO."""
    from stable_baselines3 import PPO
    from stable_baselines3.common.env_util import make_vec_env

    c0, t0 = time.process_time(), time.time()
    rm, accuracy = fit_reward_model(pairs, size["rm_steps"], seed=seed)
    rm_cpu = time.process_time() - c0
    say(f"  reward model: {size['rm_steps']} steps, accuracy on its pairs {accuracy:.3f} ({rm_cpu:.1f} CPU s)")

    venv = make_vec_env(R.ENV_ID, n_envs=8, seed=seed)
    model = PPO("MlpPolicy", venv, n_steps=256, batch_size=64, n_epochs=10, learning_rate=3e-4, seed=seed,
                device="cpu", verbose=0,
                policy_kwargs=dict(net_arch=dict(pi=[64, 64], vf=[64, 64]), activation_fn=nn.Tanh))
    c1 = time.process_time()
    bc_sb3(model, demos, size["bc_steps"], size["bc_batch"], size["bc_lr"], seed)
    bc_cpu = time.process_time() - c1
    # the frozen BC policy: a fresh policy of the same class with its weights (deepcopy trips on the tensors SB3's
    # distribution object keeps from the last forward)
    anchor = model.policy_class(model.observation_space, model.action_space, model.lr_schedule, **model.policy_kwargs)
    anchor.load_state_dict(model.policy.state_dict())
    anchor.set_training_mode(False)
    anchor.requires_grad_(False)
    model.set_env(learned_reward_env(venv, rm, anchor, size["rlhf_anchor"]))
    bc_measures = R.measures(R.episodes(lambda o: model.predict(o, deterministic=True)[0], size["eval_episodes"],
                                        eval_seed))
    say(f"  SB3 policy after BC ({bc_cpu:.1f} CPU s): " + ", ".join(f"{k} {v:.4g}" for k, v in bc_measures.items()))
    c2 = time.process_time()
    model.learn(total_timesteps=size["ppo_steps"])
    ppo_cpu = time.process_time() - c2
    measures = R.measures(R.episodes(lambda o: model.predict(o, deterministic=True)[0], size["eval_episodes"],
                                     eval_seed))
    say(f"  PPO {size['ppo_steps']} steps ({ppo_cpu:.1f} CPU s): " + ", ".join(f"{k} {v:.4g}" for k, v in measures.items()))
    return {**measures, "reward_model_accuracy": accuracy, "sb3_bc": bc_measures,
            "cpu_seconds": {"reward_model": round(rm_cpu, 1), "ppo": round(ppo_cpu, 1), "sb3_bc": round(bc_cpu, 1)},
            "wall_seconds": round(time.time() - t0, 1)}
