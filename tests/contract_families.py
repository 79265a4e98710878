"""Two small non-text model families, written against `dpokit.families.base` only, that the contract test
pushes through the loop. They stand for the families to come: a categorical policy over actions (a bandit:
deterministic, exact log-probabilities, S-DPO groups of several rejected actions) and a denoiser whose score
draws a timestep and noise per pair, as Diffusion-DPO does (stochastic, a surrogate of the log-likelihood).

Rows are JSON Lines. Bandit: {"context": [floats], "chosen": action, "rejected": action or [actions]}.
Denoiser: {"chosen": [floats], "rejected": [floats]}.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from collections.abc import Sequence
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from dpokit.data import read_rows
from dpokit.errors import DataError, DpokitError
from dpokit.families import register_family
from dpokit.families.base import Family, Scorer, Scores, digest


@dataclass
class Item:
    """One example: what the Example protocol names, and the family's own arrays."""

    x: torch.Tensor  # bandit: the context; denoiser: unused (zeros)
    chosen: torch.Tensor  # bandit: an action id; denoiser: a vector
    rejected: torch.Tensor  # bandit: action ids [K]; denoiser: a vector
    is_group: bool = False
    weight: float = 1.0
    margin: float = 0.0
    label: bool | None = None

    @property
    def n_rejected(self) -> int:
        return len(self.rejected) if self.is_group else 1


def _vector(row: dict, key: str, n: int, source: str, number: int) -> torch.Tensor:
    value = row.get(key)
    if not isinstance(value, list) or len(value) != n or not all(isinstance(v, (int, float)) for v in value):
        raise DataError(source, number, f"field {key!r} must be a list of {n} numbers, got {value!r}")
    if not all(math.isfinite(v) for v in value):
        raise DataError(source, number, f"field {key!r} holds a NaN or inf")
    return torch.tensor(value, dtype=torch.float32)


class _Saved(Family):
    """Loading and saving a model as one safetensors file, shared by both test families; a trained one loads back
    (for `dpokit eval`), but neither can sample."""

    capabilities = frozenset({"load_trained"})

    def build(self, cfg) -> nn.Module:
        raise NotImplementedError

    def load_policy(self, cfg):
        model = self.build(cfg)
        if cfg.model:
            model.load_state_dict(load_file(str(Path(cfg.model) / "model.safetensors")))
        return model, None

    def load_model(self, path, cfg):
        model = self.build(cfg)
        model.load_state_dict(load_file(str(Path(path) / "model.safetensors")))
        return model.requires_grad_(False).eval()

    def load_trained(self, path, cfg=None):
        return self.load_model(path, cfg), None

    def save(self, model, processor, path, merge_lora=False):
        Path(path).mkdir(parents=True, exist_ok=True)
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(Path(path) / "model.safetensors"))


# ---------------------------------------------------------------- a categorical policy (deterministic)


@dataclass
class BanditConfig:
    n_actions: int = 4
    n_features: int = 3

    def __post_init__(self):
        if self.n_actions < 2:
            raise DpokitError(f"n_actions must be >= 2, got {self.n_actions}")


class BanditScorer(Scorer):
    """log π(a | x) = log-softmax of a linear policy's logits, for the chosen action and each rejected one."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, batch):
        logp = torch.log_softmax(self.model(batch["x"]), -1)
        chosen = logp.gather(1, batch["chosen"][:, None])[:, 0]
        rejected = logp.gather(1, batch["rejected"])
        if "rejected_mask" not in batch:
            rejected = rejected[:, 0]
        ones = torch.ones_like(chosen)
        return Scores(chosen, rejected, ones, torch.ones_like(rejected))


@register_family
class BanditFamily(_Saved):
    name = "test_bandit"
    likelihood = "exact"
    config_class = BanditConfig

    def build(self, cfg):
        c = self.settings(cfg)
        return nn.Linear(c.n_features, c.n_actions)

    def examples(self, source, processor, cfg):
        c = self.settings(cfg)
        out = []
        for number, row in read_rows(source):
            x = _vector(row, "context", c.n_features, str(source), number)
            group = isinstance(row.get("rejected"), list)
            actions = [row.get("chosen")] + (row["rejected"] if group else [row.get("rejected")])
            for a in actions:
                if isinstance(a, bool) or not isinstance(a, int) or not 0 <= a < c.n_actions:
                    raise DataError(str(source), number, f"an action must be an integer in 0..{c.n_actions - 1}, "
                                                         f"got {a!r}")
            if actions[0] in actions[1:]:
                raise DataError(str(source), number, "the chosen action is among the rejected")
            out.append(Item(x, torch.tensor(actions[0]), torch.tensor(actions[1:]), group,
                            float(row.get("weight", 1.0))))
        return out

    def collate(self, examples, cfg, processor):
        K = max(ex.n_rejected for ex in examples)
        rejected = torch.zeros(len(examples), K, dtype=torch.long)
        mask = torch.zeros(len(examples), K, dtype=torch.bool)
        for i, ex in enumerate(examples):
            rejected[i, :len(ex.rejected)] = ex.rejected
            mask[i, :len(ex.rejected)] = True
        batch = {"x": torch.stack([ex.x for ex in examples]), "chosen": torch.stack([ex.chosen for ex in examples]),
                 "rejected": rejected, "weight": torch.tensor([ex.weight for ex in examples]),
                 "margin": torch.tensor([ex.margin for ex in examples])}
        if any(ex.is_group for ex in examples):
            batch["rejected_mask"] = mask
        return batch

    def scorer(self, model, cfg):
        return BanditScorer(model)

    def fingerprint(self, examples):
        return digest(*(b"".join(t.numpy().tobytes() for t in (ex.x, ex.chosen, ex.rejected))
                        + (b"g" if ex.is_group else b"p") for ex in examples))


# ---------------------------------------------------------------- a denoiser scored on one draw (stochastic)


@dataclass
class DenoiserConfig:
    dim: int = 4
    hidden: int = 16


class Denoiser(nn.Module):
    """ε_θ(x_t, t): a small MLP that predicts the noise added to x at noise level t."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(dim + 1, hidden), nn.Tanh(), nn.Linear(hidden, dim))

    def forward(self, x_t, t):
        return self.net(torch.cat([x_t, t[:, None]], -1))


