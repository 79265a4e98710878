"""Before/after rollouts of a policy run in report.html: the policy family's `sample` (an episode per reset seed,
frames at evenly spaced steps, or plots where nothing renders) through the shared samples path (report_samples).
Reacher-v5 renders with MuJoCo (MUJOCO_GL=egl); where it cannot, the same tests see the plots."""

from __future__ import annotations

import base64
import re
from pathlib import Path

import numpy as np
import pytest
import yaml

pytest.importorskip("gymnasium")
pytest.importorskip("mujoco")
from PIL import Image  # noqa: E402
from test_policy_family import config, segments, write  # noqa: E402

from dpokit.cli import main  # noqa: E402
from dpokit.errors import DpokitError  # noqa: E402
from dpokit.families import get_family  # noqa: E402
from dpokit.families.policy.sampling import FIGURE_DPI, FIGURE_SIZE, steps_to_show  # noqa: E402

ENV, OBS, ACT = "Reacher-v5", 10, 2
FIGURE = (int(FIGURE_SIZE[0] * FIGURE_DPI), int(FIGURE_SIZE[1] * FIGURE_DPI))


def train_yaml(tmp_path: Path, **own) -> Path:
    """`dpokit train` of a fresh MLP on Reacher's spaces, with the family's own keys beside the shared ones; a
    large learning rate, so that training moves the policy."""
    data = write(segments(8, obs_dim=OBS, act_dim=ACT), tmp_path / "pairs.jsonl")
    cfg = config(tmp_path, data, learning_rate=0.3, max_steps=3)
    flat = {k: v for k, v in cfg.to_dict().items() if k not in ("family_config", "obs_dim", "act_dim")}
    flat.update({"policy_head": "gaussian", "policy_hidden": [16], "env_id": ENV})  # the spaces from env_id
    flat.update(own)
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump({k: v for k, v in flat.items() if v is not None}))
    return path


def data_uris(page: str) -> list[bytes]:
    return [base64.b64decode(m) for m in re.findall(r'<img src="data:image/png;base64,([^"]+)"', page)]


def pixels(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path))


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("reacher")
    assert main(["train", str(train_yaml(tmp, sample_prompts=[0, 1], sample_num=3))]) == 0
    return tmp / "out"


def test_train_with_sample_prompts_puts_before_and_after_rollouts_in_the_report(run, capsys):
    grids = [run / "samples" / name / "grid.png" for name in ("base", "trained")]
    page = (run / "report.html").read_text()
    assert "<h2>Samples</h2>" in page and data_uris(page) == [g.read_bytes() for g in grids]
    assert page.index('data-name="base"') < page.index('data-name="trained"')
    assert "<span>0</span><span>1</span>" in page  # rows named by their episode seeds
    size = Image.open(grids[0]).size
    rendered = size != (FIGURE[0], 2 * FIGURE[1])
    if rendered:  # three frames per episode, two episodes
        w, h = Image.open(run / "samples" / "base" / "0-0.png").size
        assert size == (3 * w, 2 * h) and (run / "samples" / "base" / "1-2.png").is_file()
    assert not np.array_equal(pixels(grids[0]), pixels(grids[1]))  # training moved the policy

    # `dpokit sample RUN --base` redraws the base's grid exactly (deterministic rollouts from the same seeds)
    out = run.parent / "again"
    assert main(["sample", str(run), "--base", "--prompts", "0", "1", "--num", "3", "--out", str(out)]) == 0
    assert "grid.png" in capsys.readouterr().out
    assert np.array_equal(pixels(out / "grid.png"), pixels(grids[0]))
    assert main(["sample", str(run), "--prompts", "0", "1", "--num", "3", "--out", str(run.parent / "t")]) == 0
    assert np.array_equal(pixels(run.parent / "t" / "grid.png"), pixels(grids[1]))


def test_rollout_frames_are_deterministic_and_evenly_spaced(run):
    family = get_family("policy")
    model, spec = family.load_trained(str(run), None)
    assert spec.env_id is None
    with pytest.raises(DpokitError, match="need env_id"):
        family.sample(model, spec, [0])
    model, spec = family.load_trained(str(run), _cfg(run))
    assert spec.env_id == ENV and not model.training

    first = family.sample(model, spec, [3, 4], num_generations=4)
    again = family.sample(model, spec, ["3", 4], num_generations=4)  # digits, as `dpokit sample --prompts` gives
    flat = [np.asarray(img) for row in first for img in row]
    assert all(np.array_equal(a, np.asarray(b)) for a, b in zip(flat, [img for row in again for img in row]))
    if first[0][0].size != FIGURE:
        assert [len(row) for row in first] == [4, 4]
        assert not np.array_equal(flat[0], flat[3])  # step 0 and the last state differ
        assert not np.array_equal(flat[1], flat[5])  # two episodes differ
    assert steps_to_show(50, 4) == [0, 17, 33, 50] and steps_to_show(50, 1) == [0]


def _cfg(run: Path):
    from dpokit.config import load_config

    return load_config(run / "config.yaml")


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")  # gymnasium's viewer.__del__
def test_without_rendering_each_episode_is_one_plot(run, monkeypatch):
    """A renderer that cannot start (here an unknown MUJOCO_GL) gives one figure of qpos and actions per episode."""
    from dpokit.images import write_images

    monkeypatch.setenv("MUJOCO_GL", "no-such-backend")
    family = get_family("policy")
    model, spec = family.load_trained(str(run), _cfg(run))
    rows = family.sample(model, spec, [0, 1], num_generations=3)
    assert [len(row) for row in rows] == [1, 1] and rows[0][0].size == FIGURE
    assert not np.array_equal(np.asarray(rows[0][0]), np.asarray(rows[1][0]))
    paths = write_images(rows, run.parent / "plots")
    assert Image.open(paths[-1]).size == (FIGURE[0], 2 * FIGURE[1])


def test_bad_sample_settings_are_one_line(run, tmp_path, capsys):
    for args, problem in [(["--prompts", "0,1"], "prompt 1: '0,1' is not an episode seed"),
                          (["--prompts", "0", "--steps", "5"], "take no num_inference_steps")]:
        assert main(["sample", str(run), *args, "--out", str(tmp_path / "x")]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and problem in err[0], err
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("own, problem", [
    ({"sample_prompts": ["a"]}, "sample_prompts: each prompt is an episode's reset seed .*got 'a'"),
    ({"sample_prompts": "0"}, "sample_prompts must be a non-empty list of episode seeds"),
    ({"sample_prompts": [0], "env_id": None, "obs_dim": OBS, "act_dim": ACT}, "sample_prompts needs env_id"),
    ({"sample_prompts": [0], "obs_dim": 3}, "sample_prompts: env_id 'Reacher-v5' has observations of size 10, the "
                                            "policy's are of size 3"),
    ({"sample_prompts": [0], "sample_num": 0}, "sample_num must be a positive number"),
])
def test_bad_sample_prompts_fail_before_training(tmp_path, capsys, own, problem):
    assert main(["train", str(train_yaml(tmp_path, **own))]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and re.search(problem, err[0]), err
    assert not (tmp_path / "out" / "metrics.jsonl").exists()
