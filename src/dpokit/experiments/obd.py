"""World model estimates against importance weighting on the Open Bandit Dataset (issue 18; `dpokit experiment
obd`).

The protocol (committed in docs/experiments.md before the first run; `PROTOCOL` below is that text, verbatim):

1. obp's `OpenBanditDataset` reads the `random` and `bts` logs of campaign `all` in place (the sample inside the obp
   package, or a full download with `--data`); the on-policy value V is the `bts` log's mean click;
2. the evaluation policy is obp's `BernoulliTS` with the ZOZOTOWN prior, its action distribution by Monte Carlo
   (`compute_batch_action_dist`, 100,000 simulations);
3. a world model (`dpokit.worldmodel.fit_world_model`, early stopping with patience 3) is fitted once on the random
   log: a user is the tuple of the four hashed user features, an item is `<item_id>@<position>`, engaged = click;
4. every round of the random log with history (a user's first round is left out) gets q̂[r, a, k], the world model's
   predicted engagement of `a@k` given the user's earlier events and clicks; obp's `RegressionModel` (logistic
   regression, 3-fold cross-fitting) gives the usual q̂ on the same rounds;
5. IPW, SNIPW, DM and DR (world model), DM and DR (logistic) on those rounds: estimates, 95% bootstrap intervals
   (1,000 resamples), relative errors |V̂ − V| / V.

Decision rule: the world model *agrees with importance weighting* when its DM estimate lies inside IPW's 95%
interval; it is *at least as accurate as the usual reward model* when its DM's relative error is not above the
logistic DM's.

Needs obp (0.5.7, installed with `--no-deps --ignore-requires-python` on Python 3.11) and seaborn (obp's
`obp.ope` imports it). The pure pieces (events, histories, q̂, subsetting, the decision rule) need neither.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Sequence

import numpy as np

from ..errors import DpokitError
from . import finish, say

NAME = "obd"
# rounds: use only the first N rounds of the random log (None: all); wm_epochs: the world model's epoch cap (None:
# FitConfig's default). The protocol's run is FULL; QUICK is a smoke test that keeps every round: with fewer, a
# position's cross-fitting fold can hold no click, and logistic regression refuses a single class.
FULL = dict(n_sim=100_000, n_bootstrap=1000, wm_patience=3, wm_epochs=None, n_folds=3, rounds=None)
QUICK = dict(FULL, n_sim=2000, n_bootstrap=100, wm_epochs=3)
CAMPAIGN = "all"
ESTIMATORS = (("ipw", "IPW"), ("snipw", "SNIPW"), ("dm_wm", "DM (world model)"), ("dr_wm", "DR (world model)"),
              ("dm_lr", "DM (logistic)"), ("dr_lr", "DR (logistic)"))
ROUND_KEYS = ("action", "position", "reward", "pscore", "context")  # a bandit feedback's per-round arrays
READING = "<!-- obd:reading -->"  # docs text after this marker is hand-written and survives a rerun
TITLE = "## World model estimates against importance weighting (Open Bandit Dataset)"


# ---------------------------------------------------------------- the log as world-model events (pure)


def user_key(features: Sequence) -> str:
    """A user: the tuple of the hashed user features, joined into one id."""
    return "|".join(str(f) for f in features)


def item_id(action, position) -> str:
    """What is shown: the item at a position, `<item_id>@<position>` (obp's 0-based position)."""
    return f"{int(action)}@{int(position)}"


def catalogue(n_actions: int, len_list: int) -> list[str]:
    """Every `a@k`, item-major: entry a * len_list + k is `a@k` (so [B, n_actions * len_list] predictions reshape to
    [B, n_actions, len_list])."""
    return [item_id(a, k) for a in range(n_actions) for k in range(len_list)]


def log_events(users: Sequence[str], actions, positions, rewards) -> list:
    """The log's rounds as world-model events, time = the round's index (the log is in timestamp order)."""
    from ..worldmodel import LogEvent

    return [LogEvent(u, item_id(a, k), float(t), {"engaged": float(r > 0)})
            for t, (u, a, k, r) in enumerate(zip(users, actions, positions, rewards))]


def rounds_with_history(users: Sequence[str], actions, positions, rewards,
                        max_history: int | None = None) -> tuple[np.ndarray, list[list]]:
    """The rounds whose user has an earlier round (a user's first round has none and is left out), and each kept
    round's history: the user's earlier events `(a@k, {"engaged": click})`, oldest first (the last `max_history`
    of them when given: the world model reads no more)."""
    seen: dict[str, list] = {}
    keep, histories = [], []
    for r, (u, a, k, y) in enumerate(zip(users, actions, positions, rewards)):
        past = seen.setdefault(u, [])
        if past:
            keep.append(r)
            histories.append(list(past[-max_history:] if max_history else past))
        past.append((item_id(a, k), {"engaged": float(y > 0)}))
    return np.asarray(keep, dtype=np.int64), histories


def world_model_q(world, histories: Sequence, n_actions: int, len_list: int, batch_size: int = 256) -> np.ndarray:
    """q̂[r, a, k]: the world model's predicted engagement of `a@k` after history r, as an array
    [len(histories), n_actions, len_list] (batches of `batch_size` histories, every `a@k` a candidate of each)."""
    cands = catalogue(n_actions, len_list)
    out = np.empty((len(histories), n_actions, len_list))
    for s in range(0, len(histories), batch_size):
        chunk = histories[s:s + batch_size]
        p = world.predict(chunk, [cands] * len(chunk))["engaged"].numpy()
        out[s:s + len(chunk)] = p.reshape(len(chunk), n_actions, len_list)
    return out


def subset_feedback(feedback: dict, keep) -> dict:
    """A bandit feedback dict restricted to the rounds `keep` (the per-round arrays sliced alike, n_rounds set)."""
    keep = np.asarray(keep, dtype=np.int64)
    out = dict(feedback)
    for key in ROUND_KEYS:
        if key in feedback and feedback[key] is not None:
            out[key] = np.asarray(feedback[key])[keep]
    out["n_rounds"] = len(keep)
    return out


# ---------------------------------------------------------------- the measures and the decision rule (pure)


def relative_error(estimate: float, truth: float) -> float:
    """|V̂ − V| / V."""
    if truth <= 0:
        raise DpokitError(f"the on-policy value must be positive for a relative error, got {truth}")
    return abs(float(estimate) - float(truth)) / float(truth)


def decide(estimators: dict) -> dict:
    """The decision rule on {name: {"estimate", "low", "high", "relative_error"}}: the world model's DM inside IPW's
    95% interval; its relative error not above the logistic DM's."""
    ipw, wm, lr = estimators["ipw"], estimators["dm_wm"], estimators["dm_lr"]
    return {"agrees_with_ipw": bool(ipw["low"] <= wm["estimate"] <= ipw["high"]),
            "at_least_as_accurate_as_logistic": bool(wm["relative_error"] <= lr["relative_error"])}


def summarise(estimates: dict, intervals: dict, truth: float) -> dict:
    """{name: {"estimate", "low", "high", "relative_error"}} from point estimates and (low, high) intervals."""
    return {k: {"estimate": float(v), "low": float(intervals[k][0]), "high": float(intervals[k][1]),
                "relative_error": relative_error(v, truth)} for k, v in estimates.items()}


# ---------------------------------------------------------------- obp


def _dataset_class():
    """obp's OpenBanditDataset with its own `pre_process` (the same features) written for pandas 3: obp 0.5.7 calls
    `DataFrame.drop(columns=..., axis=1)`, which pandas 3 refuses ("Cannot specify both 'axis' and 'index'/
    'columns'"). The context is cast to float (pandas ≥ 2's get_dummies gives bools)."""
    import pandas as pd
    from obp.dataset import OpenBanditDataset
    from sklearn.preprocessing import LabelEncoder

    class Dataset(OpenBanditDataset):
        def pre_process(self) -> None:
            user_cols = self.data.columns.str.contains("user_feature")
            self.context = pd.get_dummies(self.data.loc[:, user_cols], drop_first=True).values.astype(float)
            item_feature_0 = self.item_context["item_feature_0"].to_frame()
            item_feature_cat = self.item_context.drop(columns=["item_id", "item_feature_0"]).apply(
                LabelEncoder().fit_transform)
            self.action_context = pd.concat(objs=[item_feature_cat, item_feature_0], axis=1).values

    return Dataset


def load_log(behavior_policy: str, data=None):
    """obp's OpenBanditDataset (campaign all), read in place: the package's sample, or `data` (obp's data_path)."""
    return _dataset_class()(behavior_policy=behavior_policy, campaign=CAMPAIGN, data_path=data)


def user_ids(dataset) -> list[str]:
    """Each round's user (its hashed user features), in the dataset's (timestamp) order."""
    cols = [c for c in dataset.data.columns if str(c).startswith("user_feature")]
    if len(cols) != 4:
        raise DpokitError(f"expected four user_feature columns in the OBD log, found {cols}")
    return [user_key(row) for row in dataset.data[cols].itertuples(index=False)]


def evaluation_policy(n_actions: int, len_list: int, n_rounds: int, n_sim: int, seed: int) -> np.ndarray:
    """Bernoulli TS with the ZOZOTOWN prior: its action distribution [n_rounds, n_actions, len_list] (obp)."""
    from obp.policy import BernoulliTS

    policy = BernoulliTS(n_actions=n_actions, len_list=len_list, is_zozotown_prior=True, campaign=CAMPAIGN,
                         random_state=seed)
    return policy.compute_batch_action_dist(n_sim=n_sim, n_rounds=n_rounds)


def logistic_q(feedback: dict, action_dist: np.ndarray, n_folds: int, seed: int) -> np.ndarray:
    """The usual reward model: obp's RegressionModel, logistic regression on the context features (and the item
    features, obp's action_context), `n_folds`-fold cross-fitting; q̂ [n_rounds, n_actions, len_list]."""
    from obp.ope import RegressionModel
    from sklearn.linear_model import LogisticRegression

    model = RegressionModel(n_actions=feedback["n_actions"], len_list=action_dist.shape[2],
                            action_context=feedback["action_context"],
                            base_model=LogisticRegression(max_iter=1000, random_state=seed))
    return model.fit_predict(context=feedback["context"], action=feedback["action"], reward=feedback["reward"],
                             position=feedback["position"], pscore=feedback["pscore"], action_dist=action_dist,
                             n_folds=n_folds, random_state=seed)


def off_policy_estimates(feedback: dict, action_dist: np.ndarray, q_world: np.ndarray, q_logistic: np.ndarray,
                         n_bootstrap: int, seed: int) -> tuple[dict, dict]:
    """The six estimators on the same rounds: ({name: estimate}, {name: (low, high)}), 95% bootstrap intervals."""
    from obp.ope import (DirectMethod, DoublyRobust, InverseProbabilityWeighting, OffPolicyEvaluation,
                         SelfNormalizedInverseProbabilityWeighting)

    ope = OffPolicyEvaluation(bandit_feedback=feedback, ope_estimators=[
        InverseProbabilityWeighting(estimator_name="ipw"),
        SelfNormalizedInverseProbabilityWeighting(estimator_name="snipw"),
        DirectMethod(estimator_name="dm_wm"), DoublyRobust(estimator_name="dr_wm"),
        DirectMethod(estimator_name="dm_lr"), DoublyRobust(estimator_name="dr_lr")])
    q = {"dm_wm": q_world, "dr_wm": q_world, "dm_lr": q_logistic, "dr_lr": q_logistic}
    estimates = ope.estimate_policy_values(action_dist=action_dist, estimated_rewards_by_reg_model=q)
    raw = ope.estimate_intervals(action_dist=action_dist, estimated_rewards_by_reg_model=q, alpha=0.05,
                                 n_bootstrap_samples=n_bootstrap, random_state=seed)
    intervals = {k: (v["95.0% CI (lower)"], v["95.0% CI (upper)"]) for k, v in raw.items()}
    return {k: float(v) for k, v in estimates.items()}, intervals


# ---------------------------------------------------------------- the run


def _held_out_clicks(events: list) -> int:
    """Clicks among the world model's held-out events (each user's last event, users with two or more)."""
    from ..worldmodel import split_leave_last_out, user_sequences

    sequences = user_sequences(events)
    _, held = split_leave_last_out(sequences, 1)
    return int(sum(sequences[u][j].outcomes["engaged"] for u, j in held))


def run(out_dir: str | Path = "runs/obd", size: dict | None = None, seed: int = 0,
        docs_dir: str | Path | None = None, command: str = "dpokit experiment obd", data=None) -> dict:
    """The protocol (module docstring); writes obd.json (and the docs section) and returns the results:
    {"on_policy_value", "estimators": {name: {"estimate", "low", "high", "relative_error"}}, "world_model",
    "verdict", "data", "minutes", ...}."""
    import torch

    from ..worldmodel import FitConfig, fit_world_model

    size = dict(size or FULL)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    random_log, bts_log = load_log("random", data), load_log("bts", data)
    feedback = random_log.obtain_batch_bandit_feedback()
    users = user_ids(random_log)
    n_actions, len_list = int(random_log.n_actions), int(random_log.len_list)
    if size.get("rounds"):
        first = np.arange(min(int(size["rounds"]), feedback["n_rounds"]))
        feedback, users = subset_feedback(feedback, first), users[:len(first)]
    truth = float(np.mean(bts_log.reward))
    data_info = {"source": str(data) if data else "obp's package sample", "campaign": CAMPAIGN,
                 "random_rounds": int(feedback["n_rounds"]), "random_clicks": int(np.sum(feedback["reward"])),
                 "bts_rounds": int(len(bts_log.reward)), "bts_clicks": int(np.sum(bts_log.reward)),
                 "users": len(set(users)), "n_actions": n_actions, "len_list": len_list}
    say(t0, f"random log: {data_info['random_rounds']} rounds, {data_info['random_clicks']} clicks, "
             f"{data_info['users']} users; bts log: {data_info['bts_rounds']} rounds, {data_info['bts_clicks']} "
             f"clicks, on-policy value {truth:.5f}")

    events = log_events(users, feedback["action"], feedback["position"], feedback["reward"])
    config = FitConfig(patience=size["wm_patience"], seed=seed)
    if size.get("wm_epochs"):  # a fixed budget: early stopping off (the diagnosis's fix, --wm-epochs)
        config.epochs, config.patience = int(size["wm_epochs"]), None
    torch.manual_seed(seed)
    world, fidelity = fit_world_model(events, items=catalogue(n_actions, len_list), config=config)
    fidelity["held_out_clicks"] = _held_out_clicks(events)
    say(t0, "world model: " + ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
                                         for k, v in fidelity.items()))

    keep, histories = rounds_with_history(users, feedback["action"], feedback["position"], feedback["reward"],
                                          max_history=world.max_history)
    q_world = world_model_q(world, histories, n_actions, len_list)
    sub = subset_feedback(feedback, keep)
    rounds = {"used": int(len(keep)), "left_out": int(feedback["n_rounds"] - len(keep)),
              "clicks_used": int(np.sum(sub["reward"]))}
    say(t0, f"rounds with history: {rounds['used']} ({rounds['left_out']} first rounds left out, "
             f"{rounds['clicks_used']} clicks); world-model q̂ {q_world.shape}, mean {q_world.mean():.5f}")

    action_dist = evaluation_policy(n_actions, len_list, len(keep), size["n_sim"], seed)
    say(t0, f"Bernoulli TS action distribution: {size['n_sim']} simulations")
    q_logistic = logistic_q(sub, action_dist, size["n_folds"], seed)
    say(t0, f"logistic q̂ ({size['n_folds']}-fold cross-fitting): mean {q_logistic.mean():.5f}")
    estimates, intervals = off_policy_estimates(sub, action_dist, q_world, q_logistic, size["n_bootstrap"], seed)
    estimators = summarise(estimates, intervals, truth)
    results = {"command": command, "seed": seed, "size": dict(size), "data": data_info, "rounds": rounds,
               "on_policy_value": truth, "estimators": estimators, "world_model": fidelity,
               "verdict": decide(estimators), "minutes": round((time.time() - t0) / 60, 1)}
    finish(results, out, NAME, format_table(results), docs_dir, markdown_section(results), keep=READING)
    return results


