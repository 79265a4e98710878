"""The recommender demo's known simulator (docs/experiments.md, "Recommenders"): users, items, the true engagement
probability and utility, the popularity-led logging policy, and the log it writes.

- item vectors v_i ~ N(0, I/d), item biases b_i ~ N(0, 0.5²), user tastes u ~ N(0, I) (d = `dim`, 8);
- true engagement p(u, i) = σ(2·u·v_i + b_i − 1); the true utility of showing i to u is 1 + 4·p(u, i), the
  expected rating;
- the log: each user is shown `shown` distinct items drawn with probability ∝ exp(b_i + 0.5·u·v_i) (successive
  draws without replacement), at times 1..shown, and rates each round(clip(1 + 4·p + N(0, 0.5²), 1, 5)).

Item ids are "i0".."i{n-1}", user ids "u0".."u{n-1}".
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

import numpy as np


@dataclass
class Simulator:
    vectors: np.ndarray  # [items, dim]
    biases: np.ndarray  # [items]
    tastes: np.ndarray  # [users, dim]

    @property
    def items(self) -> list[str]:
        return [f"i{j}" for j in range(len(self.biases))]

    @property
    def users(self) -> list[str]:
        return [f"u{j}" for j in range(len(self.tastes))]

    def p(self, users, items) -> np.ndarray:
        """True engagement probability for index arrays (broadcast together)."""
        users, items = np.asarray(users), np.asarray(items)
        x = 2 * np.einsum("...d,...d->...", self.tastes[users], self.vectors[items]) + self.biases[items] - 1
        return 1 / (1 + np.exp(-x))

    def true_utility(self, users, items) -> np.ndarray:
        """The expected rating 1 + 4·p(u, i)."""
        return 1 + 4 * self.p(users, items)

    def true_utility_of(self, user: str, item: str) -> float:
        return float(self.true_utility(int(user[1:]), int(item[1:])))

    def logging_probs(self, user: int) -> np.ndarray:
        """The logging policy's weights over the catalogue for one user: ∝ exp(b_i + 0.5·u·v_i)."""
        logits = self.biases + 0.5 * self.vectors @ self.tastes[user]
        w = np.exp(logits - logits.max())
        return w / w.sum()


def make_simulator(users: int = 500, items: int = 300, dim: int = 8, seed: int = 0) -> Simulator:
    rng = np.random.default_rng(seed)
    vectors = rng.normal(0.0, 1.0 / np.sqrt(dim), size=(items, dim))
    biases = rng.normal(0.0, 0.5, size=items)
    tastes = rng.normal(0.0, 1.0, size=(users, dim))
    return Simulator(vectors, biases, tastes)


def simulate_log(sim: Simulator, shown: int = 30, noise: float = 0.5, seed: int = 0) -> list[dict]:
    """The logged events: {"user", "item", "rating", "timestamp"}, users in order, times 1..shown."""
    rng = np.random.default_rng(seed + 1)
    rows = []
    n = len(sim.biases)
    for u in range(len(sim.tastes)):
        picks = rng.choice(n, size=shown, replace=False, p=sim.logging_probs(u))
        p = sim.p(np.full(shown, u), picks)
        ratings = np.round(np.clip(1 + 4 * p + rng.normal(0.0, noise, size=shown), 1, 5)).astype(int)
        for t, (i, r) in enumerate(zip(picks, ratings), start=1):
            rows.append({"user": f"u{u}", "item": f"i{int(i)}", "rating": int(r), "timestamp": t})
    return rows


def write_log(rows: list[dict], path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=["user", "item", "rating", "timestamp"])
        w.writeheader()
        w.writerows(rows)
    return path


def write_catalogue(sim: Simulator, path: str | Path) -> Path:
    """The item list as a text file (one id a line), the recommender family's `item_catalogue`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(sim.items) + "\n", encoding="utf-8")
    return path
