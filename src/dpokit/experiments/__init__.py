"""Experiments that rerun a result from a paper on a controlled task; `dpokit experiment NAME`.

Nothing in the core imports this package: the command line reaches it through `experiments.cli`, and an
experiment's helpers (segment embeddings, reading checkpoints as policies) live here with it."""

import json
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
