"""`dpokit data build rollouts`: policy rollouts in gymnasium environments → labelled segment pairs.

Segments against the environment's own dynamics (none spans a reset), the jerk definition on hand-made
segments, each labeller, both output formats, policies given as a callable or a Distribution-returning
module, and the command line's one-line errors.
"""

import json
import math

import numpy as np
import pytest
import torch

from dpokit.cli import main
from dpokit.errors import DpokitError
from dpokit.recipes.rollouts import (jerk, label_pairs, pair_indices, rollout_pairs, rollout_segments, write)

pytest.importorskip("gymnasium")


def _pendulum_step_ok(obs, u, next_obs) -> bool:
    """Whether next_obs follows from (obs, u) under Pendulum-v1's dynamics (g = 10, m = l = 1, dt = 0.05)."""
    th = math.atan2(obs[1], obs[0])
    thdot = float(np.clip(obs[2] + (15.0 * math.sin(th) + 3.0 * float(np.clip(u, -2, 2))) * 0.05, -8, 8))
    th2 = th + thdot * 0.05
    return (abs(next_obs[2] - thdot) < 1e-4 and abs(next_obs[0] - math.cos(th2)) < 1e-4
            and abs(next_obs[1] - math.sin(th2)) < 1e-4)


def _seg(actions=None, qpos=None, rewards=None, T=None):
    T = T or len(actions if actions is not None else qpos)
    actions = np.zeros((T, 1)) if actions is None else np.asarray(actions, dtype=np.float64).reshape(T, -1)
    seg = {"obs": np.zeros((T, 2), dtype=np.float32), "actions": actions,
           "rewards": np.zeros(T) if rewards is None else np.asarray(rewards, dtype=np.float64),
           "qpos": None if qpos is None else np.asarray(qpos, dtype=np.float64).reshape(T, -1)}
    seg["info"] = {"return": float(seg["rewards"].sum()), "jerk": jerk(seg)}
    return seg


# ---------------------------------------------------------------- segments


def test_segments_never_span_an_episode_end():
    # 30-step episodes cut into 8-step segments: 3 per episode, 6 steps left over each time
    segs, out = rollout_segments("Pendulum-v1", "random", steps=3 * 75, num_envs=3, segment_length=8, seed=1,
                                 env_kwargs={"max_episode_steps": 30})
    assert out.counts["episodes_ended"] == 3 * 2 and out.steps == 225
    assert out.counts["segments"] == len(segs) == 3 * (2 * 3 + 1)  # 15 steps into the third episode: one more
    assert out.counts["steps_outside_segments"] == 225 - 8 * len(segs)
    assert {s["start"] for s in segs} == {0, 8, 16}
    for s in segs:
        assert s["start"] + 8 <= 30 and s["obs"].shape == (8, 3) and s["actions"].shape == (8, 1)
        # every step inside a segment follows the dynamics: no reset happened within it
        assert all(_pendulum_step_ok(s["obs"][t], s["actions"][t, 0], s["obs"][t + 1]) for t in range(7))
    # and the checker has teeth: two segments of different episodes do not chain
    a = next(s for s in segs if s["start"] == 16 and s["env"] == 0 and s["episode"] == 0)
    b = next(s for s in segs if s["start"] == 0 and s["env"] == 0 and s["episode"] == 1)
    assert not _pendulum_step_ok(a["obs"][-1], a["actions"][-1, 0], b["obs"][0])


def test_reacher_records_qpos_aligned_with_the_observations():
    pytest.importorskip("mujoco")
    segs, out = rollout_segments("Reacher-v5", "random", steps=200, num_envs=2, segment_length=10, seed=0)
    assert len(segs) == 20 and out.counts["steps_outside_segments"] == 0  # 50-step episodes
    for s in segs:
        assert s["qpos"].shape == (10, 4) and s["actions"].shape == (10, 2) and s["obs"].shape == (10, 10)
        # Reacher's observation starts with cos and sin of the two arm angles, qpos[:2], at the same step
        np.testing.assert_allclose(np.cos(s["qpos"][:, :2]), s["obs"][:, :2], atol=1e-5)
        np.testing.assert_allclose(np.sin(s["qpos"][:, :2]), s["obs"][:, 2:4], atol=1e-5)
        third = s["qpos"][3:] - 3 * s["qpos"][2:-1] + 3 * s["qpos"][1:-2] - s["qpos"][:-3]
        assert s["info"]["jerk"] == pytest.approx(float((third ** 2).sum(1).mean()))
    with pytest.raises(DpokitError, match=r"segment_length must be >= 4 .*third finite difference of qpos"):
        rollout_pairs("Reacher-v5", steps=50, num_envs=1, segment_length=3)