# ---------------------------------------------------------------- tables


def _verdict_lines(results: dict) -> list[str]:
    e, v = results["estimators"], results["verdict"]
    wm, ipw, lr = e["dm_wm"], e["ipw"], e["dm_lr"]
    return [f"world-model DM {wm['estimate']:.5f} {'inside' if v['agrees_with_ipw'] else 'outside'} IPW's 95% "
            f"interval [{ipw['low']:.5f}, {ipw['high']:.5f}]: "
            f"{'agrees' if v['agrees_with_ipw'] else 'does not agree'} with importance weighting",
            f"world-model DM relative error {wm['relative_error']:.3f} vs logistic DM {lr['relative_error']:.3f}: "
            f"{'at least as accurate' if v['at_least_as_accurate_as_logistic'] else 'less accurate'} than the "
            f"usual reward model"]


def format_table(results: dict) -> str:
    lines = [f"{'estimator':<20}{'estimate':>10}{'95% low':>10}{'95% high':>10}{'rel. error':>12}",
             f"{'on-policy (bts log)':<20}{results['on_policy_value']:>10.5f}"]
    for key, label in ESTIMATORS:
        r = results["estimators"][key]
        lines.append(f"{label:<20}{r['estimate']:>10.5f}{r['low']:>10.5f}{r['high']:>10.5f}"
                     f"{r['relative_error']:>12.3f}")
    rounds = results["rounds"]
    lines.append(f"rounds used {rounds['used']}, left out {rounds['left_out']} (users' first rounds); "
                 f"{results['minutes']} min")
    return "\n".join(lines + _verdict_lines(results))


