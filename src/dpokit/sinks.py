"""Where logged metrics go. `report_to` in the config picks the sinks; JSONL is always written.

Names as in transformers' `report_to`: `tensorboard`, `mlflow`, `wandb`, `all` (every one of
the three that is installed), `none`/`jsonl` (the JSONL file alone). Each of the three is an
optional install (`pip install 'dpokit[logging]'`), imported only when asked for. Every sink
writes under the run's output dir, and none needs a network:

- tensorboard: event files in `<output_dir>/tensorboard` (`tensorboard --logdir` reads them);
- mlflow: `MLFLOW_TRACKING_URI` when set, else a local SQLite store `<output_dir>/mlflow.db`
  (`mlflow ui --backend-store-uri sqlite:///<output_dir>/mlflow.db`); experiment from
  `MLFLOW_EXPERIMENT_NAME`, default "dpokit";
- wandb: offline unless `WANDB_MODE` says otherwise; the run lands in `<output_dir>/wandb`
  (`wandb sync` uploads it later); project from `WANDB_PROJECT`, default "dpokit".

On resume every sink takes up where the checkpoint left off: the JSONL file and TensorBoard
drop what was logged after the resume step, MLflow and W&B continue the same run (their
stores cannot forget points, so steps between the checkpoint and the crash appear twice in
MLflow; W&B ignores steps that go backwards).
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import time
from pathlib import Path

from .errors import DpokitError

OPTIONAL = {"tensorboard": "tensorboard", "mlflow": "mlflow", "wandb": "wandb"}  # sink → module it needs


class JsonlSink:
    """`<output_dir>/metrics.jsonl`: one JSON object per logged step."""

    def __init__(self, output_dir: Path, resume_step: int | None = None):
        self.path = Path(output_dir) / "metrics.jsonl"
        if resume_step is None:
            self.path.write_text("")
        elif self.path.exists():  # drop what was logged after the checkpoint: it will be logged again
            kept = [ln for ln in self.path.read_text().splitlines() if ln and json.loads(ln)["step"] <= resume_step]
            self.path.write_text("".join(ln + "\n" for ln in kept))

    def log(self, step: int, metrics: dict[str, float]) -> None:
        with self.path.open("a") as f:
            f.write(json.dumps({"step": step, **metrics}) + "\n")

    def close(self) -> None:
        pass


class TensorBoardSink:
    """Scalars under their metric names; the config as a text summary."""

    def __init__(self, output_dir: Path, config: dict, resume_step: int | None = None):
        from torch.utils.tensorboard import SummaryWriter

        # purge_step hides events at or after it that an earlier, interrupted run wrote
        self.writer = SummaryWriter(str(Path(output_dir) / "tensorboard"),
                                    purge_step=None if resume_step is None else resume_step + 1)
        if resume_step is None:
            self.writer.add_text("config", "```\n" + json.dumps(config, indent=2, default=str) + "\n```")

    def log(self, step: int, metrics: dict[str, float]) -> None:
        for name, value in metrics.items():
            self.writer.add_scalar(name, value, step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class MlflowSink:
    """One MLflow run per training run; its id is kept in `<output_dir>/mlflow_run_id` for resumes."""

    def __init__(self, output_dir: Path, config: dict, resume_step: int | None = None):
        from mlflow.tracking import MlflowClient

        out = Path(output_dir).resolve()
        uri = os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{out / 'mlflow.db'}"
        self.client = MlflowClient(tracking_uri=uri)
        name = os.environ.get("MLFLOW_EXPERIMENT_NAME", "dpokit")
        experiment = self.client.get_experiment_by_name(name)
        experiment_id = experiment.experiment_id if experiment else self.client.create_experiment(
            name, artifact_location=(out / "mlartifacts").as_uri())
        id_file = out / "mlflow_run_id"
        if resume_step is not None and id_file.exists():
            self.run_id = id_file.read_text().strip()
        else:
            self.run_id = self.client.create_run(experiment_id, run_name=out.name).info.run_id
            id_file.write_text(self.run_id + "\n")
            self._log_params(config)

    def _log_params(self, config: dict) -> None:
        from mlflow.entities import Param

        params = [Param(k, str(v)[:6000]) for k, v in config.items() if v is not None]
        for start in range(0, len(params), 100):  # MLflow's batch limit
            self.client.log_batch(self.run_id, params=params[start:start + 100])

    def log(self, step: int, metrics: dict[str, float]) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        batch = [Metric(k, float(v), now, step) for k, v in metrics.items() if math.isfinite(v)]
        self.client.log_batch(self.run_id, metrics=batch)

    def close(self) -> None:
        self.client.set_terminated(self.run_id)


class WandbSink:
    """A W&B run, offline by default; its id is kept in `<output_dir>/wandb_run_id` for resumes."""

    def __init__(self, output_dir: Path, config: dict, resume_step: int | None = None):
        import wandb

        out = Path(output_dir).resolve()
        id_file = out / "wandb_run_id"
        run_id = id_file.read_text().strip() if resume_step is not None and id_file.exists() else None
        self.run = wandb.init(
            mode=os.environ.get("WANDB_MODE", "offline"), dir=str(out), project=os.environ.get("WANDB_PROJECT", "dpokit"),
            name=out.name, id=run_id, resume="allow" if run_id else None, config=config,
            settings=wandb.Settings(console="off", silent=True),
        )
        id_file.write_text(self.run.id + "\n")

    def log(self, step: int, metrics: dict[str, float]) -> None:
        self.run.log(dict(metrics), step=step)

    def close(self) -> None:
        self.run.finish()


SINKS = {"tensorboard": TensorBoardSink, "mlflow": MlflowSink, "wandb": WandbSink}


def make_sinks(report_to: list[str], output_dir: Path, config: dict, resume_step: int | None = None) -> list:
    names = list(dict.fromkeys(report_to))  # in order, once each
    unknown = [n for n in names if n not in (*SINKS, "jsonl", "none", "all")]
    if unknown:
        raise DpokitError(f"unknown report_to sink(s): {', '.join(unknown)}; known: jsonl, {', '.join(SINKS)}, all, none")
    if "all" in names:
        names = [n for n in SINKS if importlib.util.find_spec(OPTIONAL[n]) is not None]
    wanted = [n for n in names if n in SINKS]
    missing = [n for n in wanted if importlib.util.find_spec(OPTIONAL[n]) is None]
    if missing:
        raise DpokitError(f"report_to names {', '.join(missing)}, which is not installed; "
                          f"pip install 'dpokit[logging]' (or drop it from report_to)")
    sinks = [JsonlSink(output_dir, resume_step)]
    try:
        for name in wanted:
            sinks.append(SINKS[name](Path(output_dir), config, resume_step))
    except BaseException:
        for s in sinks:
            s.close()
        raise
    return sinks