class DenoiserScorer(Scorer):
    """−‖ε − ε_θ(x_t, t)‖² for the chosen and the rejected vector, on the batch's own draw of (t, ε), shared
    by the pair: Diffusion-DPO's per-timestep ELBO term."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, batch):
        t, eps = batch["t"], batch["noise"]
        a, s = (1 - t).sqrt()[:, None], t.sqrt()[:, None]
        score = [-((eps - self.model(a * x + s * eps, t)) ** 2).sum(-1) for x in (batch["chosen"], batch["rejected"])]
        ones = torch.ones_like(score[0])
        return Scores(score[0], score[1], ones, ones)


@register_family
class DenoiserFamily(_Saved):
    name = "test_denoiser"
    likelihood = "surrogate"
    stochastic = True
    config_class = DenoiserConfig

    def build(self, cfg):
        c = self.settings(cfg)
        return Denoiser(c.dim, c.hidden)

    def examples(self, source, processor, cfg):
        return LazyExamples(source, self.settings(cfg).dim)

    def collate(self, examples, cfg, processor, draws):
        """One (t, ε) per pair from the loop's per-example seed: the same however a batch is split."""
        ts, noises = [], []
        for ex, seed in zip(examples, draws):
            g = torch.Generator().manual_seed(seed % (2 ** 63))
            ts.append(torch.rand((), generator=g) * 0.9 + 0.05)
            noises.append(torch.randn(ex.chosen.shape, generator=g))
        return {"chosen": torch.stack([ex.chosen for ex in examples]),
                "rejected": torch.stack([ex.rejected for ex in examples]),
                "t": torch.stack(ts), "noise": torch.stack(noises),
                "weight": torch.tensor([ex.weight for ex in examples]), "margin": torch.zeros(len(examples))}

    def scorer(self, model, cfg):
        return DenoiserScorer(model)


class LazyExamples(Sequence):
    """Examples built from their rows when indexed, as a family whose data does not fit in memory (images)
    would hold them; `built` counts the builds."""

    def __init__(self, source, dim: int):
        self.source, self.dim, self.built = str(source), dim, 0
        self.rows = list(read_rows(source))

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        number, row = self.rows[i]
        self.built += 1
        zero = torch.zeros(0)
        return Item(zero, _vector(row, "chosen", self.dim, self.source, number),
                    _vector(row, "rejected", self.dim, self.source, number))


# ---------------------------------------------------------------- data


def bandit_rows(n: int, seed: int = 0, n_features: int = 3, n_actions: int = 4, group: int = 0) -> list[dict]:
    """Contexts (drawn with `seed`) whose best action is the argmax of one fixed linear map; the chosen is the
    best action, the rejected a random other one (or `group` of them)."""
    W = torch.randn(n_features, n_actions, generator=torch.Generator().manual_seed(1234))
    g = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(n):
        x = torch.randn(n_features, generator=g)
        best = int((x @ W).argmax())
        others = [a for a in torch.randperm(n_actions, generator=g).tolist() if a != best]
        rows.append({"context": [round(v, 4) for v in x.tolist()], "chosen": best,
                     "rejected": others[:group] if group else others[0]})
    return rows


def denoiser_rows(n: int, seed: int = 0, dim: int = 4) -> list[dict]:
    """Chosen vectors near +1 in every coordinate, rejected near −1."""
    g = torch.Generator().manual_seed(seed)
    return [{"chosen": [round(v, 4) for v in (1 + 0.3 * torch.randn(dim, generator=g)).tolist()],
             "rejected": [round(v, 4) for v in (-1 + 0.3 * torch.randn(dim, generator=g)).tolist()]}
            for _ in range(n)]


def write_rows(rows: list[dict], path: Path) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path
