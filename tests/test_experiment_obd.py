"""`dpokit experiment obd`'s pieces on a tiny synthetic OBD-shaped log (no obp data files): the world-model q̂, the
first-round exclusion, the subsetting of a bandit feedback, the decision rule; with obp installed, the estimators
and the reading of an OBD-shaped folder (the `--data` path)."""

import argparse

import numpy as np
import pytest

from dpokit.errors import DpokitError
from dpokit.experiments import obd

N_ITEMS, N_POS, HOT = 5, 2, 3  # item 3 is clicked far more than the others


def synthetic_feedback(n_users=8, rounds_per_user=40, seed=0):
    """A uniform-logging OBD-shaped log: users interleaved in time, 5 items, 2 positions; click probability 0.6 for
    item HOT at either position, 0.02 for the rest."""
    rng = np.random.default_rng(seed)
    n = n_users * rounds_per_user
    users = [f"u{u}" for u in rng.permutation(np.repeat(np.arange(n_users), rounds_per_user))]
    action = rng.integers(0, N_ITEMS, n)
    position = rng.integers(0, N_POS, n)
    reward = (rng.random(n) < np.where(action == HOT, 0.6, 0.02)).astype(int)
    feedback = {"n_rounds": n, "n_actions": N_ITEMS, "action": action, "position": position, "reward": reward,
                "pscore": np.full(n, 1 / N_ITEMS), "context": rng.random((n, 3)),
                "action_context": np.arange(N_ITEMS * 2).reshape(N_ITEMS, 2).astype(float)}
    return users, feedback


def test_the_first_round_of_each_user_is_left_out_and_histories_are_the_earlier_events():
    users = ["a", "b", "a", "c", "b", "a", "d"]
    action, position, reward = [0, 1, 2, 3, 4, 0, 1], [0, 1, 1, 0, 0, 1, 0], [0, 1, 0, 0, 0, 1, 1]
    keep, hist = obd.rounds_with_history(users, action, position, reward)
    assert keep.tolist() == [2, 4, 5]  # the rounds whose user was seen before; a, b, c, d's first rounds dropped
    assert hist[0] == [("0@0", {"engaged": 0.0})]
    assert hist[1] == [("1@1", {"engaged": 1.0})]
    assert hist[2] == [("0@0", {"engaged": 0.0}), ("2@1", {"engaged": 0.0})]  # oldest first, clicks observed
    keep2, hist2 = obd.rounds_with_history(users, action, position, reward, max_history=1)
    assert keep2.tolist() == keep.tolist() and hist2[2] == [("2@1", {"engaged": 0.0})]  # the most recent only


def test_subset_slices_every_per_round_array_alike_and_leaves_the_item_features():
    _, fb = synthetic_feedback(n_users=1, rounds_per_user=N_ITEMS)  # n_rounds == n_actions: no length guessing
    keep = np.array([1, 3])
    sub = obd.subset_feedback(fb, keep)
    assert sub["n_rounds"] == 2
    for key in obd.ROUND_KEYS:
        assert np.array_equal(sub[key], np.asarray(fb[key])[keep])
    assert sub["action_context"] is fb["action_context"] and fb["n_rounds"] == N_ITEMS  # the original untouched


def test_catalogue_is_item_major_so_predictions_reshape_to_items_by_positions():
    cat = obd.catalogue(3, 2)
    assert cat == ["0@0", "0@1", "1@0", "1@1", "2@0", "2@1"]
    assert np.array(cat).reshape(3, 2)[2, 1] == obd.item_id(2, 1)


def test_world_model_q_has_the_obd_shape_and_ranks_the_hot_item_first():
    import torch

    from dpokit.worldmodel import FitConfig, fit_world_model

    users, fb = synthetic_feedback()
    events = obd.log_events(users, fb["action"], fb["position"], fb["reward"])
    assert [e.time for e in events] == list(range(fb["n_rounds"])) and events[0].outcomes.keys() == {"engaged"}
    torch.manual_seed(0)
    world, fidelity = fit_world_model(events, items=obd.catalogue(N_ITEMS, N_POS),
                                      config=FitConfig(hidden=32, blocks=1, epochs=25, lr=1e-2, seed=0))
    assert world.outcomes == ("engaged",)  # a click-only log: engagement is the one outcome
    keep, hist = obd.rounds_with_history(users, fb["action"], fb["position"], fb["reward"])
    assert len(keep) == fb["n_rounds"] - len(set(users))
    q = obd.world_model_q(world, hist, N_ITEMS, N_POS, batch_size=64)  # batches that do not divide the rounds
    assert q.shape == (len(keep), N_ITEMS, N_POS)
    assert np.all((q > 0) & (q < 1))
    # the batched array is what predict gives round by round
    one = world.predict([hist[100]], [obd.catalogue(N_ITEMS, N_POS)])["engaged"].numpy().reshape(N_ITEMS, N_POS)
    assert np.allclose(q[100], one, atol=1e-5)
    mean = q.mean(axis=(0, 2))
    assert mean.argmax() == HOT and mean[HOT] > 3 * np.delete(mean, HOT).max()


