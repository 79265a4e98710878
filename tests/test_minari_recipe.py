"""`dpokit data build minari`: a local Minari dataset → labelled segment pairs.

Datasets are built here, in a tmp folder, by Minari's own writer (`create_dataset_from_buffers` from a random
Pendulum/CartPole policy, and `DataCollector` when jax, its `minari[create]` extra, is installed); nothing is
downloaded. Segments against Pendulum's own dynamics (none crosses an episode end), the T + 1 observations,
labels, both output formats read back by the policy family, the id lookup under MINARI_DATASETS_PATH, and the
one-line errors.
"""

import json
import math
import warnings

import numpy as np
import pytest

pytest.importorskip("gymnasium")
minari = pytest.importorskip("minari")
pytest.importorskip("h5py")  # minari's default (hdf5) storage

import gymnasium as gym  # noqa: E402
from minari.data_collector.episode_buffer import EpisodeBuffer  # noqa: E402

from dpokit.cli import main  # noqa: E402
from dpokit.errors import DpokitError  # noqa: E402
from dpokit.recipes.minari_data import dataset_segments, find_dataset, minari_pairs  # noqa: E402
from dpokit.recipes.segment_pairs import write  # noqa: E402


def _pendulum_step_ok(obs, u, next_obs) -> bool:
    """Whether next_obs follows from (obs, u) under Pendulum-v1's dynamics (g = 10, m = l = 1, dt = 0.05)."""
    th = math.atan2(obs[1], obs[0])
    thdot = float(np.clip(obs[2] + (15.0 * math.sin(th) + 3.0 * float(np.clip(u, -2, 2))) * 0.05, -8, 8))
    th2 = th + thdot * 0.05
    return (abs(next_obs[2] - thdot) < 1e-4 and abs(next_obs[0] - math.cos(th2)) < 1e-4
            and abs(next_obs[1] - math.sin(th2)) < 1e-4)


def _episodes(env_id: str, lengths, seed: int = 0, infos=None) -> tuple[gym.Env, list[EpisodeBuffer]]:
    """Random-policy episodes of the given lengths, as Minari episode buffers (T + 1 observations)."""
    env = gym.make(env_id)
    env.action_space.seed(seed)
    buffers = []
    for i, T in enumerate(lengths):
        o, _ = env.reset(seed=seed + i)
        obs, acts, rews = [o], [], []
        for _ in range(T):
            a = env.action_space.sample()
            o, r, terminated, _, _ = env.step(a)
            obs.append(o), acts.append(a), rews.append(float(r))
            assert not terminated  # the lengths asked for are short enough for these envs
        buffers.append(EpisodeBuffer(id=i, observations=np.stack(obs), actions=np.stack(acts), rewards=rews,
                                     terminations=[False] * T, truncations=[False] * (T - 1) + [True],
                                     infos=None if infos is None else infos(i, T)))
    return env, buffers


def _create(dataset_id: str, env, buffers, **kw):
    with warnings.catch_warnings():  # minari asks for an author, a description and a code permalink
        warnings.simplefilter("ignore")
        return minari.create_dataset_from_buffers(dataset_id, buffers, env=env, **kw)


@pytest.fixture
def root(tmp_path, monkeypatch):
    """Minari's local root, in tmp; downloading is made to fail loudly."""
    monkeypatch.setenv("MINARI_DATASETS_PATH", str(tmp_path / "minari"))

    def no_download(*a, **k):
        raise AssertionError("dpokit must not download")

    monkeypatch.setattr(minari, "download_dataset", no_download)
    monkeypatch.setattr(minari.storage.hosting, "download_dataset", no_download)
    return tmp_path / "minari"


@pytest.fixture
def pendulum(root):
    """Pendulum episodes of 30, 25 and 7 steps: with 8-step segments, 3 + 3 + 0 segments."""
    env, buffers = _episodes("Pendulum-v1", (30, 25, 7))
    _create("dpokit/pendulum/random-v0", env, buffers)
    return root / "dpokit" / "pendulum" / "random-v0"


# ---------------------------------------------------------------- segments


