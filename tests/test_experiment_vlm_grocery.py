"""`dpokit experiment vlm --task grocery`'s pieces on hand-made data: the readable names, the hallucination scorer,
the pair builder (another product as the rejected reply, half a near miss, seeded), the decision rule, the command
line's data checks and the committed protocol text; and, marked slow, a quick end-to-end run on grocery-64 when
../shared has it."""

from __future__ import annotations

import csv
import random
from pathlib import Path

import numpy as np
import pytest

from dpokit.cli import main
from dpokit.experiments import vlm_grocery as g
from dpokit.experiments.vlm import verdict

ROOT = Path(__file__).parents[1]
SHARED = ROOT / ".." / "shared" / "data" / "grocery-64"
# A hand-made class table in the upstream layout: two apples and a juice family, a coarse class with one product
# (banana: its near misses come from its top level), a vegetable.
CLASSES = [("Golden-Delicious", "Apple", "Fruit"), ("Granny-Smith", "Apple", "Fruit"), ("Banana", "Banana", "Fruit"),
           ("Bravo-Apple-Juice", "Juice", "Packages"), ("Bravo-Orange-Juice", "Juice", "Packages"),
           ("Tropicana-Mandarin-Morning", "Juice", "Packages"), ("Oatly-Oat-Milk", "Oat-Milk", "Packages"),
           ("Red-Bell-Pepper", "Pepper", "Vegetables")]


def write_classes(path: Path) -> Path:
    coarse_ids: dict[str, int] = {}
    with path.open("w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["Class Name (str)", "Class ID (int)", "Coarse Class Name (str)", "Coarse Class ID (int)",
                    "Iconic Image Path (str)", "Product Description Path (str)"])
        for k, (name, coarse, top) in enumerate(CLASSES):
            c = coarse_ids.setdefault(coarse, len(coarse_ids))
            w.writerow([name, k, coarse, c, f"/iconic-images-and-descriptions/{top}/{coarse}/{name}/x.jpg", ""])
    return path


@pytest.fixture
def cat(tmp_path: Path) -> g.Catalogue:
    return g.read_catalogue(write_classes(tmp_path / "classes.csv"))


def test_readable_names(cat):
    assert g.readable_fine("Golden-Delicious", "Apple") == "Golden Delicious apple"
    assert g.readable_fine("Anjou", "Pear") == "Anjou pear"
    assert g.readable_fine("Watermelon", "Melon") == "Watermelon"  # already says melon
    assert g.readable_fine("Oatly-Oat-Milk", "Oat-Milk") == "Oatly Oat Milk"
    assert g.readable_coarse("Red-Grapefruit") == "red grapefruit"
    assert cat.fine[:3] == ("Golden Delicious apple", "Granny Smith apple", "Banana")
    assert cat.fine[5] == "Tropicana Mandarin Morning juice"
    assert cat.top_of == ("fruit",) * 3 + ("packaged product",) * 4 + ("vegetable",)
    assert cat.description(0) == "a Golden Delicious apple, a kind of apple."
    assert cat.description(6) == "an Oatly Oat Milk, a kind of oat milk."


def test_hallucination_scorer(cat):
    apple, juice = 0, 3
    assert g.correct(cat.description(apple), apple, cat) and not g.hallucinates(cat.description(apple), apple, cat)
    near = "a Granny Smith apple, a kind of apple."  # a wrong variety: a hallucination, but the right kind
    assert g.hallucinates(near, apple, cat) and not g.wrong_kind(near, apple, cat)
    assert g.hallucinates("a Banana, a kind of apple.", apple, cat) and g.wrong_kind("a Banana.", apple, cat)
    assert g.hallucinates("a Golden Delicious apple, a kind of juice.", apple, cat)  # a false coarse class alone
    # "Bravo Apple Juice" is one product: its "apple" is not the apple class
    assert g.named(cat.description(juice), cat) == ({juice}, {2})
    assert not g.hallucinates("a Bravo Apple Juice, a kind of juice.", juice, cat)
    assert g.hallucinates("a Bravo Orange Juice, a kind of juice.", juice, cat)
    # naming nothing is no hallucination, and not a true description either
    assert not g.hallucinates("a kind of something.", apple, cat) and not g.correct("a kind of.", apple, cat)
    assert g.correct("GOLDEN delicious Apple!", apple, cat)
    for f in range(len(CLASSES)):  # every other product's description is a hallucination for this one
        assert all(g.hallucinates(cat.description(h), f, cat) for h in range(len(CLASSES)) if h != f)