def _fmt(v, spec: str = ".3f") -> str:
    return "n/a" if v is None else format(v, spec)


def markdown_section(results: dict) -> str:
    d, r, w, v = results["data"], results["rounds"], results["world_model"], results["verdict"]
    table = ["| estimator | estimate | 95% interval | relative error |", "|---|---:|---:|---:|",
             f"| on-policy value V (bts log) | {results['on_policy_value']:.5f} | | |"]
    for key, label in ESTIMATORS:
        e = results["estimators"][key]
        table.append(f"| {label} | {e['estimate']:.5f} | [{e['low']:.5f}, {e['high']:.5f}] | "
                     f"{e['relative_error']:.3f} |")
    fid = (f"AUC {_fmt(w.get('engaged_auc'))}, ECE {_fmt(w.get('engaged_ece'), '.4f')}, log-loss "
           f"{_fmt(w.get('engaged_log_loss'), '.4f')} (the training click rate as a constant: "
           f"{_fmt(w.get('baseline_engaged_log_loss'), '.4f')}) on {w.get('held_out_events')} held-out events with "
           f"{w.get('held_out_clicks')} click(s); {w.get('epochs_run')} epochs, best {w.get('best_epoch')}")
    wm, ipw, lr = (results["estimators"][k] for k in ("dm_wm", "ipw", "dm_lr"))
    return f"""{TITLE}

{PROTOCOL}
### Results

Rerun: `{results['command']}` ({results['minutes']} min on this machine). Data: {d['source']}, campaign
{d['campaign']}; random log {d['random_rounds']} rounds with {d['random_clicks']} clicks from {d['users']} users;
bts log {d['bts_rounds']} rounds with {d['bts_clicks']} clicks. Rounds used by every estimator: {r['used']}
({r['clicks_used']} clicks); left out (users' first rounds): {r['left_out']}. World model held-out fidelity: {fid}.

{chr(10).join(table)}

Decision rule: the world model's DM estimate, {wm['estimate']:.5f}, lies {'inside' if v['agrees_with_ipw'] else
'outside'} IPW's 95% interval [{ipw['low']:.5f}, {ipw['high']:.5f}]: it **{'agrees' if v['agrees_with_ipw'] else
'does not agree'} with importance weighting**. Its relative error, {wm['relative_error']:.3f}, is
{'not above' if v['at_least_as_accurate_as_logistic'] else 'above'} the logistic DM's, {lr['relative_error']:.3f}: it
is **{'at least as accurate as' if v['at_least_as_accurate_as_logistic'] else 'less accurate than'} the usual
reward model**.

{READING}
(The reading of these figures is written by hand after the run; a rerun keeps it.)
"""