def test_segments_never_cross_an_episode_end(pendulum):
    segs, out = dataset_segments(pendulum, segment_length=8)
    assert dict(out.counts) == {"episodes": 3, "steps": 62, "segments": 6, "steps_outside_segments": 6 + 1 + 7,
                                "episodes_shorter_than_a_segment": 1}
    assert [(s["episode"], s["start"]) for s in segs] == [(0, 0), (0, 8), (0, 16), (1, 0), (1, 8), (1, 16)]
    ds = minari.MinariDataset(pendulum / "data")
    for s in segs:
        ep = ds[s["episode"]]
        assert s["obs"].shape == (8, 3) and s["actions"].shape == (8, 1) and s["rewards"].shape == (8,)
        # step t is (obs_t, a_t, r_t): the dataset's observation t, not t + 1
        np.testing.assert_array_equal(s["obs"], ep.observations[s["start"]:s["start"] + 8])
        np.testing.assert_array_equal(s["actions"], ep.actions[s["start"]:s["start"] + 8])
        assert s["info"]["return"] == pytest.approx(ep.rewards[s["start"]:s["start"] + 8].sum())
        assert all(_pendulum_step_ok(s["obs"][t], s["actions"][t, 0], s["obs"][t + 1]) for t in range(7))
        a = s["actions"][:, 0].astype(np.float64)
        assert s["info"]["jerk"] == pytest.approx(float(((a[2:] - 2 * a[1:-1] + a[:-2]) ** 2).mean()))
    # the checker has teeth: the last segment of episode 0 does not chain into the first of episode 1
    assert not _pendulum_step_ok(segs[2]["obs"][-1], segs[2]["actions"][-1, 0], segs[3]["obs"][0])
    # --episodes reads the first N only
    segs, out = dataset_segments(pendulum, segment_length=8, episodes=1)
    assert out.counts["episodes"] == 1 and {s["episode"] for s in segs} == {0}


def test_the_return_label_picks_the_higher_return_and_pairs_are_seeded(pendulum):
    out = minari_pairs(pendulum, segment_length=5, label="return", pairs=20, seed=3)
    assert len(out.rows) == 20
    for r in out.rows:
        assert r["chosen"]["info"]["return"] > r["rejected"]["info"]["return"]
        assert math.isclose(r["chosen"]["info"]["return"], r["chosen"]["rewards"].sum())
    again = minari_pairs(pendulum, segment_length=5, label="return", pairs=20, seed=3)
    assert all(np.array_equal(a["chosen"]["obs"], b["chosen"]["obs"]) for a, b in zip(out.rows, again.rows))
    smooth = minari_pairs(pendulum, segment_length=5, label="smoothness")
    assert smooth.rows and all(r["chosen"]["info"]["jerk"] < r["rejected"]["info"]["jerk"] for r in smooth.rows)


def test_discrete_actions_stay_integers_of_shape_T(root):
    env, buffers = _episodes("CartPole-v1", (9, 6), seed=1)
    _create("cartpole-v0", env, buffers)
    segs, _ = dataset_segments("cartpole-v0", segment_length=3)
    assert len(segs) == 5
    for s in segs:
        assert s["actions"].shape == (3,) and s["actions"].dtype == np.int64 and s["obs"].shape == (3, 4)


def test_qpos_in_the_infos_drives_the_jerk(root):
    # a qpos row per observation (T + 1), its last row dropped like the last observation's
    t = np.arange(11, dtype=np.float64)
    env, buffers = _episodes("Pendulum-v1", (10, 10), infos=lambda i, T: {"qpos": (t ** 3 if i else t)[:, None]})
    _create("qpos-v0", env, buffers)
    segs, _ = dataset_segments("qpos-v0", segment_length=5)
    assert all(s["qpos"].shape == (5, 1) for s in segs)
    assert [s["info"]["jerk"] for s in segs] == [0.0, 0.0, pytest.approx(36.0), pytest.approx(36.0)]
    out = minari_pairs("qpos-v0", segment_length=5, label="smoothness", pairs=4, seed=0)
    assert all(r["chosen"]["episode"] == 0 and r["rejected"]["episode"] == 1 for r in out.rows)
    with pytest.raises(DpokitError, match=r"segment_length must be >= 4 .*third finite difference of qpos"):
        minari_pairs("qpos-v0", segment_length=3)


def test_a_dataset_recorded_by_minaris_data_collector(root):
    pytest.importorskip("jax")  # DataCollector's episode buffer needs minari[create]
    env = minari.DataCollector(gym.make("Pendulum-v1", max_episode_steps=40))
    env.reset(seed=0)
    env.action_space.seed(0)
    for _ in range(100):
        _, _, terminated, truncated, _ = env.step(env.action_space.sample())
        if terminated or truncated:
            env.reset()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        env.create_dataset("dpokit/collected-v0", algorithm_name="random")
    segs, out = dataset_segments("dpokit/collected-v0", segment_length=10)
    assert out.counts["episodes"] == 3 and out.counts["steps"] == 100 and len(segs) == 4 + 4 + 2
    assert all(_pendulum_step_ok(s["obs"][t], s["actions"][t, 0], s["obs"][t + 1]) for s in segs for t in range(9))


# ---------------------------------------------------------------- outputs and the command line


