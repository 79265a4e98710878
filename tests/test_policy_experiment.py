"""The policy experiment's demonstrator, jerk measure and decision rule, and `dpokit demo policy --quick` end to
end."""

import json

import numpy as np
import pytest

pytest.importorskip("gymnasium")
pytest.importorskip("mujoco")

from dpokit.experiments import policy, reacher  # noqa: E402


def test_scripted_demonstrator_reaches():
    """With its noise the controller still ends far closer to the target than doing nothing, on the same starts."""
    demo = reacher.measures(reacher.demonstrations(8, seed=5))
    still = reacher.measures(reacher.episodes(lambda obs: np.zeros((len(obs), 2)), 8, seed=5))
    assert demo["final_distance"] < 0.5 * still["final_distance"]
    noiseless = reacher.measures(reacher.episodes(lambda obs: reacher.controller(obs, np.zeros((len(obs), 2))),
                                                  8, seed=5))
    assert noiseless["success_rate"] >= 0.5 and noiseless["jerk"] < demo["jerk"]


def test_controller_is_the_jacobian_transpose_law():
    """τ = clip(30·Jᵀ(target − fingertip) − 0.03·q̇ + n, −1, 1) at a hand-checked arm pose."""
    q1, q2 = 0.3, -0.5
    obs = np.zeros((1, 10))
    obs[0, :4] = [np.cos(q1), np.cos(q2), np.sin(q1), np.sin(q2)]
    obs[0, 6:8] = [1.0, -2.0]
    obs[0, 8:10] = [0.01, -0.02]  # fingertip − target
    jac = np.array([[-0.1 * np.sin(q1) - 0.11 * np.sin(q1 + q2), -0.11 * np.sin(q1 + q2)],
                    [0.1 * np.cos(q1) + 0.11 * np.cos(q1 + q2), 0.11 * np.cos(q1 + q2)]])
    noise = np.array([[0.3, -0.3]])
    want = np.clip(30 * jac.T @ np.array([-0.01, 0.02]) - 0.03 * np.array([1.0, -2.0]) + noise[0], -1, 1)
    assert reacher.controller(obs, noise)[0] == pytest.approx(want)


def test_telegraph_noise_holds_for_five_steps_at_plus_minus_the_noise():
    tele = reacher.Telegraph(64, np.random.default_rng(0))
    values = np.stack([tele() for _ in range(10)])
    assert np.all(np.abs(values) == pytest.approx(reacher.NOISE)) and reacher.NOISE == 0.2  # protocol version 2
    assert np.all(values[:5] == values[0]) and np.all(values[5:] == values[5])
    assert np.any(values[5] != values[0])


def test_jerk_is_the_mean_squared_third_difference():
    x = np.array([[0.0, 0.0], [1.0, 0.0], [0.0, 2.0], [4.0, 0.0], [0.0, 1.0]])
    d = [x[t + 3] - 3 * x[t + 2] + 3 * x[t + 1] - x[t] for t in range(2)]
    want = np.mean([float((v ** 2).sum()) for v in d])
    assert reacher.jerk(x[None])[0] == pytest.approx(want)
    t = np.arange(10.0)[:, None]
    assert reacher.jerk(np.concatenate([t ** 2, 3 * t], 1)[None])[0] == pytest.approx(0.0)  # a parabola has none


def test_verdict_applies_each_part_of_the_rule():
    bc = {"jerk": 1.0, "success_rate": 0.50}
    assert policy.verdict(bc, {"jerk": 0.5, "success_rate": 0.48})["met"]
    assert not policy.verdict(bc, {"jerk": 0.51, "success_rate": 0.60})["met"]  # jerk not halved
    assert not policy.verdict(bc, {"jerk": 0.2, "success_rate": 0.475})["met"]  # lost more than 2 points
    low = {"jerk": 1.0, "success_rate": 0.29}
    assert not policy.verdict(low, {"jerk": 0.1, "success_rate": 0.9})["met"]  # BC below 30%: does not count


def test_quick_demo_writes_each_policy_s_measures(tmp_path, capsys):
    from dpokit.cli import main

    out, path = tmp_path / "run", tmp_path / "demo.json"
    assert main(["demo", "policy", "--quick", "--output-dir", str(out), "--json", str(path)]) == 0
    results = json.loads(path.read_text())
    for name in ("bc", "dpo", "cpl", "sft", "rlhf"):
        assert {"jerk", "success_rate", "return"} <= set(results[name])
        assert 0.0 <= results[name]["success_rate"] <= 1.0
        assert results[name]["episodes"] == policy.QUICK["eval_episodes"]
    assert set(results["verdict"]) == {"dpo", "cpl", "sft", "rlhf"}
    assert results["rlhf"]["cpu_seconds"]["ppo"] > 0 and set(results["train_cpu_seconds"]) == {"sft", "dpo", "cpl"}
    assert results["pair_data"]["pairs"] > 0 and (out / "pairs.npz").is_file()
    assert results["dpo"] != results["bc"]  # DPO trained on the pairs and moved the policy
    assert (out / "policy-reacher.png").is_file() and "goal" in capsys.readouterr().out


def test_family_new_policy_saves_and_loads_back(tmp_path):
    import torch

    from dpokit.families import get_family

    family = get_family("policy")
    torch.manual_seed(0)
    fresh = family.new_policy(10, 2, head="tanh_gaussian", hidden=(8, 8))
    family.save(fresh, None, str(tmp_path / "p"))
    again, spec = family.load_trained(str(tmp_path / "p"))
    obs = torch.randn(3, 10)
    assert spec.head == "tanh_gaussian" and (spec.obs_dim, spec.act_dim) == (10, 2)
    assert torch.allclose(fresh(obs).mode, again(obs).mode)


def test_bradley_terry_reward_model_orders_separable_pairs():
    """Chosen segments push action 0 up, rejected push it down: the fitted reward ranks held-out pairs the same way."""
    import numpy as np
    import torch

    from dpokit.experiments.rlhf import fit_reward_model, segment_return

    rng = np.random.default_rng(0)

    def pairs(n):
        obs = rng.standard_normal((2, n, 5, 3)).astype(np.float32)
        act = rng.standard_normal((2, n, 5, 2)).astype(np.float32) * 0.3
        act[0, :, :, 0] += 0.5
        act[1, :, :, 0] -= 0.5
        return {"chosen_obs": obs[0], "chosen_actions": act[0], "rejected_obs": obs[1], "rejected_actions": act[1]}

    model, accuracy = fit_reward_model(pairs(64), steps=200, seed=0)
    held = {k: torch.as_tensor(v) for k, v in pairs(64).items()}
    margin = (segment_return(model, held["chosen_obs"], held["chosen_actions"])
              - segment_return(model, held["rejected_obs"], held["rejected_actions"]))
    assert accuracy > 0.95 and (margin > 0).float().mean() > 0.95
