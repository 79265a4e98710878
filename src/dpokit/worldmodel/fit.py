"""Fitting a world model on an interaction log, its fidelity on held-out events, and its folder format.

A log is a file `dpokit.recipes.interactions.read_log` reads (CSV/TSV/Parquet, RecBole .inter) or a list of
`LogEvent`s (or dicts with user, item, time and outcomes). Outcomes: `rating` (a rating column) and `engaged`
(a click column, click > 0; or a watch_time column, watch_time ≥ `min_watch`); when the log has ratings only,
`engaged_threshold` makes engagement explicit as rating ≥ it (None: no engagement outcome).

Each user's events are sorted by time (the file's order on a tie); the last `holdout` events of every user with more
than `holdout` events are held out (leave-last-out), the rest are the user's training sequence (windows of at most
max_history events). Training: Adam, MSE on the standardised rating plus BCE on engagement, each event's outcomes
hidden from the input with probability `outcome_dropout` (so histories of bare item ids, as a recommender's, are
in distribution). Fidelity: every held-out event predicted from all the user's earlier events with their observed
outcomes — `fidelity` returns the dict (see dpokit.worldmodel.metrics).

Folder: config.json (the architecture and outcomes), model.safetensors (weights, the rating statistics included),
items.json (the vocabulary: a JSON list of item ids as strings, index i + 1 for entry i).
"""

from __future__ import annotations

import json
import logging
import math
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F

from ..errors import DpokitError
from .metrics import auc, expected_calibration_error, log_loss, mae, rmse
from .model import OUTCOMES, WorldModel

logger = logging.getLogger(__name__)
CONFIG_FILE, WEIGHTS_FILE, ITEMS_FILE = "config.json", "model.safetensors", "items.json"


@dataclass
class LogEvent:
    user: str
    item: str
    time: float
    outcomes: dict = field(default_factory=dict)


@dataclass
class FitConfig:
    hidden: int = 64
    blocks: int = 2
    heads: int = 2
    dropout: float = 0.1
    max_history: int = 50
    epochs: int = 50
    lr: float = 3e-3
    batch_size: int = 32
    holdout: int = 1
    outcome_dropout: float = 0.1
    seed: int = 0
    # Early stopping: each user's event before the held-out one is a validation event; training stops when their
    # loss has not improved for `patience` epochs and keeps the best epoch's weights. None (the default): train all
    # epochs on every event but the held-out ones. Real logs need it (MovieLens-100K overfits in 50 epochs, see
    # docs/experiments.md); small synthetic ones can plateau for many epochs before they learn.
    patience: int | None = None


# ---------------------------------------------------------------- logs


def read_events(path: str | Path, user_col: str | None = None, item_col: str | None = None,
                time_col: str | None = None, rating_col: str | None = None, engaged_col: str | None = None,
                engaged_kind: str = "click", min_watch: float = 1.0,
                engaged_threshold: float | None = None) -> list[LogEvent]:
    """A log file's events with their outcomes, through the interactions recipe's reader. The rating column is
    `rating_col` (default: `rating` when the file has it); engagement is `engaged_col` read as `engaged_kind`
    ("click": > 0 engaged; "watch_time": ≥ min_watch), or rating ≥ `engaged_threshold`."""
    from ..recipes.interactions import read_log

    if engaged_kind not in ("click", "watch_time"):
        raise DpokitError(f"engaged_kind must be click or watch_time, got {engaged_kind!r}")
    common = dict(user_col=user_col, item_col=item_col, time_col=time_col)
    events, kind, _ = read_log(path, feedback_col=rating_col, feedback="rating" if rating_col else None,
                               need_feedback=engaged_col is None, **common)
    ratings = {e.row: e.feedback for e in events} if kind == "rating" else {}
    engaged: dict[int, float] = {}
    if engaged_col is not None:
        second, _, _ = read_log(path, feedback_col=engaged_col, feedback=engaged_kind, **common)
        engaged = {e.row: float(e.feedback > 0 if engaged_kind == "click" else e.feedback >= min_watch)
                   for e in second}
        events = [e for e in second if not ratings or e.row in ratings]
    elif kind in ("click", "watch_time"):  # the log's one feedback column is an engagement signal
        engaged = {e.row: float(e.feedback > 0 if kind == "click" else e.feedback >= min_watch) for e in events}
    if not ratings and not engaged:
        raise DpokitError(f"{path}: no outcome to predict: the log has no rating, click or watch_time column")
    out = []
    for e in events:
        outcomes = {}
        if e.row in ratings:
            outcomes["rating"] = ratings[e.row]
        if e.row in engaged:
            outcomes["engaged"] = engaged[e.row]
        elif engaged_threshold is not None and "rating" in outcomes:
            outcomes["engaged"] = float(outcomes["rating"] >= engaged_threshold)
        out.append(LogEvent(e.user, e.item, e.time, outcomes))
    return out


