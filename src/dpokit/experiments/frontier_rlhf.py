"""The frontier experiment's RLHF arm: a learned reward model plus RL, from TRL's own trainers, against DPO.

`dpokit experiment frontier --rlhf` runs it after the frontier's runs, on the same SFT model, clean pairs and
held-out prompts (frontier._run calls `run_arm`). The protocol is PROTOCOL below (committed in
docs/experiments.md before the first run):

1. a Bradley–Terry reward model, TRL's `RewardTrainer`, from the SFT model's weights with a fresh one-output head,
   on a seeded 90% of the clean pairs; its accuracy on the other 10% (and the true reward's on the same labels);
2. TRL's `GRPOTrainer` from the SFT model against that learned reward at several β (its KL term to the SFT
   model), and once against the true reward (the oracle); a checkpoint every `eval_every` steps;
3. every checkpoint measured as the DPO runs' are (frontier.measure), plus the learned reward of the same samples;
4. CPU seconds per point (process time, measuring not counted), reward hacking along each run, and the decision
   rule: DPO's hull against every RLHF point, and DPO's CPU seconds to RLHF's best true reward.

The learned reward reads a reply as the reward model was trained on it: prompt + reply + EOS (RewardTrainer
appends EOS to every reply; passing the model itself as GRPO's reward function would score the text without it,
at a position the head never saw in training). Research code: it imports TRL and `datasets` directly.
"""

from __future__ import annotations

import html
import math
import shutil
import time
from pathlib import Path

import torch

from .. import demo_task
from ..io import write_text
from ..report import PALETTE, _fmt, _ticks
from . import update_docs

NAME = "frontier-rlhf"
READING = f"<!-- {NAME}:reading -->"  # what follows it in the docs is written by hand

FULL = dict(rm_epochs=3, rm_batch=32, rm_lr=1e-4, heldout_fraction=0.1, betas=(0.01, 0.04, 0.1), oracle_beta=0.04,
            num_generations=8, batch=32, learning_rate=1e-4, warmup_steps=5, max_steps=120, eval_every=10)
QUICK = dict(rm_epochs=1, rm_batch=32, rm_lr=1e-4, heldout_fraction=0.1, betas=(0.04,), oracle_beta=0.04,
             num_generations=4, batch=8, learning_rate=1e-4, warmup_steps=1, max_steps=4, eval_every=2)
HALF, FIFTH = 0.5, 0.2  # the decision rule's CPU ratios: the claim, and the stretch aim

PROTOCOL = """## DPO against RLHF on the frontier task: a learned reward model plus GRPO

The DPO paper's central claim, on the frontier experiment above: DPO reaches what RLHF (a reward model trained on
the preferences, then reinforcement learning against it) reaches, at about half the compute and with less room for
reward hacking. `dpokit experiment frontier --rlhf` adds an RLHF arm built from TRL's own trainers (TRL 1.16 ships
no PPO; its RL trainer is `GRPOTrainer`). The protocol and the decision rule below were committed before the first
run.

- **Same starting point**: the task's SFT model, its clean preference pairs and its held-out prompts, exactly as
  the DPO, IPO, cDPO and preferred-FT runs above use them (the line task; `--task vader` the same on HH prompts).
- **Reward model**: TRL's `RewardTrainer` (Bradley–Terry) on the clean pairs, from the SFT model's weights with a
  fresh one-output head (`AutoModelForSequenceClassification`), 90% of the pairs to train and a seeded 10% held out
  (its held-out pair accuracy reported, and the true-reward accuracy of the same held-out labels beside it), 3
  epochs, batch 32, learning rate 1e-4, TRL's defaults otherwise.
- **RLHF arm**: TRL's `GRPOTrainer` from the SFT model against that learned reward, on the training prompts (the
  prompts of the pairs), with its KL term to the SFT model at β ∈ {0.01, 0.04, 0.1} (TRL's `beta`), 8 generations
  per prompt, 32 completions a step, temperature 1, completions as long as the task's replies, learning rate 1e-4
  constant after 5 warm-up steps, 120 steps, a checkpoint every 10 (the DPO runs' schedule).
- **Oracle arm**: the same GRPO at β = 0.04 against the **true** reward: the ceiling RL reaches when the reward is
  not learned.
- **Points**: every GRPO checkpoint is measured exactly as the DPO runs' are (16 fresh samples on each held-out
  prompt; their mean true reward and KL(π ‖ π_SFT) on them); for the RLHF arm also the learned reward of the same
  samples.
- **CPU seconds** (process time, torch on one thread; measuring the points is not counted): for a DPO point, the
  reference pass plus the run's training time up to that checkpoint; for an RLHF point, the reward model's training
  plus GRPO's time up to that checkpoint; for the oracle, GRPO's alone. Within a run, time up to checkpoint s is the
  run's training time × s / its steps (each step costs the same). A second plot: true reward against CPU seconds.
- **Reward hacking**: along each RLHF run, the learned and the true reward of its samples; a run hacks its reward
  where the learned reward rises from one checkpoint to the next while the true reward falls, and the gap between
  the two (both standardised on the SFT model's samples) is reported at every checkpoint.
- **Decision rule** (the issue's goal): on a task, DPO's frontier — the upper concave hull of all DPO points
  (mixing checkpoints, as above) — must be at or above every RLHF point whose KL lies within the DPO points' range,
  *and* DPO must reach the RLHF arm's best true reward in at most half the CPU seconds RLHF took to reach it (the
  first DPO checkpoint with a reward at least that high, against the RLHF checkpoint that had it); a fifth is the
  stretch aim. The claim holds if both hold on at least one of the two tasks. Reported whatever the outcome; if it
  fails, one round of diagnosis and one fix a practitioner would try."""


