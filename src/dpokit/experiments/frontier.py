"""Reward vs KL frontier: the controlled experiment of the DPO paper (Rafailov et al. 2023, Fig. 2), small.

On the demo's task (dpokit.tasks: a positive line about a subject, exact ground-truth reward), or with
`task="vader"` on HH prompts with VADER sentiment as the reward (hh_sentiment.py; no noisy part there):

1. the demo's warm-up (SFT) model, built and trained from scratch (dpokit.demo.warm_up);
2. preference pairs sampled from it (temperature 1) and labelled by the true reward
   (tasks.make_pairs); a second copy with a seeded 20% of the labels flipped;
3. runs of `dpokit.train` with the SFT model as the reference: DPO at several β, IPO,
   conservative DPO (cDPO: sigmoid with label smoothing), robust DPO, and preferred-FT (the
   `sft` loss alone: SFT on the chosen replies, no reference) at several learning rates;
   then DPO, cDPO and robust DPO again on the noisy pairs, at one matched β;
4. each run is checkpointed along the way (a constant learning rate after a short warm-up, so
   checkpoints are points on one trajectory, as the paper's frontier uses); every checkpoint
   is one point: fresh samples on held-out prompts (no pair uses them), their mean true
   reward, and KL(π ‖ π_SFT) estimated on those samples (mean of log π(y|x) − log π_SFT(y|x),
   summed over the reply's tokens). All models draw with the same seed. A checkpoint is
   deleted once measured; each run's final model stays.

`run_frontier` writes frontier.json (every point), frontier.svg and frontier.md (the table and
reading) to its output dir, and with `docs_dir` also the "Reward vs KL frontier" section of
`<docs_dir>/experiments.md` and `<docs_dir>/frontier.svg` (the vader task: frontier-vader.svg and
its own section).
"""

from __future__ import annotations

import copy
import html
import json
import math
import os
import random
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from .. import tasks
from ..config import TrainConfig
from ..data import Example
from ..demo import FULL as DEMO_FULL, QUICK as DEMO_QUICK, MAX_NEW_TOKENS, pair_logps, warm_up
from ..report import PALETTE, _fmt, _ticks
from ..tiny import build_llama, build_tokenizer, single_thread
from ..train import train
from . import update_docs

FLIP_FRACTION = 0.2
SMOOTHING = 0.2  # cDPO's and robust DPO's assumed flip rate: the true one of the noisy pairs
REFERENCE_METHODS = ("DPO", "IPO", "cDPO", "robust DPO")  # the DPO family: trained against π_SFT


@dataclass(frozen=True)
class Run:
    method: str  # the label in the plot and tables
    loss_type: str
    beta: float
    learning_rate: float
    label_smoothing: float = 0.0
    labels: str = "clean"  # "clean" or "noisy" (FLIP_FRACTION of the labels flipped)
    replicate: int = 0  # r > 0: training seed + r (the batch order) and, for noisy labels, flip seed + r

    @property
    def slug(self) -> str:
        name = self.method.lower().replace(" ", "-")
        return f"{self.labels}-{name}-b{self.beta:g}-lr{self.learning_rate:g}-r{self.replicate}"


def _runs(betas_dpo, betas_ipo, betas_cdpo, pft_lrs, noisy_beta, replicates, lr=1e-4) -> tuple[Run, ...]:
    """The clean sweep (replicate 0), then DPO, cDPO and robust DPO at `noisy_beta` on noisy labels, and on
    clean labels again for replicates > 0, so each noisy run has a clean twin with the same seed."""
    clean = (*(Run("DPO", "sigmoid", b, lr) for b in betas_dpo),
             *(Run("IPO", "ipo", b, lr) for b in betas_ipo),
             *(Run("cDPO", "sigmoid", b, lr, SMOOTHING) for b in betas_cdpo),
             Run("robust DPO", "robust", noisy_beta, lr, SMOOTHING),
             # beta is unused by the sft loss; the learning rate traces its curve
             *(Run("preferred-FT", "sft", 0.1, r) for r in pft_lrs))
    robust_trio = (("DPO", "sigmoid", 0.0), ("cDPO", "sigmoid", SMOOTHING), ("robust DPO", "robust", SMOOTHING))
    noisy = tuple(Run(m, loss, noisy_beta, lr, eps, labels, r) for r in range(replicates)
                  for labels in (("noisy",) if r == 0 else ("clean", "noisy")) for m, loss, eps in robust_trio)
    return clean + noisy


