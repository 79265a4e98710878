"""dpokit.worldmodel: the user simulator of issue 18 on synthetic logs built here (fidelity, calibration metric,
pair labelling, rollouts of the greedy baseline, the folder round-trip, one-line errors)."""

import json
import random

import pytest
import torch

from dpokit.errors import DpokitError
from dpokit.families import get_family
from dpokit.ranking import coverage
from dpokit.worldmodel import (FitConfig, Utility, auc, evaluate_policy, expected_calibration_error, fit_world_model,
                               greedy_policy, label_pairs, load_world_model, random_policy, read_events,
                               save_world_model)

ITEMS = [f"i{i}" for i in range(20)]


def synthetic_log(n_users=120, per_user=12, seed=0):
    """Users of type A (even index) rate even items 5 and odd items 1; type B the reverse."""
    rng = random.Random(seed)
    events = []
    for u in range(n_users):
        a = u % 2 == 0
        for t in range(per_user):
            i = rng.randrange(len(ITEMS))
            events.append({"user": f"u{u}", "item": ITEMS[i], "time": t, "rating": 5.0 if (i % 2 == 0) == a else 1.0})
    return events


def history(type_a: bool):
    """A short history revealing the taste: an even and an odd item with the type's ratings."""
    hi, lo = (5.0, 1.0) if type_a else (1.0, 5.0)
    return [("i6", {"rating": hi}), ("i9", {"rating": lo}), ("i12", {"rating": hi})]


@pytest.fixture(scope="module")
def fitted():
    torch.set_num_threads(1)
    return fit_world_model(synthetic_log(), items=ITEMS, engaged_threshold=4.0,
                           config=FitConfig(epochs=60, batch_size=16))


def test_fidelity_beats_the_mean_and_the_taste_is_learnt(fitted):
    world, fid = fitted
    assert world.outcomes == ("rating", "engaged")
    assert fid["held_out_events"] == 120
    assert fid["rating_rmse"] < 0.3 * fid["baseline_rating_rmse"]
    assert fid["rating_mae"] < 0.3 * fid["baseline_rating_mae"]
    assert fid["engaged_auc"] > 0.95 and fid["engaged_ece"] < 0.1
    assert fid["engaged_log_loss"] < fid["baseline_engaged_log_loss"]
    for type_a in (True, False):
        r = world.predict([history(type_a)], [ITEMS])["rating"][0]
        even, odd = r[0::2], r[1::2]
        liked, disliked = (even, odd) if type_a else (odd, even)
        assert liked.min() > disliked.max()


def test_calibration_and_auc_metrics():
    # calibrated: in each bin the predicted probability is the observed rate
    probs, labels = [], []
    for p, pos in ((0.05, 1), (0.25, 5), (0.55, 11), (0.85, 17)):
        probs += [p] * 20
        labels += [1] * pos + [0] * (20 - pos)
    assert expected_calibration_error(probs, labels) == pytest.approx(0.0, abs=1e-9)
    # miscalibrated: says 0.9 where half engage
    assert expected_calibration_error([0.9] * 10, [1, 0] * 5) == pytest.approx(0.4)
    assert expected_calibration_error([1.0, 0.0], [1, 0]) == 0.0
    assert auc([0.1, 0.4, 0.35, 0.8], [0, 0, 1, 1]) == pytest.approx(0.75)
    assert auc([0.5, 0.5], [0, 1]) == pytest.approx(0.5)
    assert auc([0.2, 0.3], [1, 1]) is None


