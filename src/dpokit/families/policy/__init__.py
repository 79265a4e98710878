"""Control policies (DPO on segments of robot or game trajectories): a policy π(a | s) that returns a torch
distribution, scored on pairs of (observation, action) segments by Σ_t log π(a_t | s_t).

- config.py: the family's own keys (`PolicyConfig`: the head and size of a fresh MLP, the spaces, env_id);
- models.py: dpokit's MLP policy (gaussian, tanh-squashed gaussian or categorical head), its folder format
  (config.json + model.safetensors), `Spec` (what data must fit);
- sb3.py: a Stable-Baselines3 zip (PPO, A2C, SAC) as the starting or reference policy, and saved back as one;
- data.py: segment pairs from JSON Lines or .npz, checked against the policy, padded and masked in batches;
- scorer.py: the segment score;
- sampling.py: rollouts in `env_id` from reset seeds, as rendered frames (or plots where nothing renders): the
  `sample` capability, so `sample_prompts` puts before/after rollouts in report.html (report_samples).

`likelihood` is per model: `likelihood_for(cfg)` says "exact" for a categorical head (a sum of log-probabilities,
so SimPO and ORPO may use it) and "density" for continuous ones, which those losses refuse; the class attribute
says "density", the conservative answer for a model not yet seen. gymnasium and stable-baselines3 are optional
(`pip install dpokit[policy]`) and imported inside the functions that need them.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from ...errors import DpokitError
from ..base import Family, digest
from .config import PolicyConfig
from .data import PolicyExample, collate, load_examples
from .models import PolicyMLP, Spec, load_mlp, read_config, save_mlp, spec_of
from .scorer import PolicyScorer


class PolicyFamily(Family):
    """`policy`: pass `policy=` a module of your own (forward(obs) → a torch distribution of batch shape [B]) to
    train it through `dpokit.train.train(cfg, family=PolicyFamily(policy=module))`; its `likelihood` is "exact"
    when its `spec` (or its `head` attribute) says categorical, else `likelihood` as given."""

    name = "policy"
    likelihood = "density"  # continuous heads; a categorical one is "exact" (likelihood_for)
    config_class = PolicyConfig
    capabilities = frozenset({"sample", "load_trained"})
    rebuilds_base = True  # no `model`: load_trained(None, cfg) is the fresh MLP the run started from

    def __init__(self, policy: nn.Module | None = None, likelihood: str | None = None):
        self.policy = policy
        if likelihood is not None:
            self.likelihood = likelihood

    # ------------------------------------------------------------ the model

    def likelihood_for(self, cfg) -> str:
        if self.policy is not None:
            return "exact" if spec_of(self.policy).discrete else self.likelihood
        return "exact" if self._head(cfg) == "categorical" else "density"

    def _head(self, cfg) -> str | None:
        """The head of the model `cfg` names, read without loading it (an SB3 zip's JSON, a folder's config)."""
        from .sb3 import ZIP_NAME, is_discrete_zip

        if not cfg.model:
            return self.settings(cfg).policy_head
        path = Path(cfg.model)
        if path.suffix.lower() == ".zip" and path.is_file():
            return "categorical" if is_discrete_zip(path) else None
        if path.is_dir():
            config = read_config(path)
            if config["format"] == "sb3":
                return "categorical" if is_discrete_zip(path / ZIP_NAME) else None
            return config.get("head")
        return None  # a missing path: load_policy says so

    def _load(self, path: str, cfg) -> nn.Module:
        from .sb3 import ZIP_NAME, load_sb3

        p = Path(path)
        algo = self.settings(cfg).sb3_algo if cfg is not None else None
        if p.suffix.lower() == ".zip":
            return load_sb3(p, algo)
        if not p.exists():
            raise DpokitError(f"{path}: no such file or folder (model: a policy folder dpokit saved or an SB3 .zip)")
        config = read_config(p)
        if config["format"] == "sb3":
            return load_sb3(p / config.get("zip", ZIP_NAME), config.get("algo"))
        if config["format"] == "module":
            raise DpokitError(f"{path}: holds the weights of a module of your own (model.safetensors); build the "
                              "module, load them into it and pass it as PolicyFamily(policy=module)")
        return load_mlp(p)

    def _fresh(self, cfg) -> PolicyMLP:
        s = self.settings(cfg)
        obs_dim, act_dim = s.obs_dim, s.act_dim
        if (obs_dim is None or act_dim is None) and s.env_id:
            env_obs, env_act = env_dims(s.env_id, s.policy_head)
            obs_dim, act_dim = obs_dim or env_obs, act_dim or env_act
        if obs_dim is None or act_dim is None:
            raise DpokitError("a fresh policy needs obs_dim and act_dim (or env_id to read them from, or model: a "
                              "saved policy folder or an SB3 .zip)")
        with torch.random.fork_rng(devices=[]):  # the start is a function of the config: eval rebuilds it
            torch.manual_seed(cfg.seed)
            return PolicyMLP(obs_dim, act_dim, s.policy_head, s.policy_hidden, s.action_low, s.action_high)

    def load_policy(self, cfg):
        if cfg.lora is not None:
            raise DpokitError("the policy family does not take lora (its policies are small): remove 'lora'")
        model = self.policy if self.policy is not None else (self._load(cfg.model, cfg) if cfg.model
                                                             else self._fresh(cfg))
        self._check_sample_prompts(spec_of(model), cfg)
        return model, spec_of(model)

    def _check_sample_prompts(self, spec: Spec, cfg) -> None:
        """`sample_prompts` with an env_id that cannot be made or does not fit the policy fail here, before
        training, rather than when the report's rollouts are drawn after it."""
        from .sampling import check_env

        s = self.settings(cfg)
        if s.sample_prompts is not None:
            try:
                check_env(spec, s.env_id)
            except DpokitError as e:
                raise DpokitError(f"sample_prompts: {e}") from None

    def load_model(self, path, cfg):
        """A frozen policy from `path`; no path (a run that started from a fresh MLP, as `dpokit eval` asks for its
        reference): that fresh MLP again, which the run's seed determines."""
        model = self._load(path, cfg) if path else self._fresh(cfg)
        return model.requires_grad_(False).eval()

    def load_processor(self, path, cfg):
        return spec_of(self._load(path, cfg))

    def new_policy(self, obs_dim: int, act_dim: int, head: str = "gaussian", hidden=(64, 64),
                   action_low: float = -1.0, action_high: float = 1.0) -> PolicyMLP:
        """A fresh dpokit MLP policy (save it with `save`), for code that trains it first, e.g. by behaviour
        cloning, without importing the family's modules."""
        return PolicyMLP(obs_dim, act_dim, head, tuple(hidden), action_low, action_high)

    def load_trained(self, path, cfg=None):
        """The policy at `path` (None: the fresh MLP a run without `model` started from), frozen, and its `Spec`,
        which carries the config's env_id for `sample`."""
        from dataclasses import replace

        model = self.load_model(path, cfg)
        env_id = self.settings(cfg).env_id if cfg is not None else None
        return model, replace(spec_of(model), env_id=env_id)

    def sample(self, model, spec, prompts, **settings):
        """Rollout pictures per prompt (an episode's reset seed): see sampling.sample."""
        from .sampling import sample

        return sample(model, spec, prompts, **settings)

    def save(self, model, spec, path, merge_lora=False):
        """dpokit's MLP: its folder. An SB3 policy: policy.zip (loads with PPO.load / SAC.load) beside
        model.safetensors of its weights and a config.json naming them. A module of your own: its weights."""
        import json

        from safetensors.torch import save_file

        from .sb3 import ZIP_NAME, SB3Policy, save_sb3

        if isinstance(model, PolicyMLP):
            return save_mlp(model, path)
        out = Path(path)
        out.mkdir(parents=True, exist_ok=True)
        save_file({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()},
                  str(out / "model.safetensors"))
        spec = spec_of(model)
        about = {"head": spec.head, "obs_dim": spec.obs_dim, "act_dim": spec.act_dim}
        if isinstance(model, SB3Policy):
            save_sb3(model, out)
            about = {"format": "sb3", "algo": model.algo, "zip": ZIP_NAME, **about}
        else:
            about = {"format": "module", "class": type(model).__qualname__, **about}
        (out / "config.json").write_text(json.dumps(about, indent=2) + "\n")

    # ------------------------------------------------------------ data

    def examples(self, source, spec, cfg):
        return load_examples(source, spec if isinstance(spec, Spec) else Spec(None, None, None))

    def collate(self, examples, cfg, spec):
        return collate(examples)

    def scorer(self, model, cfg):
        return PolicyScorer(model)

    def fingerprint(self, examples):
        """Every segment's observations and actions, with their shapes."""
        parts = []
        for ex in examples:
            for t in (ex.chosen_obs, ex.chosen_actions, ex.rejected_obs, ex.rejected_actions):
                parts += [str(tuple(t.shape)).encode(), t.numpy().tobytes()]
        return digest(*parts)


def env_dims(env_id: str, head: str) -> tuple[int, int]:
    """(obs_dim, act_dim) of a gymnasium environment's spaces."""
    from .sampling import make_env, space_dims

    env = make_env(env_id)
    try:
        return space_dims(env, env_id, head)
    finally:
        env.close()


__all__ = ["PolicyConfig", "PolicyExample", "PolicyFamily", "PolicyMLP", "PolicyScorer", "Spec"]
