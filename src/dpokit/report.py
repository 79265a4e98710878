"""`report.html`: a run's metrics over steps, as one self-contained page.

Built from `<output_dir>/metrics.jsonl`. The plots are inline SVG drawn here, with no
script, stylesheet or font fetched from anywhere, so the file opens offline, from disk or
as an attachment. Panels: loss, reward accuracy, reward margin, chosen/rejected rewards,
chosen/rejected log-probs, KL, then one panel for every other logged metric. Training
series are solid lines, eval series (`eval_*`) dashed with markers; hovering a marker shows
its step and value; a metric and its eval twin share a colour.

When the run holds sample grids (`<output_dir>/samples/<name>/grid.png`, see report_samples),
a Samples section shows them side by side, base first, then trained, each under its folder's
name with its rows' prompts beside it; the PNGs are embedded as data URIs, so the page stays
one file.
"""

from __future__ import annotations

import base64
import html
import json
import math
from datetime import datetime, timezone
from pathlib import Path

import yaml

from .errors import DpokitError
from .io import write_text

PALETTE = ["#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf"]
PANELS = [  # (title, metric names without the eval_ prefix)
    ("Loss", ["loss", "nll_loss"]),
    ("Reward accuracy", ["rewards/accuracies"]),
    ("Reward margin", ["rewards/margins"]),
    ("Rewards: chosen / rejected", ["rewards/chosen", "rewards/rejected"]),
    ("Log-probs: chosen / rejected", ["logps/chosen", "logps/rejected"]),
]
SKIP = {"step", "epoch"}
HINTS = {"KL(π ‖ π_ref)": " <code>dpokit eval RUN --prompts FILE</code> estimates it on samples."}
W, H = 440, 250
LEFT, RIGHT, TOP, BOTTOM = 58, 12, 12, 34


def read_metrics(path: Path) -> list[dict]:
    """metrics.jsonl rows; a torn last line (a run killed mid-write) is left out."""
    rows = []
    for line in Path(path).read_text().splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(row, dict) and isinstance(row.get("step"), (int, float)):
            rows.append(row)
    return rows


def _series(rows: list[dict]) -> dict[str, list[tuple[float, float]]]:
    out: dict[str, list[tuple[float, float]]] = {}
    for row in rows:
        for k, v in row.items():
            if k in SKIP or isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                continue
            out.setdefault(k, []).append((float(row["step"]), float(v)))
    for points in out.values():
        points.sort()
    return out


def _panels(series: dict) -> list[tuple[str, list[str]]]:
    """(title, series names) for the fixed panels, a KL panel, then one per remaining metric."""
    used, panels = set(), []
    for title, names in PANELS:
        keys = [k for n in names for k in (n, "eval_" + n) if k in series]
        used.update(keys)
        panels.append((title, keys))
    kl = [k for k in series if "kl" in k.lower().replace("/", "_").split("_")]
    used.update(kl)
    panels.append(("KL(π ‖ π_ref)", kl))
    for k in series:
        if k in used:
            continue
        base = k[5:] if k.startswith("eval_") else k
        keys = [x for x in (base, "eval_" + base) if x in series and x not in used]
        used.update(keys)
        panels.append((base, keys))
    return panels


def _ticks(lo: float, hi: float, n: int = 6) -> list[float]:
    span = hi - lo
    raw = span / n
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw)
    first = math.ceil(lo / step) * step
    return [first + i * step for i in range(int((hi - first) / step + 1e-9) + 1)]


def _fmt(v: float) -> str:
    return "0" if abs(v) < 1e-12 else f"{v:.4g}"


