"""Recommenders: DPO against a world model, without collapse (issue 18's demo; `dpokit demo recommender`, and
`dpokit experiment recommender`, the same protocol; `--data LOG` runs it on a real log, its own protocol in
docs/experiments.md, `PROTOCOL_DATA` below).

The protocol (committed in docs/experiments.md before the first run; `PROTOCOL` below is that text, verbatim):

1. a known simulator (recsim.py) writes a log from a popularity-led logging policy;
2. `dpokit data build interactions` (rating negatives, leave-last-out) makes the train/valid/test contexts;
3. a world model (`dpokit.worldmodel.fit_world_model`) is fitted on the log;
4. the BC policy: the recommender family's SASRec trained with `loss_type: sft` on the train rows;
5. the world model labels 20 uniform candidates per train context: the best chosen, the worst (DPO) or the 4 worst
   (S-DPO, DMPO) rejected; DPO, S-DPO and DMPO train from the BC policy on the same contexts;
6. BC, DPO, S-DPO, DMPO and the world model's greedy argmax are measured on the test users: utility in world-model
   rollouts, the simulator's true utility of the same taken items, NDCG@10 / HR@10 of the held-out item, coverage
   and the Gini of exposure of their top-10 lists.

Decision rule: a method meets the goal when its utility ≥ 1.10× BC's, its NDCG@10 ≥ BC's, its coverage ≥ 0.90×
BC's and its true utility > BC's; the collapse claim holds when greedy's coverage is below BC's.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np

from ..config import TrainConfig
from ..errors import DpokitError
from ..families import get_family
from ..io import write_text
from ..ranking import coverage, exposure_gini, hit_rate_at_k, ndcg_at_k
from ..train import train
from . import finish, recsim, say, training_log

NAME = "recommender"
FULL = dict(users=500, items=300, dim=8, shown=30, rating_noise=0.5, high=4.0, low=2.0, wm_patience=3,
            engaged_threshold=4.0, bc_epochs=5, bc_batch=64, bc_lr=1e-3, candidates=20, group=4,
            epochs=2, batch_size=64, learning_rate=5e-4, beta=0.1, horizon=5, k=10)
# The demo is the whole experiment.
DEMO = dict(FULL)
QUICK = dict(FULL, users=60, items=80, bc_epochs=1, epochs=1, horizon=2)
GOAL = {"utility_ratio": 1.10, "coverage_ratio": 0.90}
METHODS = (("bc", "BC (unaligned)"), ("dpo", "DPO"), ("sdpo", "S-DPO"), ("dmpo", "DMPO"),
           ("greedy", "greedy (world model)"))
TUNED = (("dpo", "sigmoid"), ("sdpo", "sdpo"), ("dmpo", "dmpo"))
MEASURES = ("utility", "true_utility", "ndcg@10", "hr@10", "coverage", "gini", "popularity", "ild")
READING = "<!-- recommender:reading -->"  # docs text after this marker is hand-written and survives a rerun
NAME_DATA = "recommender-data"  # the real-log run's json and docs section
READING_DATA = "<!-- recommender-data:reading -->"



def _write_jsonl(rows: list[dict], path: Path) -> Path:
    write_text(path, "".join(json.dumps(r) + "\n" for r in rows))
    return path


def build_interactions(log: Path, catalogue: Path | None, out: Path, size: dict, seed: int) -> dict[str, list[dict]]:
    """`dpokit data build interactions` on the log (its Python functions): rating negatives, leave-last-out, the
    catalogue as `--items`, same-time events in the file's order; writes OUT (+ .valid/.test) and returns the rows
    of each split."""
    from ..recipes.interactions import interactions_to_rows, write

    built = interactions_to_rows(log, negatives="rating", split="leave-last-out", items=catalogue,
                                 high=size["high"], low=size["low"], on_duplicate_time="keep-file-order", seed=seed)
    write(built, out)
    return built.splits


def train_bc(rows_path: Path, catalogue: Path, out: Path, size: dict, seed: int) -> tuple[str, dict]:
    """The BC policy: a fresh SASRec (the family's defaults) trained with `loss_type: sft` on the train rows."""
    cfg = TrainConfig(family="recommender", train_data=str(rows_path), output_dir=str(out), loss_type="sft",
                      learning_rate=size["bc_lr"], lr_scheduler_type="constant", num_train_epochs=size["bc_epochs"],
                      per_device_train_batch_size=size["bc_batch"], logging_steps=10, save_steps=10 ** 6,
                      seed=seed, disable_tqdm=True, report_to=[], ref_cache_dir=str(out.parent / "cache-bc"),
                      family_config={"item_catalogue": str(catalogue)})
    return str(out), training_log(train(cfg))


def tune(bc_dir: str, data: Path, rows: int, out: Path, loss_type: str, size: dict, seed: int, catalogue: Path,
         eval_rows: Path) -> tuple[str, dict]:
    """DPO, S-DPO or DMPO from the BC policy (the reference) through dpokit's loop on `data` (`rows` rows); the
    validation rows evaluated from the start and every epoch, so report.html plots the collapse guards over
    training."""
    cfg = TrainConfig(model=bc_dir, family="recommender", train_data=str(data), output_dir=str(out),
                      loss_type=loss_type, beta=size["beta"], learning_rate=size["learning_rate"],
                      lr_scheduler_type="constant", num_train_epochs=size["epochs"],
                      per_device_train_batch_size=size["batch_size"], logging_steps=5, save_steps=10 ** 6,
                      seed=seed, disable_tqdm=True, report_to=["jsonl"], ref_cache_dir=str(out.parent / "cache"),
                      eval_data=str(eval_rows), eval_on_start=True,
                      eval_steps=max(1, -(-rows // size["batch_size"])),
                      family_config={"item_catalogue": str(catalogue), "eval_top_k": size["k"]})
    return str(out), training_log(train(cfg))


def label_groups(world, train_rows: list[dict], size: dict, seed: int) -> tuple[list[dict], list[dict]]:
    """Utility-labelled rows for every train context: groups (the best vs the `group` worst of `candidates`
    uniform non-history items, by the world model's predicted rating), and pairs from the same contexts (the best
    vs the worst: the group's first, worst-first)."""
    from ..worldmodel import Utility, label_pairs

    contexts = [{"user": r["user"], "history": r["history"]} for r in train_rows]
    groups = label_pairs(world, contexts, size["candidates"], k=size["group"], utility=Utility({"rating": 1.0}),
                         seed=seed)
    pairs = [dict(g, rejected=g["rejected"][0]) for g in groups]
    return pairs, groups


def measure(recommend, world, sim: recsim.Simulator | None, test_rows: list[dict], items: list[str], size: dict,
            seed: int, popularity: dict[str, float], genres: dict | None = None) -> dict:
    """The protocol's measures of one policy (histories → top-k lists) on the test contexts; the true utility
    where a simulator knows it, the genre diversity where the catalogue has genres."""
    from ..ranking import genre_distance, intra_list_diversity, popularity_bias
    from ..worldmodel import evaluate_policy

    k, users = size["k"], [r["user"] for r in test_rows]
    histories = [list(r["history"]) for r in test_rows]
    lists = [list(x)[:k] for x in recommend(histories)]
    targets = [r["chosen"] for r in test_rows]
    roll = evaluate_policy(world, recommend, histories, horizon=size["horizon"], k=k, seed=seed)
    owners = users * size["horizon"]  # `taken`: step by step, history by history
    out = {"utility": roll["utility"],
           "ndcg@10": ndcg_at_k(lists, targets, k), "hr@10": hit_rate_at_k(lists, targets, k),
           "coverage": coverage(lists, len(items), k), "gini": exposure_gini(lists, items, k),
           "popularity": popularity_bias(lists, popularity, k), "test_contexts": len(test_rows)}
    if sim is not None:
        out["true_utility"] = float(np.mean([sim.true_utility_of(u, i) for u, i in zip(owners, roll["taken"])]))
    if genres:
        out["ild"] = intra_list_diversity(lists, genre_distance(genres), k)
    return out


def recommender_policy(path: str, k: int = 10):
    family = get_family("recommender")
    model, items = family.load_trained(path)
    return lambda histories: family.sample(model, items, histories, num_generations=k)


def verdict(bc: dict, method: dict) -> dict:
    """The decision rule applied to one method's figures against BC's (the true utility where it is known)."""
    checks = {"utility_up_10pct": method["utility"] >= GOAL["utility_ratio"] * bc["utility"] - 1e-12,
              "ndcg_kept": method["ndcg@10"] >= bc["ndcg@10"],
              "coverage_kept": method["coverage"] >= GOAL["coverage_ratio"] * bc["coverage"] - 1e-12}
    if "true_utility" in bc:
        checks["true_utility_up"] = method["true_utility"] > bc["true_utility"]
    return {**checks, "met": all(checks.values())}


def collapse(bc: dict, greedy: dict) -> bool:
    """The collapse claim: greedy's coverage is below BC's."""
    return greedy["coverage"] < bc["coverage"]


LOWER_AHEAD = ("gini", "popularity")


def compare_sdpo_dpo(dpo: dict, sdpo: dict) -> dict:
    """Which is ahead on each measure both have (the Gini and popularity bias: lower is ahead)."""
    out = {}
    for m in (m for m in MEASURES if m in dpo and m in sdpo):
        a, b = sdpo[m], dpo[m]
        out[m] = "tie" if a == b else ("sdpo" if (a < b if m in LOWER_AHEAD else a > b) else "dpo")
    return out


def synthetic_inputs(out: Path, size: dict, seed: int, t0: float) -> dict:
    """The demo's log from the known simulator, and what the pipeline needs of it."""
    sim = recsim.make_simulator(size["users"], size["items"], size["dim"], seed)
    log_rows = recsim.simulate_log(sim, size["shown"], size["rating_noise"], seed)
    log = recsim.write_log(log_rows, out / "log.csv")
    write_text(out / "items.csv", "item\n" + "".join(f"{i}\n" for i in sim.items))
    ratings = np.array([r["rating"] for r in log_rows])
    say(t0, f"log: {len(log_rows)} events, {size['users']} users, {size['items']} items; mean rating "
             f"{ratings.mean():.2f}, rated ≥ {size['high']:g}: {(ratings >= size['high']).mean():.1%}")
    return {"sim": sim, "log": log, "recipe_items": out / "items.csv",
            "catalogue": recsim.write_catalogue(sim, out / "items.txt"), "items": sim.items, "genres": None}


def real_inputs(data: str, items_file: str | None, out: Path, t0: float) -> dict:
    """A real log read in place (nothing of it copied): its catalogue (`items_file`, or the log's items written as
    a list of ids) and genres where the catalogue has them."""
    from ..recipes.interactions import catalogue_ids, read_genres, read_log

    events, kind, _ = read_log(data)
    if kind != "rating":
        raise DpokitError(f"{data}: the experiment labels by ratings; this log's feedback is {kind}")
    if items_file:
        items = catalogue_ids(items_file)
        catalogue = Path(items_file)
    else:
        items = list(dict.fromkeys(e.item for e in events))
        catalogue = out / "items.txt"
        write_text(catalogue, "\n".join(items) + "\n")
    say(t0, f"log {data}: {len(events)} events, {len({e.user for e in events})} users, {len(items)} items")
    return {"sim": None, "log": Path(data), "recipe_items": Path(items_file) if items_file else None,
            "catalogue": catalogue, "items": items, "genres": read_genres(items_file)}


def world_model_log(log: Path, test_rows: list[dict], engaged_threshold: float):
    """The log's events without each test user's held-out event and anything after it (the world model must not
    see what the test measures): the user's events in time order (the file's on a tie), cut at the last event of
    the test item."""
    from ..worldmodel import read_events, user_sequences

    held = {r["user"]: str(r["chosen"]) for r in test_rows}
    kept = []
    for user, evs in user_sequences(read_events(log, engaged_threshold=engaged_threshold)).items():
        if user in held:
            cut = max((j for j, e in enumerate(evs) if e.item == held[user]), default=len(evs))
            evs = evs[:cut]
        kept += evs
    return kept


def run(out_dir: str | Path = "runs/recommender", size: dict | None = None, seed: int = 0,
        docs_dir: str | Path | None = None, command: str = "dpokit experiment recommender", data: str | None = None,
        items_file: str | None = None) -> dict:
    """The protocol (module docstring; with `data`, the real-log protocol `PROTOCOL_DATA`); writes
    recommender.json (recommender-data.json) and the docs section, and returns the results: {"bc": {...},
    "dpo": {...}, "sdpo": {...}, "dmpo": {...}, "greedy": {...}, ...}, each with the MEASURES it has."""
    import torch

    from ..worldmodel import FitConfig, fit_world_model, greedy_policy, read_events

    size = dict(size or FULL)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    src = synthetic_inputs(out, size, seed, t0) if data is None else real_inputs(data, items_file, out, t0)
    sim, items, catalogue = src["sim"], src["items"], src["catalogue"]

    splits = build_interactions(src["log"], src["recipe_items"], out / "rows.jsonl", size, seed)
    counts = {k: len(v) for k, v in splits.items()}
    say(t0, "interactions: " + ", ".join(f"{k} {v}" for k, v in counts.items()))

    torch.manual_seed(seed)
    if sim is None:
        wm_log = world_model_log(src["log"], splits["test"], size["engaged_threshold"])
    else:  # the demo's protocol: the whole log
        wm_log = read_events(src["log"], engaged_threshold=size["engaged_threshold"])
    world, fidelity = fit_world_model(wm_log, items=items, config=FitConfig(patience=size["wm_patience"], seed=seed),
                                      engaged_threshold=size["engaged_threshold"])
    say(t0, "world model: " + ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
                                         for k, v in fidelity.items()))
    popularity = {}  # ratings per item in the world model's (training) log
    for e in wm_log:
        popularity[e.item] = popularity.get(e.item, 0) + 1

    bc_dir, bc_log = train_bc(out / "rows.jsonl", catalogue, out / "bc", size, seed)
    say(t0, f"bc: {bc_log['steps']} steps; loss {bc_log.get('first', {}).get('loss', float('nan')):.4g} -> "
             f"{bc_log.get('last', {}).get('loss', float('nan')):.4g}")

    with torch.no_grad():
        pairs, groups = label_groups(world, splits["train"], size, seed)
    pair_path, group_path = _write_jsonl(pairs, out / "pairs.jsonl"), _write_jsonl(groups, out / "groups.jsonl")
    pair_data = {"contexts": len(splits["train"]), "rows": len(pairs), "ties_dropped": len(splits["train"]) - len(pairs)}
    if sim is not None:
        gaps = [sim.true_utility_of(p["user"], p["chosen"]) - sim.true_utility_of(p["user"], p["rejected"])
                for p in pairs]
        pair_data.update(true_utility_gap=float(np.mean(gaps)) if gaps else None,
                         true_agreement=float(np.mean([g > 0 for g in gaps])) if gaps else None)
        say(t0, f"{len(pairs)} labelled contexts; chosen above rejected under the simulator: "
                 f"{pair_data['true_agreement']:.1%} (mean true-utility gap {pair_data['true_utility_gap']:.3f})")
    else:
        say(t0, f"{len(pairs)} labelled contexts")

    models, logs = {"bc": bc_dir}, {"bc": bc_log}
    valid = out / "rows.valid.jsonl"
    for key, loss_type in TUNED:
        rows = (pair_path, len(pairs)) if key == "dpo" else (group_path, len(groups))
        models[key], logs[key] = tune(bc_dir, *rows, out / key, loss_type, size, seed, catalogue, valid)
        first, last = logs[key].get("first", {}), logs[key].get("last", {})
        say(t0, f"{key}: {logs[key]['steps']} steps; " + ", ".join(
            f"{k} {first[k]:.4g} -> {last[k]:.4g}" for k in first if k in last))

    results = {"command": command, "seed": seed, "size": dict(size), "data": counts, "world_model": fidelity,
               "pair_data": pair_data, "training": logs, "log": str(data) if data else "synthetic"}
    test = splits["test"]
    measured = dict(sim=sim, test_rows=test, items=items, size=size, seed=seed, popularity=popularity,
                    genres=src["genres"])
    with torch.no_grad():
        for key, path in models.items():
            results[key] = measure(recommender_policy(path, size["k"]), world, **measured)
            say(t0, f"{key}: " + ", ".join(f"{m} {results[key][m]:.4g}" for m in MEASURES if m in results[key]))
        results["greedy"] = measure(greedy_policy(world, items, k=size["k"]), world, **measured)
        say(t0, "greedy: " + ", ".join(f"{m} {results['greedy'][m]:.4g}" for m in MEASURES if m in results["greedy"]))
    results["verdict"] = {key: verdict(results["bc"], results[key]) for key, _ in TUNED}
    results["collapse_claim"] = collapse(results["bc"], results["greedy"])
    results["sdpo_vs_dpo"] = compare_sdpo_dpo(results["dpo"], results["sdpo"])
    results["minutes"] = round((time.time() - t0) / 60, 1)
    name, reading = (NAME, READING) if data is None else (NAME_DATA, READING_DATA)
    finish(results, out, name, format_table(results), docs_dir, markdown_section(results), keep=reading)
    return results


# ---------------------------------------------------------------- tables


def _goal_lines(results: dict) -> list[str]:
    lines = []
    for key, _ in TUNED:
        v = results["verdict"][key]
        lines.append(f"{dict(METHODS)[key]}: " + ("goal met" if v["met"] else "goal missed: " + ", ".join(
            k for k, ok in v.items() if not ok and k != "met")))
    lines.append("collapse claim (greedy's coverage below BC's): " + ("holds" if results["collapse_claim"] else
                                                                     "does not hold"))
    ahead = results["sdpo_vs_dpo"]
    lines.append("S-DPO vs DPO, ahead on: " + ", ".join(f"{m} {w}" for m, w in ahead.items()))
    return lines


COLUMNS = (("utility", "utility", 9, ".3f"), ("true_utility", "true", 8, ".3f"), ("ndcg@10", "NDCG@10", 9, ".4f"),
           ("hr@10", "HR@10", 8, ".3f"), ("coverage", "coverage", 10, ".3f"), ("gini", "gini", 7, ".3f"),
           ("popularity", "pop.", 8, ".1f"), ("ild", "ILD", 7, ".3f"))


def _columns(results: dict) -> list[tuple]:
    return [c for c in COLUMNS if c[0] in results["bc"]]


def format_table(results: dict) -> str:
    cols, bc = _columns(results), results["bc"]
    head = f"{'policy':<22}" + "".join(f"{label:>{w}}" + ("  vs BC" if m == "utility" else "")
                                       for m, label, w, _ in cols)
    lines = [head]
    for key, label in METHODS:
        r = results[key]
        lines.append(f"{label[:21]:<22}" + "".join(
            f"{r[m]:>{w}{f}}" + (f"{r[m] / bc[m]:>6.2f}×" if m == "utility" else "") for m, _, w, f in cols))
    return "\n".join(lines + _goal_lines(results))


PROTOCOL = """\
The issue's demo (`dpokit demo recommender`, CPU, no downloads): synthetic logs from a known simulator, so the true
utility is computable. The protocol and the decision rule below were committed before the first run; the real-data
version (`dpokit experiment recommender --data`, MovieLens-100K) has its own protocol, in the next section.

- **Simulator** (seeded): 500 users, 300 items, latent size 8. Item vectors v_i ~ N(0, I/8), item bias
  b_i ~ N(0, 0.5²), user tastes u ~ N(0, I). True engagement probability p(u, i) = σ(2·u·v_i + b_i − 1); the true
  utility of showing i to u is its expected rating 1 + 4·p(u, i).
- **Log**: each user is shown 30 distinct items drawn with probability ∝ exp(b_i + 0.5·u·v_i) (a popularity-led
  logging policy with weak personalisation), at times 1..30, and rates each round(clip(1 + 4·p + N(0, 0.5²), 1, 5)).
- **Splits and pairs for held-out accuracy**: `dpokit data build interactions` with rating negatives (chosen rated
  ≥ 4, rejected ≤ 2) and leave-last-out: each user's last positive context is the test set.
- **World model**: `dpokit.worldmodel.fit_world_model` on the log (engaged = rating ≥ 4), early stopping with
  patience 3; its held-out fidelity is reported.
- **BC policy**: the recommender family's SASRec (defaults: hidden 64, 2 blocks) trained with `loss_type: sft` on
  the train rows (next positive item given the history), 5 epochs, batch 64, learning rate 1e-3.
- **Utility-labelled pairs**: for every train context, 20 candidate items drawn uniformly from those not in the
  history (seeded), scored by the world model's predicted rating; chosen = the best, rejected = the worst (pairs,
  for DPO) or the 4 worst (groups, for S-DPO and DMPO); ties dropped.
- **Training** from the BC policy (the reference), the same contexts, steps and learning rate for all: DPO
  (`sigmoid`), S-DPO (`sdpo`), DMPO (`dmpo`), β = 0.1, 2 epochs, batch 64, learning rate 5e-4 constant.
- **Greedy baseline**: for each history, the 10 items with the highest predicted utility under the world model.
- **Measures** for BC, DPO, S-DPO, DMPO and greedy, on the test users: **utility**, the mean predicted rating of the
  items taken in world-model rollouts (horizon 5 from each test user's history; the policy's top-10 list, the user
  takes the first item); **true utility**, the simulator's expected rating of the same taken items; **NDCG@10** and
  HR@10 of the held-out test item over the full catalogue (history items left out); **coverage**, the share of the
  catalogue in the top-10 lists of all test contexts, and the Gini of exposure.
- **Decision rule** (the issue's goal): a method meets it when its utility is at least 1.10× BC's, its NDCG@10 is
  not below BC's, and its coverage is at least 0.90× BC's; the collapse claim holds when greedy's coverage is below
  BC's; on this synthetic demo the true utility must rise too (above BC's). S-DPO is compared with DPO on the same
  measures (the S-DPO paper reports S-DPO ahead). If the goal is missed: one round of diagnosis and one fix a
  practitioner would try, reported beside the first result.
"""


NAMES = {"utility": "utility (world model)", "true_utility": "true utility", "ndcg@10": "NDCG@10", "hr@10": "HR@10",
         "coverage": "coverage", "gini": "Gini", "popularity": "popularity", "ild": "ILD (genres)"}


def markdown_section(results: dict) -> str:
    s, d, w, p = results["size"], results["data"], results["world_model"], results["pair_data"]
    cols, bc = _columns(results), results["bc"]
    real = results.get("log", "synthetic") != "synthetic"
    table = ["| policy | " + " | ".join(NAMES[m] + (" | vs BC" if m == "utility" else "") for m, *_ in cols) + " |",
             "|---|" + "---:|" * (len(cols) + 1)]
    for key, label in METHODS:
        r = results[key]
        table.append(f"| {label} | " + " | ".join(
            f"{r[m]:{f}}" + (f" | {r[m] / bc[m]:.2f}×" if m == "utility" else "") for m, _, _, f in cols) + " |")
    verdicts = []
    for key, _ in TUNED:
        r, v = results[key], results["verdict"][key]
        true = f", true utility {r['true_utility']:.3f} vs {bc['true_utility']:.3f}" if "true_utility" in r else ""
        verdicts.append(f"{dict(METHODS)[key]}: utility {r['utility'] / bc['utility']:.2f}× BC's (goal ≥ "
                        f"{GOAL['utility_ratio']:g}×), NDCG@10 {r['ndcg@10']:.4f} vs {bc['ndcg@10']:.4f}, coverage "
                        f"{r['coverage'] / bc['coverage']:.2f}× BC's (goal ≥ {GOAL['coverage_ratio']:g}×){true}: **goal "
                        f"{'met' if v['met'] else 'missed'}**.")
    logs = []
    for key, label in METHODS[:4]:
        f, l = results["training"][key].get("first", {}), results["training"][key].get("last", {})
        logs.append(f"{label} {results['training'][key]['steps']} steps: " + ", ".join(
            f"{k} {f[k]:.3g} → {l[k]:.3g}" for k in ("loss", "rewards/margins", "logps/chosen", "logps/rejected")
            if k in f and k in l))
    fid = ", ".join(f"{k} {w[k]:.3f}" for k in ("rating_rmse", "baseline_rating_rmse", "engaged_auc", "engaged_ece")
                    if isinstance(w.get(k), float))
    ahead = ", ".join(f"{m} {who}" for m, who in results["sdpo_vs_dpo"].items())
    agreement = (f"; the world model's chosen is above its rejected under the simulator's true utility in "
                 f"{p['true_agreement']:.1%} of them" if p.get("true_agreement") is not None else "")
    if real:
        title = "## Recommenders on real logs: DPO against a world model, MovieLens-100K"
        protocol, reading = PROTOCOL_DATA, READING_DATA
        sizes = f"Log: `{results['log']}` (read in place)"
    else:
        title = "## Recommenders: DPO against a world model, without collapse (demo, known simulator)"
        protocol, reading = PROTOCOL, READING
        sizes = f"Sizes: {s['users']} users, {s['items']} items, {s['shown']} shown each"
    return f"""{title}

{protocol}
### Results

Rerun: `{results['command']}` ({results['minutes']} min on this machine). {sizes}; interaction rows
{', '.join(f'{k} {v}' for k, v in d.items())}. World model ({w.get('epochs_run')} epochs, best
{w.get('best_epoch')}), held-out fidelity: {fid}. Labelled contexts {p['rows']} of {p['contexts']} (ties dropped
{p['ties_dropped']}){agreement}.

{chr(10).join(table)}

{' '.join(verdicts)} Collapse claim (greedy's coverage below BC's): **{'holds' if results['collapse_claim'] else
'does not hold'}**. S-DPO against DPO, ahead on: {ahead}.

Training logs (first → last logged step): {'; '.join(logs)}.

{reading}
(The reading of these figures is written by hand after the runs; a rerun keeps it.)
"""


PROTOCOL_DATA = """\
`dpokit experiment recommender --data LOG [--items ITEMS]` runs the demo's pipeline on a real log instead of the
simulator. The protocol and the decision rule below were committed before the first run on MovieLens-100K. The
data ships inside the `recbole` wheel (`pip install --no-deps recbole`; `recbole/dataset_example/ml-100k/`); its
licence forbids redistribution, so dpokit reads it in place and the repository holds none of it. The run folder
holds rows derived from it (item ids, no ratings) and models trained on it: keep them to yourself.

- **Log**: any log the interactions recipe reads (CSV/TSV/Parquet with user, item, rating, timestamp; RecBole
  `.inter`), ratings required; events of one user at the same time keep the file's order
  (`--on-duplicate-time keep-file-order`: MovieLens has many same-second ratings). `--items` (a RecBole `.item`,
  a CSV with an `item` column, or a text file) is the catalogue; with a genre column (`class`, `genre(s)`,
  `category`) it also gives intra-list diversity.
- **Rows**: `dpokit data build interactions` with rating negatives (chosen rated ≥ 4, rejected ≤ 2) and
  leave-last-out per user: each user's last positive context is the test set, the one before it validation.
- **World model**: `dpokit.worldmodel.fit_world_model` (engaged = rating ≥ 4, early stopping with patience 3) on
  the log *without* each test user's held-out event and anything after it, so the world model never sees what the
  test measures; its held-out fidelity reported.
- **BC policy, utility-labelled pairs, DPO / S-DPO / DMPO, greedy**: exactly as in the demo's protocol above (SASRec
  defaults, `loss_type: sft`, 5 epochs, batch 64, lr 1e-3; 20 uniform candidates per train context, best vs worst
  or the 4 worst by predicted rating; β = 0.1, 2 epochs, batch 64, lr 5e-4 constant; greedy = the world model's
  top-10 by predicted utility). Each tuned run also evaluates the validation rows every epoch, so its report.html
  plots the collapse guards over training.
- **Measures** on the test users: **utility**, the mean predicted rating of the items taken in world-model
  rollouts (horizon 5, the user takes the first of the top-10 list); **NDCG@10** and HR@10 of the held-out item over
  the full catalogue (history items left out); the collapse guards of the top-10 lists: **coverage** (share of the
  catalogue), Gini of exposure, popularity bias (the mean number of training-log ratings of the recommended items),
  and intra-list diversity (1 − genre Jaccard) where the catalogue has genres. A real log has no true utility.
- **Decision rule** (the issue's goal): a method meets it when its utility is at least 1.10× BC's, its NDCG@10 is
  not below BC's, and its coverage at least 0.90× BC's; the collapse claim holds when greedy's coverage is below
  BC's. S-DPO is compared with DPO on the same measures. If the goal is missed: one round of diagnosis and one fix a
  practitioner would try, reported beside the first result.
"""