FULL = dict(demo=DEMO_FULL, eval_samples=16, max_steps=120, eval_every=10, noisy_beta=0.5, replicates=3,
            runs=_runs((0.1, 0.25, 0.5, 1.0), (1.0, 2.0, 4.0), (0.25, 0.5, 1.0), (3e-5, 1e-4, 3e-4), 0.5, 3))
QUICK = dict(demo=DEMO_QUICK, eval_samples=4, max_steps=40, eval_every=20, noisy_beta=0.5, replicates=1,
             runs=(Run("DPO", "sigmoid", 0.5, 1e-4), Run("preferred-FT", "sft", 0.1, 1e-4),
                   Run("DPO", "sigmoid", 0.5, 1e-4, labels="noisy")))


def flip_labels(rows: list[dict], fraction: float, seed: int) -> tuple[list[dict], list[int]]:
    """A copy of `rows` with round(fraction · n) of them, chosen with `seed`, chosen and rejected swapped
    (scores too); returns (rows, the flipped row indices, sorted)."""
    rng = random.Random(seed)
    flipped = sorted(rng.sample(range(len(rows)), round(fraction * len(rows))))
    out = [dict(r) for r in rows]
    for i in flipped:
        r = out[i]
        r["chosen"], r["rejected"] = r["rejected"], r["chosen"]
        if "score_chosen" in r:
            r["score_chosen"], r["score_rejected"] = r["score_rejected"], r["score_chosen"]
    return out, flipped


def optimal_frontier(rewards: list[float], inverse_betas=None) -> list[dict]:
    """The best any policy can do: π_t ∝ π_SFT · exp(t·r), t = 1/β, maximises E[r] − β·KL(π ‖ π_SFT), so
    its (KL, reward) pairs trace the frontier. Both are estimated from rewards of samples of π_SFT:
    E_t[r] = E[r·e^{tr}] / Z and KL = t·E_t[r] − log Z, with Z = E[e^{tr}]."""
    r = torch.tensor(rewards, dtype=torch.float64)
    curve = []
    for t in inverse_betas if inverse_betas is not None else [i / 20 for i in range(0, 201)]:
        log_z = torch.logsumexp(t * r, 0) - math.log(len(r))
        mean = (torch.softmax(t * r, 0) * r).sum().item()
        curve.append({"inverse_beta": t, "kl": t * mean - log_z.item(), "reward": mean})
    return curve


def _sequence_logps(model, tokenizer, prompts: list[str], replies: list[str]) -> torch.Tensor:
    """log π(reply | prompt) per row, summed over the reply's tokens and its EOS, as the loop scores them."""
    eos = tokenizer.eos_token_id
    out = []
    for prompt, reply in zip(prompts, replies):
        p = tokenizer(prompt)["input_ids"]
        full = torch.tensor([tokenizer(prompt + reply)["input_ids"] + [eos]])
        logits = model(input_ids=full).logits[0, :-1]
        targets = full[0, 1:]
        out.append(torch.log_softmax(logits.float(), -1).gather(-1, targets[:, None])[len(p) - 1:].sum())
    return torch.stack(out)


def _flat_grad(model, loss: torch.Tensor, retain: bool = False) -> torch.Tensor:
    params = [q for q in model.parameters() if q.requires_grad]
    return torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, params, retain_graph=retain)])


