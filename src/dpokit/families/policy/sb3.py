"""Stable-Baselines3 policies as dpokit policies: an SB3 `.zip` (PPO, A2C or SAC) loaded as the starting model,
forward(obs) returning SB3's own action distribution (so log-probs are exactly SB3's `evaluate_actions`), and the
trained weights written back into an SB3 zip that `PPO.load` / `SAC.load` reads.

An SB3 zip holds pickles (its policy class, spaces, schedules): loading one runs code from the file. dpokit loads
one only because the config's `model` (or `ref_model`) names it, and says so in the log.

Actions are in the environment's units, what `model.predict` returns and `env.step` takes. SAC's squashed
Gaussian is defined on [−1, 1]: its actions are rescaled onto it (`policy.scale_action`) and the log-density gets
the rescaling's log-Jacobian, so it is a density in the environment's units as well.
"""

from __future__ import annotations

import copy
import json
import logging
import zipfile
from pathlib import Path

import torch
from torch import nn
from torch.distributions import Distribution

from ...errors import DpokitError
from .models import Spec

log = logging.getLogger(__name__)

ALGOS = ("PPO", "A2C", "SAC")
ZIP_NAME = "policy.zip"


def _require_sb3():
    try:
        import stable_baselines3
    except ImportError:
        raise DpokitError("an SB3 .zip policy needs stable-baselines3: pip install 'dpokit[policy]'") from None
    return stable_baselines3


def zip_data(path: str | Path) -> dict:
    """The zip's `data` member: JSON (its pickled values stay unread), what an SB3 zip says about itself."""
    try:
        with zipfile.ZipFile(path) as z:
            return json.loads(z.read("data"))
    except (OSError, KeyError, zipfile.BadZipFile, json.JSONDecodeError) as e:
        raise DpokitError(f"{path}: not a Stable-Baselines3 zip ({e})") from None


def algo_of(path: str | Path, named: str | None = None) -> str:
    """PPO, A2C or SAC: `named` (config key sb3_algo) or read off the zip's data (SAC's policy lives in
    stable_baselines3.sac, PPO keeps a clip_range, A2C neither)."""
    if named:
        return named.upper()
    data = zip_data(path)
    module = str(data.get("policy_class", {}).get("__module__", ""))
    if ".sac." in module or "target_entropy" in data:
        return "SAC"
    if ".td3." in module or ".ddpg." in module or ".dqn." in module:
        raise DpokitError(f"{path}: a deterministic or value-based SB3 policy ({module}) has no action distribution "
                          "to score; use PPO, A2C or SAC")
    return "PPO" if "clip_range" in data else "A2C"


def is_discrete_zip(path: str | Path) -> bool:
    """Whether the zip's action space is Discrete, read off its JSON alone (for the family's `likelihood`)."""
    space = zip_data(path).get("action_space", {})
    return "Discrete" in str(space.get(":type:", "")) and "MultiDiscrete" not in str(space.get(":type:", ""))


class SB3Action(Distribution):
    """An SB3 `Distribution` (after `proba_distribution`) as a torch one of batch shape [B]: `log_prob` is SB3's
    own (summed over action dimensions), plus `log_jacobian` for actions rescaled onto SAC's [−1, 1]."""

    arg_constraints: dict = {}

    def __init__(self, dist, batch: int, low: torch.Tensor | None = None, high: torch.Tensor | None = None):
        self.dist, self.low, self.high = dist, low, high
        super().__init__(batch_shape=torch.Size([batch]), validate_args=False)

    def _unit(self, value):
        return value if self.low is None else 2 * (value - self.low) / (self.high - self.low) - 1

    def log_prob(self, value):
        logp = self.dist.log_prob(self._unit(value))
        if self.low is not None:
            logp = logp + torch.log(2 / (self.high - self.low)).sum()
        return logp

    def _env(self, unit):
        return unit if self.low is None else self.low + (unit + 1) * (self.high - self.low) / 2

    def sample(self, sample_shape=torch.Size()):
        return self._env(self.dist.sample())

    @property
    def mode(self):
        return self._env(self.dist.mode())

    @property
    def mean(self):
        return self.mode

    def entropy(self):
        return self.dist.entropy()


class SB3Policy(nn.Module):
    """An SB3 algorithm's policy (an `nn.Module`, trained in place); `source` is the zip it came from, which
    `save` reloads to write the trained weights into."""

    def __init__(self, policy: nn.Module, algo: str, source: str):
        super().__init__()
        self.policy, self.algo, self.source = policy, algo, str(source)
        self.spec = _spec(policy, algo, source)
        if self.spec.low is not None and algo == "SAC":
            self.register_buffer("low", torch.tensor(self.spec.low, dtype=torch.float32), persistent=False)
            self.register_buffer("high", torch.tensor(self.spec.high, dtype=torch.float32), persistent=False)
        else:
            self.low = self.high = None

    def forward(self, obs: torch.Tensor) -> Distribution:
        if self.algo == "SAC":
            actor = self.policy.actor
            mean, log_std, kwargs = actor.get_action_dist_params(obs)
            dist = copy.copy(actor.action_dist).proba_distribution(mean, log_std, **kwargs)
        else:
            # get_distribution returns the policy's one action_dist object, refilled on every call: keep a copy
            dist = copy.copy(self.policy.get_distribution(obs))
        return SB3Action(dist, obs.shape[0], self.low, self.high)


def _spec(policy, algo: str, source: str) -> Spec:
    from gymnasium import spaces

    obs, act = policy.observation_space, policy.action_space
    if not isinstance(obs, spaces.Box) or len(obs.shape) != 1:
        raise DpokitError(f"{source}: the policy's observation space is {obs}; the policy family takes flat Box "
                          "observations")
    if isinstance(act, spaces.Discrete):
        return Spec("categorical", int(obs.shape[0]), int(act.n))
    if not isinstance(act, spaces.Box) or len(act.shape) != 1:
        raise DpokitError(f"{source}: the policy's action space is {act}; the policy family takes Discrete or flat "
                          "Box actions")
    if algo == "SAC":
        return Spec("tanh_gaussian", int(obs.shape[0]), int(act.shape[0]), tuple(map(float, act.low)),
                    tuple(map(float, act.high)))
    return Spec("gaussian", int(obs.shape[0]), int(act.shape[0]))


def load_sb3(path: str | Path, algo: str | None = None) -> SB3Policy:
    """The policy of the SB3 zip at `path`, on the CPU (the loop moves it)."""
    sb3 = _require_sb3()
    if not Path(path).is_file():
        raise DpokitError(f"{path}: no such file")
    name = algo_of(path, algo)
    log.info("%s: loading an SB3 zip (a pickle) because the config names it", path)
    try:
        model = getattr(sb3, name).load(str(path), device="cpu")
    except Exception as e:  # noqa: BLE001 - whatever the unpickling raises is the file's problem
        raise DpokitError(f"{path}: cannot load as an SB3 {name} zip ({type(e).__name__}: "
                          f"{str(e).splitlines()[0] if str(e) else ''})") from None
    return SB3Policy(model.policy, name, str(path))


def save_sb3(model: SB3Policy, path: str | Path) -> Path:
    """The trained weights written into the starting zip's algorithm and saved as <path>/policy.zip."""
    sb3 = _require_sb3()
    algo = getattr(sb3, model.algo).load(model.source, device="cpu")
    algo.policy.load_state_dict({k: v.detach().cpu() for k, v in model.policy.state_dict().items()})
    out = Path(path) / ZIP_NAME
    algo.save(str(out))
    return out
