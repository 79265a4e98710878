"""`dpokit demo`: the controlled task shows DPO's gain. The quick variant runs by default; the
full demo, with the issue's gate (held-out accuracy >= 0.9), is marked slow."""

import json

import pytest

from dpokit import tasks
from dpokit.cli import main


def test_task_reward_follows_the_rule():
    prompt = tasks.prompts(["river"])[0]  # "... The river is"
    assert tasks.reward(prompt, " bright, calm and kind.") == 1.0
    assert tasks.reward(prompt, " dull, cold and cruel.") == -1.0
    assert tasks.reward(prompt, " bright, tall and grim.") == 0.0
    assert tasks.reward(prompt, " bright, calm and fluffy.") == -1.0  # an unknown word: malformed
    assert tasks.reward(prompt, " bright calm kind") == -1.0  # broken form: malformed


def test_quick_demo_shows_dpo_gain(tmp_path, capsys):
    assert main(["demo", "--quick", "--output-dir", str(tmp_path)]) == 0
    results = json.loads((tmp_path / "demo_results.json").read_text())
    warm, dpo = results["warmup"], results["dpo"]
    assert dpo["heldout_accuracy"] > warm["heldout_accuracy"] + 0.2
    assert dpo["mean_reward"] > warm["mean_reward"] + 0.15
    assert dpo["kl_to_warmup"] > 0
    printed = capsys.readouterr().out
    assert "held-out pref. acc." in printed and f"{dpo['heldout_accuracy']:.3f}" in printed
    assert (tmp_path / "dpo" / "model.safetensors").exists()


@pytest.mark.slow
def test_full_demo_meets_the_gate(tmp_path):
    assert main(["demo", "--output-dir", str(tmp_path)]) == 0
    results = json.loads((tmp_path / "demo_results.json").read_text())
    assert results["dpo"]["heldout_accuracy"] >= 0.9
    assert results["dpo"]["mean_reward"] >= results["warmup"]["mean_reward"] + 0.3
    assert results["wall_s"] < 300