def first_step_alignment(model, tokenizer, rows: list[dict]) -> dict:
    """How alike DPO's and preferred-FT's first updates are, at the SFT model on `rows` (pairs of its samples).

    At the reference the DPO logit is 0, so DPO's gradient is −(β/2)·mean(∇log π(y_w) − ∇log π(y_l)) for every
    β; preferred-FT's is −mean ∇log π(y_w) (over tokens: a constant factor here). Over pairs of on-policy
    samples the two have the same expectation up to that factor: mean ∇log π(y_w) = ½·mean(∇y_w − ∇y_l) +
    ½·mean(∇y_w + ∇y_l), and the last term has expectation 0 under π. Adam's first step is the sign of the
    gradient, so its scale (β) drops out. Reported: the cosine of the two gradients and of their first Adam
    steps, beside the cosine of DPO's gradient on one half of the pairs with the other half's (what sampling
    noise alone leaves)."""
    model.eval()
    half = len(rows) // 2
    grads = {}
    for name, part in (("all", rows), ("a", rows[:half]), ("b", rows[half:])):
        prompts = [r["prompt"] for r in part]
        chosen = _sequence_logps(model, tokenizer, prompts, [r["chosen"] for r in part])
        rejected = _sequence_logps(model, tokenizer, prompts, [r["rejected"] for r in part])
        grads["dpo", name] = _flat_grad(model, -(chosen - rejected).mean(), retain=name == "all")
        if name == "all":
            grads["pft", name] = _flat_grad(model, -chosen.mean())
    cos = lambda x, y: torch.nn.functional.cosine_similarity(x, y, dim=0).item()  # noqa: E731
    return {"pairs": len(rows), "grad_cosine": cos(grads["dpo", "all"], grads["pft", "all"]),
            "adam_step_cosine": cos(grads["dpo", "all"].sign(), grads["pft", "all"].sign()),
            "dpo_halves_grad_cosine": cos(grads["dpo", "a"], grads["dpo", "b"]),
            "dpo_halves_adam_step_cosine": cos(grads["dpo", "a"].sign(), grads["dpo", "b"].sign())}


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def _say(t0: float, message: str) -> None:
    print(f"[frontier {time.time() - t0:6.1f}s] {message}", flush=True)


def _policy_at(checkpoint_dir: Path, sft_model):
    """The policy of a training checkpoint: its full-weight `trainable.safetensors` (the scorer's
    state, keys prefixed `model.`) loaded into a copy of the SFT model."""
    from safetensors.torch import load_file

    weights = load_file(str(checkpoint_dir / "trainable.safetensors"))
    model = copy.deepcopy(sft_model)
    model.load_state_dict({k.removeprefix("model."): v for k, v in weights.items()}, strict=True)
    return model.eval()


@dataclass
class Setup:
    """A task for the experiment: the SFT model, the prompts, and how a reply is scored."""
    name: str  # "line" (dpokit.tasks) or "vader" (HH prompts, VADER sentiment)
    sft: object
    tokenizer: object
    warm_dir: Path
    train_prompts: list[str]
    heldout_prompts: list[str]
    reward_fn: object  # (prompt, reply) -> the true reward
    max_new_tokens: int
    malformed: object = None  # reply -> bool, where the task has a notion of malformed
    max_length: int = 64
    max_prompt_length: int = 32
    description: str = ""  # what the docs say about the task and the SFT model