def _events(log, engaged_threshold: float | None) -> list[LogEvent]:
    if isinstance(log, (str, Path)):
        return read_events(log, engaged_threshold=engaged_threshold)
    out = []
    for n, e in enumerate(log, start=1):
        if isinstance(e, dict):
            missing = [k for k in ("user", "item", "time") if k not in e]
            if missing:
                raise DpokitError(f"log event {n}: missing {', '.join(missing)}")
            e = LogEvent(str(e["user"]), str(e["item"]), float(e["time"]),
                         {k: float(e[k]) for k in OUTCOMES if e.get(k) is not None})
        elif not isinstance(e, LogEvent):
            raise DpokitError(f"log event {n}: a LogEvent or a dict (user, item, time, outcomes), "
                              f"got {type(e).__name__}")
        if engaged_threshold is not None and "rating" in e.outcomes and "engaged" not in e.outcomes:
            engaged = float(e.outcomes["rating"] >= engaged_threshold)
            e = LogEvent(e.user, e.item, e.time, {**e.outcomes, "engaged": engaged})
        out.append(e)
    return out


def user_sequences(events: Sequence[LogEvent]) -> dict[str, list[LogEvent]]:
    """Each user's events in time order (a stable sort: the log's order on a tie), users in order of appearance."""
    by_user: dict[str, list[LogEvent]] = {}
    for e in events:
        by_user.setdefault(e.user, []).append(e)
    return {u: sorted(evs, key=lambda e: e.time) for u, evs in by_user.items()}


def split_leave_last_out(sequences: dict[str, list[LogEvent]], holdout: int = 1):
    """(train sequences, held-out (user, index) pairs): the last `holdout` events of users with more than that."""
    train, held = {}, []
    for u, evs in sequences.items():
        if len(evs) > holdout:
            train[u] = evs[:-holdout]
            held += [(u, j) for j in range(len(evs) - holdout, len(evs))]
        else:
            train[u] = evs
    return train, held


# ---------------------------------------------------------------- training


def _windows(seqs: list[list[LogEvent]], max_history: int) -> list[list[LogEvent]]:
    """Training windows of at most max_history + 1 events (stride max_history, the last one ending at the end)."""
    n = max_history + 1
    out = []
    for evs in seqs:
        if len(evs) < 2:
            continue
        if len(evs) <= n:
            out.append(evs)
            continue
        starts = list(range(0, len(evs) - n + 1, max_history))
        if starts[-1] != len(evs) - n:
            starts.append(len(evs) - n)
        out += [evs[s:s + n] for s in starts]
    return out


def _batch(model: WorldModel, windows: list[list[LogEvent]], drop: float, rng: random.Random):
    """Input events 0..n-2, next items 1..n-1, targets [B, L, n_outcomes] and their mask."""
    L = max(len(w) for w in windows) - 1
    B, K = len(windows), len(model.outcomes)
    items = torch.zeros(B, L, dtype=torch.long)
    feats = torch.zeros(B, L, 2 * K)
    nxt = torch.zeros(B, L, dtype=torch.long)
    target = torch.zeros(B, L, K)
    mask = torch.zeros(B, L, K, dtype=torch.bool)
    for b, w in enumerate(windows):
        for t, e in enumerate(w[:-1]):
            items[b, t] = model.index[e.item]
            if not (drop and rng.random() < drop):
                feats[b, t] = torch.tensor(model.event_features(e.outcomes))
        for t, e in enumerate(w[1:]):
            nxt[b, t] = model.index[e.item]
            for k, name in enumerate(model.outcomes):
                v = e.outcomes.get(name)
                if v is not None:
                    if name == "rating":
                        v = (v - float(model.rating_mean)) / float(model.rating_std)
                    target[b, t, k] = v
                    mask[b, t, k] = True
    return items, feats, nxt, target, mask


def _loss(model: WorldModel, raw, target, mask):
    total = raw.new_zeros(())
    for k, name in enumerate(model.outcomes):
        m = mask[..., k]
        if not m.any():
            continue
        r, y = raw[..., k][m], target[..., k][m]
        total = total + (F.mse_loss(r, y) if name == "rating" else F.binary_cross_entropy_with_logits(r, y))
    return total


