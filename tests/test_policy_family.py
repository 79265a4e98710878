"""The policy family (DPO on segments of control trajectories): tiny MLP and Stable-Baselines3 policies built
here, nothing downloaded."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from dpokit.config import TrainConfig
from dpokit.errors import DataError, DpokitError
from dpokit.families import get_family
from dpokit.families.policy import PolicyFamily
from dpokit.families.policy.data import collate
from dpokit.families.policy.models import PolicyMLP, TanhNormal, deterministic_action, load_mlp, save_mlp
from dpokit.families.policy.scorer import PolicyScorer
from dpokit.train import Loop

OBS, ACT = 3, 2


def segments(n: int, seed: int = 0, obs_dim: int = OBS, act_dim: int = ACT, lengths=(4, 6)) -> list[dict]:
    """Pairs whose chosen actions lie near +0.5 and rejected near −0.5, segments of varying length."""
    g = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        row = {}
        for side, centre in (("chosen", 0.5), ("rejected", -0.5)):
            T = lengths[(i + (side == "rejected")) % len(lengths)]
            actions = np.clip(centre + 0.1 * g.normal(size=(T, act_dim)), -0.99, 0.99)
            row[side] = {"obs": g.normal(size=(T, obs_dim)).round(4).tolist(), "actions": actions.round(4).tolist()}
        rows.append(row)
    return rows


def write(rows: list[dict], path: Path) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def config(tmp_path: Path, data: Path, **kw) -> TrainConfig:
    own = {"obs_dim": OBS, "act_dim": ACT, "policy_head": "gaussian", "policy_hidden": [16]}
    own.update({k: kw.pop(k) for k in list(kw) if k in own or k in ("action_low", "action_high", "sb3_algo")})
    settings = dict(family="policy", train_data=str(data), output_dir=str(tmp_path / "out"), beta=0.5,
                    learning_rate=1e-2, max_steps=1, per_device_train_batch_size=8, logging_steps=1, report_to=[],
                    disable_tqdm=True, save_steps=0, seed=3, ref_cache_dir=str(tmp_path / "cache"))
    settings.update(kw)
    return TrainConfig(**settings, family_config=own)


# ---------------------------------------------------------------- the model


def test_tanh_gaussian_log_prob_is_the_change_of_variables():
    """log π(a) = log N(u) − Σ log(1 − tanh(u)²) − Σ log(half-width), u = atanh of the action mapped to [−1, 1];
    an action on the bound keeps a finite log-density."""
    torch.manual_seed(0)
    loc, scale = torch.randn(5, 2), torch.rand(5, 2) + 0.3
    low, high = -2.0, 3.0
    a = low + (torch.rand(5, 2) * 0.98 + 0.01) * (high - low)
    dist = torch.distributions.Independent(TanhNormal(loc, scale, low, high), 1)
    unit = (a - low) / ((high - low) / 2) - 1
    u = torch.atanh(unit)
    by_hand = (torch.distributions.Normal(loc, scale).log_prob(u) - torch.log(1 - torch.tanh(u) ** 2)
               - math.log((high - low) / 2)).sum(-1)
    assert torch.allclose(dist.log_prob(a), by_hand, atol=1e-4)
    assert torch.isfinite(dist.log_prob(torch.full((5, 2), high))).all()
    sample = dist.sample()
    assert sample.shape == (5, 2) and (sample >= low).all() and (sample <= high).all()


def test_segment_score_is_the_sum_of_step_log_probs_and_padding_adds_nothing():
    torch.manual_seed(0)
    model = PolicyMLP(OBS, ACT, "tanh_gaussian", (8,))
    spec = model.spec
    fam = PolicyFamily()
    examples = fam.examples(segments(3, lengths=(2, 5, 3)), spec, None)
    scorer = PolicyScorer(model)
    with torch.no_grad():
        together = scorer(collate(examples))
        for i, ex in enumerate(examples):
            alone = scorer(collate([ex]))
            by_hand = model(ex.chosen_obs).log_prob(ex.chosen_actions).sum()
            assert torch.allclose(together.chosen[i], by_hand, atol=1e-5)
            assert torch.allclose(together.rejected[i], alone.rejected[0], atol=1e-5)
            assert together.chosen_len[i] == len(ex.chosen_obs) and together.rejected_len[i] == len(ex.rejected_obs)


def test_mlp_folder_round_trips(tmp_path):
    torch.manual_seed(0)
    for head in ("gaussian", "tanh_gaussian", "categorical"):
        model = PolicyMLP(OBS, 4, head, (8, 8), -2.0, 2.0)
        save_mlp(model, tmp_path / head)
        assert not list((tmp_path / head).glob("*.bin")) and not list((tmp_path / head).glob("*.pt"))
        back = load_mlp(tmp_path / head)
        obs = torch.randn(6, OBS)
        a = model(obs).sample()
        assert back.spec == model.spec and torch.allclose(back(obs).log_prob(a), model(obs).log_prob(a))


def test_likelihood_follows_the_head(tmp_path):
    fam = get_family("policy")
    data = write(segments(4), tmp_path / "d.jsonl")
    assert fam.likelihood_for(config(tmp_path, data)) == "density"
    assert fam.likelihood_for(config(tmp_path, data, policy_head="categorical", act_dim=4)) == "exact"
    with pytest.raises(DpokitError) as err:
        Loop(config(tmp_path, data, loss_type="simpo"))
    assert "\n" not in str(err.value) and "simpo" in str(err.value) and "density" in str(err.value)
    rows = [{side: {"obs": [[0.0] * OBS] * 2, "actions": [a, a]} for side, a in (("chosen", 1), ("rejected", 2))}] * 4
    cat = write(rows, tmp_path / "cat.jsonl")
    Loop(config(tmp_path, cat, loss_type="simpo", policy_head="categorical", act_dim=4))  # exact: simpo allowed


# ---------------------------------------------------------------- training


def test_sigmoid_moves_the_mean_action_toward_the_chosen(tmp_path, capsys):
    """DPO (sigmoid) on pairs whose chosen actions lie near +0.5 and rejected near −0.5 raises a fresh tanh-Gaussian
    policy's mean action; `dpokit eval` on the run reproduces the loop's last evaluation (its reference, the fresh
    MLP, rebuilt from the run's seed)."""
    data = write(segments(16), tmp_path / "train.jsonl")
    held_out = write(segments(6, seed=1), tmp_path / "eval.jsonl")
    cfg = config(tmp_path, data, max_steps=25, loss_type="sigmoid", policy_head="tanh_gaussian",
                 eval_data=str(held_out), eval_steps=25)
    loop = Loop(cfg)
    obs = torch.randn(64, OBS, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        before = deterministic_action(loop.model(obs)).mean().item()
    last = [r for r in loop.run().history if "eval_loss" in r][-1]
    trained = load_mlp(tmp_path / "out")
    with torch.no_grad():
        after = deterministic_action(trained(obs)).mean().item()
    assert after > before + 0.1 and after > 0.1
    assert last["eval_rewards/accuracies"] >= 0.8

    from dpokit.cli import main

    capsys.readouterr()
    assert main(["eval", str(tmp_path / "out"), "--data", str(held_out), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)["preference"]
    for key in ("loss", "rewards/margins", "logps/chosen"):
        assert result[key] == pytest.approx(last[f"eval_{key}"], rel=1e-5, abs=1e-6), key


def test_npz_reads_like_json_lines(tmp_path):
    rows = segments(3, lengths=(5,))
    arrays = {f"{side}_{key}": np.array([r[side][key] for r in rows], dtype=np.float32)
              for side in ("chosen", "rejected") for key in ("obs", "actions")}
    np.savez(tmp_path / "d.npz", **arrays, weight=np.array([1.0, 2.0, 0.5]))
    fam, spec = PolicyFamily(), PolicyMLP(OBS, ACT).spec
    a = fam.examples(str(tmp_path / "d.npz"), spec, None)
    b = fam.examples(str(write(rows, tmp_path / "d.jsonl")), spec, None)
    assert [ex.weight for ex in a] == [1.0, 2.0, 0.5]
    assert fam.fingerprint(a) == fam.fingerprint(b)


# ---------------------------------------------------------------- bad input: one line naming file and row

BAD = {
    "rank": (lambda r: r["chosen"].update(obs=r["chosen"]["obs"][0]), "[T, obs_dim]"),
    "lengths": (lambda r: r["rejected"].update(actions=r["rejected"]["actions"][:-1]), "observations but"),
    "obs_dim": (lambda r: r["chosen"].update(obs=[o + [0.0] for o in r["chosen"]["obs"]]), "the policy takes 3"),
    "act_dim": (lambda r: r["chosen"].update(actions=[a[:1] for a in r["chosen"]["actions"]]), "policy's are 2"),
    "nan": (lambda r: r["chosen"]["obs"][1].__setitem__(0, float("nan")), "NaN"),
    "bounds": (lambda r: r["rejected"]["actions"][0].__setitem__(1, 1.5), "outside the squashed"),
    "not_numbers": (lambda r: r["chosen"].update(actions=[["a", "b"]] * len(r["chosen"]["obs"])), "numbers"),
    "missing": (lambda r: r.pop("rejected"), "'rejected' must be an object"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_rows_are_one_line_naming_file_and_row(tmp_path, case):
    rows = segments(3)
    BAD[case][0](rows[1])
    path = tmp_path / "bad.jsonl"
    write(rows, path)
    with pytest.raises(DataError) as err:
        PolicyFamily().examples(str(path), PolicyMLP(OBS, ACT, "tanh_gaussian").spec, None)
    message = str(err.value)
    assert "\n" not in message and message.startswith(f"{path}, row 2: ") and BAD[case][1] in message


@pytest.mark.parametrize("actions, problem", [([0, 1.5, 2], "integers"), ([0, 4, 1], "unknown action 4")])
def test_bad_categorical_actions(tmp_path, actions, problem):
    row = {side: {"obs": [[0.0] * OBS] * 3, "actions": actions} for side in ("chosen", "rejected")}
    path = write([row], tmp_path / "cat.jsonl")
    with pytest.raises(DataError) as err:
        PolicyFamily().examples(str(path), PolicyMLP(OBS, 4, "categorical").spec, None)
    assert str(err.value).startswith(f"{path}, row 1: ") and problem in str(err.value)


def test_bad_npz_names_the_row(tmp_path):
    rows = segments(2, lengths=(3,))
    arrays = {f"{side}_{key}": np.array([r[side][key] for r in rows]) for side in ("chosen", "rejected")
              for key in ("obs", "actions")}
    arrays["rejected_obs"][1, 2, 0] = np.inf
    np.savez(tmp_path / "d.npz", **arrays)
    with pytest.raises(DataError, match=r"d\.npz, row 2: field 'rejected\.obs' holds a inf"):
        PolicyFamily().examples(str(tmp_path / "d.npz"), PolicyMLP(OBS, ACT).spec, None)
    arrays["chosen_obs"] = arrays["chosen_obs"][:, :, 0]
    np.savez(tmp_path / "e.npz", **arrays)
    with pytest.raises(DataError, match=r"e\.npz, row 1: field 'chosen\.obs' must be a non-empty \[T, obs_dim\]"):
        PolicyFamily().examples(str(tmp_path / "e.npz"), PolicyMLP(OBS, ACT).spec, None)


def test_cli_bad_row_exits_2_with_one_line(tmp_path, capsys):
    from dpokit.cli import main

    rows = segments(3)
    rows[2]["chosen"]["actions"][0] = [0.1, 0.2, 0.3]
    data = write(rows, tmp_path / "bad.jsonl")
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(config(tmp_path, data).to_dict()))
    assert main(["train", str(path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"{data}, row 3: " in err[0] and "Traceback" not in err[0]


# ---------------------------------------------------------------- Stable-Baselines3


def test_sb3_ppo_start_scores_trains_and_saves_back(tmp_path):
    gymnasium = pytest.importorskip("gymnasium")
    sb3 = pytest.importorskip("stable_baselines3")
    torch.manual_seed(0)
    ppo = sb3.PPO("MlpPolicy", gymnasium.make("Pendulum-v1"), n_steps=64, device="cpu",
                  policy_kwargs={"net_arch": [16]})
    ppo.save(tmp_path / "start.zip")
    rows = segments(8, obs_dim=3, act_dim=1)
    data = write(rows, tmp_path / "pendulum.jsonl")
    cfg = config(tmp_path, data, model=str(tmp_path / "start.zip"), obs_dim=None, act_dim=None,
                 learning_rate=1e-2, max_steps=2)
    loop = Loop(cfg)
    start = {k: v.clone() for k, v in loop.model.state_dict().items()}
    ex = loop.train_examples[0]
    with torch.no_grad():
        ours = PolicyScorer(loop.model)(collate([ex])).chosen[0]
        _, theirs, _ = loop.model.policy.evaluate_actions(ex.chosen_obs, ex.chosen_actions)
    assert torch.allclose(ours, theirs.sum(), atol=1e-5)
    loop.run()
    trained = {k: v for k, v in loop.model.state_dict().items()}
    moved = [k for k in trained if not torch.equal(start[k], trained[k])]
    assert any("action_net" in k or "policy_net" in k for k in moved)
    back = sb3.PPO.load(tmp_path / "out" / "policy.zip", device="cpu")
    for k, v in back.policy.state_dict().items():
        assert torch.equal(v, trained["policy." + k]), k
    assert (tmp_path / "out" / "model.safetensors").exists()
    again = get_family("policy").load_trained(str(tmp_path / "out"))[0]  # the folder loads back as the policy
    with torch.no_grad():
        assert torch.allclose(PolicyScorer(again)(collate([ex])).chosen, PolicyScorer(loop.model)(collate([ex])).chosen)


def test_sb3_sac_log_prob_is_sb3s_on_rescaled_actions(tmp_path):
    """SAC's squashed Gaussian lives on [−1, 1]: actions in the env's units are rescaled onto it, and the log-density
    gains the rescaling's log-Jacobian."""
    gymnasium = pytest.importorskip("gymnasium")
    sb3 = pytest.importorskip("stable_baselines3")
    sac = sb3.SAC("MlpPolicy", gymnasium.make("Pendulum-v1"), device="cpu", policy_kwargs={"net_arch": [8]})
    sac.save(tmp_path / "sac.zip")
    fam = get_family("policy")
    cfg = config(tmp_path, tmp_path / "unused.jsonl", model=str(tmp_path / "sac.zip"))
    assert fam.likelihood_for(cfg) == "density"
    model, spec = fam.load_policy(cfg)
    assert spec.head == "tanh_gaussian" and spec.low == (-2.0,) and spec.high == (2.0,)
    obs, a = torch.randn(5, 3), torch.rand(5, 1) * 3.8 - 1.9
    with torch.no_grad():
        mean, log_std, _ = model.policy.actor.get_action_dist_params(obs)
        theirs = model.policy.actor.action_dist.proba_distribution(mean, log_std).log_prob(a / 2)
        assert torch.allclose(model(obs).log_prob(a), theirs + math.log(2 / 4), atol=1e-5)