def test_label_pairs_choose_the_higher_utility_item(fitted):
    world, _ = fitted
    ctx = [{"user": "a", "history": history(True)}, {"user": "b", "history": history(False)}]
    rows = label_pairs(world, ctx, [["i1", "i2"], ["i1", "i2"]])
    assert [(r["user"], r["chosen"], r["rejected"]) for r in rows] == [("a", "i2", "i1"), ("b", "i1", "i2")]
    assert rows[0]["history"] == ["i6", "i9", "i12"] and rows[0]["weight"] == 1.0
    json.dumps(rows)  # the recommender family's JSON Lines
    groups = label_pairs(world, ctx, 8, k=3, seed=1)
    for g, type_a in zip(groups, (True, False)):
        assert len(g["rejected"]) == 3 and g["chosen"] not in g["rejected"]
        assert (int(g["chosen"][1:]) % 2 == 0) == type_a  # the liked parity
        assert not set(g["rejected"] + [g["chosen"]]) & set(g["history"])
    assert label_pairs(world, ctx, 8, k=3, seed=1) == groups  # seeded
    assert label_pairs(world, ctx[:1], [["i2", "i2"]]) == []  # a tie is dropped
    engaged_only = label_pairs(world, ctx[:1], [["i1", "i2"]], utility=Utility({"engaged": 1.0}))
    assert engaged_only[0]["chosen"] == "i2"


def test_greedy_rollouts_beat_random_and_collapse(fitted):
    world, _ = fitted
    starts = [history(n % 2 == 0) for n in range(20)]
    greedy = evaluate_policy(world, greedy_policy(world, k=2), starts, horizon=3, k=2)
    rand = evaluate_policy(world, random_policy(ITEMS, k=2, seed=0), starts, horizon=3, k=2)
    assert len(greedy["lists"]) == 60 and len(greedy["utility_per_step"]) == 3
    assert greedy["utility"] > rand["utility"] + 1.0
    assert coverage(greedy["lists"], len(ITEMS)) < coverage(rand["lists"], len(ITEMS))
    assert greedy["histories"][0][:3] == ["i6", "i9", "i12"] and len(greedy["histories"][0]) == 6
    sampled = evaluate_policy(world, greedy_policy(world, k=2), starts, horizon=2, k=2, choice="engaged", seed=3)
    assert sampled == evaluate_policy(world, greedy_policy(world, k=2), starts, horizon=2, k=2, choice="engaged",
                                      seed=3)


def test_rollout_of_a_recommender_through_the_family(fitted):
    world, _ = fitted
    family = get_family("recommender")  # its public surface only: new_model, sample, its items= constructor
    torch.manual_seed(0)
    model = family.new_model(ITEMS, max_history=20, hidden=16, blocks=1).eval()
    vocab = type(family)(items=ITEMS).items

    def recommend(histories):
        return family.sample(model, vocab, histories, num_generations=3)

    out = evaluate_policy(world, recommend, [history(True), history(False)], horizon=2, k=3)
    assert len(out["lists"]) == 4 and all(len(s) == 3 for s in out["lists"])


def test_save_load_round_trip(fitted, tmp_path):
    world, _ = fitted
    save_world_model(world, tmp_path / "wm")
    assert json.loads((tmp_path / "wm" / "items.json").read_text()) == ITEMS
    back = load_world_model(tmp_path / "wm")
    hs = [history(True), ["i3", "i4"]]
    a, b = world.predict(hs, [ITEMS, ITEMS]), back.predict(hs, [ITEMS, ITEMS])
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(DpokitError, match="not a world model folder"):
        load_world_model(tmp_path)


def test_read_events_from_a_csv(tmp_path):
    path = tmp_path / "log.csv"
    path.write_text("user,item,timestamp,rating,click\nu1,a,1,5,1\nu1,b,2,2,0\nu2,a,1,4,0\nu1,c,3,3,1\n")
    events = read_events(path, engaged_col="click")
    assert [(e.user, e.item, e.outcomes) for e in events] == [
        ("u1", "a", {"rating": 5.0, "engaged": 1.0}), ("u1", "b", {"rating": 2.0, "engaged": 0.0}),
        ("u2", "a", {"rating": 4.0, "engaged": 0.0}), ("u1", "c", {"rating": 3.0, "engaged": 1.0})]
    by_threshold = read_events(path, engaged_threshold=4.0)
    assert [e.outcomes["engaged"] for e in by_threshold] == [1.0, 0.0, 1.0, 0.0]
    world, fid = fit_world_model(path, config=FitConfig(epochs=1))
    assert world.outcomes == ("rating",) and fid["held_out_events"] == 1


