"""Torch policies: forward(obs [B, obs_dim]) → a `torch.distributions.Distribution` of batch shape [B].

`PolicyMLP` is dpokit's own: an MLP (tanh activations) with a `gaussian`, `tanh_gaussian` or `categorical` head,
saved as a folder of `config.json` and `model.safetensors`. Any other `nn.Module` whose forward returns such a
distribution is accepted too (`PolicyFamily(policy=module)`); `Spec` is what the family reads off a model to check
data against it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from torch.distributions import (AffineTransform, Categorical, Distribution, Independent, Normal, TanhTransform,
                                 TransformedDistribution)

from ...errors import DpokitError

LOG_STD_MIN, LOG_STD_MAX = -20.0, 2.0  # SAC's clamp of the log-std
TANH_EPS = 1e-6  # actions at ±1 (a squashed head's bounds) are read as ±(1 − TANH_EPS)


class TanhNormal(TransformedDistribution):
    """A Normal squashed by tanh and mapped affinely onto [low, high] (SAC, Haarnoja et al. 2018, appendix C,
    eq. 21): a = low + (tanh(u) + 1)·(high − low)/2 with u ~ N(μ, σ), so

        log π(a) = log N(u; μ, σ) − Σ log(1 − tanh(u)²) − Σ log((high − low)/2),  u = atanh(ã),

    ã the action mapped back to [−1, 1]. torch's `TanhTransform` computes log(1 − tanh(u)²) stably from u; atanh
    is infinite at ±1, so `log_prob` first clamps ã to ±(1 − TANH_EPS): an action recorded at the bound (as
    environments clip them) keeps a finite log-density. Per action dimension; wrap in `Independent(·, 1)`."""

    def __init__(self, loc, scale, low=-1.0, high=1.0, validate_args=False):
        self.low = torch.as_tensor(low, dtype=loc.dtype, device=loc.device)
        self.high = torch.as_tensor(high, dtype=loc.dtype, device=loc.device)
        half = (self.high - self.low) / 2
        transforms = [TanhTransform(cache_size=1), AffineTransform(self.low + half, half)]
        super().__init__(Normal(loc, scale, validate_args=False), transforms, validate_args=validate_args)

    def log_prob(self, value):
        half = (self.high - self.low) / 2
        unit = ((value - self.low) / half - 1).clamp(-1 + TANH_EPS, 1 - TANH_EPS)
        return super().log_prob(self.low + (unit + 1) * half)

    @property
    def mode(self):
        """The squashed mean (the action SAC takes deterministically)."""
        half = (self.high - self.low) / 2
        return self.low + (torch.tanh(self.base_dist.loc) + 1) * half


@dataclass(frozen=True)
class Spec:
    """What the data must fit: the head, the observation size, the action size (the number of actions of a
    categorical head) and a squashed head's bounds. None where a user's module does not say."""

    head: str | None
    obs_dim: int | None
    act_dim: int | None
    low: tuple[float, ...] | None = None  # per action dimension; None: unbounded
    high: tuple[float, ...] | None = None
    env_id: str | None = None  # the environment `sample` rolls out in (load_trained reads it off the run's config)

    @property
    def discrete(self) -> bool:
        return self.head == "categorical"


def spec_of(model: nn.Module) -> Spec:
    """A model's `Spec`: from its `spec` attribute (dpokit's and the SB3 wrapper have one), else from attributes
    `head`, `obs_dim`, `act_dim` a user's module may set."""
    spec = getattr(model, "spec", None)
    if isinstance(spec, Spec):
        return spec
    return Spec(getattr(model, "head", None), getattr(model, "obs_dim", None), getattr(model, "act_dim", None))


def mlp(sizes: list[int]) -> nn.Sequential:
    """Linear layers with tanh between them (none after the last)."""
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
        layers.append(nn.Linear(a, b))
        if i < len(sizes) - 2:
            layers.append(nn.Tanh())
    return nn.Sequential(*layers)