def test_relative_error_and_the_decision_rule_on_hand_made_numbers():
    assert obd.relative_error(0.006, 0.004) == pytest.approx(0.5)
    assert obd.relative_error(0.002, 0.004) == pytest.approx(0.5)
    with pytest.raises(DpokitError):
        obd.relative_error(0.1, 0.0)
    truth = 0.004
    est = obd.summarise({"ipw": 0.005, "dm_wm": 0.003, "dm_lr": 0.0052},
                        {"ipw": (0.002, 0.009), "dm_wm": (0.0029, 0.0031), "dm_lr": (0.005, 0.0054)}, truth)
    assert est["dm_wm"]["relative_error"] == pytest.approx(0.25) and est["ipw"]["low"] == 0.002
    assert obd.decide(est) == {"agrees_with_ipw": True, "at_least_as_accurate_as_logistic": True}
    # outside IPW's interval (below its low end), and a larger error than the logistic DM's
    est["dm_wm"].update(estimate=0.0015, relative_error=obd.relative_error(0.0015, truth))
    assert obd.decide(est) == {"agrees_with_ipw": False, "at_least_as_accurate_as_logistic": False}
    # the interval's end counts as inside; an equal error counts as at least as accurate
    est["dm_wm"].update(estimate=0.002, relative_error=est["dm_lr"]["relative_error"])
    assert obd.decide(est) == {"agrees_with_ipw": True, "at_least_as_accurate_as_logistic": True}


def test_the_command_line_parser_has_data_and_the_common_flags():
    parser = argparse.ArgumentParser()
    from dpokit.experiments.cli import add_obd

    p, own = add_obd(parser.add_subparsers(dest="experiment"))
    args = parser.parse_args(["obd", "--data", "/somewhere", "--quick", "--seed", "2"])
    assert (args.data, args.quick, args.seed, args.out) == ("/somewhere", True, 2, "runs/obd")
    assert args.experiment_run is not None and [a.option_strings for a in own] == [["--data"], ["--wm-epochs"]]


# ---------------------------------------------------------------- with obp


def test_estimators_use_the_same_rounds_and_match_their_formulas():
    pytest.importorskip("obp")
    users, fb = synthetic_feedback()
    keep, _ = obd.rounds_with_history(users, fb["action"], fb["position"], fb["reward"])
    sub = obd.subset_feedback(fb, keep)
    n = len(keep)
    rng = np.random.default_rng(1)
    pi = rng.dirichlet(np.ones(N_ITEMS), size=N_POS).T  # [items, positions], each position a distribution
    action_dist = np.tile(pi, (n, 1, 1))
    q_world = rng.random((n, N_ITEMS, N_POS)) * 0.1
    q_logistic = obd.logistic_q(sub, action_dist, n_folds=3, seed=0)
    assert q_logistic.shape == (n, N_ITEMS, N_POS)
    est, intervals = obd.off_policy_estimates(sub, action_dist, q_world, q_logistic, n_bootstrap=50, seed=0)
    assert set(est) == {k for k, _ in obd.ESTIMATORS} == set(intervals)
    a, k, r = sub["action"], sub["position"], sub["reward"]
    w = pi[a, k] / sub["pscore"]
    assert est["ipw"] == pytest.approx(np.mean(w * r))
    assert est["snipw"] == pytest.approx(np.mean(w * r) / np.mean(w))
    dm = (q_world[np.arange(n), :, k] * pi[:, k].T).sum(axis=1)  # Σ_a π(a | k) q̂(x, a, k) at the logged k
    assert est["dm_wm"] == pytest.approx(dm.mean())
    assert est["dr_wm"] == pytest.approx(np.mean(dm + w * (r - q_world[np.arange(n), a, k])))
    assert all(lo <= hi for lo, hi in intervals.values())


def test_an_obd_folder_is_read_in_place_with_users_in_timestamp_order(tmp_path):
    pytest.importorskip("obp")
    import pandas as pd

    rows = []
    for t, (u, item, pos, click) in enumerate([("x", 1, 1, 0), ("y", 0, 2, 1), ("x", 2, 3, 1), ("y", 1, 1, 0)]):
        rows.append({"timestamp": f"2019-11-24 00:00:{59 - 10 * t:02d}+00:00", "item_id": item, "position": pos,
                     "click": click, "propensity_score": 1 / 3, **{f"user_feature_{j}": f"{u}{j}" for j in range(4)}})
    items = pd.DataFrame({"item_id": [0, 1, 2], "item_feature_0": [0.1, 0.2, 0.3], "item_feature_1": ["a", "b", "a"],
                          "item_feature_2": ["c", "c", "d"], "item_feature_3": ["e", "f", "e"]})
    folder = tmp_path / "random" / "all"
    folder.mkdir(parents=True)
    pd.DataFrame(rows).to_csv(folder / "all.csv")
    items.to_csv(folder / "item_context.csv")
    log = obd.load_log("random", data=tmp_path)
    fb = log.obtain_batch_bandit_feedback()
    assert fb["action"].tolist() == [1, 2, 0, 1]  # timestamps were written newest first: obp sorts them
    assert fb["position"].tolist() == [0, 2, 1, 0] and fb["action_context"].shape == (3, 4)
    users = obd.user_ids(log)
    assert users == ["y0|y1|y2|y3", "x0|x1|x2|x3", "y0|y1|y2|y3", "x0|x1|x2|x3"]
    keep, _ = obd.rounds_with_history(users, fb["action"], fb["position"], fb["reward"])
    assert keep.tolist() == [2, 3]
