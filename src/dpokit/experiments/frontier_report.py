"""Reading the frontier experiment's points: envelopes and mixtures per KL budget, the noisy-label
comparison, the SVG plot and the docs section. Pure functions of what frontier.json holds."""

from __future__ import annotations

import html
import math
from pathlib import Path

from ..report import PALETTE, _fmt, _ticks
from . import update_docs

FLIP_FRACTION = 0.2
SMOOTHING = 0.2  # cDPO's and robust DPO's assumed flip rate: the true one of the noisy pairs
REFERENCE_METHODS = ("DPO", "IPO", "cDPO", "robust DPO")  # the DPO family: trained against π_SFT


def line_description(demo: dict) -> str:
    return ("`dpokit.demo_task` (a positive line about a subject; exact ground-truth reward in [-1, 1], -1 for "
            "anything malformed) stands in for IMDb sentiment, and a "
            f"{demo['hidden']}-wide, {demo['layers']}-layer Llama trained from scratch "
            f"(`dpokit.demo.warm_up`, {demo['sft_steps']} steps) is the SFT model.")


# ---------------------------------------------------------------- reading the points

KL_BUDGETS = (0.25, 0.5, 1.0, 2.0)


def envelope(points: list[dict], methods, kl_budget: float, labels: str = "clean") -> float | None:
    """The best reward among the points of `methods` with KL ≤ `kl_budget` (the SFT model counts: KL 0)."""
    kept = [p["reward"] for p in points if p["labels"] == labels and p["kl"] <= kl_budget
            and (p["method"] in methods or p["method"] == "SFT")]
    return max(kept) if kept else None


def mixture_frontier(points: list[dict], methods, kl: float, labels: str = "clean") -> float | None:
    """The best reward at KL ≤ `kl` of a random mixture of the points of `methods` (the SFT model counts):
    drawing a reply from checkpoint i with probability λ_i gives reward Σλ_i·r_i at KL ≤ Σλ_i·KL_i (KL is
    convex), so the upper concave hull of a method's points is reachable, between checkpoints too."""
    pts = sorted((p["kl"], p["reward"]) for p in points if p["labels"] == labels
                 and (p["method"] in methods or p["method"] == "SFT"))
    best = None
    for i, (k1, r1) in enumerate(pts):
        if k1 <= kl:
            best = r1 if best is None else max(best, r1)
        for k2, r2 in pts[i + 1:]:
            if k1 <= kl < k2:
                best = max(best if best is not None else r1, r1 + (r2 - r1) * (kl - k1) / (k2 - k1))
    return best


def _run_points(points, method, labels, beta=None, replicate=0):
    return sorted((p for p in points if p["method"] == method and p["labels"] == labels
                   and p.get("replicate", 0) == replicate and (beta is None or math.isclose(p["beta"], beta))),
                  key=lambda p: p["step"])


def _mean(values):
    return sum(values) / len(values)


def _ratio(a, b):
    return a / b if b > 0 else None


