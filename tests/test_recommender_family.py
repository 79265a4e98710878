"""The recommender family (DPO, S-DPO and DMPO on interactions): tiny SASRec models built here, nothing
downloaded."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch
import yaml

from dpokit.config import TrainConfig
from dpokit.errors import DataError, DpokitError
from dpokit.families import get_family
from dpokit.families.recommender import RecommenderFamily
from dpokit.families.recommender.data import collate, load_examples, read_catalogue
from dpokit.families.recommender.models import Items, SASRec, load_model, slate_log_probs
from dpokit.families.recommender.scorer import RecommenderScorer
from dpokit.objectives import LOSSES, LossInputs, ObjectiveConfig
from dpokit.train import Loop

N = 12  # items "0".."11"; item k is followed by k + 1 (mod N)
SMALL = {"rec_hidden": 32, "rec_blocks": 1, "rec_heads": 2, "rec_dropout": 0.0, "max_history": 8}


def write(rows: list[dict], path: Path) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def sequences(n: int, seed: int = 0, k: int = 1) -> list[dict]:
    """Histories of consecutive items; the next one chosen, others rejected (k > 1: a list, an S-DPO group)."""
    g = random.Random(seed)
    rows = []
    for _ in range(n):
        start, length = g.randrange(N), g.randint(2, 6)
        history = [(start + i) % N for i in range(length)]
        nxt = (start + length) % N
        others = g.sample([i for i in range(N) if i != nxt], k)
        rows.append({"user": f"u{g.randrange(100)}", "history": history, "chosen": nxt,
                     "rejected": others if k > 1 else others[0]})
    return rows


def every_item_row() -> dict:
    """A row naming every item, so a vocabulary built from the data covers the catalogue."""
    return {"history": list(range(N - 1)), "chosen": N - 1, "rejected": 0}


def config(tmp_path: Path, data: Path, **kw) -> TrainConfig:
    own = dict(SMALL)
    own.update({k: kw.pop(k) for k in list(kw) if k in own or k in ("item_catalogue", "score_over", "eval_top_k")})
    settings = dict(family="recommender", train_data=str(data), output_dir=str(tmp_path / "out"), beta=0.5,
                    learning_rate=1e-2, max_steps=1, per_device_train_batch_size=16, logging_steps=1, report_to=[],
                    disable_tqdm=True, save_steps=0, seed=3, ref_cache_dir=str(tmp_path / "cache"))
    settings.update(kw)
    return TrainConfig(**settings, family_config=own)


def items() -> Items:
    return Items(range(N), "test")


# ---------------------------------------------------------------- scores


class NoCatalogue(SASRec):
    """A SASRec whose full forward over the catalogue is forbidden."""

    def forward(self, history):
        raise AssertionError("built the catalogue's logits")


def test_slate_log_softmax_is_the_catalogue_logits_restricted_to_the_slate():
    torch.manual_seed(0)
    model = SASRec(N + 1, 8, 16, 2, 2, 0.0).eval()
    history = torch.tensor([[0, 0, 1, 2], [3, 4, 5, 6]])
    slate = torch.tensor([[1, 3, 5, 7], [2, 4, 9, 0]])
    mask = slate != 0
    with torch.no_grad():
        full = model(history).gather(1, slate).masked_fill(~mask, -float("inf")).log_softmax(-1)
        restricted = NoCatalogue(N + 1, 8, 16, 2, 2, 0.0)
        restricted.load_state_dict(model.state_dict())
        ours = slate_log_probs(restricted.eval(), history, slate, mask)
    assert torch.allclose(ours, full, atol=1e-6)
    assert ours[1, 3] == -float("inf")
    # The scorer on slate rows goes the same way: no catalogue logits.
    rows = [{"history": [1, 2], "chosen": 3, "rejected": [5, 7], "candidates": [1, 3, 5, 7]},
            {"history": [4, 5, 6], "chosen": 9, "rejected": 4, "candidates": [2, 4, 9]}]
    examples = load_examples(rows, items(), 8, slate=True)
    with torch.no_grad():
        s = RecommenderScorer(restricted.eval())(collate(examples))
        by_hand = model(torch.tensor([[0, 2, 3]]))[0, [2, 4, 6, 8]].log_softmax(-1)  # indices are id + 1
    assert torch.allclose(s.chosen[0], by_hand[1], atol=1e-6)
    assert torch.allclose(s.rejected[0], by_hand[[2, 3]], atol=1e-6)
    assert s.rejected.shape == (2, 2) and s.rejected[1, 1] == 0  # the second row's empty slot


def test_item_score_is_log_softmax_of_a_forward_by_hand():
    torch.manual_seed(0)
    model = SASRec(N + 1, 8, 16, 2, 2, 0.0).eval()
    rows = sequences(5, k=3) + sequences(3, seed=1)
    examples = RecommenderFamily().examples(rows, items(), None)
    with torch.no_grad():
        together = RecommenderScorer(model)(collate(examples))
        for i, ex in enumerate(examples):
            logits = model(torch.tensor([ex.history]))[0]
            logp = logits[1:].log_softmax(-1)  # column 0 is the padding
            assert torch.allclose(together.chosen[i], logp[ex.chosen - 1], atol=1e-5)
            for k, r in enumerate(ex.rejected):
                assert torch.allclose(together.rejected[i, k], logp[r - 1], atol=1e-5)
    assert (together.chosen_len == 1).all()


def test_long_histories_keep_the_most_recent(tmp_path):
    row = {"history": list(range(N)), "chosen": 0, "rejected": 1}
    [ex] = RecommenderFamily().examples([row], items(), config(tmp_path, tmp_path / "x", max_history=3))
    assert ex.history == (10, 11, 12)  # ids 9, 10, 11 at indices id + 1


# ---------------------------------------------------------------- training


def _top1(model, items_, rows) -> float:
    examples = RecommenderFamily().examples(rows, items_, None)
    batch = collate(examples)
    with torch.no_grad():
        return (model(batch["history"])[:, 1:].argmax(-1) + 1 == batch["chosen"]).float().mean().item()


def test_sft_learns_the_next_item(tmp_path):
    data = write(sequences(64) + [every_item_row()], tmp_path / "train.jsonl")
    cfg = config(tmp_path, data, loss_type="sft", max_steps=80, learning_rate=1e-2)
    loop = Loop(cfg)
    before = _top1(loop.model.eval(), loop.processor, sequences(40, seed=7))
    loop.run()
    model, items_ = get_family("recommender").load_trained(str(tmp_path / "out"), cfg)
    after = _top1(model, items_, sequences(40, seed=7))
    assert after >= 0.9 and after > before
    assert json.loads((tmp_path / "out" / "items.json").read_text())["0"] == items_.index["0"]


def test_dpo_raises_the_chosen_over_the_rejected(tmp_path):
    """Pairs preferring item 3 over item 7 after history [1, 2]: p(3)/p(7) rises relative to the reference."""
    rows = [{"history": [1, 2], "chosen": 3, "rejected": 7}] * 16 + [every_item_row()]
    data = write(rows, tmp_path / "pairs.jsonl")
    cfg = config(tmp_path, data, loss_type="sigmoid", max_steps=15, learning_rate=5e-3)
    Loop(cfg).run()
    fam = get_family("recommender")
    ref, items_ = fam.load_trained(None, cfg)
    trained, _ = fam.load_trained(str(tmp_path / "out"), cfg)
    h = torch.tensor([[items_.index["1"], items_.index["2"]]])
    a, b = items_.index["3"], items_.index["7"]
    with torch.no_grad():
        ratio = lambda m: (m(h)[0, a] - m(h)[0, b]).item()  # noqa: E731
        assert ratio(trained) > ratio(ref) + 1.0


@pytest.mark.parametrize("loss", ["sdpo", "dmpo"])
def test_groups_train_with_sdpo_and_dmpo(tmp_path, loss):
    data = write(sequences(24, k=3) + [every_item_row()], tmp_path / "groups.jsonl")
    held_out = write(sequences(8, seed=1, k=2), tmp_path / "eval.jsonl")
    result = Loop(config(tmp_path, data, loss_type=loss, max_steps=20, eval_data=str(held_out),
                         eval_steps=20)).run()
    rows = [r for r in result.history if "loss" in r]
    assert rows[-1]["loss"] < rows[0]["loss"]
    assert [r for r in result.history if "eval_loss" in r]


def test_dmpo_is_the_mean_of_the_negatives_and_sigmoid_at_k_1():
    g = torch.Generator().manual_seed(0)
    B, K = 5, 4
    mask = torch.ones(B, K, dtype=torch.bool)
    mask[1, 2:] = False
    t = LossInputs(-torch.rand(B, generator=g) * 9, -torch.rand(B, K, generator=g) * 9,
                   -torch.rand(B, generator=g) * 9, -torch.rand(B, K, generator=g) * 9,
                   torch.ones(B), torch.ones(B, K), torch.zeros(B), rejected_mask=mask)
    c = ObjectiveConfig(beta=0.3)
    got = LOSSES["dmpo"](t, c)
    for i in range(B):
        m = mask[i]
        mean = (t.policy_rejected[i, m] - t.ref_rejected[i, m]).mean()
        want = -torch.nn.functional.logsigmoid(0.3 * ((t.policy_chosen[i] - t.ref_chosen[i]) - mean))
        assert torch.allclose(got[i], want, atol=1e-6)
    one = LossInputs(t.policy_chosen, t.policy_rejected[:, 0], t.ref_chosen, t.ref_rejected[:, 0], torch.ones(B),
                     torch.ones(B), torch.rand(B, generator=g))
    group = LossInputs(t.policy_chosen, t.policy_rejected[:, :1], t.ref_chosen, t.ref_rejected[:, :1], torch.ones(B),
                       torch.ones(B, 1), one.margin, rejected_mask=torch.ones(B, 1, dtype=torch.bool))
    assert torch.allclose(LOSSES["dmpo"](one, c), LOSSES["sigmoid"](one, c), atol=1e-6)
    assert torch.allclose(LOSSES["dmpo"](group, c), LOSSES["sigmoid"](one, c), atol=1e-6)


# ---------------------------------------------------------------- save, load, the catalogue


def test_save_load_round_trips_scores_exactly(tmp_path):
    torch.manual_seed(0)
    fam = RecommenderFamily()
    its = Items([f"item-{i}" for i in range(N)], "test")
    model = fam.new_model(its, max_history=8, hidden=16, blocks=2, heads=2).eval()
    fam.save(model, its, str(tmp_path / "m"))
    back = load_model(tmp_path / "m")
    back_items = fam.load_processor(str(tmp_path / "m"), None)
    assert back_items.index == its.index
    rows = [{"history": ["item-1", "item-2"], "chosen": "item-3", "rejected": ["item-4", "item-5"]}]
    batch = collate(fam.examples(rows, back_items, None))
    with torch.no_grad():
        a, b = RecommenderScorer(model)(batch), RecommenderScorer(back.eval())(batch)
    assert torch.equal(a.chosen, b.chosen) and torch.equal(a.rejected, b.rejected)


def test_catalogue_formats_and_unknown_items(tmp_path):
    ids = ["a", "b", "7", "d"]
    (tmp_path / "c.txt").write_text("\n".join(ids) + "\n")
    (tmp_path / "c.item").write_text("item_id:token\ttitle:token_seq\n" + "".join(f"{i}\tT {i}\n" for i in ids))
    (tmp_path / "c.csv").write_text("item,title\n" + "".join(f"{i},T\n" for i in ids))
    for name in ("c.txt", "c.item", "c.csv"):
        assert read_catalogue(str(tmp_path / name)).ids == ids
    data = write([{"history": ["a", 7], "chosen": "b", "rejected": ["d"]},
                  {"history": ["a"], "chosen": "zz", "rejected": "b"}], tmp_path / "d.jsonl")
    cfg = config(tmp_path, data, item_catalogue=str(tmp_path / "c.txt"))
    with pytest.raises(DataError) as err:
        Loop(cfg)
    assert str(err.value).startswith(f"{data}, row 2: ") and "unknown item 'zz'" in str(err.value)
    # A saved model loads with a catalogue only when the catalogue holds no item its items.json lacks.
    fam = RecommenderFamily()
    fam.save(fam.new_model(Items(ids[:3], "t"), hidden=8, blocks=1), Items(ids[:3], "t"), str(tmp_path / "m"))
    with pytest.raises(DpokitError) as err:
        fam.load_policy(config(tmp_path, data, model=str(tmp_path / "m"), item_catalogue=str(tmp_path / "c.txt")))
    assert "unknown item 'd'" in str(err.value) and "\n" not in str(err.value)
    model, its = fam.load_policy(config(tmp_path, data, model=str(tmp_path / "m")))
    with pytest.raises(DataError, match="unknown item 'd'"):  # the saved vocabulary is closed
        fam.examples(str(data), its, None)


# ---------------------------------------------------------------- bad input: one line naming file and row

BAD = {
    "unknown": (lambda r: r.update(chosen="nope"), "unknown item 'nope'"),
    "empty_history": (lambda r: r.update(history=[]), "'history' is empty"),
    "chosen_rejected": (lambda r: r.update(rejected=[r["chosen"], (r["chosen"] + 5) % N]), "also among the rejected"),
    "rejected_not_ids": (lambda r: r.update(rejected=[[1], 2]), "'rejected' must be a list of item ids"),
    "rejected_not_id": (lambda r: r.update(rejected={"a": 1}), "'rejected' must be an item id"),
    "candidates_not_list": (lambda r: r.update(candidates="1,2"), "'candidates' must be a list of item ids"),
    "chosen_not_in_slate": (lambda r: r.update(candidates=[r["rejected"]]), "chosen item"),
    "rejected_not_in_slate": (lambda r: r.update(candidates=[r["chosen"]]), "rejected item"),
    "duplicate_rejected": (lambda r: r.update(rejected=[r["rejected"], r["rejected"]]), "twice"),
    "missing_history": (lambda r: r.pop("history"), "missing field 'history'"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_rows_are_one_line_naming_file_and_row(tmp_path, case):
    rows = sequences(3)
    BAD[case][0](rows[1])
    path = write(rows, tmp_path / "bad.jsonl")
    with pytest.raises(DataError) as err:
        RecommenderFamily().examples(str(path), items(), None)
    message = str(err.value)
    assert "\n" not in message and message.startswith(f"{path}, row 2: ") and BAD[case][1] in message


def test_slate_scoring_needs_candidates(tmp_path):
    path = write(sequences(2), tmp_path / "d.jsonl")
    with pytest.raises(DataError, match=r"row 1: score_over: slate needs 'candidates'"):
        RecommenderFamily().examples(str(path), items(), config(tmp_path, path, score_over="slate"))


def test_bad_config_values_are_one_line(tmp_path):
    for key, value, words in (("score_over", "items", "score_over"), ("rec_heads", 3, "divide"),
                              ("rec_dropout", 1.0, "rec_dropout"), ("max_history", 0, "max_history")):
        with pytest.raises(DpokitError) as err:
            get_family("recommender").settings(config(tmp_path, tmp_path / "x", **{key: value}))
        assert words in str(err.value) and "\n" not in str(err.value)


def test_cli_bad_row_exits_2_with_one_line(tmp_path, capsys):
    from dpokit.cli import main

    rows = sequences(4)
    rows[2]["rejected"] = [rows[2]["chosen"]]
    data = write(rows, tmp_path / "bad.jsonl")
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(config(tmp_path, data).to_dict()))
    assert main(["train", str(path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"{data}, row 3: " in err[0] and "Traceback" not in err[0]


def test_eval_reproduces_the_loops_last_evaluation(tmp_path, capsys):
    """`dpokit eval RUN` rebuilds the fresh SASRec reference from the run's seed and vocabulary."""
    from dpokit.cli import main

    data = write(sequences(32, k=2) + [every_item_row()], tmp_path / "train.jsonl")
    held_out = write(sequences(8, seed=2, k=2), tmp_path / "eval.jsonl")
    cfg = config(tmp_path, data, loss_type="sdpo", max_steps=10, eval_data=str(held_out), eval_steps=10)
    last = [r for r in Loop(cfg).run().history if "eval_loss" in r][-1]
    capsys.readouterr()
    assert main(["eval", str(tmp_path / "out"), "--data", str(held_out), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)["preference"]
    for key in ("loss", "rewards/margins", "logps/chosen"):
        assert result[key] == pytest.approx(last[f"eval_{key}"], rel=1e-5, abs=1e-6), key


# ---------------------------------------------------------------- list metrics: the collapse guards on the report


class FixedLogits(torch.nn.Module):
    """Every context gets the same logits (a recommender that shows everyone the same items), or per-context
    random ones (`varied`)."""

    def __init__(self, n_items: int, varied: bool = False):
        super().__init__()
        self.w = torch.nn.Parameter(torch.arange(n_items, dtype=torch.float))
        self.varied = varied

    def forward(self, history):
        logits = self.w.expand(history.shape[0], -1).clone()
        if self.varied:
            g = torch.Generator().manual_seed(int(history.sum()))
            logits = logits + 100 * torch.rand(logits.shape, generator=g)
        return logits


def _eval_examples(items: Items, n: int = 40):
    return load_examples([dict(r, rejected=r["rejected"]) for r in sequences(n, seed=5)], items, 8)


def test_list_metrics_tell_a_collapsed_recommender_from_a_varied_one():
    from dpokit.families.recommender.lists import list_metrics

    items = Items([str(i) for i in range(N)], "test")
    examples = _eval_examples(items)
    same = list_metrics(FixedLogits(items.n_items).eval(), items, examples, k=3)
    varied = list_metrics(FixedLogits(items.n_items, varied=True).eval(), items, examples, k=3)
    # everyone is shown the top 3 logits minus their history: few items, unequally exposed
    assert same["coverage@3"] < varied["coverage@3"]
    assert same["gini@3"] > varied["gini@3"]
    assert set(same) == {"ndcg@3", "hr@3", "coverage@3", "gini@3", "popularity@3"}  # no genres: no ILD
    # HR@3 by hand: the chosen item among the three highest-index items outside the history
    hits = [ex.chosen in sorted(set(range(1, N + 1)) - set(ex.history))[-3:] for ex in examples]
    assert same["hr@3"] == pytest.approx(sum(hits) / len(hits))


def test_genre_diversity_from_a_recbole_item_file(tmp_path):
    from dpokit.families.recommender.lists import list_metrics
    from dpokit.ranking import genre_distance
    from dpokit.recipes.interactions import read_genres

    path = tmp_path / "cat.item"
    path.write_text("item_id:token\ttitle:token_seq\tclass:token_seq\n" + "".join(
        f"{i}\tfilm {i}\t{'Comedy' if i % 2 else 'Drama'}{' Romance' if i % 3 == 0 else ''}\n" for i in range(N)))
    genres = read_genres(str(path))
    assert genres["3"] == {"Comedy", "Romance"} and genres["4"] == {"Drama"}
    d = genre_distance(genres)
    assert d("3", "9") == 0.0 and d("3", "1") == pytest.approx(0.5) and d("3", "4") == 1.0
    items = read_catalogue(str(path))
    out = list_metrics(FixedLogits(items.n_items).eval(), items, _eval_examples(items), k=2, genres=genres)
    assert 0.0 <= out["ild@2"] <= 1.0
    assert read_genres(str(tmp_path / "none.txt")) is None


def test_the_loop_logs_list_metrics_from_the_start_and_the_report_plots_them(tmp_path):
    from dpokit.report import write_report

    data = write(sequences(32, k=2) + [every_item_row()], tmp_path / "train.jsonl")
    held_out = write(sequences(8, seed=2, k=2), tmp_path / "eval.jsonl")
    cfg = config(tmp_path, data, loss_type="sdpo", max_steps=6, eval_data=str(held_out), eval_steps=3,
                 eval_on_start=True, eval_top_k=4)
    rows = [r for r in Loop(cfg).run().history if "eval_coverage@4" in r]
    assert [r["step"] for r in rows] == [0, 3, 6]
    assert all(0 < r["eval_coverage@4"] <= 1 and 0 <= r["eval_gini@4"] <= 1 for r in rows)
    html = write_report(tmp_path / "out").read_text()
    assert "eval_coverage@4" in html and "eval_gini@4" in html
