"""`dpokit experiment vlm`'s pieces on hand-made data: the truth parser on easy-vqa-shaped questions, the
hallucination scorer, the rejected descriptions, the decision rule and the committed protocol text."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from dpokit.experiments import vlm

QUESTIONS = [
    ["what is the blue shape?", "rectangle", 0],
    ["is there a triangle in the image?", "no", 0],
    ["what color is the shape?", "teal", 1],
    ["does the image not contain a circle?", "no", 1],  # a circle, by negation
    ["is there not a red shape?", "yes", 2],
    ["is no triangle present?", "no", 2],  # a triangle
    ["does the image contain a gray shape?", "yes", 2],
    ["what shape is in the image?", "circle", 3],  # colour never settled: left out
    ["is there a yellow shape?", "no", 3],
]


def test_truth_from_questions():
    assert vlm.truth(QUESTIONS) == {0: ("blue", "rectangle"), 1: ("teal", "circle"), 2: ("gray", "triangle")}


def test_truth_by_elimination_and_contradiction():
    rows = [["what color is the shape?", "red", 5]]
    rows += [[f"is there a {s}?", "no", 5] for s in ("circle", "triangle")]
    assert vlm.truth(rows) == {5: ("red", "rectangle")}
    with pytest.raises(ValueError):
        vlm.truth([["what shape is in the image?", "circle", 0], ["is there a circle?", "no", 0]])


def test_hallucination_scorer():
    assert not vlm.hallucinates("a red circle.", "red", "circle")
    assert vlm.correct("a red circle.", "red", "circle")
    assert vlm.hallucinates("a blue circle.", "red", "circle")
    assert vlm.hallucinates("a red triangle.", "red", "circle")
    assert vlm.hallucinates("a red circle and a green circle.", "red", "circle")
    assert not vlm.hallucinates("a shape.", "red", "circle") and not vlm.correct("a shape.", "red", "circle")
    assert not vlm.correct("a red.", "red", "circle")
    assert vlm.named("A Gray Rectangle") == ({"gray"}, {"rectangle"})


def test_rejected_changes_exactly_one_attribute(tmp_path: Path):
    truths = {i: (vlm.COLOURS[i % 8], vlm.SHAPES[i % 3]) for i in range(40)}
    images = {i: str(tmp_path / f"{i}.png") for i in truths}
    rows = vlm.pair_rows(truths, images, 30, seed=0)
    assert rows == vlm.pair_rows(truths, images, 30, seed=0)  # seeded
    changed = {"colour": 0, "shape": 0}
    for row in rows:
        i = int(Path(row["images"][0]).stem)
        colour, shape = truths[i]
        assert row["prompt"] == "<image>" + vlm.DESCRIBE and row["chosen"] == " " + vlm.description(colour, shape)
        assert row["rejected"] != row["chosen"] and vlm.hallucinates(row["rejected"], colour, shape)
        (c,), (s,) = vlm.named(row["rejected"])
        assert (c != colour) + (s != shape) == 1
        changed["colour" if c != colour else "shape"] += 1
    assert changed == {"colour": 15, "shape": 15}
    rng = random.Random(0)
    for which in ("colour", "shape"):
        assert all(vlm.rejected_description("red", "circle", which, rng) != "a red circle." for _ in range(50))


def test_warmup_rows_hold_every_question_and_one_description_per_image(tmp_path: Path):
    truths = vlm.truth(QUESTIONS)
    images = {i: str(tmp_path / f"{i}.png") for i in range(4)}
    rows = vlm.warmup_rows(QUESTIONS, truths, images, None, seed=0)
    assert len(rows) == len(QUESTIONS) + len(truths)
    assert all(r["chosen"] != r["rejected"] for r in rows)
    assert sum(r["prompt"].endswith(vlm.DESCRIBE) for r in rows) == len(truths)


def test_decision_rule():
    warm = {"hallucination_rate": 0.30, "accuracy": 0.80}
    assert vlm.verdict(warm, {"hallucination_rate": 0.15, "accuracy": 0.785})["met"]
    v = vlm.verdict(warm, {"hallucination_rate": 0.16, "accuracy": 0.80})
    assert not v["met"] and not v["hallucination_halved"]
    v = vlm.verdict(warm, {"hallucination_rate": 0.05, "accuracy": 0.77})
    assert not v["met"] and not v["accuracy_within_2_points"]
    v = vlm.verdict({"hallucination_rate": 0.08, "accuracy": 0.8}, {"hallucination_rate": 0.0, "accuracy": 0.8})
    assert not v["met"] and not v["warmup_hallucinates_at_least_10pct"]


def test_protocol_is_the_committed_text():
    docs = (Path(__file__).parents[1] / "docs" / "experiments.md").read_text(encoding="utf-8")
    assert vlm.PROTOCOL in docs
    assert vlm.PROTOCOL.startswith("## Vision-language DPO") and "Decision rule" in vlm.PROTOCOL