# ---------------------------------------------------------------- the reward model

def split_pairs(rows: list[dict], heldout_fraction: float, seed: int) -> tuple[list[dict], list[dict]]:
    """(train, held out): a seeded `heldout_fraction` of the rows held out, both in the rows' order."""
    import random

    n_held = max(1, round(heldout_fraction * len(rows)))
    held = set(random.Random(seed).sample(range(len(rows)), n_held))
    return [r for i, r in enumerate(rows) if i not in held], [r for i, r in enumerate(rows) if i in held]


class LearnedReward:
    """The reward model as a GRPO reward function, (prompts, completions) -> rewards: each reply scored as
    RewardTrainer trained on it, prompt + reply + EOS, right-padded, its head read at the last real token."""

    __name__ = "learned_reward"  # the name TRL logs it under

    def __init__(self, model, tokenizer, batch_size: int = 256):
        self.model, self.tokenizer, self.batch_size = model.eval(), tokenizer, batch_size

    @torch.no_grad()
    def score(self, prompts: list[str], replies: list[str]) -> list[float]:
        eos, out = self.tokenizer.eos_token, []
        for i in range(0, len(prompts), self.batch_size):
            texts = [p + r + eos for p, r in zip(prompts[i:i + self.batch_size], replies[i:i + self.batch_size])]
            enc = self.tokenizer(texts, return_tensors="pt", padding=True, padding_side="right",
                                 add_special_tokens=False)
            out += self.model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).logits[:, 0].tolist()
        return out

    def __call__(self, prompts, completions, **kwargs) -> list[float]:
        return self.score(list(prompts), list(completions))


def true_reward(reward_fn):
    """The task's reward (prompt, reply) -> float as a GRPO reward function: the oracle arm's."""
    def oracle_reward(prompts, completions, **kwargs):
        return [float(reward_fn(p, c)) for p, c in zip(prompts, completions)]
    return oracle_reward


def pair_accuracy(score, rows: list[dict]) -> float:
    """The share of `rows` whose chosen reply `score` ranks above the rejected one (ties count as wrong)."""
    chosen = score([r["prompt"] for r in rows], [r["chosen"] for r in rows])
    rejected = score([r["prompt"] for r in rows], [r["rejected"] for r in rows])
    return sum(c > r for c, r in zip(chosen, rejected)) / len(rows)


def _quiet_trl():
    import logging
    import warnings

    from transformers.utils import logging as hf_logging

    import datasets

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    datasets.disable_progress_bars()
    logging.getLogger("trl").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", module="trl")
    warnings.filterwarnings("ignore", module="transformers")