def summarize(results: dict) -> dict:
    """The frontier per method at KL budgets, preferred-FT against the DPO family, and the noisy-label
    comparison (mean over replicates)."""
    points, base = results["points"], results["sft_reward"]
    sweep = [p for p in points if p.get("replicate", 0) == 0]  # one run per setting for every method
    methods = list(dict.fromkeys(p["method"] for p in sweep if p["method"] != "SFT" and p["labels"] == "clean"))
    table = {m: {str(b): envelope(sweep, [m], b) for b in KL_BUDGETS} for m in methods}
    family = [m for m in methods if m in REFERENCE_METHODS]
    table["DPO family"] = {str(b): envelope(sweep, family, b) for b in KL_BUDGETS}
    if results.get("optimal"):
        table["KL-optimal policy"] = {str(b): max(q["reward"] for q in results["optimal"] if q["kl"] <= b)
                                      for b in KL_BUDGETS}
    mixture = {m: {str(b): mixture_frontier(sweep, [m], b) for b in KL_BUDGETS}
               for m in ("DPO", "preferred-FT") if m in methods}
    mixture["DPO family"] = {str(b): mixture_frontier(sweep, family, b) for b in KL_BUDGETS}
    # Dominance: for each preferred-FT point, the best reward a method reaches at no more KL.
    pft = _run_points(sweep, "preferred-FT", "clean")
    dominance = {}
    for name, group in (("DPO", ["DPO"]), ("DPO family", family)):
        # A sample estimate of KL can come out below 0 near the SFT model: it is read as 0 (the SFT model's)
        diffs = [envelope(sweep, group, max(p["kl"], 0.0)) - p["reward"] for p in pft]
        mixed = [mixture_frontier(sweep, group, max(p["kl"], 0.0))
                 - mixture_frontier(sweep, ["preferred-FT"], max(p["kl"], 0.0)) for p in pft]
        dominance[name] = {"pft_points": len(diffs), "beaten": sum(d > 0 for d in diffs),
                           "min_diff": min(diffs) if diffs else None,
                           "mean_diff": _mean(diffs) if diffs else None,
                           "mixture_min_diff": min(mixed) if mixed else None,
                           "mixture_mean_diff": _mean(mixed) if mixed else None}
    noisy = {}
    beta = results["noisy_beta"]
    for method in ("DPO", "cDPO", "robust DPO"):
        seeds = []
        for r in range(results.get("replicates", 1)):
            c, n = _run_points(points, method, "clean", beta, r), _run_points(points, method, "noisy", beta, r)
            if not c or not n:
                continue
            best = max(c, key=lambda p: p["reward"])
            noisy_at = {p["step"]: p for p in n}
            seeds.append({"replicate": r, "best_step": best["step"], "best_gain_clean": best["reward"] - base,
                          "best_gain_noisy": max(p["reward"] for p in n) - base,
                          "matched_gain_noisy": noisy_at[best["step"]]["reward"] - base,
                          "last_step": c[-1]["step"], "last_gain_clean": c[-1]["reward"] - base,
                          "last_gain_noisy": n[-1]["reward"] - base, "last_kl_clean": c[-1]["kl"],
                          "last_kl_noisy": n[-1]["kl"]})
        if not seeds:
            continue
        row = {k: _mean([x[k] for x in seeds]) for k in seeds[0] if k not in ("replicate", "best_step", "last_step")}
        per_seed_kept = [_ratio(x["best_gain_noisy"], x["best_gain_clean"]) for x in seeds]
        row.update(replicates=len(seeds), last_step=seeds[0]["last_step"], seeds=seeds,
                   kept_best=_ratio(row["best_gain_noisy"], row["best_gain_clean"]),
                   kept_matched=_ratio(row["matched_gain_noisy"], row["best_gain_clean"]),
                   kept_best_range=[min(per_seed_kept), max(per_seed_kept)] if None not in per_seed_kept else None)
        noisy[method] = row
    return {"envelope": table, "mixture": mixture, "dominance": dominance, "noisy": noisy}


# ---------------------------------------------------------------- plot

MARKERS = {"DPO": "circle", "IPO": "square", "cDPO": "triangle", "robust DPO": "diamond", "preferred-FT": "cross",
           "SFT": "ring"}
COLORS = {"DPO": PALETTE[0], "IPO": PALETTE[2], "cDPO": PALETTE[3], "robust DPO": PALETTE[4],
          "preferred-FT": PALETTE[1], "SFT": "#000000"}
PW, PH, LEFT, TOP, BOTTOM, GAP = 380, 280, 52, 28, 40, 40


