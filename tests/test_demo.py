"""The controlled task's ground truth, and `dpokit demo` end to end (quick variant; the full one is slow)."""

import json
import re

import pytest
import torch

from dpokit import demo_task as tasks
from dpokit.demo import run_demo


def test_reward_counts_positive_minus_negative_adjectives():
    assert tasks.reward("", " bright, kind and warm.") == 1.0
    assert tasks.reward("", " grim, cruel and dull.") == -1.0
    assert tasks.reward("", " bright, tall and grim.") == 0.0
    assert tasks.reward("", " bright and tall.") == 0.5
    assert tasks.reward("", " lovely.") == 1.0


@pytest.mark.parametrize("response", [
    " bright kind warm.",  # no separators
    " bright, kind and warm",  # unfinished
    " bright, and kind.",
    " bright and kind and warm.",
    " bright, kind and river.",  # not an adjective
    " bright, kind and warm. The",
    "bright.",
    "",
])
def test_anything_malformed_scores_minus_one(response):
    assert tasks.adjectives_of(response) is None
    assert tasks.reward("", response) == -1.0


def test_held_out_prompts_name_other_subjects():
    train, heldout = tasks.split_prompts(seed=3)
    subjects = lambda ps: {re.search(r"The (\w+) is$", p).group(1) for p in ps}  # noqa: E731
    assert len(heldout) == len(tasks.prompts()) // 4
    assert subjects(train).isdisjoint(subjects(heldout))
    assert len(train) + len(heldout) == len(tasks.prompts())


def test_warm_up_corpus_carries_no_preference():
    rows = tasks.sft_rows(tasks.prompts(), 3000, seed=1)
    rewards = torch.tensor([tasks.reward(r["prompt"], r["completion"]) for r in rows])
    assert abs(rewards.mean().item()) < 0.05
    assert (rewards == 1).float().mean().item() == pytest.approx(1 / 3, abs=0.03)
    assert all(tasks.adjectives_of(r["completion"]) is not None for r in rows)


def _sample(prompt, response):
    return tasks.Sample(prompt, response, [], [], tasks.reward(prompt, response))


def test_pairs_choose_the_higher_reward_and_drop_ties():
    p, q = "Describe the cat in a positive way. The cat is", "Write a positive line about the dog. The dog is"
    samples = [_sample(p, " grim."), _sample(p, " kind."),  # pair: kind wins
               _sample(p, " tall."), _sample(p, " old."),  # tie: dropped
               _sample(q, " bright and warm."), _sample(q, " bright and dull.")]
    rows = tasks.make_pairs(samples)
    assert [(r["prompt"], r["chosen"], r["rejected"]) for r in rows] == [
        (p, " kind.", " grim."), (q, " bright and warm.", " bright and dull.")]
    assert all(r["score_chosen"] > r["score_rejected"] for r in rows)


def test_quick_demo_dpo_beats_the_warm_up(tmp_path):
    results = run_demo(output_dir=tmp_path, seed=0, quick=True)
    before, after = results["warmup"], results["dpo"]
    assert after["mean_reward"] > before["mean_reward"] + 0.15
    assert after["all_positive"] > before["all_positive"]
    assert after["heldout_accuracy"] >= 0.8 > before["heldout_accuracy"]
    # The demo's own implicit-reward accuracy agrees with the training loop's eval on the same pairs.
    assert after["heldout_accuracy"] == pytest.approx(results["final_eval"]["eval_rewards/accuracies"],
                                                      abs=1 / results["heldout_pairs"])
    assert before["kl_to_warmup"] == 0 and after["kl_to_warmup"] > 0
    saved = json.loads((tmp_path / "demo_results.json").read_text())
    assert saved["dpo"]["mean_reward"] == after["mean_reward"]
    assert (tmp_path / "dpo-round1" / "pairs.jsonl").exists() and (tmp_path / "warmup" / "config.json").exists()


@pytest.mark.slow
def test_full_demo_meets_the_gate(tmp_path):
    results = run_demo(output_dir=tmp_path, seed=0)
    assert results["dpo"]["heldout_accuracy"] >= 0.9
    assert results["dpo"]["mean_reward"] >= results["warmup"]["mean_reward"] + 0.3
    assert results["gate_passed"]