def train_reward_model(setup, rows: list[dict], arm: dict, out: Path, seed: int):
    """TRL's RewardTrainer on a seeded (1 − heldout_fraction) of `rows`, from the SFT model's weights with a fresh
    one-output head. Returns (LearnedReward, what the json records of it)."""
    from datasets import Dataset
    from transformers import AutoModelForSequenceClassification, PrinterCallback
    from trl import RewardConfig, RewardTrainer

    train_rows, held = split_pairs(rows, arm["heldout_fraction"], seed)
    c0 = time.process_time()
    torch.manual_seed(seed)  # the fresh head (RewardTrainer seeds again before building a model from a path)
    model = AutoModelForSequenceClassification.from_pretrained(str(setup.warm_dir), num_labels=1)
    model.config.pad_token_id = setup.tokenizer.pad_token_id
    args = RewardConfig(output_dir=str(out / "rlhf" / "reward-model"), num_train_epochs=arm["rm_epochs"],
                        per_device_train_batch_size=arm["rm_batch"], learning_rate=arm["rm_lr"], seed=seed,
                        use_cpu=True, bf16=False, fp16=False, report_to="none", save_strategy="no",
                        logging_steps=10, disable_tqdm=True, dataloader_num_workers=0)
    data = Dataset.from_list([{k: r[k] for k in ("prompt", "chosen", "rejected")} for r in train_rows])
    trainer = RewardTrainer(model=model, args=args, train_dataset=data, processing_class=setup.tokenizer)
    trainer.remove_callback(PrinterCallback)  # its log lines would bury the experiment's own
    trainer.train()
    cpu = time.process_time() - c0
    learned = LearnedReward(trainer.model, setup.tokenizer)
    truth = lambda ps, rs: [setup.reward_fn(p, r) for p, r in zip(ps, rs)]  # noqa: E731
    log = [{k: v for k, v in row.items() if k in ("step", "loss", "accuracy", "margin")}
           for row in trainer.state.log_history if "loss" in row]
    return learned, {"train_pairs": len(train_rows), "heldout_pairs": len(held), "epochs": arm["rm_epochs"],
                     "steps": trainer.state.global_step, "cpu_s": round(cpu, 3),
                     "heldout_accuracy": pair_accuracy(learned.score, held),
                     "heldout_true_accuracy": pair_accuracy(truth, held),
                     "train_accuracy": pair_accuracy(learned.score, train_rows), "log": log}


# ---------------------------------------------------------------- GRPO runs and their points

def measure_learned(model, setup, n: int, seed: int, learned: LearnedReward | None, measured: dict) -> dict:
    """The samples frontier.measure drew (the same seed, so the same replies): their learned reward (mean, and
    per-sample sd) and the true reward's sd. `measured`: measure's result, checked against the redraw."""
    torch.manual_seed(seed)
    samples = demo_task.sample(model, setup.tokenizer, setup.heldout_prompts, n, setup.max_new_tokens,
                               reward_fn=setup.reward_fn)
    true = torch.tensor([s.reward for s in samples], dtype=torch.float64)
    if not math.isclose(true.mean().item(), measured["reward"], abs_tol=1e-6):
        raise RuntimeError("the redrawn samples are not the measured ones")
    out = {"reward_sd": true.std().item()}
    if learned is not None:
        lr = torch.tensor(learned.score([s.prompt for s in samples], [s.response for s in samples]),
                          dtype=torch.float64)
        out.update(learned_reward=lr.mean().item(), learned_reward_sd=lr.std().item())
    return out


def grpo_run(setup, name: str, reward_func, beta: float, prompts: list[str], arm: dict, out: Path, seed: int,
             eval_samples: int, learned: LearnedReward | None) -> tuple[list[dict], dict]:
    """TRL's GRPOTrainer from the SFT model against `reward_func` with KL weight `beta`; then one point per
    checkpoint (deleted once measured). Returns (points without CPU seconds, the run's record)."""
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, PrinterCallback
    from trl import GRPOConfig, GRPOTrainer

    from .frontier import measure

    run_dir = out / "rlhf" / name
    args = GRPOConfig(output_dir=str(run_dir), beta=beta, num_generations=arm["num_generations"],
                      per_device_train_batch_size=arm["batch"], temperature=1.0,
                      max_completion_length=setup.max_new_tokens, learning_rate=arm["learning_rate"],
                      lr_scheduler_type="constant_with_warmup", warmup_steps=arm["warmup_steps"],
                      max_steps=arm["max_steps"], save_strategy="steps", save_steps=arm["eval_every"],
                      logging_steps=min(10, arm["eval_every"]), report_to="none", disable_tqdm=True, seed=seed,
                      use_cpu=True, bf16=False, fp16=False, dataloader_num_workers=0)
    trainer = GRPOTrainer(model=str(setup.warm_dir), reward_funcs=reward_func, args=args,
                          train_dataset=Dataset.from_dict({"prompt": prompts}), processing_class=setup.tokenizer)
    trainer.remove_callback(PrinterCallback)
    c0 = time.process_time()
    trainer.train()
    cpu = time.process_time() - c0
    steps = trainer.state.global_step
    keep = ("step", "reward", "kl", "loss", "completions/mean_length", "completions/clipped_ratio")
    log = [{k: row[k] for k in keep if k in row} for row in trainer.state.log_history if "reward" in row]
    del trainer
    points = []
    for folder in sorted(run_dir.glob("checkpoint-*"), key=lambda f: int(f.name.split("-")[1])):
        model = AutoModelForCausalLM.from_pretrained(str(folder)).eval()
        m = measure(model, setup, eval_samples, seed + 2)
        points.append({"run": name, "beta": beta, "step": int(folder.name.split("-")[1]), **m,
                       **measure_learned(model, setup, eval_samples, seed + 2, learned, m)})
        shutil.rmtree(folder)
    return points, {"run": name, "beta": beta, "steps": steps, "train_cpu_s": round(cpu, 3), "log": log}