def fit_world_model(log, items: Sequence[str] | None = None, config: FitConfig | None = None,
                    outcomes: Sequence[str] | None = None,
                    engaged_threshold: float | None = None) -> tuple[WorldModel, dict]:
    """Train a world model on `log` (a path or events) and return it (eval mode) and its fidelity on the held-out
    events. `items`: the vocabulary (default: the log's items, in order of appearance); `outcomes`: which to
    predict (default: those the log has)."""
    config = config or FitConfig()
    events = _events(log, engaged_threshold)
    if not events:
        raise DpokitError("empty log: no events to fit a world model on")
    present = [o for o in OUTCOMES if any(o in e.outcomes for e in events)]
    outcomes = tuple(outcomes) if outcomes is not None else tuple(present)
    if not outcomes:
        raise DpokitError("the log's events carry no outcome (rating or engaged) to predict")
    for o in outcomes:
        if o not in present:
            raise DpokitError(f"outcome {o!r} is not in the log (it has {', '.join(present) or 'none'})")
    vocab = list(dict.fromkeys(e.item for e in events)) if items is None else [str(i) for i in items]
    known = set(vocab)
    unknown = next((e.item for e in events if e.item not in known), None)
    if unknown is not None:
        raise DpokitError(f"log item {unknown!r} is not in the items given")
    sequences = user_sequences(events)
    train_seqs, held = split_leave_last_out(sequences, config.holdout)
    valid: list[tuple[str, int]] = []
    if config.patience is not None:
        train_seqs, valid = split_leave_last_out(train_seqs, 1)
        if "engaged" in outcomes and not any(sequences[u][j].outcomes.get("engaged") for u, j in valid):
            # all-zero targets: the validation loss only falls as every prediction falls (the Open Bandit
            # Dataset check in docs/experiments.md stopped at the epoch predicting 20x too few clicks)
            logger.warning("early stopping: none of the %d validation events is engaged, so it will keep the epoch "
                        "that predicts the least engagement; train a fixed number of epochs (patience=None) "
                        "instead", len(valid))
    windows = _windows(list(train_seqs.values()), config.max_history)
    if not windows:
        raise DpokitError("no user has two training events: nothing to learn a next event from")
    torch.manual_seed(config.seed)
    model = WorldModel(vocab, outcomes, config.max_history, config.hidden, config.blocks, config.heads,
                       config.dropout, engaged_threshold)
    ratings = [e.outcomes["rating"] for evs in train_seqs.values() for e in evs if "rating" in e.outcomes]
    if ratings:
        mean = sum(ratings) / len(ratings)
        std = (sum((r - mean) ** 2 for r in ratings) / len(ratings)) ** 0.5
        model.rating_mean.fill_(mean)
        model.rating_std.fill_(std if std > 0 else 1.0)
    rng = random.Random(config.seed)
    opt = torch.optim.Adam(model.parameters(), lr=config.lr)
    best, best_epoch, epochs_run = None, 0, 0
    for epoch in range(1, config.epochs + 1):
        model.train()
        rng.shuffle(windows)
        for s in range(0, len(windows), config.batch_size):
            items_t, feats, nxt, target, mask = _batch(model, windows[s:s + config.batch_size],
                                                       config.outcome_dropout, rng)
            loss = _loss(model, model(items_t, feats, nxt), target, mask)
            opt.zero_grad()
            loss.backward()
            opt.step()
        epochs_run = epoch
        if valid:
            score = validation_loss(model.eval(), sequences, valid)
            if best is None or score < best[0]:
                best, best_epoch = (score, {k: v.detach().clone() for k, v in model.state_dict().items()}), epoch
            elif epoch - best_epoch >= config.patience:
                break
    if best is not None:
        model.load_state_dict(best[1])
    model.eval()
    baseline = {"rating": sum(ratings) / len(ratings) if ratings else None}
    engaged_train = [e.outcomes["engaged"] for evs in train_seqs.values() for e in evs if "engaged" in e.outcomes]
    baseline["engaged"] = sum(engaged_train) / len(engaged_train) if engaged_train else None
    out = fidelity(model, sequences, held, baseline)
    out.update(epochs_run=epochs_run, best_epoch=best_epoch if valid else epochs_run, validation_events=len(valid))
    return model, out


