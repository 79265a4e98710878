"""Experiments that rerun a result from a paper on a controlled task; `dpokit experiment NAME`.

Nothing in the core imports this package: the command line reaches it through `experiments.cli`, and an
experiment's helpers (segment embeddings, reading checkpoints as policies) live here with it."""

import json
import time
from pathlib import Path

from ..io import write_text


def update_docs(path: Path, name: str, section: str, keep: str | None = None) -> None:
    """Put `section` into `path` between `<!-- NAME:begin -->` and `<!-- NAME:end -->`, replacing an earlier
    copy; the rest of the file (other experiments' sections) stays as it is. `section` may already carry the two
    markers (frontier's does, so frontier.md holds the same block).

    `keep`: a marker in the section after which the text is hand-written (a reading of the numbers): the new
    section's text after it is replaced by the old copy's, so a rerun refreshes the tables and keeps the reading."""
    begin, end = f"<!-- {name}:begin -->", f"<!-- {name}:end -->"
    body = section.strip().removeprefix(begin).removesuffix(end).strip()
    block = f"{begin}\n{body}\n{end}"
    text = Path(path).read_text(encoding="utf-8") if Path(path).exists() else "# Experiments\n"
    if begin in text and end in text:
        head, rest = text.split(begin, 1)
        old, tail = rest.split(end, 1)
        if keep and keep in body and keep in old:
            block = f"{begin}\n{body.split(keep, 1)[0]}{keep}{old.split(keep, 1)[1]}{end}"
        text = head + block + tail
    else:
        text = text.rstrip("\n") + "\n\n" + block + "\n"
    write_text(path, text)


def write_docs(results: dict, out_dir, docs_dir, name: str, section: str, keep: str | None = None) -> None:
    """Record the rerun command, save `<out_dir>/<name>.json` and refresh the experiment's docs section (`keep`: as
    in `update_docs`, the hand-written text after that marker survives the rerun)."""
    results["command"] += f" --docs {docs_dir}"
    write_text(Path(out_dir) / f"{name}.json", json.dumps(results, indent=2))
    update_docs(Path(docs_dir) / "experiments.md", name, section, keep=keep)


def say(t0: float, msg: str) -> None:
    """A progress line with the seconds since `t0`."""
    print(f"[{time.time() - t0:6.0f}s] {msg}", flush=True)


def training_log(result) -> dict:
    """A `dpokit.train` result's steps and its first and last logged loss, margins, accuracies and log-probs: what
    a reading of an experiment needs from the training logs."""
    keep = ("loss", "rewards/margins", "rewards/accuracies", "logps/chosen", "logps/rejected")
    rows = [r for r in result.history if "loss" in r]
    log = {"steps": result.global_step}
    if rows:
        log["first"] = {k: rows[0][k] for k in keep if k in rows[0]}
        log["last"] = {k: rows[-1][k] for k in keep if k in rows[-1]}
    return log


def finish(results: dict, out_dir, name: str, table: str, docs_dir=None, section: str | None = None,
           keep: str | None = None) -> None:
    """An experiment's last step: `<out_dir>/<name>.json`, the table printed, and with `docs_dir` its docs section
    (`write_docs`, which saves the json with the rerun command)."""
    if docs_dir is None:
        write_text(Path(out_dir) / f"{name}.json", json.dumps(results, indent=2))
    print(table)
    if docs_dir is not None:
        write_docs(results, out_dir, docs_dir, name, section, keep=keep)