def add_cpu(points: list[dict], train_cpu_s: float, steps: int, offset: float = 0.0) -> list[dict]:
    """Each point's CPU seconds: `offset` (the reference pass, or the reward model) plus the run's training time ×
    step / steps (each step costs the same)."""
    return [{**p, "cpu_s": offset + train_cpu_s * p["step"] / steps} for p in points]


def run_arm(setup, clean: list[dict], results: dict, arm: dict, out: Path, seed: int, say=print) -> dict:
    """The whole arm on the frontier's SFT model and clean pairs; returns what frontier.json holds under "rlhf"
    (points, the reward model, the runs, and the reading: `summarize`)."""
    from .frontier import measure

    _quiet_trl()
    t0, c0 = time.time(), time.process_time()
    n = results["eval_samples_per_prompt"]
    learned, rm = train_reward_model(setup, clean, arm, out, seed)
    say(f"reward model: {rm['train_pairs']} pairs, {rm['steps']} steps ({rm['cpu_s']:.1f} CPU s); held-out pair "
        f"accuracy {rm['heldout_accuracy']:.3f} (the true reward's {rm['heldout_true_accuracy']:.3f})")
    base = measure(setup.sft, setup, n, seed + 2)
    sft = {"run": "SFT", "step": 0, **base, **measure_learned(setup.sft, setup, n, seed + 2, learned, base)}
    prompts = list(dict.fromkeys(r["prompt"] for r in clean))  # the prompts of the pairs
    points, runs = [], []
    plan = [(f"rlhf-b{b:g}", "RLHF", learned, b) for b in arm["betas"]]
    plan.append((f"oracle-b{arm['oracle_beta']:g}", "oracle", true_reward(setup.reward_fn), arm["oracle_beta"]))
    for name, kind, reward_func, beta in plan:
        new, record = grpo_run(setup, name, reward_func, beta, prompts, arm, out, seed, n, learned)
        # every point's learned reward is recorded; the oracle run's too (what the learned reward says of it)
        offset = rm["cpu_s"] if kind == "RLHF" else 0.0
        new = [{**p, "arm": kind} for p in add_cpu(new, record["train_cpu_s"], record["steps"], offset)]
        points += new
        runs.append({**record, "arm": kind, "offset_cpu_s": offset})
        best = max(new, key=lambda p: p["reward"])
        say(f"{name}: best true reward {best['reward']:+.3f} at KL {best['kl']:.2f} (step {best['step']}, "
            f"{best['cpu_s']:.0f} CPU s); last {new[-1]['reward']:+.3f} at KL {new[-1]['kl']:.2f}, learned "
            f"{new[-1]['learned_reward']:+.2f} ({record['train_cpu_s']:.0f} CPU s of GRPO)")
    arm_out = {"settings": {k: list(v) if isinstance(v, tuple) else v for k, v in arm.items()},
               "reward_model": rm, "sft": sft, "runs": runs, "points": points, "prompts": len(prompts),
               "command": results["command"], "wall_s": round(time.time() - t0, 1),
               "cpu_s": round(time.process_time() - c0, 1)}
    arm_out["summary"] = summarize(results, arm_out)
    return arm_out


# ---------------------------------------------------------------- reading the points

def standardised_gaps(run_points: list[dict], sft: dict) -> list[dict]:
    """Per checkpoint: the learned and the true reward's gains over the SFT model's, each in units of its per-sample
    sd on the SFT model's samples, and their gap (learned − true; > 0: the learned reward claims more than the
    true one)."""
    out = []
    for p in sorted(run_points, key=lambda p: p["step"]):
        zl = (p["learned_reward"] - sft["learned_reward"]) / sft["learned_reward_sd"]
        zt = (p["reward"] - sft["reward"]) / sft["reward_sd"]
        out.append({"step": p["step"], "learned_z": zl, "true_z": zt, "gap": zl - zt})
    return out


def hacking_events(run_points: list[dict], sft: dict | None = None) -> list[dict]:
    """Where a run hacks its reward: from one checkpoint to the next (the SFT model, given, is the run's step 0) the
    learned reward rises while the true reward falls."""
    seq = ([{**sft, "step": 0}] if sft else []) + sorted(run_points, key=lambda p: p["step"])
    return [{"from_step": a["step"], "to_step": b["step"], "learned_change": b["learned_reward"] - a["learned_reward"],
             "true_change": b["reward"] - a["reward"]}
            for a, b in zip(seq, seq[1:]) if b["learned_reward"] > a["learned_reward"] and b["reward"] < a["reward"]]