# ---------------------------------------------------------------- the command line


PROTOCOL = """\
Issue 18 asks that the world model's offline estimates be checked against importance weighting on real logs with
known logging propensities. The protocol and the decision rule below were committed before the first run
(`dpokit experiment obd`).

- **Data**: the Open Bandit Dataset sample that ships inside the `obp` package (ZOZOTOWN, CC BY 4.0; obp itself is
  Apache-2.0), campaign `all`: the `random` log (uniform logging over 80 items, propensity 1/80, 3 positions) and the
  `bts` log (Bernoulli Thompson sampling), 10,000 rounds each, read in place with obp's `OpenBanditDataset`; nothing
  is copied.
- **Target**: the click rate of the Bernoulli TS policy. Its on-policy value is the mean click of the `bts` log (the
  ground truth, as in the dataset's paper); the estimators see only the `random` log.
- **Evaluation policy**: obp's `BernoulliTS` with the ZOZOTOWN prior (`is_zozotown_prior=True`, campaign `all`,
  80 items, 3 positions), its action distribution computed by obp (`compute_batch_action_dist`, 100,000 simulations,
  seed 0).
- **World model** (dpokit.worldmodel.fit_world_model, its defaults, early stopping with patience 3, fitted once on
  the random log): a user is the tuple of the four hashed user features, events in timestamp order; the item shown
  is `<item_id>@<position>` (where an item is shown is part of what is shown); the outcome is `engaged` = click. A
  round is predicted from its user's earlier events with their observed clicks; a user's first round has no history
  and is left out of every estimator (the same rounds for all; how many is reported). Its held-out fidelity (AUC,
  ECE) is reported.
- **Estimators** on those rounds of the random log: IPW and SNIPW (obp); DM and DR with the world model as the
  reward model (q̂(x, a, k) = the predicted engagement of `a@k` given the history; obp's `DirectMethod` and
  `DoublyRobust` with `estimated_rewards_by_reg_model`); DM and DR with obp's `RegressionModel` (logistic regression
  on the dataset's context features, 3-fold cross-fitting), the practitioner's usual reward model.
- **Measures**: each estimate with its 95% bootstrap interval (obp's `estimate_intervals`, 1,000 resamples, seed 0)
  and its relative error |V̂ − V| / V to the on-policy value V.
- **Decision rule**: the world model's estimate *agrees with importance weighting* when its DM estimate lies inside
  IPW's 95% interval; it is *at least as accurate as the usual reward model* when the world-model DM's relative
  error is not above the logistic DM's. Both are reported whatever they say; with about 40 clicks per log every
  interval is wide, and the reading says so.
"""
