"""The policy family's own config keys (flat in the YAML beside the shared ones)."""

from __future__ import annotations

from dataclasses import dataclass, field

from ...errors import DpokitError

HEADS = ("gaussian", "tanh_gaussian", "categorical")


@dataclass
class PolicyConfig:
    # A fresh MLP policy, built when `model` is not given (a dpokit folder or an SB3 zip carries its own head).
    policy_head: str = "gaussian"  # gaussian | tanh_gaussian | categorical
    policy_hidden: list = field(default_factory=lambda: [64, 64])  # hidden layer sizes (tanh activations)
    obs_dim: int | None = None  # observation size; None: read from env_id's observation space
    act_dim: int | None = None  # action size, or the number of actions of a categorical head; None: from env_id
    action_low: float = -1.0  # a tanh_gaussian head's bounds (the same for every action dimension)
    action_high: float = 1.0
    env_id: str | None = None  # a gymnasium id: the spaces of a fresh policy, and later evaluation by rollouts
    sb3_algo: str | None = None  # PPO | A2C | SAC: the class an SB3 zip loads with; None: read off the zip
    # After `dpokit train`: rollouts of the starting and the trained policy in env_id from these reset seeds (one
    # row each) under <output_dir>/samples/{base,trained}, shown in report.html; None: none drawn.
    sample_prompts: list | None = None
    sample_num: int = 4  # pictures per episode (frames at evenly spaced steps; the grid's columns)

    def __post_init__(self):
        if self.policy_head not in HEADS:
            raise DpokitError(f"policy_head must be one of {', '.join(HEADS)}, got {self.policy_head!r}")
        hidden = self.policy_hidden
        if not isinstance(hidden, list) or not all(isinstance(h, int) and not isinstance(h, bool) and h > 0
                                                   for h in hidden):
            raise DpokitError(f"policy_hidden must be a list of positive layer sizes, got {hidden!r}")
        for key in ("obs_dim", "act_dim"):
            value = getattr(self, key)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise DpokitError(f"{key} must be a positive integer, got {value!r}")
        if self.policy_head == "categorical" and self.act_dim is not None and self.act_dim < 2:
            raise DpokitError(f"a categorical head needs act_dim >= 2 actions, got {self.act_dim}")
        if not self.action_low < self.action_high:
            raise DpokitError(f"action_low must be below action_high, got {self.action_low} and {self.action_high}")
        if self.sb3_algo is not None and self.sb3_algo.upper() not in ("PPO", "A2C", "SAC"):
            raise DpokitError(f"sb3_algo must be PPO, A2C or SAC, got {self.sb3_algo!r}")
        if isinstance(self.sample_num, bool) or not isinstance(self.sample_num, int) or self.sample_num < 1:
            raise DpokitError(f"sample_num must be a positive number of pictures per episode, got {self.sample_num!r}")
        self._check_sample_prompts()

    def _check_sample_prompts(self) -> None:
        """The shape only (a non-empty list of reset seeds, and an environment to roll out in): whether env_id
        fits the policy is checked when the policy loads, before training, not after it."""
        prompts = self.sample_prompts
        if prompts is None:
            return
        if not isinstance(prompts, list) or not prompts:
            raise DpokitError(f"sample_prompts must be a non-empty list of episode seeds, got {prompts!r}")
        odd = next((p for p in prompts if isinstance(p, bool) or not isinstance(p, int) or p < 0), None)
        if odd is not None:
            raise DpokitError(f"sample_prompts: each prompt is an episode's reset seed (a non-negative integer), "
                              f"got {odd!r}")
        if not self.env_id:
            raise DpokitError("sample_prompts needs env_id: the gymnasium environment to roll the policy out in")
