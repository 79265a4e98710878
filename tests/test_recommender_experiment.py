"""The recommender demo's simulator, its decision rule, and `dpokit demo recommender --quick` end to end."""

import json

import numpy as np
import pytest

from dpokit.experiments import recommender, recsim


def test_true_utility_is_one_plus_four_p():
    sim = recsim.make_simulator(users=20, items=30, dim=8, seed=3)
    u, i = np.arange(20)[:, None], np.arange(30)[None, :]
    x = 2 * sim.tastes @ sim.vectors.T + sim.biases[None, :] - 1
    p = 1 / (1 + np.exp(-x))
    assert np.allclose(sim.p(u, i), p)
    assert np.allclose(sim.true_utility(u, i), 1 + 4 * p)
    assert sim.true_utility_of("u4", "i7") == pytest.approx(1 + 4 * p[4, 7])


def test_logging_policy_favours_popular_items():
    """On a seeded draw, items of higher bias are shown far more often; every user sees 30 distinct items."""
    sim = recsim.make_simulator(users=300, items=100, seed=0)
    rows = recsim.simulate_log(sim, shown=30, seed=0)
    assert len(rows) == 300 * 30
    by_user = {}
    for r in rows:
        by_user.setdefault(r["user"], []).append(r)
    assert all(len({r["item"] for r in rs}) == 30 for rs in by_user.values())
    assert all([r["timestamp"] for r in rs] == list(range(1, 31)) for rs in by_user.values())
    assert all(r["rating"] in (1, 2, 3, 4, 5) for r in rows)
    counts = np.zeros(100)
    for r in rows:
        counts[int(r["item"][1:])] += 1
    order = np.argsort(sim.biases)
    assert counts[order[-20:]].mean() > 2 * counts[order[:20]].mean()  # top-bias fifth vs bottom fifth
    assert np.corrcoef(sim.biases, counts)[0, 1] > 0.6
    probs = sim.logging_probs(0)
    assert probs.sum() == pytest.approx(1.0)
    assert np.allclose(np.log(probs) - np.log(probs).mean(),
                       (sim.biases + 0.5 * sim.vectors @ sim.tastes[0])
                       - (sim.biases + 0.5 * sim.vectors @ sim.tastes[0]).mean())


def test_ratings_follow_the_true_probability():
    sim = recsim.make_simulator(users=200, items=60, seed=1)
    rows = recsim.simulate_log(sim, shown=30, seed=1)
    true = np.array([sim.true_utility_of(r["user"], r["item"]) for r in rows])
    rating = np.array([r["rating"] for r in rows])
    assert abs((rating - true).mean()) < 0.1 and np.corrcoef(rating, true)[0, 1] > 0.7


def test_verdict_applies_each_part_of_the_rule():
    bc = {"utility": 3.0, "ndcg@10": 0.10, "coverage": 0.50, "true_utility": 2.5}
    ok = {"utility": 3.3, "ndcg@10": 0.10, "coverage": 0.45, "true_utility": 2.51}
    assert recommender.verdict(bc, ok)["met"]
    assert not recommender.verdict(bc, dict(ok, utility=3.29))["met"]  # utility below 1.10x
    assert not recommender.verdict(bc, dict(ok, **{"ndcg@10": 0.099}))["met"]  # NDCG@10 dropped
    assert not recommender.verdict(bc, dict(ok, coverage=0.449))["met"]  # coverage below 0.90x
    assert not recommender.verdict(bc, dict(ok, true_utility=2.5))["met"]  # true utility did not rise
    assert recommender.collapse(bc, {"coverage": 0.49}) and not recommender.collapse(bc, {"coverage": 0.5})
    ahead = recommender.compare_sdpo_dpo(
        {"utility": 1, "true_utility": 1, "ndcg@10": 0.2, "hr@10": 0.3, "coverage": 0.5, "gini": 0.5},
        {"utility": 2, "true_utility": 1, "ndcg@10": 0.1, "hr@10": 0.3, "coverage": 0.6, "gini": 0.4})
    assert ahead == {"utility": "sdpo", "true_utility": "tie", "ndcg@10": "dpo", "hr@10": "tie",
                     "coverage": "sdpo", "gini": "sdpo"}


def test_protocol_is_the_committed_docs_text():
    from pathlib import Path

    docs = (Path(__file__).parents[1] / "docs" / "experiments.md").read_text(encoding="utf-8")
    section = docs.split("<!-- recommender:begin -->")[1].split("### Results")[0]
    assert recommender.PROTOCOL.strip() in section and recommender.PROTOCOL.startswith("The issue's demo")


