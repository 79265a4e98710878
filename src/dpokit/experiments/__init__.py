"""Experiments that rerun a result from a paper on a controlled task; `dpokit experiment NAME`."""

import json
from pathlib import Path


def update_docs(path: Path, name: str, section: str) -> None:
    """Put `section` into `path` between `<!-- NAME:begin -->` and `<!-- NAME:end -->`, replacing an earlier
    copy; the rest of the file (other experiments' sections) stays as it is."""
    path = Path(path)
    begin, end = f"<!-- {name}:begin -->", f"<!-- {name}:end -->"
    block = f"{begin}\n{section.strip()}\n{end}"
    text = path.read_text(encoding="utf-8") if path.exists() else "# Experiments\n"
    if begin in text and end in text:
        head, rest = text.split(begin, 1)
        text = head + block + rest.split(end, 1)[1]
    else:
        text = text.rstrip("\n") + "\n\n" + block + "\n"
    tmp = path.with_suffix(".md.tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)


def write_docs(results: dict, out_dir, docs_dir, name: str, section: str) -> None:
    """Record the rerun command, save `<out_dir>/<name>.json` and refresh the experiment's docs section."""
    results["command"] += f" --docs {docs_dir}"
    Path(docs_dir).mkdir(parents=True, exist_ok=True)
    (Path(out_dir) / f"{name}.json").write_text(json.dumps(results, indent=2))
    update_docs(Path(docs_dir) / "experiments.md", name, section)