def _chart(title: str, names: list[str], series: dict, colors: dict[str, str]) -> str:
    e = html.escape
    if not names:
        return (f'<figure class="panel empty"><figcaption>{e(title)}</figcaption>'
                f'<p>Not logged in this run.{HINTS.get(title, "")}</p></figure>')
    pts = [p for n in names for p in series[n]]
    x0, x1 = min(p[0] for p in pts), max(p[0] for p in pts)
    y0, y1 = min(p[1] for p in pts), max(p[1] for p in pts)
    if x0 == x1:
        x0, x1 = x0 - 1, x1 + 1
    pad = (y1 - y0) * 0.06 or (abs(y0) * 0.1 or 1.0)
    y0, y1 = y0 - pad, y1 + pad
    pw, ph = W - LEFT - RIGHT, H - TOP - BOTTOM
    sx = lambda x: LEFT + (x - x0) / (x1 - x0) * pw  # noqa: E731
    sy = lambda y: TOP + (y1 - y) / (y1 - y0) * ph  # noqa: E731
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {W} {H}" width="{W}" height="{H}" '
             f'role="img" aria-label="{e(title)}">',
             f'<rect x="{LEFT}" y="{TOP}" width="{pw}" height="{ph}" class="plot"/>']
    for t in _ticks(y0, y1):
        y = sy(t)
        parts.append(f'<line x1="{LEFT}" x2="{LEFT + pw}" y1="{y:.1f}" y2="{y:.1f}" class="grid"/>'
                     f'<text x="{LEFT - 6}" y="{y + 4:.1f}" class="tick" text-anchor="end">{_fmt(t)}</text>')
    for t in _ticks(x0, x1):
        x = sx(t)
        parts.append(f'<line x1="{x:.1f}" x2="{x:.1f}" y1="{TOP}" y2="{TOP + ph}" class="grid"/>'
                     f'<text x="{x:.1f}" y="{TOP + ph + 16}" class="tick" text-anchor="middle">{_fmt(t)}</text>')
    parts.append(f'<text x="{LEFT + pw / 2}" y="{H - 3}" class="axis" text-anchor="middle">step</text>')
    for name in names:
        color, points = colors[name], series[name]
        is_eval = name.startswith("eval_")
        d = " ".join(f"{'M' if i == 0 else 'L'}{sx(x):.1f},{sy(y):.1f}" for i, (x, y) in enumerate(points))
        dash = ' stroke-dasharray="6 4"' if is_eval else ""
        parts.append(f'<path d="{d}" class="series" data-metric="{e(name)}" data-points="{len(points)}" '
                     f'stroke="{color}"{dash}/>')
        if is_eval or len(points) <= 60:
            for x, y in points:
                parts.append(f'<circle cx="{sx(x):.1f}" cy="{sy(y):.1f}" r="{3 if is_eval else 2}" fill="{color}">'
                             f'<title>{e(name)} at step {_fmt(x)}: {y:.6g}</title></circle>')
    parts.append("</svg>")
    legend = "".join(f'<span class="key"><i style="border-top:3px {"dashed" if n.startswith("eval_") else "solid"} '
                     f'{colors[n]}"></i>{e(n)} '
                     f'<b>{series[n][-1][1]:.4g}</b></span>' for n in names)
    return (f'<figure class="panel" data-title="{e(title)}"><figcaption>{e(title)}</figcaption>'
            f'{"".join(parts)}<div class="legend">{legend}</div></figure>')


CSS = """
body{font:14px/1.4 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:24px;color:#222;background:#fff}
h1{font-size:20px;margin:0 0 4px} .meta{color:#555;margin:0 0 16px}
.grid-panels{display:flex;flex-wrap:wrap;gap:16px}
.panel{margin:0;padding:8px;border:1px solid #ddd;border-radius:6px;width:440px}
.panel figcaption{font-weight:600;margin-bottom:4px} .panel.empty p{color:#777;margin:8px 0}
svg .plot{fill:#fafafa;stroke:#ccc} svg .grid{stroke:#e6e6e6} svg .tick{font-size:10px;fill:#555}
svg .axis{font-size:11px;fill:#555} svg .series{fill:none;stroke-width:2;stroke-linejoin:round}
.legend{font-size:12px;display:flex;flex-wrap:wrap;gap:4px 12px}
.key i{display:inline-block;width:16px;height:0;margin-right:4px;vertical-align:middle}
table{border-collapse:collapse;font-size:13px;margin:0 0 16px} td,th{padding:2px 10px;text-align:left}
th{border-bottom:1px solid #ccc}
.samples{display:flex;flex-wrap:wrap;gap:16px;align-items:flex-start}
.sample{margin:0;padding:8px;border:1px solid #ddd;border-radius:6px}
.sample figcaption{font-weight:600;margin-bottom:4px} .sample .cells{display:flex}
.sample .rows{display:grid;align-items:center;padding-right:8px;font-size:12px;color:#555;max-width:160px}
.sample img{image-rendering:pixelated;max-width:100%;height:auto}
"""
SAMPLE_ORDER = ("base", "trained")  # the before and the after, left to right; other folders follow by name
MIN_CELL = 64  # px: tiny samples are scaled up (by whole pixels) to at least this


def sample_grids(output_dir: Path) -> list[tuple[str, Path, list | None]]:
    """(folder name, grid.png, the rows' prompts or None) of every sample folder of the run, base first."""
    found = {p.parent.name: p for p in Path(output_dir).glob("samples/*/grid.png")}
    names = [n for n in SAMPLE_ORDER if n in found] + sorted(set(found) - set(SAMPLE_ORDER))
    return [(name, found[name], _prompts(found[name].parent / "prompts.json")) for name in names]