class PolicyMLP(nn.Module):
    """An MLP policy. `gaussian`: Independent Normal with a state-independent log-std parameter (as PPO's);
    `tanh_gaussian`: the log-std is a second output, clamped to [−20, 2], squashed by tanh onto
    [action_low, action_high] (SAC's actor); `categorical`: logits over `act_dim` actions."""

    def __init__(self, obs_dim: int, act_dim: int, head: str = "gaussian", hidden=(64, 64),
                 action_low: float = -1.0, action_high: float = 1.0):
        super().__init__()
        self.config = {"head": head, "obs_dim": obs_dim, "act_dim": act_dim, "hidden": list(hidden),
                       "action_low": float(action_low), "action_high": float(action_high)}
        width = 2 * act_dim if head == "tanh_gaussian" else act_dim
        self.net = mlp([obs_dim, *hidden, width])
        if head == "gaussian":
            self.log_std = nn.Parameter(torch.zeros(act_dim))
        bounds = (tuple([float(action_low)] * act_dim), tuple([float(action_high)] * act_dim))
        self.spec = Spec(head, obs_dim, act_dim, *(bounds if head == "tanh_gaussian" else (None, None)))

    def forward(self, obs: torch.Tensor) -> Distribution:
        out = self.net(obs)
        head = self.config["head"]
        if head == "categorical":
            return Categorical(logits=out)
        if head == "gaussian":
            return Independent(Normal(out, self.log_std.exp().expand_as(out)), 1)
        mean, log_std = out.chunk(2, dim=-1)
        std = log_std.clamp(LOG_STD_MIN, LOG_STD_MAX).exp()
        return Independent(TanhNormal(mean, std, self.config["action_low"], self.config["action_high"]), 1)


def deterministic_action(dist: Distribution) -> torch.Tensor:
    """The action a policy takes without sampling: the mean, a squashed head's squashed mean, the likeliest action."""
    base = dist.base_dist if isinstance(dist, Independent) else dist
    if isinstance(base, TanhNormal):
        return base.mode
    if isinstance(base, Categorical):
        return base.probs.argmax(-1)
    mode = getattr(dist, "mode", None)
    return mode if isinstance(mode, torch.Tensor) else dist.mean


CONFIG_FILE, WEIGHTS_FILE = "config.json", "model.safetensors"


def save_mlp(model: PolicyMLP, path: str | Path) -> None:
    from safetensors.torch import save_file

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    (path / CONFIG_FILE).write_text(json.dumps({"format": "dpokit-policy", **model.config}, indent=2) + "\n")
    save_file({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}, str(path / WEIGHTS_FILE))


def read_config(path: str | Path) -> dict:
    """A saved folder's config.json; one line when it is missing or not dpokit's."""
    file = Path(path) / CONFIG_FILE
    if not file.is_file():
        raise DpokitError(f"{path}: not a policy folder (no {CONFIG_FILE}); give a folder dpokit saved or an SB3 .zip")
    try:
        config = json.loads(file.read_text())
    except json.JSONDecodeError as e:
        raise DpokitError(f"{file}: not valid JSON ({e.msg})") from None
    if not isinstance(config, dict) or config.get("format") not in ("dpokit-policy", "sb3", "module"):
        raise DpokitError(f"{file}: not a config.json dpokit's policy family wrote")
    return config


def load_mlp(path: str | Path) -> PolicyMLP:
    from safetensors.torch import load_file

    config = read_config(path)
    if config["format"] != "dpokit-policy":
        raise DpokitError(f"{path}: holds a {config['format']} policy, not dpokit's MLP")
    try:
        model = PolicyMLP(config["obs_dim"], config["act_dim"], config["head"], config["hidden"],
                          config.get("action_low", -1.0), config.get("action_high", 1.0))
        model.load_state_dict(load_file(str(Path(path) / WEIGHTS_FILE)))
    except (KeyError, RuntimeError, OSError) as e:
        raise DpokitError(f"{path}: cannot load the policy ({str(e).splitlines()[0]})") from None
    return model


__all__ = ["PolicyMLP", "Spec", "TanhNormal", "deterministic_action", "load_mlp", "save_mlp", "spec_of"]