def _slug(p: dict) -> str:
    from .frontier import Run

    return Run(p["method"], p["loss_type"], p["beta"], p["learning_rate"], p["label_smoothing"], p["labels"],
               p.get("replicate", 0)).slug


def dpo_cpu_points(points: list[dict], run_cpu: dict) -> tuple[list[dict], float]:
    """The clean-label DPO points with their CPU seconds: the reference pass plus the run's training time × step /
    steps. The reference pass is the setup time of the run that computed the reference cache (model loading and
    tokenising included: an over-count, against DPO). Returns (points, the reference pass's seconds)."""
    ref = [t["setup_cpu_s"] for t in run_cpu.values() if t.get("reference_pass") and t.get("labels") == "clean"]
    ref_s = ref[0] if ref else max((t["setup_cpu_s"] for t in run_cpu.values()), default=0.0)
    out = []
    for p in points:
        if p["method"] != "DPO" or p["labels"] != "clean":
            continue
        t = run_cpu[_slug(p)]
        out.append({**p, "run": _slug(p), "cpu_s": ref_s + t["train_cpu_s"] * p["step"] / t["steps"]})
    return out, ref_s


def hull_check(frontier_points: list[dict], rlhf_points: list[dict]) -> dict:
    """DPO's frontier (the upper concave hull of all clean-label DPO points and the SFT model: mixing checkpoints)
    against every RLHF point whose KL lies within the DPO points' KL range: holds when the hull is at or above each."""
    from .frontier_report import mixture_frontier

    dpo = [p for p in frontier_points if p["labels"] == "clean" and p["method"] in ("DPO", "SFT")]
    kls = [p["kl"] for p in dpo if p["method"] == "DPO"]
    lo, hi = min(kls), max(kls)
    compared = []
    for p in rlhf_points:
        if lo <= p["kl"] <= hi:
            hull = mixture_frontier(dpo, ["DPO"], p["kl"])
            compared.append({"run": p["run"], "step": p["step"], "kl": p["kl"], "reward": p["reward"],
                             "hull": hull, "margin": hull - p["reward"]})
    below = [c for c in compared if c["margin"] < 0]
    return {"kl_range": [lo, hi], "compared": len(compared), "outside_range": len(rlhf_points) - len(compared),
            "below_hull": len(below), "worst": min(compared, key=lambda c: c["margin"]) if compared else None,
            "points": compared, "holds": not below}


def cpu_check(dpo_points: list[dict], rlhf_points: list[dict]) -> dict:
    """The RLHF arm's best true reward (the cheapest checkpoint that had it), the first DPO checkpoint (fewest CPU
    seconds) with a true reward at least that high, and the ratio of their CPU seconds: ≤ HALF holds, ≤ FIFTH is
    the stretch aim. No DPO checkpoint that high: it does not hold."""
    best = min(rlhf_points, key=lambda p: (-p["reward"], p["cpu_s"]))
    reached = [p for p in dpo_points if p["reward"] >= best["reward"]]
    first = min(reached, key=lambda p: p["cpu_s"]) if reached else None
    ratio = first["cpu_s"] / best["cpu_s"] if first and best["cpu_s"] > 0 else None
    pick = lambda p: None if p is None else {k: p[k] for k in ("run", "step", "kl", "reward", "cpu_s")}  # noqa: E731
    return {"rlhf_best": pick(best), "dpo_first": pick(first), "ratio": ratio,
            "holds": ratio is not None and ratio <= HALF, "stretch": ratio is not None and ratio <= FIFTH}


def summarize(results: dict, arm: dict) -> dict:
    """The reading of the arm: per run its best and last points, hacking and gaps; the decision rule."""
    dpo, ref_s = dpo_cpu_points(results["points"], results["run_cpu_s"])
    rlhf = [p for p in arm["points"] if p["arm"] == "RLHF"]
    runs = {}
    for r in arm["runs"]:
        pts = sorted((p for p in arm["points"] if p["run"] == r["run"]), key=lambda p: p["step"])
        gaps = standardised_gaps(pts, arm["sft"])
        runs[r["run"]] = {"arm": r["arm"], "beta": r["beta"], "best": max(pts, key=lambda p: p["reward"]),
                          "last": pts[-1], "hacking": hacking_events(pts, arm["sft"]), "gaps": gaps,
                          "max_gap": max(g["gap"] for g in gaps), "train_cpu_s": r["train_cpu_s"]}
    hull, cpu = hull_check(results["points"], rlhf), cpu_check(dpo, rlhf)
    return {"runs": runs, "dpo_points": [{k: p[k] for k in ("run", "step", "kl", "reward", "cpu_s")} for p in dpo],
            "reference_pass_cpu_s": ref_s, "hull": hull, "cpu": cpu,
            "verdict": {"hull": hull["holds"], "cpu_half": cpu["holds"], "cpu_fifth": cpu["stretch"],
                        "claim_holds": hull["holds"] and cpu["holds"]}}


