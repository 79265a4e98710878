"""Fidelity measures of a world model's predictions on held-out events: pure functions of plain sequences.

Ratings: RMSE and MAE (against a baseline's, the training log's mean rating). Engagement: the log-loss, the AUC
(the Mann–Whitney statistic: the chance a random engaged event scores above a random unengaged one, ties half;
Hanley & McNeil 1982) and the expected calibration error (Naeini, Cooper & Hauskrecht 2015, "Obtaining Well
Calibrated Probabilities Using Bayesian Binning": equal-width bins of the predicted probability, the bins'
|mean prediction − observed rate| weighted by their share of the events).
"""

from __future__ import annotations

import math
from typing import Sequence

from ..errors import DpokitError


def _pair(pred: Sequence[float], true: Sequence[float]) -> None:
    if len(pred) != len(true):
        raise DpokitError(f"{len(pred)} predictions but {len(true)} observed outcomes")
    if not pred:
        raise DpokitError("no held-out events to measure")


def rmse(pred: Sequence[float], true: Sequence[float]) -> float:
    _pair(pred, true)
    return math.sqrt(sum((p - t) ** 2 for p, t in zip(pred, true)) / len(pred))


def mae(pred: Sequence[float], true: Sequence[float]) -> float:
    _pair(pred, true)
    return sum(abs(p - t) for p, t in zip(pred, true)) / len(pred)


def log_loss(probs: Sequence[float], labels: Sequence[float], eps: float = 1e-7) -> float:
    """Mean binary cross-entropy, predictions clipped to [eps, 1 − eps]."""
    _pair(probs, labels)
    total = 0.0
    for p, y in zip(probs, labels):
        p = min(max(p, eps), 1 - eps)
        total -= y * math.log(p) + (1 - y) * math.log(1 - p)
    return total / len(probs)


def auc(scores: Sequence[float], labels: Sequence[float]) -> float | None:
    """ROC AUC by average ranks (ties share a rank); None when the labels are all one class."""
    _pair(scores, labels)
    order = sorted(range(len(scores)), key=lambda i: scores[i])
    ranks = [0.0] * len(scores)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and scores[order[j + 1]] == scores[order[i]]:
            j += 1
        for m in range(i, j + 1):
            ranks[order[m]] = (i + j) / 2 + 1
        i = j + 1
    pos = [r for r, y in zip(ranks, labels) if y > 0.5]
    n_pos, n_neg = len(pos), len(labels) - len(pos)
    if n_pos == 0 or n_neg == 0:
        return None
    return (sum(pos) - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg)


def expected_calibration_error(probs: Sequence[float], labels: Sequence[float], bins: int = 10) -> float:
    """ECE over `bins` equal-width bins of [0, 1] (a probability of exactly 1 falls in the last bin)."""
    _pair(probs, labels)
    if bins < 1:
        raise DpokitError(f"bins must be >= 1, got {bins}")
    count = [0] * bins
    conf = [0.0] * bins
    hits = [0.0] * bins
    for p, y in zip(probs, labels):
        b = min(int(p * bins), bins - 1) if p > 0 else 0
        count[b] += 1
        conf[b] += p
        hits[b] += y
    n = len(probs)
    return sum(abs(conf[b] - hits[b]) / n for b in range(bins) if count[b])