def _marker(kind: str, x: float, y: float, color: str, tip: str, hollow: bool = False) -> str:
    r = 4.5
    paint = f'fill="#fff" stroke="{color}" stroke-width="1.5"' if hollow else f'fill="{color}"'
    if kind == "circle":
        shape = f'<circle cx="{x:.1f}" cy="{y:.1f}" r="{r}" {paint}/>'
    elif kind == "square":
        shape = f'<rect x="{x - r:.1f}" y="{y - r:.1f}" width="{2 * r}" height="{2 * r}" {paint}/>'
    elif kind == "triangle":
        shape = (f'<path d="M{x:.1f},{y - r - 1:.1f} L{x + r + 1:.1f},{y + r:.1f} '
                 f'L{x - r - 1:.1f},{y + r:.1f} Z" {paint}/>')
    elif kind == "diamond":
        shape = (f'<path d="M{x:.1f},{y - r - 1:.1f} L{x + r + 1:.1f},{y:.1f} L{x:.1f},{y + r + 1:.1f} '
                 f'L{x - r - 1:.1f},{y:.1f} Z" {paint}/>')
    elif kind == "cross":
        shape = (f'<path d="M{x - r:.1f},{y - r:.1f} L{x + r:.1f},{y + r:.1f} M{x - r:.1f},{y + r:.1f} '
                 f'L{x + r:.1f},{y - r:.1f}" stroke="{color}" stroke-width="{1.2 if hollow else 2.5}" fill="none"/>')
    else:  # ring: the SFT model, where every curve starts
        shape = f'<circle cx="{x:.1f}" cy="{y:.1f}" r="{r + 1}" fill="#fff" stroke="{color}" stroke-width="2"/>'
    return f"<g><title>{html.escape(tip)}</title>{shape}</g>"