def test_quick_demo_writes_each_method_s_measures(tmp_path, capsys):
    from dpokit.cli import main

    out, path = tmp_path / "run", tmp_path / "demo.json"
    assert main(["demo", "recommender", "--quick", "--output-dir", str(out), "--json", str(path)]) == 0
    results = json.loads(path.read_text())
    for name in ("bc", "dpo", "sdpo", "dmpo", "greedy"):
        assert set(recommender.MEASURES) - {"ild"} <= set(results[name])  # no genres in the simulator
        assert 1.0 <= results[name]["utility"] <= 5.0 and 1.0 <= results[name]["true_utility"] <= 5.0
        assert 0.0 < results[name]["coverage"] <= 1.0
    assert set(results["verdict"]) == {"dpo", "sdpo", "dmpo"}
    assert isinstance(results["collapse_claim"], bool)
    assert results["pair_data"]["rows"] > 0 and results["world_model"]["held_out_events"] > 0
    assert (out / "recommender.json").is_file() and (out / "log.csv").is_file()
    assert results["dpo"] != results["bc"]  # DPO moved the policy
    assert "goal" in capsys.readouterr().out


def test_real_log_protocol_is_the_committed_docs_text():
    from pathlib import Path

    docs = (Path(__file__).parents[1] / "docs" / "experiments.md").read_text(encoding="utf-8")
    section = docs.split("<!-- recommender-data:begin -->")[1].split("### Results")[0]
    assert recommender.PROTOCOL_DATA.strip() in section
    assert recommender.PROTOCOL_DATA.startswith("`dpokit experiment recommender --data")


def test_world_model_log_cuts_each_test_user_at_the_held_out_item(tmp_path):
    log = tmp_path / "log.csv"
    log.write_text("user,item,rating,timestamp\n" + "".join(
        f"{u},{i},{r},{t}\n" for u, i, r, t in [("a", "x", 5, 1), ("a", "y", 4, 2), ("a", "z", 1, 3), ("a", "w", 5, 4),
                                                 ("b", "x", 2, 1), ("b", "y", 5, 2), ("c", "z", 5, 1)]))
    kept = recommender.world_model_log(log, [{"user": "a", "chosen": "y"}, {"user": "b", "chosen": "y"}], 4.0)
    assert [(e.user, e.item) for e in kept] == [("a", "x"), ("b", "x"), ("c", "z")]
    assert kept[0].outcomes == {"rating": 5.0, "engaged": 1.0}


def test_quick_run_on_a_real_log_with_genres(tmp_path, capsys):
    """`--data` with a log that is not the simulator's (its true utility unknown) and a RecBole .item catalogue with
    genres: the collapse guards with popularity and genre diversity; the tuned runs' reports plot them."""
    from dpokit.cli import main

    sim = recsim.make_simulator(users=60, items=80, seed=4)
    log = recsim.write_log(recsim.simulate_log(sim, shown=30, seed=4), tmp_path / "ratings.csv")
    cat = tmp_path / "films.item"
    cat.write_text("item_id:token\tclass:token_seq\n" + "".join(
        f"{i}\t{'Comedy' if int(i[1:]) % 2 else 'Drama'}{' War' if int(i[1:]) % 5 == 0 else ''}\n" for i in sim.items))
    out = tmp_path / "run"
    assert main(["experiment", "recommender", "--quick", "--data", str(log), "--items", str(cat),
                 "--out", str(out)]) == 0
    results = json.loads((out / "recommender-data.json").read_text())
    for name in ("bc", "dpo", "sdpo", "dmpo", "greedy"):
        assert "true_utility" not in results[name]
        assert 0.0 <= results[name]["ild"] <= 1.0 and results[name]["popularity"] > 0
    assert "true_utility_up" not in results["verdict"]["dpo"]
    rows = [json.loads(line) for line in (out / "dpo" / "metrics.jsonl").read_text().splitlines()]
    guards = [r for r in rows if "eval_coverage@10" in r]
    assert guards[0]["step"] == 0 and len(guards) >= 2 and "eval_ild@10" in guards[0]
    assert "eval_coverage@10" in (out / "dpo" / "report.html").read_text()
    assert "goal" in capsys.readouterr().out


def test_items_without_data_is_refused_in_one_line(tmp_path, capsys):
    from dpokit.cli import main

    assert main(["experiment", "recommender", "--items", str(tmp_path / "x.item"), "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--items goes with --data" in err[0]
