"""Reward vs KL frontier: the controlled experiment of the DPO paper (Rafailov et al. 2023, Fig. 2), small.

On the demo's task (dpokit.demo_task: a positive line about a subject, exact ground-truth reward), or with
`task="vader"` on HH prompts with VADER sentiment as the reward (hh_sentiment.py; no noisy part there):

1. the demo's warm-up (SFT) model, built and trained from scratch (dpokit.demo.warm_up);
2. preference pairs sampled from it (temperature 1) and labelled by the true reward
   (demo_task.make_pairs); a second copy with a seeded 20% of the labels flipped;
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

import itertools
import json
import math
import os
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from .. import demo_task
from ..config import TrainConfig
from ..data import load_examples
from ..demo import FULL as DEMO_FULL, QUICK as DEMO_QUICK
from ..demo import MAX_NEW_TOKENS, malformed_line, sample_stats, warm_up
from ..families import get_family
from ..io import write_text
from ..recipes.common import write_jsonl
from ..scoring import score_examples
from ..tiny import build_llama, build_tokenizer, single_thread
from ..train import Loop
from . import update_docs
from .checkpoints import drain_policies
from .frontier_report import (FLIP_FRACTION, SMOOTHING, line_description, markdown_section, plot_svg,
                              summarize, update_section)



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


def _summed_grads(scorer, examples: list, tokenizer, batch_size: int = 128):
    """Σ over `examples` of ∇(log π(y_w) − log π(y_l)) and of ∇log π(y_w), flattened, scored by the training
    scorer (the loop's tokenization and log-probs)."""
    params = [q for q in scorer.parameters() if q.requires_grad]
    sums = None
    for s in score_examples(get_family("causal_lm"), scorer, examples, TrainConfig(), tokenizer, batch_size):
        grads = (torch.autograd.grad((s.scores.chosen - s.scores.rejected).sum(), params, retain_graph=True),
                 torch.autograd.grad(s.scores.chosen.sum(), params))
        flat = [torch.cat([g.reshape(-1) for g in gs]) for gs in grads]
        sums = flat if sums is None else [x + y for x, y in zip(sums, flat)]
    return sums


def first_step_alignment(model, tokenizer, rows: list[dict]) -> dict:
    """How alike DPO's and preferred-FT's first updates are, at the SFT model on `rows` (pairs of its samples).

    At the reference the DPO logit is 0, so DPO's gradient is −(β/2)·mean(∇log π(y_w) − ∇log π(y_l)) for every
    β; preferred-FT's is −mean ∇log π(y_w) (over tokens: a constant factor here). Over pairs of on-policy
    samples the two have the same expectation up to that factor: mean ∇log π(y_w) = ½·mean(∇y_w − ∇y_l) +
    ½·mean(∇y_w + ∇y_l), and the last term has expectation 0 under π. Adam's first step is the sign of the
    gradient, so its scale (β) drops out. Reported: the cosine of the two gradients and of their first Adam
    steps, beside the cosine of DPO's gradient on one half of the pairs with the other half's (what sampling
    noise alone leaves)."""
    scorer = get_family("causal_lm").scorer(model, TrainConfig()).eval()
    examples = load_examples(rows, tokenizer, None, None)
    half = len(examples) // 2
    # Gradients are linear in the examples: the two halves' sums make the whole set's. Cosines and signs do
    # not depend on the sign or scale of a loss, so sums of ∇log-probs stand for the losses' gradients.
    dpo_a, pft_a = _summed_grads(scorer, examples[:half], tokenizer)
    dpo_b, pft_b = _summed_grads(scorer, examples[half:], tokenizer)
    dpo, pft = dpo_a + dpo_b, pft_a + pft_b
    cos = lambda x, y: torch.nn.functional.cosine_similarity(x, y, dim=0).item()  # noqa: E731
    return {"pairs": len(rows), "grad_cosine": cos(dpo, pft), "adam_step_cosine": cos(dpo.sign(), pft.sign()),
            "dpo_halves_grad_cosine": cos(dpo_a, dpo_b), "dpo_halves_adam_step_cosine": cos(dpo_a.sign(), dpo_b.sign())}


def _say(t0: float, message: str) -> None:
    print(f"[frontier {time.time() - t0:6.1f}s] {message}", flush=True)


@dataclass
class Setup:
    """A task for the experiment: the SFT model, the prompts, and how a reply is scored."""
    name: str  # "line" (dpokit.demo_task) or "vader" (HH prompts, VADER sentiment)
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
    train_prompts, heldout_prompts = demo_task.split_prompts(seed)
    tokenizer = build_tokenizer(demo_task.corpus(), vocab_size=600)
    sft = build_llama(tokenizer, hidden_size=demo["hidden"], num_layers=demo["layers"], seed=seed)
    warm_up(sft, tokenizer, demo_task.sft_rows(train_prompts + heldout_prompts, demo["sft_rows"], seed),
            demo["sft_steps"], demo["sft_lr"], seed=seed)
    return Setup("line", sft, tokenizer, out / "sft", train_prompts, heldout_prompts, demo_task.reward, MAX_NEW_TOKENS,
                 malformed_line, description=line_description(demo))


def measure(model, setup: Setup, n: int, seed: int) -> dict:
    """Mean true reward of `n` fresh samples per held-out prompt, KL(π ‖ π_SFT) estimated on them, and the
    share of malformed replies (None where the task has no such notion)."""
    stats = sample_stats(model, setup.sft, setup.tokenizer, setup.heldout_prompts, n, seed, setup.max_new_tokens,
                         setup.reward_fn, setup.malformed)
    return {"reward": stats["mean_reward"], "kl": stats["kl_to_warmup"], "malformed": stats["malformed"]}


def _train_and_measure(run: Run, data: Path, setup: Setup, size: dict, out: Path, seed: int,
                       timings: dict | None = None) -> list[dict]:
    """Train `run`, then one point per checkpoint (and the final model). `timings`: where the run's CPU seconds go
    (`timings[run.slug]`: the setup, which holds the reference pass when the reference cache missed, and the
    training steps), for the RLHF arm's compute comparison (frontier_rlhf)."""
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
    cache = Path(cfg.ref_cache_dir)
    cached_before = len(list(cache.rglob("*.safetensors")))
    c0 = time.process_time()
    loop = Loop(cfg)  # what train(cfg) does, in two timed parts: the setup (and reference pass), then the steps
    c1 = time.process_time()
    result = loop.run()
    c2 = time.process_time()
    if timings is not None:
        timings[run.slug] = {"setup_cpu_s": round(c1 - c0, 3), "train_cpu_s": round(c2 - c1, 3),
                             "steps": result.global_step, "labels": run.labels, "method": run.method,
                             "reference_pass": len(list(cache.rglob("*.safetensors"))) > cached_before}
    final = (result.global_step, get_family("causal_lm").load_trained(run_dir)[0])
    return [{**asdict(run), "step": step, **measure(model, setup, size["eval_samples"], seed + 2)}
            for step, model in itertools.chain(drain_policies(run_dir, setup.sft), [final])]


def sft_optimum(setup: Setup, n: int, seed: int) -> list[dict]:
    """`optimal_frontier` from `n` fresh samples per held-out prompt of the SFT model."""
    torch.manual_seed(seed + 3)
    return optimal_frontier([x.reward for x in demo_task.sample(setup.sft, setup.tokenizer, setup.heldout_prompts, n,
                                                            setup.max_new_tokens, reward_fn=setup.reward_fn)])


def run_frontier(out: str | Path = "runs/frontier", quick: bool = False, seed: int = 0,
                 docs_dir: str | Path | None = None, task: str = "line", data: str | Path | None = None,
                 rlhf: bool = False) -> dict:
    """Run the experiment (see the module docstring); returns what frontier.json holds. `task="vader"` runs it
    on the prompts of an HH-style preference file `data` with VADER sentiment as the reward
    (dpokit.experiments.hh_sentiment). `rlhf`: then the RLHF arm on the same SFT model and pairs
    (frontier_rlhf: a TRL reward model and GRPO), its points under "rlhf" in frontier.json, and with `docs_dir`
    its own section; the frontier section of the docs is then left as it is."""
    if task == "vader":
        from . import hh_sentiment

        setup_fn, size = hh_sentiment.setup, hh_sentiment.QUICK if quick else hh_sentiment.FULL
    else:
        setup_fn, size = line_setup, QUICK if quick else FULL
    arm = None
    if rlhf:
        from . import frontier_rlhf

        arm = frontier_rlhf.QUICK if quick else frontier_rlhf.FULL
    with single_thread():
        return _run(Path(out), size, quick, seed, docs_dir, setup_fn, data, arm)


def _run(out: Path, size: dict, quick: bool, seed: int, docs_dir, setup_fn, data_path, arm: dict | None = None
         ) -> dict:
    t0, cpu0 = time.time(), time.process_time()
    out.mkdir(parents=True, exist_ok=True)
    setup = setup_fn(out, size, seed, data_path)
    setup.sft.save_pretrained(setup.warm_dir)
    setup.tokenizer.save_pretrained(setup.warm_dir)
    _say(t0, f"SFT model ready ({setup.name} task)")

    torch.manual_seed(seed + 1)
    clean = demo_task.make_pairs(demo_task.sample(setup.sft, setup.tokenizer, setup.train_prompts,
                                          size["demo"]["samples_per_prompt"], setup.max_new_tokens,
                                          reward_fn=setup.reward_fn))
    data = {("clean", r): out / "pairs_clean.jsonl" for r in range(max(1, size["replicates"]))}
    write_jsonl(clean, data["clean", 0])
    flipped = []
    for r in range(size["replicates"]):
        noisy, flipped = flip_labels(clean, FLIP_FRACTION, seed + r)
        data["noisy", r] = out / f"pairs_noisy_{r}.jsonl"
        write_jsonl(noisy, data["noisy", r])
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
    timings: dict = {}
    for run in size["runs"]:
        new = _train_and_measure(run, data[run.labels, run.replicate], setup, size, out, seed, timings)
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
        "run_cpu_s": timings,  # CPU seconds of each run's setup (reference pass) and steps
    }
    results["wall_s"] = round(time.time() - t0, 1)
    results["cpu_s"] = round(time.process_time() - cpu0, 1)  # wall time depends on what else the machine runs
    results["command"] = "dpokit experiment frontier" + (" --quick" if quick else "") + \
        (" --rlhf" if arm is not None else "") + \
        (f" --task {setup.name} --data {data_path}" if setup.name != "line" else "") + f" --out {out}" + \
        (f" --docs {docs_dir}" if docs_dir is not None else "")
    results["machine"] = f"{os.cpu_count()} CPU cores, torch on 1 thread"
    if arm is None:
        write_outputs(results, out, docs_dir)
    else:  # the frontier's own section and plot in the docs stay as they are; the arm writes its section
        from . import frontier_rlhf

        write_outputs(results, out, None)
        results["rlhf"] = frontier_rlhf.run_arm(setup, clean, results, arm, out, seed, say=lambda m: _say(t0, m))
        frontier_rlhf.write_outputs(results, out, docs_dir)
    _say(t0, f"done; {out / 'frontier.md'}" + (f", {Path(docs_dir) / 'experiments.md'}" if docs_dir else ""))
    return results


def write_outputs(results: dict, out: str | Path, docs_dir: str | Path | None = None) -> None:
    """frontier.json, the plot and frontier.md in `out`; the plot and the docs section in `docs_dir`.
    Also redraws them from a saved frontier.json (`write_outputs(json.load(...), out)`)."""
    out = Path(out)
    results["summary"] = summarize(results)
    write_text(out / "frontier.json", json.dumps(results, indent=2))
    name = "frontier" if results.get("task", "line") == "line" else f"frontier-{results['task']}"
    svg = plot_svg(results["points"], optimal=results.get("optimal"))
    write_text(out / f"{name}.svg", svg)
    section = markdown_section(results, svg_name=f"{name}.svg")
    write_text(out / "frontier.md", section)
    if docs_dir is not None:
        docs = Path(docs_dir)
        write_text(docs / f"{name}.svg", svg)
        if name == "frontier":
            update_section(docs / "experiments.md", section)
        else:  # its reading is written below the section, as the other experiments' are
            update_docs(docs / "experiments.md", name, section)