# ---------------------------------------------------------------- plot: true reward against CPU seconds

PW, PH, LEFT, TOP, BOTTOM = 640, 320, 56, 28, 40


def _style(arm: str, beta: float | None, i: int) -> tuple[str, str]:
    if arm == "DPO":
        return PALETTE[0], ""
    if arm == "oracle":
        return "#000000", ' stroke-dasharray="5 4"'
    return PALETTE[(1 + i) % len(PALETTE)], ""


def plot_svg(results: dict) -> str:
    """True reward (y) against CPU seconds (x): each DPO run (clean labels) and each GRPO run a line of its
    checkpoints, from its start (the SFT model, after the reference pass or the reward model)."""
    arm, s = results["rlhf"], results["rlhf"]["summary"]
    base = results["sft_reward"]
    lines = []  # (label, arm, colour, dash, [(cpu, reward, tip)])
    dpo_runs: dict[str, list] = {}
    for p in s["dpo_points"]:
        dpo_runs.setdefault(p["run"], []).append(p)
    for run, pts in dpo_runs.items():
        pts = sorted(pts, key=lambda p: p["step"])
        lines.append(("DPO", "DPO", *_style("DPO", None, 0), [(s["reference_pass_cpu_s"], base, "DPO start")] +
                      [(p["cpu_s"], p["reward"], f"{run} step {p['step']}: reward {p['reward']:+.3f}, KL "
                        f"{p['kl']:.2f}, {p['cpu_s']:.0f} CPU s") for p in pts]))
    for i, r in enumerate(arm["runs"]):
        pts = sorted((p for p in arm["points"] if p["run"] == r["run"]), key=lambda p: p["step"])
        label = f"RLHF β={r['beta']:g}" if r["arm"] == "RLHF" else f"oracle GRPO β={r['beta']:g}"
        lines.append((label, r["arm"], *_style(r["arm"], r["beta"], i), [(r["offset_cpu_s"], base, "start")] +
                      [(p["cpu_s"], p["reward"], f"{r['run']} step {p['step']}: reward {p['reward']:+.3f}, KL "
                        f"{p['kl']:.2f}" + (f", learned {p['learned_reward']:+.2f}" if "learned_reward" in p else "")
                        + f", {p['cpu_s']:.0f} CPU s") for p in pts]))
    xs = [x for *_, pts in lines for x, _, _ in pts]
    ys = [y for *_, pts in lines for _, y, _ in pts]
    x0, x1 = 0.0, max(xs) * 1.05 if xs else 1.0
    y0 = max(-1.0, math.floor(min(ys, default=-1) * 10 - 0.5) / 10)
    y1 = min(1.0, math.ceil(max(ys, default=1) * 10 + 0.5) / 10)
    width, height = LEFT + PW + 20, TOP + PH + BOTTOM + 46
    sx = lambda x: LEFT + (x - x0) / (x1 - x0) * PW  # noqa: E731
    sy = lambda y: TOP + (y1 - y) / (y1 - y0) * PH  # noqa: E731
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {width} {height}" width="{width}" '
             f'height="{height}" font-family="sans-serif" role="img" '
             f'aria-label="ground-truth reward against CPU seconds">',
             f'<rect width="{width}" height="{height}" fill="#fff"/>',
             f'<text x="{LEFT + PW / 2}" y="{TOP - 10}" font-size="13" text-anchor="middle" font-weight="bold">'
             'true reward against training compute</text>',
             f'<rect x="{LEFT}" y="{TOP}" width="{PW}" height="{PH}" fill="#fafafa" stroke="#ccc"/>']
    for t in _ticks(y0, y1, 8):
        parts.append(f'<line x1="{LEFT}" x2="{LEFT + PW}" y1="{sy(t):.1f}" y2="{sy(t):.1f}" stroke="#e6e6e6"/>'
                     f'<text x="{LEFT - 6}" y="{sy(t) + 4:.1f}" font-size="10" fill="#555" '
                     f'text-anchor="end">{_fmt(t)}</text>')
    for t in _ticks(x0, x1, 8):
        parts.append(f'<line x1="{sx(t):.1f}" x2="{sx(t):.1f}" y1="{TOP}" y2="{TOP + PH}" stroke="#e6e6e6"/>'
                     f'<text x="{sx(t):.1f}" y="{TOP + PH + 14}" font-size="10" fill="#555" '
                     f'text-anchor="middle">{_fmt(t)}</text>')
    parts.append(f'<text x="{LEFT + PW / 2}" y="{TOP + PH + 30}" font-size="11" fill="#333" text-anchor="middle">'
                 'CPU seconds (process time, one thread): reference pass or reward model, plus training</text>')
    parts.append(f'<text x="14" y="{TOP + PH / 2}" font-size="11" fill="#333" text-anchor="middle" '
                 f'transform="rotate(-90 14 {TOP + PH / 2})">true reward of samples (held-out prompts)</text>')
    for label, kind, color, dash, pts in lines:
        d = " ".join(f"{'M' if i == 0 else 'L'}{sx(x):.1f},{sy(y):.1f}" for i, (x, y, _) in enumerate(pts))
        parts.append(f'<path d="{d}" fill="none" stroke="{color}" stroke-width="1.2" opacity="0.6"{dash}/>')
        for x, y, tip in pts[1:]:
            shape = (f'<circle cx="{sx(x):.1f}" cy="{sy(y):.1f}" r="3.5" fill="{color}"/>' if kind == "DPO" else
                     f'<rect x="{sx(x) - 3.5:.1f}" y="{sy(y) - 3.5:.1f}" width="7" height="7" fill="{color}"/>')
            parts.append(f"<g class=\"point\"><title>{html.escape(tip)}</title>{shape}</g>")
    lx, ly = LEFT, TOP + PH + BOTTOM + 18
    seen = []
    for label, kind, color, dash, _ in lines:
        if label in seen:
            continue
        seen.append(label)
        parts.append(f'<path d="M{lx},{ly - 4} L{lx + 20},{ly - 4}" stroke="{color}" stroke-width="2"{dash}/>'
                     f'<text x="{lx + 25}" y="{ly}" font-size="12">{html.escape(label)}</text>')
        lx += 40 + 7 * len(label)
    parts.append("</svg>")
    return "\n".join(parts) + "\n"


