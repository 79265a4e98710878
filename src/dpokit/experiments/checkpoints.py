"""A run's checkpoints as policies, for experiments that measure a run along training.

Training never reads a checkpoint this way (it resumes with `dpokit.checkpoint.load`), so these live with the
experiments rather than in the core.
"""

from __future__ import annotations

import copy
import shutil
from pathlib import Path

from safetensors.torch import load_file
from torch import nn

from ..checkpoint import PATTERN, list_checkpoints


def policy_at(folder: Path, base_model: nn.Module) -> nn.Module:
    """The policy of a full-weight checkpoint, for evaluating it outside the loop: its
    `trainable.safetensors` (the scorer's state, keys prefixed `model.`) in a copy of `base_model`."""
    weights = load_file(str(Path(folder) / "trainable.safetensors"))
    model = copy.deepcopy(base_model)
    model.load_state_dict({k.removeprefix("model."): v for k, v in weights.items()}, strict=True)
    return model.eval()


def drain_policies(root: Path, base_model: nn.Module):
    """(step, `policy_at` its checkpoint) for each complete checkpoint under `root`, oldest first, for measuring a
    run along training; each checkpoint is deleted once the caller moves on (its optimizer state is most of it)."""
    for folder in list_checkpoints(root):
        yield int(PATTERN.match(folder.name).group(1)), policy_at(folder, base_model)
        shutil.rmtree(folder)