def line_setup(out: Path, size: dict, seed: int, data=None) -> Setup:
    """The demo's task: a positive line about a subject; the demo's warm-up is the SFT model."""
    demo = size["demo"]
    random.seed(seed)
    torch.manual_seed(seed)
    train_prompts, heldout_prompts = tasks.split_prompts(seed)
    tokenizer = build_tokenizer(tasks.corpus(), vocab_size=600)
    sft = build_llama(tokenizer, hidden_size=demo["hidden"], num_layers=demo["layers"], seed=seed)
    warm_up(sft, tokenizer, tasks.sft_rows(train_prompts + heldout_prompts, demo["sft_rows"], seed),
            demo["sft_steps"], demo["sft_lr"], seed=seed)
    return Setup("line", sft, tokenizer, out / "sft", train_prompts, heldout_prompts, tasks.reward, MAX_NEW_TOKENS,
                 lambda reply: tasks.adjectives_of(reply) is None, description=_line_description(demo))


def _line_description(demo: dict) -> str:
    return ("`dpokit.tasks` (a positive line about a subject; exact ground-truth reward in [-1, 1], -1 for "
            "anything malformed) stands in for IMDb sentiment, and a "
            f"{demo['hidden']}-wide, {demo['layers']}-layer Llama trained from scratch "
            f"(`dpokit.demo.warm_up`, {demo['sft_steps']} steps) is the SFT model.")


def measure(model, setup: Setup, n: int, seed: int) -> dict:
    """Mean true reward of `n` fresh samples per held-out prompt, KL(π ‖ π_SFT) estimated on them, and the
    share of malformed replies (None where the task has no such notion)."""
    torch.manual_seed(seed)  # every model compared draws with the same generator state
    samples = tasks.sample(model, setup.tokenizer, setup.heldout_prompts, n, setup.max_new_tokens,
                           reward_fn=setup.reward_fn)
    # Each sample is scored as a "pair" with itself; only the chosen half is read.
    as_pairs = [Example(x.prompt_ids, x.response_ids, x.response_ids) for x in samples]
    logp, _ = pair_logps(model, as_pairs, setup.tokenizer.pad_token_id)
    ref_logp, _ = pair_logps(setup.sft, as_pairs, setup.tokenizer.pad_token_id)
    bad = None if setup.malformed is None else sum(map(setup.malformed, (x.response for x in samples))) / len(samples)
    return {"reward": sum(x.reward for x in samples) / len(samples), "kl": (logp - ref_logp).mean().item(),
            "malformed": bad}


def _train_and_measure(run: Run, data: Path, setup: Setup, size: dict, out: Path, seed: int) -> list[dict]:
    """Train `run`, then one point per checkpoint (and the final model)."""
    from transformers import AutoModelForCausalLM

    run_dir = out / "runs" / run.slug
    warm = str(setup.warm_dir)
    cfg = TrainConfig(
        model=warm, ref_model=None if run.loss_type == "sft" else warm, train_data=str(data),
        output_dir=str(run_dir), loss_type=run.loss_type, beta=run.beta, label_smoothing=run.label_smoothing,
        learning_rate=run.learning_rate, lr_scheduler_type="constant_with_warmup", warmup_steps=5,
        max_steps=size["max_steps"], per_device_train_batch_size=32, max_length=setup.max_length,
        max_prompt_length=setup.max_prompt_length, logging_steps=10, save_steps=size["eval_every"],
        save_total_limit=None, report_to=["jsonl"], disable_tqdm=True, seed=seed + run.replicate,
        ref_cache_dir=str(out / "ref-cache"),
    )
    result = train(cfg)
    models = [(int(p.name.split("-")[1]), p) for p in run_dir.glob("checkpoint-*")]
    points = []
    for step, path in sorted(models) + [(result.global_step, None)]:
        model = _policy_at(path, setup.sft) if path else AutoModelForCausalLM.from_pretrained(run_dir).eval()
        points.append({**asdict(run), "step": step, **measure(model, setup, size["eval_samples"], seed + 2)})
        if path:
            shutil.rmtree(path)  # optimizer state and all: ~1 GB over a full run; the point is what is kept
    return points