def _prompts(path: Path) -> list | None:
    """A sample folder's prompts, one per grid row; None when missing or unreadable (the grid still shows)."""
    try:
        prompts = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return prompts if isinstance(prompts, list) and prompts else None


def _sample_figure(name: str, grid: Path, prompts: list | None) -> str:
    """One grid as an embedded PNG, under its folder's name, its rows labelled with their prompts."""
    from PIL import Image

    e = html.escape
    try:
        data = grid.read_bytes()
        with Image.open(grid) as img:
            w, h = img.size
    except OSError as err:  # a report is still worth writing without this grid
        return (f'<figure class="sample" data-name="{e(name)}"><figcaption>{e(name)}</figcaption>'
                f"<p>unreadable {e(str(grid.name))}: {e(str(err))}</p></figure>")
    rows = len(prompts) if prompts and h % len(prompts) == 0 else 1
    scale = max(1, -(-MIN_CELL // (h // rows)))
    labels = ""
    if prompts and rows == len(prompts):
        cells = "".join(f"<span>{e('(none)' if p is None else str(p))}</span>" for p in prompts)
        labels = f'<div class="rows" style="grid-template-rows:repeat({rows},1fr)">{cells}</div>'
    uri = "data:image/png;base64," + base64.b64encode(data).decode("ascii")
    return (f'<figure class="sample" data-name="{e(name)}"><figcaption>{e(name)}</figcaption><div class="cells">'
            f'{labels}<img src="{uri}" width="{w * scale}" height="{h * scale}" alt="{e(name)} samples"></div>'
            f"</figure>")


def _samples_section(grids: list[tuple[str, Path, list | None]]) -> str:
    if not grids:
        return ""
    figures = "".join(_sample_figure(*g) for g in grids)
    return ('<h2>Samples</h2><p class="meta">rows: prompts · columns: samples; grids drawn with the same seed start '
            f'each column from the same noise</p><div class="samples">{figures}</div>')


def render_report(rows: list[dict], title: str, config: dict | None = None,
                  grids: list[tuple[str, Path, list | None]] = ()) -> str:
    series = _series(rows)
    names = list(series)
    colors, panel_html = {}, []
    for panel_title, keys in _panels(series):
        bases = list(dict.fromkeys(k.removeprefix("eval_") for k in keys))  # a metric and its eval_ twin: one colour
        for k in keys:
            colors[k] = PALETTE[bases.index(k.removeprefix("eval_")) % len(PALETTE)]
        panel_html.append(_chart(panel_title, keys, series, colors))
    e = html.escape
    cfg = config or {}
    facts = [f"{k}: {e(str(cfg[k]))}" for k in ("model", "ref_model", "loss_type", "beta", "learning_rate", "lora")
             if cfg.get(k) is not None]
    last_step = int(max((points[-1][0] for points in series.values()), default=0))
    stamp = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    final = "".join(f"<tr><td>{e(n)}</td><td>{series[n][-1][1]:.6g}</td><td>{_fmt(series[n][-1][0])}</td></tr>"
                    for n in names)
    table = (f"<table><tr><th>metric</th><th>last value</th><th>at step</th></tr>{final}</table>" if names
             else "<p>No metrics were logged yet.</p>")
    return (f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>{e(title)}</title>'
            f"<style>{CSS}</style></head><body><h1>{e(title)}</h1>"
            f'<p class="meta">{" · ".join(facts + [f"{last_step} steps", f"written {stamp}"])}</p>'
            f'<div class="grid-panels">{"".join(panel_html)}</div>{_samples_section(list(grids))}'
            f"<h2>Last values</h2>{table}</body></html>")


def write_report(output_dir: str | Path) -> Path:
    """Write `<output_dir>/report.html` from its metrics.jsonl (and config.yaml and sample grids, if there); returns
    the path."""
    out = Path(output_dir)
    metrics = out / "metrics.jsonl"
    if not metrics.is_file():
        raise DpokitError(f"{out}: no metrics.jsonl here; is this a dpokit run's output dir?")
    rows = read_metrics(metrics)
    config = None
    if (out / "config.yaml").exists():
        try:
            config = yaml.safe_load((out / "config.yaml").read_text())
        except yaml.YAMLError:
            config = None
    page = render_report(rows, f"dpokit run: {out.resolve().name}", config if isinstance(config, dict) else None,
                         sample_grids(out))
    path = out / "report.html"
    write_text(path, page)
    return path