def test_cli_npz_and_jsonl_load_in_the_policy_family(pendulum, tmp_path, capsys):
    from dpokit.families import get_family
    from dpokit.families.policy.models import Spec

    npz, jsonl = tmp_path / "pairs.npz", tmp_path / "pairs.jsonl"
    for out in (npz, jsonl):  # by path, and by id under MINARI_DATASETS_PATH
        where = str(pendulum) if out is npz else "dpokit/pendulum/random-v0"
        assert main(["data", "build", "minari", where, str(out), "--segment-length", "6", "--label", "return",
                     "--pairs", "12"]) == 0
        assert "segments: 10" in capsys.readouterr().out  # 5 + 4 + 1
    d = np.load(npz)
    assert d["chosen_obs"].shape == d["rejected_obs"].shape == (12, 6, 3)
    assert d["chosen_actions"].shape == d["rejected_actions"].shape == (12, 6, 1)
    assert np.all(d["chosen_return"] > d["rejected_return"]) and np.all(d["weight"] == 1.0)
    rows = [json.loads(line) for line in jsonl.read_text().splitlines()]
    assert len(rows) == 12 and set(rows[0]) == {"chosen", "rejected", "weight"}
    assert np.array(rows[0]["chosen"]["obs"]).shape == (6, 3) and np.array(rows[0]["chosen"]["actions"]).shape == (6, 1)
    family, spec = get_family("policy"), Spec("tanh_gaussian", 3, 1, (-2.0,), (2.0,))
    a, b = family.examples(str(npz), spec, None), family.examples(str(jsonl), spec, None)
    assert len(a) == 12 and family.fingerprint(a) == family.fingerprint(b)
    # unlabelled pairs, from the data/ folder itself
    out = tmp_path / "open.npz"
    assert main(["data", "build", "minari", str(pendulum / "data"), str(out), "--segment-length", "8",
                 "--unlabelled"]) == 0
    d = np.load(out)
    assert d["a_obs"].shape == (3, 8, 3) and d["b_actions"].shape == (3, 8, 1)


def test_the_id_lookup_and_its_miss(pendulum, root, tmp_path, monkeypatch):
    assert find_dataset("dpokit/pendulum/random-v0") == pendulum / "data"
    assert find_dataset(pendulum) == find_dataset(pendulum / "data") == pendulum / "data"
    monkeypatch.chdir(tmp_path)  # a relative folder is a folder
    assert find_dataset("minari/dpokit/pendulum/random-v0").resolve() == (pendulum / "data").resolve()
    with pytest.raises(DpokitError, match=f"not under Minari's local root {root}.*does not download"):
        find_dataset("dpokit/pendulum/random-v1")


def _bad_datasets(root, tmp_path):
    """Datasets that are Minari datasets, but not ones dpokit reads."""
    env, buffers = _episodes("Pendulum-v1", (6, 6))
    buffers[1].observations[3, 1] = np.nan
    _create("nan-v0", env, buffers)
    obs_space = gym.spaces.Dict({"x": gym.spaces.Box(-1, 1, (2,))})
    buffer = EpisodeBuffer(id=0, observations={"x": np.zeros((5, 2), np.float32)},
                           actions=np.zeros((4, 1), np.float32), rewards=[0.0] * 4, terminations=[False] * 4,
                           truncations=[False] * 3 + [True])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        minari.create_dataset_from_buffers("dict-v0", [buffer], observation_space=obs_space,
                                           action_space=gym.spaces.Box(-1, 1, (1,)))
    (tmp_path / "empty").mkdir()
    (tmp_path / "file.npz").write_bytes(b"")


@pytest.mark.parametrize("argv, message", [
    (["{tmp}/no_such_folder", "o.jsonl"], "does not download"),
    (["nobody/nothing-v0", "o.jsonl"], "not under Minari's local root"),
    (["{tmp}/empty", "o.jsonl"], "not a Minari dataset"),
    (["{tmp}/file.npz", "o.jsonl"], "is a folder"),
    (["dpokit/pendulum/random-v0", "o.jsonl", "--segment-length", "31"], "longer than every episode (the longest of 3 has 30"),
    (["dpokit/pendulum/random-v0", "o.jsonl", "--segment-length", "2"], "segment_length must be >= 3"),
    (["dpokit/pendulum/random-v0", "o.jsonl", "--segment-length", "20", "--episodes", "1"], "a pair needs 2"),
    (["dpokit/pendulum/random-v0", "o.jsonl", "--label", "json"], "label must be one of"),
    (["dpokit/pendulum/random-v0", "o.jsonl", "--label", "no_such_module:score"], "cannot import label function"),
    (["dpokit/pendulum/random-v0", "o.jsonl", "--unlabelled", "--label", "return"], "drop --label"),
    (["dpokit/pendulum/random-v0", "o.csv"], "must end in .jsonl"),
    (["dpokit/pendulum/random-v0", "o.jsonl", "--episodes", "0"], "episodes must be >= 1"),
    (["nan-v0", "o.npz", "--segment-length", "3"], "nan-v0, episode 1: observations at step 3 (dimension 1) holds a NaN"),
    (["dict-v0", "o.npz"], "the observation space is Dict('x': Box(-1.0, 1.0, (2,), float32))"),
])
def test_cli_errors_are_one_line_and_exit_2(pendulum, root, tmp_path, capsys, argv, message):
    _bad_datasets(root, tmp_path)
    argv = [argv[0].format(tmp=tmp_path), str(tmp_path / argv[1]), *argv[2:]]
    assert main(["data", "build", "minari", *argv]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1, err
    assert "Traceback" not in err and not (tmp_path / argv[1]).exists()