# ---------------------------------------------------------------- jerk and labels


def test_jerk_by_hand_and_the_smoothness_label():
    t = np.arange(6, dtype=np.float64)
    assert jerk(_seg(qpos=2 * t - 1)) == 0.0  # constant velocity: no jerk
    assert jerk(_seg(qpos=t ** 3)) == pytest.approx(36.0)  # third difference of t³ is 6
    assert jerk(_seg(qpos=np.stack([t ** 3, t ** 2], 1))) == pytest.approx(36.0)  # t²'s third difference is 0
    assert jerk(_seg(actions=[1, -1, 1, -1])) == pytest.approx(16.0)  # second differences ±4
    assert jerk(_seg(actions=[[0, 1], [1, 1], [2, 1]])) == 0.0
    assert jerk(_seg(actions=[1.0, 2.0])) is None  # too short for a second difference
    smooth, jerky = _seg(qpos=t), _seg(qpos=t ** 3, actions=np.zeros(6))
    out = label_pairs([jerky, smooth], [(0, 1)], "smoothness")
    assert out.rows[0]["chosen"] is smooth and out.rows[0]["rejected"] is jerky
    # qpos takes precedence over the actions: these smooth actions cannot save the jerky joints
    out = label_pairs([smooth, jerky], [(1, 0)], "smoothness")
    assert out.rows[0]["chosen"] is smooth
    tie = label_pairs([_seg(qpos=t), _seg(qpos=t + 1)], [(0, 1)], "smoothness")
    assert tie.rows == [] and tie.counts["ties"] == 1


def test_smoothness_and_return_labels_on_a_rollout(tmp_path):
    out = rollout_pairs("Pendulum-v1", steps=400, num_envs=4, segment_length=10, label="smoothness", seed=3)
    assert out.rows and all(r["chosen"]["info"]["jerk"] < r["rejected"]["info"]["jerk"] for r in out.rows)
    path = tmp_path / "smooth.jsonl"
    assert write(out, path) == len(out.rows)
    for line in path.read_text().splitlines():  # the written actions give back the jerk of each side
        row = json.loads(line)
        assert set(row) == {"chosen", "rejected", "weight"} and row["weight"] == 1.0
        for side in ("chosen", "rejected"):
            a = np.array(row[side]["actions"])
            assert a.shape == (10, 1) and np.array(row[side]["obs"]).shape == (10, 3)
            assert row[side]["info"]["jerk"] == pytest.approx(float(((a[2:] - 2 * a[1:-1] + a[:-2]) ** 2).mean()))
        assert row["chosen"]["info"]["jerk"] < row["rejected"]["info"]["jerk"]
    out = rollout_pairs("Pendulum-v1", steps=400, num_envs=4, segment_length=10, label="return", seed=3)
    assert out.rows and all(r["chosen"]["info"]["return"] > r["rejected"]["info"]["return"] for r in out.rows)
    assert all(math.isclose(r["chosen"]["info"]["return"], r["chosen"]["rewards"].sum()) for r in out.rows)
    # the same seed gives the same pairs
    again = rollout_pairs("Pendulum-v1", steps=400, num_envs=4, segment_length=10, label="return", seed=3)
    assert all(np.array_equal(a["chosen"]["obs"], b["chosen"]["obs"]) for a, b in zip(out.rows, again.rows))