def plot_svg(points: list[dict], kl_max: float = 3.0, optimal: list[dict] | None = None) -> str:
    """Reward (y) against KL(π ‖ π_SFT) (x): a clean-label and a noisy-label panel, one marker and colour per
    method, each run's checkpoints joined in step order. Points past `kl_max` (runs that degenerated) are
    drawn on the right edge, hollow, with their real KL in the tooltip. `optimal` (optimal_frontier's
    points) is drawn dashed in both panels."""
    panels = [("clean labels", "clean"), (f"{FLIP_FRACTION:.0%} of labels flipped", "noisy")]
    panels = [x for x in panels if any(p["labels"] == x[1] and p["method"] != "SFT" for p in points)]
    width = max(LEFT + len(panels) * PW + (len(panels) - 1) * GAP + 20, 760)  # the legend's width
    height = TOP + PH + BOTTOM + 46
    x0, x1 = 0.0, kl_max
    # the rewards' range, to a tenth, within the reward bounds [-1, 1] the tasks share
    shown = [p["reward"] for p in points] + [q["reward"] for q in optimal or [] if q["kl"] <= x1]
    y0 = max(-1.0, math.floor(min(shown, default=-1) * 10 - 0.5) / 10)
    y1 = min(1.0, math.ceil(max(shown, default=1) * 10 + 0.5) / 10)
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {width} {height}" width="{width}" '
             f'height="{height}" font-family="sans-serif" role="img" '
             f'aria-label="ground-truth reward against KL to the SFT model">',
             f'<rect width="{width}" height="{height}" fill="#fff"/>']
    for k, (title, labels) in enumerate(panels):
        ox = LEFT + k * (PW + GAP)
        sx = lambda x: ox + (min(x, x1) - x0) / (x1 - x0) * PW  # noqa: E731
        sy = lambda y: TOP + (y1 - y) / (y1 - y0) * PH  # noqa: E731
        parts.append(f'<text x="{ox + PW / 2}" y="{TOP - 10}" font-size="13" text-anchor="middle" '
                     f'font-weight="bold">{html.escape(title)}</text>')
        parts.append(f'<rect x="{ox}" y="{TOP}" width="{PW}" height="{PH}" fill="#fafafa" stroke="#ccc"/>')
        for t in _ticks(y0, y1, 8):
            parts.append(f'<line x1="{ox}" x2="{ox + PW}" y1="{sy(t):.1f}" y2="{sy(t):.1f}" stroke="#e6e6e6"/>'
                         f'<text x="{ox - 6}" y="{sy(t) + 4:.1f}" font-size="10" fill="#555" '
                         f'text-anchor="end">{_fmt(t)}</text>')
        for t in _ticks(x0, x1, 6):
            parts.append(f'<line x1="{sx(t):.1f}" x2="{sx(t):.1f}" y1="{TOP}" y2="{TOP + PH}" stroke="#e6e6e6"/>'
                         f'<text x="{sx(t):.1f}" y="{TOP + PH + 14}" font-size="10" fill="#555" '
                         f'text-anchor="middle">{_fmt(t)}</text>')
        parts.append(f'<text x="{ox + PW / 2}" y="{TOP + PH + 30}" font-size="11" fill="#333" '
                     f'text-anchor="middle">KL(π ‖ π_SFT) on samples, nats (≥ {kl_max:g} drawn at the edge)'
                     '</text>')
        if optimal:
            d = " ".join(f"{'M' if i == 0 else 'L'}{sx(p['kl']):.1f},{sy(p['reward']):.1f}"
                         for i, p in enumerate(q for q in optimal if q["kl"] <= x1))
            parts.append(f'<path d="{d}" fill="none" stroke="#000" stroke-width="1.2" stroke-dasharray="5 4" '
                         f'class="optimum"><title>KL-optimal: π ∝ π_SFT·exp(r/β)</title></path>')
        mine = [p for p in points if p["labels"] == labels]
        runs: dict[tuple, list[dict]] = {}
        for p in mine:
            if p["method"] != "SFT":
                key = (p["method"], p["beta"], p["learning_rate"], p["label_smoothing"], p.get("replicate", 0))
                runs.setdefault(key, []).append(p)
        sft = next((p for p in mine if p["method"] == "SFT"), None)
        for (method, *_), pts in runs.items():
            pts = sorted(pts, key=lambda p: p["step"])
            path = ([sft] if sft else []) + pts
            d = " ".join(f"{'M' if i == 0 else 'L'}{sx(p['kl']):.1f},{sy(p['reward']):.1f}" for i, p in enumerate(path))
            parts.append(f'<path d="{d}" fill="none" stroke="{COLORS[method]}" stroke-width="1" opacity="0.45"/>')
            for p in pts:
                tip = (f"{method} β={p['beta']:g} lr={p['learning_rate']:g} replicate {p.get('replicate', 0)} "
                       f"step {p['step']}: KL {p['kl']:.3f}, "
                       f"reward {p['reward']:+.3f}" +
                       ("" if p["malformed"] is None else f", malformed {p['malformed']:.0%}"))
                parts.append(_marker(MARKERS[method], sx(p["kl"]), sy(p["reward"]), COLORS[method], tip,
                                     hollow=p["kl"] > x1))
        if sft:
            parts.append(_marker("ring", sx(0), sy(sft["reward"]), "#000", f"SFT model: reward {sft['reward']:+.3f}"))
    parts.append(f'<text x="14" y="{TOP + PH / 2}" font-size="11" fill="#333" text-anchor="middle" '
                 f'transform="rotate(-90 14 {TOP + PH / 2})">true reward of samples (held-out prompts)</text>')
    lx, ly = LEFT, TOP + PH + BOTTOM + 18
    shown_methods = {p["method"] for p in points}
    for method in (m for m in ("SFT", "preferred-FT", "DPO", "IPO", "cDPO", "robust DPO") if m in shown_methods):
        parts.append(_marker(MARKERS[method], lx + 6, ly - 4, COLORS[method], method)
                     + f'<text x="{lx + 16}" y="{ly}" font-size="12">{html.escape(method)}</text>')
        lx += 30 + 7 * len(method)
    if optimal:
        parts.append(f'<path d="M{lx},{ly - 4} L{lx + 22},{ly - 4}" stroke="#000" stroke-width="1.2" '
                     f'stroke-dasharray="5 4"/><text x="{lx + 28}" y="{ly}" font-size="12">'
                     'KL-optimal π ∝ π_SFT·exp(r/β)</text>')
    parts.append("</svg>")
    return "\n".join(parts) + "\n"


# ---------------------------------------------------------------- the docs section

