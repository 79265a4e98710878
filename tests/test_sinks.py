"""Each metric sink writes what it was given, in a form its own tools read back."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from dpokit.errors import DpokitError
from dpokit.sinks import JsonlSink, make_sinks

ROWS = {1: {"loss": 0.69, "rewards/accuracies": 0.5}, 2: {"loss": 0.61, "rewards/accuracies": 0.75},
        3: {"loss": 0.55, "rewards/accuracies": 1.0}}
CONFIG = {"beta": 0.1, "learning_rate": 5e-7, "loss_type": "sigmoid", "lora": None}


def _log(sinks, rows):
    for step, metrics in rows.items():
        for s in sinks:
            s.log(step, metrics)
    for s in sinks:
        s.close()


def test_jsonl_truncates_to_the_resume_step(tmp_path):
    _log([JsonlSink(tmp_path)], ROWS)
    _log([JsonlSink(tmp_path, resume_step=1)], {2: {"loss": 0.4}})
    rows = [json.loads(ln) for ln in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert rows == [{"step": 1, **ROWS[1]}, {"step": 2, "loss": 0.4}]


def test_unknown_and_missing_sinks_are_user_errors(tmp_path, monkeypatch):
    with pytest.raises(DpokitError, match="unknown report_to sink.*comet"):
        make_sinks(["jsonl", "comet"], tmp_path, CONFIG)
    import importlib.util
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    with pytest.raises(DpokitError, match=r"wandb, which is not installed.*dpokit\[logging\]"):
        make_sinks(["wandb"], tmp_path, CONFIG)
    assert [type(s).__name__ for s in make_sinks(["none"], tmp_path, CONFIG)] == ["JsonlSink"]


def test_tensorboard_scalars_read_back_and_resume_purges(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    _log(make_sinks(["tensorboard"], tmp_path, CONFIG), ROWS)
    _log(make_sinks(["tensorboard"], tmp_path, CONFIG, resume_step=2), {3: {"loss": 0.3, "rewards/accuracies": 0.9}})
    acc = EventAccumulator(str(tmp_path / "tensorboard"))
    acc.Reload()
    assert {"loss", "rewards/accuracies"} <= set(acc.Tags()["scalars"])
    loss = [(e.step, round(e.value, 6)) for e in acc.Scalars("loss")]
    assert loss == [(1, 0.69), (2, 0.61), (3, 0.3)]  # the first run's step 3 is purged
    assert acc.Tensors("config/text_summary")  # the config is recorded once, as text
    assert (tmp_path / "metrics.jsonl").exists()  # JSONL is always written


def test_mlflow_local_store_reads_back_and_resume_continues_the_run(tmp_path, monkeypatch):
    pytest.importorskip("mlflow")
    pytest.importorskip("sqlalchemy")
    from mlflow.tracking import MlflowClient

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "dpokit-test")
    _log(make_sinks(["mlflow"], tmp_path, CONFIG), ROWS)
    run_id = (tmp_path / "mlflow_run_id").read_text().strip()
    _log(make_sinks(["mlflow"], tmp_path, CONFIG, resume_step=3), {4: {"loss": 0.5, "rewards/accuracies": 1.0}})
    assert (tmp_path / "mlflow_run_id").read_text().strip() == run_id

    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path.resolve() / 'mlflow.db'}")
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params["beta"] == "0.1" and "lora" not in run.data.params
    history = sorted((m.step, m.value) for m in client.get_metric_history(run_id, "rewards/accuracies"))
    assert history == [(1, 0.5), (2, 0.75), (3, 1.0), (4, 1.0)]
    assert run.data.metrics["loss"] == 0.5
    assert client.get_experiment_by_name("dpokit-test").experiment_id == run.info.experiment_id


def test_wandb_offline_run_reads_back(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    for var in ("WANDB_MODE", "WANDB_PROJECT", "WANDB_API_KEY"):
        monkeypatch.delenv(var, raising=False)  # offline is the default: no key, no network
    _log(make_sinks(["wandb"], tmp_path, CONFIG), ROWS)
    run_id = (tmp_path / "wandb_run_id").read_text().strip()
    [run_dir] = (tmp_path / "wandb").glob(f"offline-run-*-{run_id}")
    wandb_cli = Path(sys.executable).with_name("wandb")
    out = subprocess.run([str(wandb_cli) if wandb_cli.exists() else shutil.which("wandb"), "leet", "inspect",
                          "--json", str(run_dir)], capture_output=True, text=True, timeout=120,
                         env={**os.environ, "WANDB_MODE": "offline"})
    assert out.returncode == 0, out.stderr
    records = [json.loads(ln) for ln in out.stdout.splitlines() if ln.startswith("{")]
    history = {r["history"]["step"]["num"]: r["history"]["item"] for r in records if r["type"] == "history"}
    assert {s: {k: history[s][k] for k in ROWS[s]} for s in history} == ROWS
    config = [r for r in records if r["type"] == "run"]
    assert config, "the run record (with the config) is in the log"
