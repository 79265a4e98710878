"""Where logged metrics go. `report_to` in the config picks the sinks; JSONL is always written."""

from __future__ import annotations

import json
from pathlib import Path


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


def make_sinks(report_to: list[str], output_dir: Path, config: dict, resume_step: int | None = None) -> list:
    sinks = [JsonlSink(output_dir, resume_step)]
    unknown = [name for name in report_to if name not in ("jsonl", "none")]
    if unknown:
        from .errors import DpokitError
        raise DpokitError(f"unknown report_to sink(s): {', '.join(unknown)}")
    return sinks