def _one_line(excinfo):
    assert "\n" not in str(excinfo.value)


def test_bad_input_is_one_line(fitted, tmp_path):
    world, _ = fitted
    cases = [
        lambda: fit_world_model([]),
        lambda: world.predict([[]], [["i1"]]),
        lambda: world.predict([history(True)], [["nope"]]),
        lambda: world.predict([["nope"]], [["i1"]]),
        lambda: evaluate_policy(world, greedy_policy(world, k=2), [[]]),
        lambda: evaluate_policy(world, lambda hs: [["nope"]] * len(hs), [history(True)]),
        lambda: label_pairs(world, [{"user": "x", "history": []}], [["i1", "i2"]]),
        lambda: label_pairs(world, [history(True)], [["i1", "zzz"]]),
        lambda: Utility({"rating": 0.0}),
        lambda: fit_world_model([{"user": "u", "item": "a", "time": 0}]),
    ]
    empty = tmp_path / "empty.csv"
    empty.write_text("user,item,timestamp,rating\n")
    cases.append(lambda: fit_world_model(empty))
    for case in cases:
        with pytest.raises(DpokitError) as e:
            case()
        _one_line(e)


def test_early_stopping_keeps_the_best_validation_epoch(monkeypatch):
    """With patience, training stops once the validation loss has not improved for that many epochs, and the
    weights are the best epoch's: its validation loss is the lowest seen."""
    from dpokit.worldmodel import fit as fit_module

    seen = []
    real = fit_module.validation_loss

    def spy(model, sequences, pairs):
        seen.append(real(model, sequences, pairs))
        return seen[-1]

    monkeypatch.setattr(fit_module, "validation_loss", spy)
    events = synthetic_log(n_users=40, per_user=8, seed=3)
    model, out = fit_module.fit_world_model(events, items=ITEMS,
                                            config=fit_module.FitConfig(epochs=25, batch_size=16, patience=3))
    assert out["validation_events"] > 0 and out["epochs_run"] == len(seen)
    best = min(range(len(seen)), key=seen.__getitem__) + 1
    assert out["best_epoch"] == best and (out["epochs_run"] == 25 or out["epochs_run"] - best == 3)
    users = fit_module.user_sequences(fit_module._events(events, None))
    train, _ = fit_module.split_leave_last_out(users, 1)
    _, valid = fit_module.split_leave_last_out(train, 1)
    assert fit_module.validation_loss(model, users, valid) == pytest.approx(seen[best - 1], rel=1e-5)


def test_early_stopping_warns_when_no_validation_event_is_engaged(caplog):
    """Rare clicks: with no engaged validation event early stopping would keep the most pessimistic epoch; the
    fit says so (and stays silent when the validation events hold a click)."""
    rare = [{"user": f"u{u}", "item": ITEMS[(u + t) % 20], "time": t, "click": float(t == 0 and u % 5 == 0)}
            for u in range(30) for t in range(6)]
    events = [dict(e, engaged=e.pop("click")) for e in rare]
    with caplog.at_level("WARNING", logger="dpokit.worldmodel.fit"):
        fit_world_model(events, items=ITEMS, config=FitConfig(epochs=1, patience=1))
    assert any("none of the 30 validation events is engaged" in r.getMessage() for r in caplog.records)
    caplog.clear()
    for e in events:  # a click on every user's second-to-last event (the validation event)
        e["engaged"] = float(e["time"] == 4)
    with caplog.at_level("WARNING", logger="dpokit.worldmodel.fit"):
        fit_world_model(events, items=ITEMS, config=FitConfig(epochs=1, patience=1))
    assert not any("validation events is engaged" in r.getMessage() for r in caplog.records)