@torch.no_grad()
def validation_loss(model: WorldModel, sequences: dict[str, list[LogEvent]], pairs: list[tuple[str, int]]) -> float:
    """The training loss on validation events, each predicted from the user's earlier events: mse of the
    standardised rating plus the engagement's binary cross-entropy (whichever outcomes the model has)."""
    pairs = [(u, j) for u, j in pairs if j >= 1]
    total, n = 0.0, 0
    for s in range(0, len(pairs), 256):
        chunk = pairs[s:s + 256]
        histories = [[(e.item, e.outcomes) for e in sequences[u][:j]] for u, j in chunk]
        p = model.predict(histories, [[sequences[u][j].item] for u, j in chunk])
        for o in model.outcomes:
            for pred, (u, j) in zip(p[o][:, 0].tolist(), chunk):
                y = sequences[u][j].outcomes.get(o)
                if y is None:
                    continue
                if o == "rating":
                    total += ((pred - y) / float(model.rating_std)) ** 2
                else:
                    q = min(max(pred, 1e-7), 1 - 1e-7)
                    total += -(y * math.log(q) + (1 - y) * math.log(1 - q))
                n += 1
    return total / max(n, 1)


def fidelity(model: WorldModel, sequences: dict[str, list[LogEvent]], held: list[tuple[str, int]],
             baseline: dict | None = None) -> dict:
    """Held-out prediction error and calibration: `held` are (user, index of the event in its sequence) pairs,
    each predicted from the user's earlier events (their observed outcomes included). `baseline`: the constant
    predictions to compare with ({"rating": mean rating, "engaged": base rate})."""
    baseline = baseline or {}
    held = [(u, j) for u, j in held if j >= 1]
    out: dict = {"held_out_events": len(held)}
    if not held:
        return out
    preds: dict[str, list[float]] = {o: [] for o in model.outcomes}
    for s in range(0, len(held), 256):
        chunk = held[s:s + 256]
        histories = [[(e.item, e.outcomes) for e in sequences[u][:j]] for u, j in chunk]
        p = model.predict(histories, [[sequences[u][j].item] for u, j in chunk])
        for o in model.outcomes:
            preds[o] += p[o][:, 0].tolist()
    for o in model.outcomes:
        pairs = [(p, sequences[u][j].outcomes.get(o)) for p, (u, j) in zip(preds[o], held)]
        pairs = [(p, y) for p, y in pairs if y is not None]
        if not pairs:
            continue
        pred, true = [p for p, _ in pairs], [y for _, y in pairs]
        if o == "rating":
            out.update(rating_rmse=rmse(pred, true), rating_mae=mae(pred, true))
            if baseline.get("rating") is not None:
                base = [baseline["rating"]] * len(true)
                out.update(baseline_rating_rmse=rmse(base, true), baseline_rating_mae=mae(base, true))
        else:
            out.update(engaged_log_loss=log_loss(pred, true), engaged_auc=auc(pred, true),
                       engaged_ece=expected_calibration_error(pred, true, bins=10))
            if baseline.get("engaged") is not None:
                out["baseline_engaged_log_loss"] = log_loss([baseline["engaged"]] * len(true), true)
    return out


# ---------------------------------------------------------------- folder


def save_world_model(model: WorldModel, path: str | Path) -> None:
    from safetensors.torch import save_file

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    (path / CONFIG_FILE).write_text(json.dumps(model.config(), indent=2) + "\n")
    save_file({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}, str(path / WEIGHTS_FILE))
    (path / ITEMS_FILE).write_text(json.dumps(model.items, ensure_ascii=False) + "\n")


def load_world_model(path: str | Path) -> WorldModel:
    """A world model folder save_world_model wrote, in eval mode."""
    from safetensors.torch import load_file

    path = Path(path)
    files = {name: path / name for name in (CONFIG_FILE, WEIGHTS_FILE, ITEMS_FILE)}
    missing = [n for n, f in files.items() if not f.is_file()]
    if missing:
        raise DpokitError(f"{path}: not a world model folder (no {', '.join(missing)})")
    try:
        config = json.loads(files[CONFIG_FILE].read_text())
        items = json.loads(files[ITEMS_FILE].read_text())
    except json.JSONDecodeError as e:
        raise DpokitError(f"{path}: a file is not valid JSON ({e.msg})") from None
    if not isinstance(config, dict) or config.get("format") != "dpokit-worldmodel":
        raise DpokitError(f"{files[CONFIG_FILE]}: not a config.json dpokit.worldmodel wrote")
    if not isinstance(items, list) or not all(isinstance(i, str) for i in items):
        raise DpokitError(f"{files[ITEMS_FILE]}: not a list of item ids")
    try:
        model = WorldModel(items, config["outcomes"], config["max_history"], config["hidden"], config["blocks"],
                           config["heads"], config["dropout"], config.get("engaged_threshold"))
        model.load_state_dict(load_file(str(files[WEIGHTS_FILE])))
    except (KeyError, RuntimeError, OSError) as e:
        raise DpokitError(f"{path}: cannot load the world model ({str(e).splitlines()[0]})") from None
    return model.eval()