def test_pairs_reject_another_product_half_near_miss_seeded(cat, tmp_path: Path):
    labels = np.array([i % len(CLASSES) for i in range(80)])
    images = {i: str(tmp_path / f"{i}.png") for i in range(80)}
    rows = g.pair_rows(labels, images, cat, 40, seed=0)
    assert rows == g.pair_rows(labels, images, cat, 40, seed=0)  # seeded
    assert rows != g.pair_rows(labels, images, cat, 40, seed=1)
    assert len({r["images"][0] for r in rows}) == 40
    near = 0
    for row in rows:
        f = int(labels[int(Path(row["images"][0]).stem)])
        assert row["prompt"] == "<image>" + g.DESCRIBE and row["chosen"] == " " + cat.description(f)
        (h,), _ = g.named(row["rejected"], cat)
        assert h != f and row["rejected"] == " " + cat.description(h)
        near += h in g.near_misses(cat, f)
    assert near >= 20  # half drawn as near misses (a random other class may be one by chance)
    assert g.near_misses(cat, 0) == [1]  # the other apple
    assert g.near_misses(cat, 2) == [0, 1]  # banana, alone in its coarse class: the other fruit
    assert g.near_misses(cat, 7) == [0, 1, 2, 3, 4, 5, 6]  # the pepper, alone among vegetables too: any other
    rng = random.Random(0)
    draws = [g.rejected_class(cat, 3, True, rng) for _ in range(200)]
    assert set(draws) == {4, 5}  # the other juices
    assert 3 not in {g.rejected_class(cat, 3, False, rng) for _ in range(200)}


def test_exactly_half_the_pairs_are_drawn_as_near_misses(cat, tmp_path: Path, monkeypatch):
    drawn = []
    real = g.rejected_class
    monkeypatch.setattr(g, "rejected_class", lambda c, f, near, rng: drawn.append(near) or real(c, f, near, rng))
    g.pair_rows(np.zeros(30, int), {i: f"{i}.png" for i in range(30)}, cat, 25, seed=3)
    assert sum(drawn) == 12 and len(drawn) == 25


def test_warmup_rows_and_questions(cat, tmp_path: Path):
    labels = np.array([0, 3, 7])
    images = {i: str(tmp_path / f"{i}.png") for i in range(3)}
    rows = g.warmup_rows(labels, images, cat, None, seed=0)
    assert len(rows) == 9 and all(r["chosen"] != r["rejected"] for r in rows)
    prompts = {r["prompt"].removeprefix("<image>") for r in rows}
    assert prompts == {g.PRODUCT, g.TOP_LEVEL, g.DESCRIBE}
    assert {"prompt": "<image>" + g.TOP_LEVEL, "chosen": " vegetable"}.items() <= \
        next(r for r in rows if r["images"] == [images[2]] and r["prompt"].endswith(g.TOP_LEVEL)).items()
    assert g.questions(labels, cat, [1]) == [[g.PRODUCT, "Bravo Apple Juice", 1],
                                             [g.TOP_LEVEL, "packaged product", 1]]
    assert g.same_answer(" Bravo apple juice.", "Bravo Apple Juice") and not g.same_answer("Bravo", "Bravo Apple Juice")


def test_decision_rule_is_the_easy_vqa_tasks():
    warm = {"hallucination_rate": 0.60, "accuracy": 0.50}
    assert verdict(warm, {"hallucination_rate": 0.30, "accuracy": 0.481})["met"]
    assert not verdict(warm, {"hallucination_rate": 0.31, "accuracy": 0.50})["hallucination_halved"]
    assert not verdict(warm, {"hallucination_rate": 0.10, "accuracy": 0.47})["accuracy_within_2_points"]
    v = verdict({"hallucination_rate": 0.09, "accuracy": 0.5}, {"hallucination_rate": 0.0, "accuracy": 0.5})
    assert not v["met"] and not v["warmup_hallucinates_at_least_10pct"]


def test_a_missing_or_bad_data_folder_is_one_error_line(tmp_path: Path, capsys):
    for argv, words in ((["--task", "grocery", "--data", str(tmp_path / "nope")], "not a grocery-64 folder"),
                        (["--data", "x"], "--data is read by `experiment vlm --task grocery` only")):
        status = main(["experiment", "vlm", *argv, "--out", str(tmp_path / "out")])
        err = capsys.readouterr().err.strip()
        assert status == 2 and len(err.splitlines()) == 1 and words in err, err
    assert not (tmp_path / "out").exists()
    bad = tmp_path / "bad"
    bad.mkdir()
    write_classes(bad / "classes.csv")
    for split in ("train", "test"):
        (bad / f"{split}.npz").write_bytes(b"not a zip")
    with pytest.raises(g.DpokitError, match="cannot read images"):
        g.load_split(g.find_data(bad), "train")


def test_protocol_is_the_committed_text_right_after_the_vlm_section():
    docs = (ROOT / "docs" / "experiments.md").read_text(encoding="utf-8")
    assert g.PROTOCOL in docs and "Decision rule" in g.PROTOCOL
    assert "<!-- vlm:end -->\n\n<!-- vlm-grocery:begin -->" in docs and g.READING in docs


@pytest.mark.slow
@pytest.mark.skipif(not (SHARED / "train.npz").exists(), reason="needs ../shared/data/grocery-64 (not on a user's "
                    "machine)")
def test_quick_run_end_to_end(tmp_path: Path):
    docs = tmp_path / "docs"
    results = g.run(tmp_path / "run", size=g.QUICK, data=SHARED, docs_dir=docs)
    for key in ("warmup", "sft", "dpo"):
        r = results[key]
        assert r["descriptions"] == 20 and r["questions"] == 40 and 0 <= r["hallucination_rate"] <= 1
    assert set(results["verdict"]) >= {"met", "hallucination_halved"}
    text = (docs / "experiments.md").read_text(encoding="utf-8")
    assert "<!-- vlm-grocery:begin -->" in text and g.PROTOCOL in text
    assert (tmp_path / "run" / "vlm-grocery.json").exists()