# ---------------------------------------------------------------- the docs section

def _n(v, fmt="+.3f") -> str:
    return "–" if v is None else format(v, fmt)


def markdown_section(results: dict, svg_name: str) -> str:
    arm = results["rlhf"]
    s, rm, st = arm["summary"], arm["reward_model"], arm["settings"]
    v, hull, cpu = s["verdict"], s["hull"], s["cpu"]
    head = PROTOCOL if results.get("task", "line") == "line" else \
        "## DPO against RLHF: VADER sentiment on HH prompts\n\nThe protocol of the line task's section, on this task."
    lines = [head, "", "### Results", "",
             f"Rerun: `{arm['command']}` ({results['task']} task; the frontier's runs "
             f"{results['cpu_s'] / 60:.1f} min CPU, then this arm {arm['cpu_s'] / 60:.1f} min CPU, "
             f"{arm['wall_s'] / 60:.1f} min wall, on {results['machine']}; every point is under \"rlhf\" in "
             "`frontier.json`).", "",
             f"![true reward against CPU seconds]({svg_name})", "",
             f"**Verdict**: DPO's hull at or above every RLHF point in its KL range: "
             f"**{'yes' if v['hull'] else 'no'}**; DPO at the RLHF arm's best true reward in ≤ ½ its CPU seconds: "
             f"**{'yes' if v['cpu_half'] else 'no'}** (≤ ⅕, the stretch aim: {'yes' if v['cpu_fifth'] else 'no'}). "
             f"The claim {'holds' if v['claim_holds'] else 'does not hold'} on this task.", "",
             f"Reward model (`RewardTrainer`, {rm['epochs']} epochs, batch {st['rm_batch']}, lr {st['rm_lr']:g}): "
             f"{rm['train_pairs']} pairs to train, {rm['heldout_pairs']} held out; held-out pair accuracy "
             f"**{rm['heldout_accuracy']:.3f}** (the true reward's on the same labels "
             f"{rm['heldout_true_accuracy']:.3f}; on its own training pairs {rm['train_accuracy']:.3f}); "
             f"{rm['steps']} steps, {rm['cpu_s']:.1f} CPU s.", "",
             f"GRPO: {st['max_steps']} steps, {st['num_generations']} generations per prompt, {st['batch']} "
             f"completions a step, on the {arm['prompts']} prompts of the pairs; lr {st['learning_rate']:g} constant "
             f"after {st['warmup_steps']} warm-up steps. SFT model: true reward {arm['sft']['reward']:+.3f}, learned "
             f"{arm['sft']['learned_reward']:+.3f} (per-sample sd {arm['sft']['reward_sd']:.3f} and "
             f"{arm['sft']['learned_reward_sd']:.3f}: the units of the standardised gap).", "",
             "| run | β | best true reward (KL, step, CPU s) | last: true reward | last: KL | last: learned reward "
             "| steps where learned ↑ and true ↓ | largest standardised gap | GRPO CPU s |",
             "|---|---:|---|---:|---:|---:|---|---:|---:|"]
    for name, r in s["runs"].items():
        b, last = r["best"], r["last"]
        hack = ", ".join(f"{h['from_step']}→{h['to_step']}" for h in r["hacking"]) or "none"
        lines.append(f"| {name} | {r['beta']:g} | {b['reward']:+.3f} ({b['kl']:.2f}, {b['step']}, {b['cpu_s']:.0f}) | "
                     f"{last['reward']:+.3f} | {last['kl']:.2f} | {_n(last.get('learned_reward'), '+.2f')} | {hack} | "
                     f"{r['max_gap']:+.2f} | {r['train_cpu_s']:.0f} |")
    lo, hi = hull["kl_range"]
    worst = hull["worst"]
    lines += ["", f"DPO's hull (all {len(s['dpo_points'])} clean-label DPO checkpoints and the SFT model) against the "
              f"{hull['compared']} RLHF points with KL in [{lo:.3f}, {hi:.3f}] ({hull['outside_range']} outside): "
              f"{hull['below_hull']} below it" +
              (f"; the closest, {worst['run']} step {worst['step']}: reward {worst['reward']:+.3f} at KL "
               f"{worst['kl']:.3f}, hull {worst['hull']:+.3f} (margin {worst['margin']:+.3f})." if worst else "."), ""]
    rb, df = cpu["rlhf_best"], cpu["dpo_first"]
    lines.append(f"CPU seconds: the RLHF arm's best true reward is {rb['reward']:+.3f} ({rb['run']} step {rb['step']}, "
                 f"{rb['cpu_s']:.0f} CPU s, the reward model's {rm['cpu_s']:.0f} included); " +
                 (f"the first DPO checkpoint at least that high is {df['run']} step {df['step']} ({df['reward']:+.3f} "
                  f"at KL {df['kl']:.2f}), {df['cpu_s']:.0f} CPU s (the reference pass's "
                  f"{s['reference_pass_cpu_s']:.1f} included): **{cpu['ratio']:.2f}×** RLHF's." if df else
                  "no DPO checkpoint is that high."))
    lines += ["", "<details><summary>Every RLHF and oracle point</summary>", "",
              "| run | step | KL | true reward | learned reward | standardised gap | CPU s |",
              "|---|---:|---:|---:|---:|---:|---:|"]
    gaps = {(n, g["step"]): g["gap"] for n, r in s["runs"].items() for g in r["gaps"]}
    for p in arm["points"]:
        lines.append(f"| {p['run']} | {p['step']} | {p['kl']:.3f} | {p['reward']:+.3f} | "
                     f"{_n(p.get('learned_reward'), '+.3f')} | {gaps[p['run'], p['step']]:+.2f} | {p['cpu_s']:.1f} |")
    lines += ["", "</details>", "", "<details><summary>DPO's points with their CPU seconds</summary>", "",
              "| run | step | KL | true reward | CPU s |", "|---|---:|---:|---:|---:|"]
    for p in s["dpo_points"]:
        lines.append(f"| {p['run']} | {p['step']} | {p['kl']:.3f} | {p['reward']:+.3f} | {p['cpu_s']:.1f} |")
    lines += ["", "</details>", "", READING, ""]
    return "\n".join(lines)


def write_outputs(results: dict, out: str | Path, docs_dir: str | Path | None = None) -> None:
    """frontier.json (with "rlhf"), the CPU-seconds plot and frontier-rlhf.md in `out`; with `docs_dir` the plot
    and the frontier-rlhf section of `<docs_dir>/experiments.md` (its reading kept). Also from a saved frontier.json
    (`write_outputs(json.load(...), out, docs)`)."""
    import json

    out = Path(out)
    name = NAME if results.get("task", "line") == "line" else f"{NAME}-{results['task']}"
    svg = plot_svg(results)
    write_text(out / "frontier.json", json.dumps(results, indent=2))
    write_text(out / f"{name}.svg", svg)
    section = markdown_section(results, f"{name}.svg")
    write_text(out / f"{name}.md", section)
    if docs_dir is not None:
        write_text(Path(docs_dir) / f"{name}.svg", svg)
        update_docs(Path(docs_dir) / "experiments.md", name, section, keep=READING)