def sft_optimum(setup: Setup, n: int, seed: int) -> list[dict]:
    """`optimal_frontier` from `n` fresh samples per held-out prompt of the SFT model."""
    torch.manual_seed(seed + 3)
    return optimal_frontier([x.reward for x in tasks.sample(setup.sft, setup.tokenizer, setup.heldout_prompts, n,
                                                            setup.max_new_tokens, reward_fn=setup.reward_fn)])


def run_frontier(out: str | Path = "runs/frontier", quick: bool = False, seed: int = 0,
                 docs_dir: str | Path | None = None, task: str = "line", data: str | Path | None = None) -> dict:
    """Run the experiment (see the module docstring); returns what frontier.json holds. `task="vader"` runs it
    on the prompts of an HH-style preference file `data` with VADER sentiment as the reward
    (dpokit.experiments.hh_sentiment)."""
    if task == "vader":
        from . import hh_sentiment

        setup_fn, size = hh_sentiment.setup, hh_sentiment.QUICK if quick else hh_sentiment.FULL
    else:
        setup_fn, size = line_setup, QUICK if quick else FULL
    with single_thread():
        return _run(Path(out), size, quick, seed, docs_dir, setup_fn, data)


def _run(out: Path, size: dict, quick: bool, seed: int, docs_dir, setup_fn, data_path) -> dict:
    t0, cpu0 = time.time(), time.process_time()
    out.mkdir(parents=True, exist_ok=True)
    setup = setup_fn(out, size, seed, data_path)
    setup.sft.save_pretrained(setup.warm_dir)
    setup.tokenizer.save_pretrained(setup.warm_dir)
    _say(t0, f"SFT model ready ({setup.name} task)")

    torch.manual_seed(seed + 1)
    clean = tasks.make_pairs(tasks.sample(setup.sft, setup.tokenizer, setup.train_prompts,
                                          size["demo"]["samples_per_prompt"], setup.max_new_tokens,
                                          reward_fn=setup.reward_fn))
    data = {("clean", r): out / "pairs_clean.jsonl" for r in range(max(1, size["replicates"]))}
    _write_jsonl(data["clean", 0], clean)
    flipped = []
    for r in range(size["replicates"]):
        noisy, flipped = flip_labels(clean, FLIP_FRACTION, seed + r)
        data["noisy", r] = out / f"pairs_noisy_{r}.jsonl"
        _write_jsonl(data["noisy", r], noisy)
    _say(t0, f"{len(clean)} pairs sampled from the SFT model and labelled by the true reward" +
         (f"; {len(flipped)} ({FLIP_FRACTION:.0%}) flipped in each of {size['replicates']} noisy copies"
          if size["replicates"] else ""))

    alignment = first_step_alignment(setup.sft, setup.tokenizer, clean)
    _say(t0, "first step at the SFT model, DPO vs preferred-FT: gradient cosine "
             f"{alignment['grad_cosine']:.3f}, Adam step cosine {alignment['adam_step_cosine']:.3f}")
    base = measure(setup.sft, setup, size["eval_samples"], seed + 2)
    optimum = sft_optimum(setup, 4 * size["eval_samples"], seed)
    labels = ("clean", "noisy") if size["replicates"] else ("clean",)
    points = [{"method": "SFT", "labels": x, "step": 0, "kl": 0.0, "reward": base["reward"],
               "malformed": base["malformed"]} for x in labels]
    for run in size["runs"]:
        new = _train_and_measure(run, data[run.labels, run.replicate], setup, size, out, seed)
        points += new
        best = max(new, key=lambda p: p["reward"])
        _say(t0, f"{run.slug}: best reward {best['reward']:+.3f} at KL {best['kl']:.2f} (step {best['step']}); "
                 f"last {new[-1]['reward']:+.3f} at KL {new[-1]['kl']:.2f}")

    results = {
        "task": setup.name, "task_description": setup.description,
        "quick": quick, "seed": seed, "sft_reward": base["reward"], "sft_malformed": base["malformed"],
        "pairs": len(clean), "flipped": len(flipped), "heldout_prompts": len(setup.heldout_prompts),
        "chosen_reward": sum(r["score_chosen"] for r in clean) / len(clean),
        "eval_samples_per_prompt": size["eval_samples"], "max_steps": size["max_steps"],
        "eval_every": size["eval_every"], "noisy_beta": size["noisy_beta"], "replicates": size["replicates"],
        "sizes": size["demo"], "optimal": optimum, "points": points, "first_step": alignment,
    }
    results["wall_s"] = round(time.time() - t0, 1)
    results["cpu_s"] = round(time.process_time() - cpu0, 1)  # wall time depends on what else the machine runs
    results["command"] = "dpokit experiment frontier" + (" --quick" if quick else "") + \
        (f" --task {setup.name} --data {data_path}" if setup.name != "line" else "") + f" --out {out}" + \
        (f" --docs {docs_dir}" if docs_dir is not None else "")
    results["machine"] = f"{os.cpu_count()} CPU cores, torch on 1 thread"
    write_outputs(results, out, docs_dir)
    _say(t0, f"done; {out / 'frontier.md'}" + (f", {Path(docs_dir) / 'experiments.md'}" if docs_dir else ""))
    return results


