"""DrPO for one-step generators (Jiang, Wen, Liu 2026, arXiv 2606.02521), and its one-step DPO baseline.

Not a model family: a one-step generator G(z, c) has no likelihood and no ELBO term to score pairs with, so DrPO
does not go through the pair loop. It is an online method of its own, on any `nn.Module` generator, a reward that is
only called (a Python callable or a command) and a frozen, differentiable feature function:

- losses.py: pure tensor functions, the dipole drift target and the one-step DPO loss, each naming its source;
- online.py: the online loop (sample N per prompt, rank by the reward, regress or DPO on the best/worst k),
  `OneStepUNet` (a diffusers UNet called once at the last timestep) and `evaluate`.
"""

from .losses import drpo_loss, onestep_dpo_loss
from .online import (OneStepUNet, OnlineOneStepConfig, command_reward, evaluate, frozen_copy, train_drpo)

__all__ = ["OneStepUNet", "OnlineOneStepConfig", "command_reward", "drpo_loss", "evaluate", "frozen_copy",
           "onestep_dpo_loss", "train_drpo"]