def test_a_label_function_by_module_path_or_callable(tmp_path, monkeypatch):
    (tmp_path / "my_labels.py").write_text(
        "import numpy as np\n"
        "def last_angle(seg):\n"
        "    return float(seg['obs'][-1, 1])\n"
        "def constant(seg):\n"
        "    return 1.0\n"
        "def words(seg):\n"
        "    return 'good'\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    out = rollout_pairs("Pendulum-v1", steps=200, num_envs=2, segment_length=5, label="my_labels:last_angle")
    assert out.rows and all(r["chosen"]["obs"][-1, 1] > r["rejected"]["obs"][-1, 1] for r in out.rows)
    seen = []
    out = rollout_pairs("Pendulum-v1", steps=200, num_envs=2, segment_length=5,
                        label=lambda seg: seen.append(seg) or -abs(float(seg["actions"].sum())))
    assert seen and {"obs", "actions", "rewards", "qpos", "info"} <= set(seen[0])
    assert all(abs(r["chosen"]["actions"].sum()) < abs(r["rejected"]["actions"].sum()) for r in out.rows)
    with pytest.raises(DpokitError, match="every one tied"):
        rollout_pairs("Pendulum-v1", steps=100, num_envs=2, segment_length=5, label="my_labels:constant")
    with pytest.raises(DpokitError, match="returned str, not a number"):
        rollout_pairs("Pendulum-v1", steps=100, num_envs=2, segment_length=5, label="my_labels:words")


def test_pairs_are_random_distinct_and_seeded():
    first = pair_indices(10, seed=0)
    assert len(first) == 5 and sorted(i for p in first for i in p) == list(range(10))
    assert pair_indices(10, seed=0) == first and pair_indices(10, seed=1) != first
    many = pair_indices(10, pairs=30, seed=0)
    assert len({frozenset(p) for p in many}) == 30 and all(i != j for i, j in many) and many[:5] == first
    assert len({frozenset(p) for p in pair_indices(4, pairs=6)}) == 6
    with pytest.raises(DpokitError, match="only 6 distinct pairs"):
        pair_indices(4, pairs=7)
    with pytest.raises(DpokitError, match="a pair needs 2"):
        pair_indices(1)


# ---------------------------------------------------------------- policies


class _Gaussian(torch.nn.Module):
    """A policy per the protocol: obs [B, obs_dim] → a Distribution with batch shape [B]."""

    def __init__(self, mean: float):
        super().__init__()
        self.mean = torch.nn.Parameter(torch.tensor([mean]))

    def forward(self, obs):
        loc = self.mean.expand(obs.shape[0], 1)
        return torch.distributions.Independent(torch.distributions.Normal(loc, 0.1 * torch.ones_like(loc)), 1)


def test_policy_modules_and_scripted_callables():
    # deterministic: the mode, recorded unclipped (5), sent clipped to the bound (2)
    segs, _ = rollout_segments("Pendulum-v1", _Gaussian(5.0), steps=40, num_envs=2, segment_length=10,
                               deterministic=True)
    assert all(np.all(s["actions"] == 5.0) for s in segs)
    assert all(_pendulum_step_ok(s["obs"][t], 2.0, s["obs"][t + 1]) for s in segs for t in range(9))
    segs, _ = rollout_segments("Pendulum-v1", _Gaussian(0.5), steps=40, num_envs=2, segment_length=10, seed=4)
    acts = np.concatenate([s["actions"] for s in segs])
    assert acts.std() > 0.01 and abs(acts.mean() - 0.5) < 0.1  # sampled
    again, _ = rollout_segments("Pendulum-v1", _Gaussian(0.5), steps=40, num_envs=2, segment_length=10, seed=4)
    assert np.array_equal(acts, np.concatenate([s["actions"] for s in again]))  # seeded
    # a scripted controller on numpy arrays; CartPole's discrete actions keep their own shape [T]
    segs, _ = rollout_segments("CartPole-v1", lambda obs: (obs[:, 2] > 0).astype(int), steps=60, num_envs=2,
                               segment_length=5)
    for s in segs:
        assert s["actions"].shape == (5,) and np.array_equal(s["actions"], (s["obs"][:, 2] > 0).astype(int))
    with pytest.raises(DpokitError, match=r"actions of shape \(2, 3\)"):
        rollout_segments("Pendulum-v1", lambda obs: np.zeros((2, 3)), steps=10, num_envs=2, segment_length=5)


def test_a_saved_policy_folder_rolls_out_with_its_deterministic_action(tmp_path):
    """A dpokit policy folder given by path is loaded through the policy family and acts as the saved policy."""
    import torch

    from dpokit.families import get_family

    family = get_family("policy")
    torch.manual_seed(0)
    saved = family.new_policy(3, 1, head="tanh_gaussian", hidden=(8,))
    family.save(saved, None, str(tmp_path / "pol"))
    segs, _ = rollout_segments("Pendulum-v1", str(tmp_path / "pol"), steps=20, num_envs=2, segment_length=5,
                               deterministic=True)
    with torch.no_grad():
        for s in segs:
            want = saved(torch.as_tensor(s["obs"], dtype=torch.float32)).mode.numpy()
            assert np.allclose(s["actions"], want, atol=1e-6)


# ---------------------------------------------------------------- outputs and the command line


def test_cli_writes_npz_and_jsonl_with_the_right_shapes(tmp_path, capsys):
    out = tmp_path / "pairs.npz"
    assert main(["data", "build", "rollouts", "Pendulum-v1", str(out), "--steps", "200", "--num-envs", "2",
                 "--segment-length", "10", "--label", "return"]) == 0
    printed = capsys.readouterr().out
    assert "steps/s" in printed and "segments: 20" in printed
    d = np.load(out)
    n = len(d["weight"])
    assert n == 10 and d["chosen_obs"].shape == (n, 10, 3) and d["chosen_actions"].shape == (n, 10, 1)
    assert d["rejected_obs"].shape == (n, 10, 3) and d["rejected_actions"].shape == (n, 10, 1)
    assert np.all(d["chosen_return"] > d["rejected_return"]) and np.all(d["weight"] == 1.0)

    out = tmp_path / "cart.npz"
    assert main(["data", "build", "rollouts", "CartPole-v1", str(out), "--steps", "200", "--num-envs", "2",
                 "--segment-length", "5", "--unlabelled", "--pairs", "12"]) == 0
    d = np.load(out)
    assert sorted(d) == ["a_actions", "a_jerk", "a_obs", "a_return", "b_actions", "b_jerk", "b_obs", "b_return"]
    assert d["a_obs"].shape == (12, 5, 4) and d["b_actions"].shape == (12, 5)

    out = tmp_path / "open.jsonl"
    assert main(["data", "build", "rollouts", "CartPole-v1", str(out), "--steps", "100", "--num-envs", "2",
                 "--segment-length", "5", "--unlabelled", "--pairs", "3"]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 3 and all(set(r) == {"a", "b"} for r in rows)
    assert np.array(rows[0]["a"]["obs"]).shape == (5, 4) and set(rows[0]["a"]["info"]) == {"return", "jerk"}


@pytest.mark.parametrize("argv, message", [
    (["NoSuchEnv-v0", "o.jsonl"], "environment 'NoSuchEnv-v0'"),
    (["Pendulum-v1", "o.jsonl", "--policy", "no_such_module:act"], "cannot import policy function"),
    (["Pendulum-v1", "o.jsonl", "--policy", "json:no_such_fn"], "cannot import policy function"),
    (["Pendulum-v1", "o.jsonl", "--policy", "not-a-thing"], "is not 'random'"),
    (["Pendulum-v1", "o.jsonl", "--label", "json"], "label must be one of"),
    (["Pendulum-v1", "o.jsonl", "--label", "no_such_module:score"], "cannot import label function"),
    (["Pendulum-v1", "o.jsonl", "--segment-length", "2"], "segment_length must be >= 3"),
    (["Pendulum-v1", "o.csv"], "must end in .jsonl"),
    (["Pendulum-v1", "o.jsonl", "--unlabelled", "--label", "return"], "drop --label"),
    (["Pendulum-v1", "o.jsonl", "--steps", "0"], "steps must be >= 1"),
    (["Pendulum-v1", "o.jsonl", "--env-kwargs", "[1, 2]"], "--env-kwargs must be a YAML mapping"),
    (["CartPole-v1", "o.jsonl", "--steps", "40", "--segment-length", "5", "--label", "return"], "every one tied"),
])
def test_cli_errors_are_one_line_and_exit_2(tmp_path, capsys, argv, message):
    argv = argv[:1] + [str(tmp_path / argv[1])] + argv[2:]
    assert main(["data", "build", "rollouts", *argv]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1, err
    assert not (tmp_path / argv[1]).exists()