BEGIN, END = "<!-- frontier:begin -->", "<!-- frontier:end -->"
READING = "<!-- frontier:reading -->"  # what follows it in the docs is written by hand


def _num(v, fmt="+.3f") -> str:
    return "–" if v is None else format(v, fmt)


def markdown_section(results: dict, svg_name: str = "frontier.svg") -> str:
    s, points = results["summary"], results["points"]
    line_task = results.get("task", "line") == "line"
    description = results.get("task_description") or line_description(results["sizes"])
    lines = [BEGIN if line_task else "", "## Reward vs KL frontier" + ("" if line_task else
                                                                     ": VADER sentiment on HH prompts"), "",
             "The controlled experiment of the DPO paper (Rafailov et al. 2023, Fig. 2) at small scale, on CPU: "
             f"{description} "
             f"{results['pairs']} preference pairs are sampled from it (temperature 1) on the training prompts and "
             "labelled by the true reward. Every method trains on them with `dpokit.train` against the SFT model "
             f"(batch 32, constant learning rate after 5 warm-up steps, {results['max_steps']} steps, a checkpoint "
             f"every {results['eval_every']}); each checkpoint is one point: "
             f"{results['eval_samples_per_prompt']} samples on each of {results['heldout_prompts']} held-out prompts "
             "(no pair uses them), their mean true reward, and KL(π ‖ π_SFT) estimated on the same samples "
             "(mean over samples of log π(y|x) − log π_SFT(y|x), summed over the reply's tokens). "
             "Preferred-FT is SFT on the chosen replies (`loss_type: sft`, no reference).", "",
             f"Rerun: `{results['command']}` ({results['wall_s'] / 60:.1f} min wall, "
             f"{results['cpu_s'] / 60:.1f} min CPU, on {results['machine']}; every point is in the table at the "
             "end and in `frontier.json` in the output dir).", "",
             f"![reward vs KL]({svg_name})", "",
             "Best reward reached at a KL budget (the upper envelope of each method's points, the SFT model "
             "included):", "",
             "| method | " + " | ".join(f"KL ≤ {b:g}" for b in KL_BUDGETS) + " |",
             "|---|" + "---:|" * len(KL_BUDGETS)]
    for method, row in s["envelope"].items():
        lines.append(f"| {method} | " + " | ".join(_num(row[str(b)]) for b in KL_BUDGETS) + " |")
    if s.get("mixture"):
        lines += ["", "Reachable by mixing checkpoints (draw each reply from checkpoint i with probability λ_i: "
                  "reward Σλ_i·r_i at KL ≤ Σλ_i·KL_i, so the upper concave hull of a method's points):", "",
                  "| method | " + " | ".join(f"KL ≤ {b:g}" for b in KL_BUDGETS) + " |",
                  "|---|" + "---:|" * len(KL_BUDGETS)]
        for method, row in s["mixture"].items():
            lines.append(f"| {method} | " + " | ".join(_num(row[str(b)]) for b in KL_BUDGETS) + " |")
    malformed = "" if results["sft_malformed"] is None else f", {results['sft_malformed']:.1%} malformed"
    lines += ["", f"SFT model: reward {results['sft_reward']:+.3f}{malformed}. "
              f"Mean reward of the chosen replies: {results['chosen_reward']:+.3f} (what preferred-FT imitates). "
              "The KL-optimal policy (dashed in the plot) is π ∝ π_SFT·exp(r/β), the optimum of the "
              "KL-regularised objective DPO and IPO solve, i.e. the best reward any policy can have at a given KL; "
              "it is estimated by reweighting the rewards of "
              f"{4 * results['eval_samples_per_prompt']} SFT samples per held-out prompt.", ""]
    d = s["dominance"]
    for name, r in d.items():
        lines.append(f"- {name} vs preferred-FT: {r['beaten']} of the {r['pft_points']} preferred-FT points are "
                     f"beaten by a {name} point with no more KL (best {name} reward at that KL minus preferred-FT's: "
                     f"mean {_num(r['mean_diff'])}, worst {_num(r['min_diff'])}). Mixing checkpoints (the upper "
                     f"concave hull of each method's points), {name} minus preferred-FT at "
                     f"preferred-FT's KLs: mean {_num(r.get('mixture_mean_diff'))}, "
                     f"worst {_num(r.get('mixture_min_diff'))}.")
    if results.get("first_step"):
        f = results["first_step"]
        lines += ["", f"First step at the SFT model, on the {f['pairs']} clean pairs: the cosine between DPO's "
                  f"gradient and preferred-FT's is {f['grad_cosine']:.3f} (their first Adam steps: "
                  f"{f['adam_step_cosine']:.3f}); DPO's gradient on one half of the pairs against the other "
                  f"half's: {f['dpo_halves_grad_cosine']:.3f} ({f['dpo_halves_adam_step_cosine']:.3f}). "
                  "See `first_step_alignment` for why their expectations agree on pairs of on-policy samples."]
    if s["noisy"]:
        lines += _noisy_lines(results)
    lines += ["", "<details><summary>Every point</summary>", "",
              "| labels | method | β | ε | lr | replicate | step | KL | reward | malformed |",
              "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for p in points:
        if p["method"] == "SFT":
            continue
        beta = "–" if p["loss_type"] == "sft" else format(p["beta"], "g")
        lines.append(f"| {p['labels']} | {p['method']} | {beta} | {p['label_smoothing']:g} | {p['learning_rate']:g} "
                     f"| {p['replicate']} | {p['step']} | {p['kl']:.3f} | "
                     f"{p['reward']:+.3f} | {'–' if p['malformed'] is None else format(p['malformed'], '.1%')} |")
    lines += ["", "</details>", ""] + ([READING, "", END, ""] if line_task else [])
    return "\n".join(lines)


def _pct(v) -> str:
    return "–" if v is None else f"{v:.0%}"


def _noisy_lines(results: dict) -> list[str]:
    rows = results["summary"]["noisy"]
    n = results["replicates"]
    lines = ["", f"### {FLIP_FRACTION:.0%} of the labels flipped", "",
             f"The same pairs with a seeded {FLIP_FRACTION:.0%} ({results['flipped']}) of the labels flipped; "
             f"DPO, cDPO (label smoothing {SMOOTHING}) and robust DPO (label smoothing {SMOOTHING}) at β = "
             f"{results['noisy_beta']:g} and the same steps, each on clean and on noisy labels, {n} replicate(s) "
             "(replicate r: flip seed and batch-order seed + r; replicate 0's clean runs are the sweep's). "
             "Gain = reward − SFT reward, the mean over replicates. Kept = noisy gain / the same method's clean "
             "gain, both at each run's best checkpoint (per-replicate range in brackets), and with the noisy "
             "run read at the step where its clean twin peaked (matched steps); the last step shows what is "
             "left when training runs on.", "",
             "| method | clean best gain | noisy best gain | kept (best) | noisy gain, matched step | kept (matched) "
             "| last step: clean gain (KL) | last step: noisy gain (KL) |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for method, r in rows.items():
        span = "" if not r["kept_best_range"] or r["replicates"] < 2 else \
            f" [{r['kept_best_range'][0]:.0%}–{r['kept_best_range'][1]:.0%}]"
        lines.append(f"| {method} | {r['best_gain_clean']:+.3f} | {r['best_gain_noisy']:+.3f} | "
                     f"{_pct(r['kept_best'])}{span} | {r['matched_gain_noisy']:+.3f} | {_pct(r['kept_matched'])} | "
                     f"{r['last_gain_clean']:+.3f} ({r['last_kl_clean']:.2f}) | "
                     f"{r['last_gain_noisy']:+.3f} ({r['last_kl_noisy']:.2f}) |")
    return lines


def update_section(path: Path, section: str) -> None:
    """The line task's section in `path`, other sections untouched; the hand-written reading after `READING` in
    the old copy is kept."""
    update_docs(path, "frontier", section, keep=READING)