def write_outputs(results: dict, out: str | Path, docs_dir: str | Path | None = None) -> None:
    """frontier.json, the plot and frontier.md in `out`; the plot and the docs section in `docs_dir`.
    Also redraws them from a saved frontier.json (`write_outputs(json.load(...), out)`)."""
    out = Path(out)
    results["summary"] = summarize(results)
    (out / "frontier.json").write_text(json.dumps(results, indent=2))
    name = "frontier" if results.get("task", "line") == "line" else f"frontier-{results['task']}"
    svg = plot_svg(results["points"], optimal=results.get("optimal"))
    (out / f"{name}.svg").write_text(svg)
    section = markdown_section(results, svg_name=f"{name}.svg")
    (out / "frontier.md").write_text(section)
    if docs_dir is not None:
        docs = Path(docs_dir)
        docs.mkdir(parents=True, exist_ok=True)
        (docs / f"{name}.svg").write_text(svg)
        if name == "frontier":
            update_section(docs / "experiments.md", section)
        else:  # its reading is written below the section, as the other experiments' are
            update_docs(docs / "experiments.md", name, section)


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
        diffs = [envelope(sweep, group, p["kl"]) - p["reward"] for p in pft]
        mixed = [mixture_frontier(sweep, group, p["kl"]) - mixture_frontier(sweep, ["preferred-FT"], p["kl"])
                 for p in pft]
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


def _num(v, fmt="+.3f") -> str:
    return "–" if v is None else format(v, fmt)


def markdown_section(results: dict, svg_name: str = "frontier.svg") -> str:
    s, points = results["summary"], results["points"]
    line_task = results.get("task", "line") == "line"
    description = results.get("task_description") or _line_description(results["sizes"])
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
    lines += ["", "</details>", ""] + (["<!-- frontier:reading -->", "", END, ""] if line_task else [])
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
    """Put `section` (delimited by BEGIN/END) into `path`, replacing an earlier one; other sections stay.
    A hand-written reading between `<!-- frontier:reading -->` and END in the old section is kept."""
    path = Path(path)
    text = path.read_text(encoding="utf-8") if path.exists() else "# Experiments\n\n"
    if BEGIN in text and END in text:
        head, rest = text.split(BEGIN, 1)
        old, tail = rest.split(END, 1)
        reading = old.split("<!-- frontier:reading -->", 1)[1] if "<!-- frontier:reading -->" in old else "\n\n"
        section = section.replace("<!-- frontier:reading -->\n\n" + END, "<!-- frontier:reading -->" + reading + END)
        text = head + section.rstrip("\n") + tail
    else:
        text = text.rstrip("\n") + "\n\n" + section
    tmp = path.with_suffix(".md.tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)
