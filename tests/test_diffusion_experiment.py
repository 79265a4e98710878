"""The diffusion experiment's measures and pair rule, and `dpokit demo diffusion --quick` end to end."""

import json

import pytest
import torch

from dpokit.experiments import diffusion
from dpokit.experiments.digits import diversity, frechet_distance, unwanted


def test_frechet_distance_of_two_gaussians_matches_the_closed_form():
    """For N(μa, diag σa²) and N(μb, diag σb²): ‖μa − μb‖² + Σ(σa − σb)²; estimated from samples."""
    g = torch.Generator().manual_seed(0)
    mu_a, mu_b = torch.tensor([0.0, 1.0, -1.0]), torch.tensor([2.0, 1.0, 0.0])
    sd_a, sd_b = torch.tensor([1.0, 2.0, 0.5]), torch.tensor([1.0, 1.0, 1.5])
    a = mu_a + sd_a * torch.randn(200_000, 3, generator=g)
    b = mu_b + sd_b * torch.randn(200_000, 3, generator=g)
    exact = float(((mu_a - mu_b) ** 2).sum() + ((sd_a - sd_b) ** 2).sum())
    assert frechet_distance(a, b) == pytest.approx(exact, rel=0.02)
    assert frechet_distance(a, a) == pytest.approx(0.0, abs=1e-6)


def test_diversity_is_within_digit_not_across():
    """Two digits far apart, each tight: diversity is the small within-digit spread, not the gap."""
    f = torch.tensor([[0.0, 0.0], [0.0, 1.0], [100.0, 0.0], [100.0, 3.0]])
    asked = torch.tensor([0, 0, 1, 1])
    assert diversity(f, asked) == pytest.approx((1.0 + 3.0) / 2)


def test_pairs_keep_exactly_one_wanted_and_choose_it():
    n = 4  # samples per digit: pairs (0, 1) and (2, 3) of each digit
    p = torch.full((diffusion.CLASSES * n,), 0.9)
    p[[0, 3, 5, 6, 7]] = 0.1  # digit 0: (0 bad, 1 good) and (2 good, 3 bad); digit 1: (4, 5 bad), (6, 7 both bad)
    asked = torch.arange(diffusion.CLASSES).repeat_interleave(n)
    pairs = diffusion.make_pairs(p, asked, n)
    assert pairs == [(1, 0), (2, 3), (4, 5)]
    assert all(not unwanted(p[w]) and unwanted(p[lose]) for w, lose in pairs)


def test_verdict_applies_each_part_of_the_rule():
    base = {"unwanted_rate": 0.30, "fid": 10.0, "diversity": 5.0}
    assert diffusion.verdict(base, {"unwanted_rate": 0.15, "fid": 11.0, "diversity": 4.5})["met"]
    assert not diffusion.verdict(base, {"unwanted_rate": 0.16, "fid": 10.0, "diversity": 5.0})["met"]
    assert not diffusion.verdict(base, {"unwanted_rate": 0.10, "fid": 11.2, "diversity": 5.0})["met"]
    assert not diffusion.verdict(base, {"unwanted_rate": 0.10, "fid": 10.0, "diversity": 4.4})["met"]
    low = {**base, "unwanted_rate": 0.10}
    assert not diffusion.verdict(low, {"unwanted_rate": 0.0, "fid": 10.0, "diversity": 5.0})["met"]


def test_quick_demo_writes_each_model_s_measures(tmp_path, capsys):
    pytest.importorskip("mlxtend")
    from dpokit.cli import main

    out, path = tmp_path / "run", tmp_path / "demo.json"
    assert main(["demo", "diffusion", "--quick", "--output-dir", str(out), "--json", str(path)]) == 0
    results = json.loads(path.read_text())
    for name in ("base", "dpo", "sft"):
        assert {"unwanted_rate", "fid", "diversity"} <= set(results[name])
        assert 0.0 <= results[name]["unwanted_rate"] <= 1.0
        assert results[name]["n"] == diffusion.CLASSES * diffusion.QUICK["eval_samples"]
    # DPO and preferred-FT trained on the pairs the base model's samples gave, and moved the model.
    assert results["pairs"] == sum(1 for _ in open(out / "pairs" / "pairs.jsonl"))
    assert results["dpo"] != results["base"] and results["sft"] != results["base"]
    assert (out / "samples.png").is_file() and "goal" in capsys.readouterr().out
