"""DPO for a robot arm: smoother reaching on Reacher-v5 (issue 17's experiment; `dpokit experiment policy`, and
`dpokit demo policy` at demo size).

The protocol (written into docs/experiments.md before the runs; `PROTOCOL` below is that text, verbatim):

1. a scripted demonstrator (Jacobian-transpose control with telegraph noise, reacher.py) reaches, jerkily;
2. the unaligned policy: the policy family's tanh-Gaussian MLP trained by behaviour cloning on its actions;
3. pairs: the BC policy's own sampled rollouts through the rollouts recipe, segments of 10 steps, labelled by
   smoothness (the lower mean squared third difference of qpos is chosen);
4. DPO (`sigmoid`, β 0.1, the BC policy as reference), CPL (`cpl`, β 0.1, λ 0.5, no BC term) and preferred-FT
   (`sft`) from the BC policy through `dpokit.train`, the same pairs, steps and learning rate;
5. every policy acts deterministically on the same 200 evaluation episodes: jerk, success rate, return.

Decision rule: a method meets the goal when its jerk is at most 0.5× BC's and its success rate at least BC's minus
2 points; the experiment counts only if BC's success rate is at least 30%. The RLHF arm of the protocol (reward
model + SB3 PPO) is not implemented here yet.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch

from ..config import TrainConfig
from ..families import get_family
from ..recipes.rollouts import rollout_pairs, write
from ..train import train
from . import finish, say, training_log
from . import reacher as R

NAME = "policy"
FULL = dict(demo_episodes=200, bc_steps=3000, bc_batch=256, bc_lr=1e-3, pair_steps=20_000, segment_length=10,
            eval_episodes=200, epochs=5, batch_size=64, learning_rate=1e-4, beta=0.1, cpl_lambda=0.5,
            pair_exploration=0.1,  # σ: see exploring_actor (protocol version 2); None: the policy's own samples (v1)
            rlhf=True, rm_steps=2000, ppo_steps=50_000, rlhf_anchor=0.1)  # the RLHF arm (rlhf.py)
# The demo is the whole experiment (about 15 s on 2 cores).
DEMO = dict(FULL)
QUICK = dict(FULL, demo_episodes=20, bc_steps=100, pair_steps=800, eval_episodes=10, epochs=1, rm_steps=20,
             ppo_steps=2048)
GOAL = {"jerk_ratio": 0.5, "success_drop": 0.02, "bc_success_min": 0.30}
METHODS = (("bc", "BC (unaligned)"), ("sft", "preferred-FT"), ("dpo", "DPO"), ("cpl", "CPL"))
RLHF = ("rlhf", "RLHF (reward model + PPO)")


def _rlhf_line(results: dict) -> str:
    """The RLHF arm's sizes and the compute each pipeline took (CPU seconds, this process)."""
    if "rlhf" not in results:
        return "The RLHF arm (reward model + PPO) is not run yet."
    r, s, cpu = results["rlhf"], results["size"], results["train_cpu_seconds"]
    c = r["cpu_seconds"]
    rlhf = c["reward_model"] + c["ppo"]
    return (f"RLHF arm: reward model {s['rm_steps']} steps (accuracy on its pairs {r['reward_model_accuracy']:.3f}), "
            f"SB3 policy behaviour-cloned (jerk {r['sb3_bc']['jerk']:.3e}, success {r['sb3_bc']['success_rate']:.1%} "
            f"before PPO), PPO {s['ppo_steps']:,} steps. CPU seconds to align from the BC policy: DPO {cpu['dpo']}, "
            f"CPL {cpu['cpl']}, RLHF {rlhf:.1f} (reward model {c['reward_model']} + PPO {c['ppo']}): RLHF took "
            f"{rlhf / max(cpu['dpo'], 1e-9):.0f}× DPO's.")


def _rows(results: dict) -> tuple:
    return (*METHODS, RLHF) if "rlhf" in results else METHODS
READING = "<!-- policy:reading -->"  # docs text after this marker is hand-written and survives a rerun
# Seeds of the episodes' starts: demonstrations, pair rollouts and evaluation never share one (env i of a batch
# reset with seed s starts from seed s + i; the pair rollout's later episodes draw from its environments' streams).
DEMO_SEED, PAIR_SEED, EVAL_SEED = 1_000, 2_000, 3_000
PAIR_ENVS = 40



def _seeds(seed: int) -> tuple[int, int, int]:
    return DEMO_SEED + 10_000 * seed, PAIR_SEED + 10_000 * seed, EVAL_SEED + 10_000 * seed


def train_bc(demos: dict, out: Path, size: dict, seed: int, say=print) -> tuple[str, list[float]]:
    """The BC policy (tanh-Gaussian MLP 64-64) saved as a policy folder; and its logged NLLs."""
    family = get_family("policy")
    obs_dim, act_dim = demos["obs"].shape[-1], demos["actions"].shape[-1]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        policy = family.new_policy(obs_dim, act_dim, head="tanh_gaussian", hidden=(64, 64))
        losses = R.behaviour_clone(policy, demos["obs"], demos["actions"], size["bc_steps"], size["bc_batch"],
                                   size["bc_lr"], seed, say=say)
    family.save(policy, None, str(out))
    return str(out), losses


def tune(bc_dir: str, data: Path, out: Path, loss_type: str, size: dict, seed: int) -> tuple[str, dict]:
    """DPO, CPL or preferred-FT from the BC policy through dpokit's loop; the trained folder and the training log's
    first and last rows."""
    extra = {"cpl_lambda": size["cpl_lambda"], "rpo_alpha": 0.0} if loss_type == "cpl" else {}
    cfg = TrainConfig(model=bc_dir, family="policy", train_data=str(data), output_dir=str(out),
                      loss_type=loss_type, beta=size["beta"], learning_rate=size["learning_rate"],
                      lr_scheduler_type="constant", num_train_epochs=size["epochs"],
                      per_device_train_batch_size=size["batch_size"], logging_steps=5, save_steps=10 ** 6,
                      seed=seed, disable_tqdm=True, ref_cache_dir=str(out.parent / "cache"), **extra)
    return str(out), training_log(train(cfg))


def evaluate(path: str, episodes: int, seed: int) -> tuple[dict, dict]:
    """A policy folder acting deterministically on the evaluation episodes: the measures and the episodes."""
    policy, _ = get_family("policy").load_trained(path)
    ep = R.episodes(R.policy_actor(policy), episodes, seed)
    return R.measures(ep), ep


def exploring_actor(policy: torch.nn.Module, sigma: float, seed: int):
    """The first run's diagnosis' fix (docs/experiments.md): pair segments from the policy's deterministic action
    plus Gaussian exploration noise of std `sigma` in action space (kept strictly inside the tanh bounds, where the
    squashed log-density is finite), so that a segment's jerk reflects the motion the policy is evaluated on
    rather than its own sampling noise (the BC policy's pre-tanh std, about 0.44, makes sampled segments 5x as
    jerky as deterministic ones)."""
    act = R.policy_actor(policy, deterministic=True)
    rng = np.random.default_rng(seed)

    def explore(obs: np.ndarray) -> np.ndarray:
        a = act(obs)
        return np.clip(a + sigma * rng.standard_normal(a.shape), -1 + R.BC_CLIP, 1 - R.BC_CLIP)
    return explore


def verdict(bc: dict, method: dict) -> dict:
    """The decision rule applied to one method's figures against the BC policy's."""
    checks = {"bc_success_at_least_30pct": bc["success_rate"] >= GOAL["bc_success_min"],
              "jerk_halved": method["jerk"] <= GOAL["jerk_ratio"] * bc["jerk"],
              "success_kept": method["success_rate"] >= bc["success_rate"] - GOAL["success_drop"] - 1e-12}
    return {**checks, "met": all(checks.values())}


def run(out_dir: str | Path = "runs/policy", size: dict | None = None, seed: int = 0,
        docs_dir: str | Path | None = None, command: str = "dpokit experiment policy") -> dict:
    """The protocol in the module docstring; writes policy.json (and the docs section and picture) and returns the
    results: {"bc": {...}, "dpo": {...}, "cpl": {...}, "sft": {...}, ...}, each with jerk, success_rate, return."""
    size = dict(size or FULL)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    cpu0 = time.process_time()
    demo_seed, pair_seed, eval_seed = _seeds(seed)
    demos = R.demonstrations(size["demo_episodes"], demo_seed)
    demonstrator = R.measures(demos)
    say(t0, f"demonstrator: {size['demo_episodes']} episodes ({demos['actions'].shape[0] * demos['actions'].shape[1]}"
             f" steps), " + ", ".join(f"{k} {v:.4g}" for k, v in demonstrator.items()))
    bc_dir, bc_losses = train_bc(demos, out / "bc", size, seed, say=lambda m: say(t0, m))
    say(t0, f"BC: {size['bc_steps']} steps, NLL {bc_losses[0]:.3f} -> {bc_losses[-1]:.3f}")

    policy, _ = get_family("policy").load_trained(bc_dir)
    if size.get("pair_exploration") is not None:
        policy = exploring_actor(policy, size["pair_exploration"], pair_seed)
    built = rollout_pairs(R.ENV_ID, policy, steps=size["pair_steps"], num_envs=PAIR_ENVS,
                          segment_length=size["segment_length"], label="smoothness", seed=pair_seed)
    data = out / "pairs.npz"
    write(built, data)
    chosen = np.array([r["chosen"]["info"]["jerk"] for r in built.rows])
    rejected = np.array([r["rejected"]["info"]["jerk"] for r in built.rows])
    pairs = {"pairs": len(built.rows), "segments": int(built.counts["segments"]), "ties": int(built.counts["ties"]),
             "chosen_jerk": float(chosen.mean()), "rejected_jerk": float(rejected.mean())}
    say(t0, f"{len(built.rows)} pairs from {built.steps} BC rollout steps: mean segment jerk chosen "
             f"{pairs['chosen_jerk']:.3g}, rejected {pairs['rejected_jerk']:.3g}")

    models, logs, cpu = {"bc": bc_dir}, {}, {}
    for key, loss_type in (("sft", "sft"), ("dpo", "sigmoid"), ("cpl", "cpl")):
        c0 = time.process_time()
        models[key], logs[key] = tune(bc_dir, data, out / key, loss_type, size, seed)
        cpu[key] = round(time.process_time() - c0, 1)
        first, last = logs[key].get("first", {}), logs[key].get("last", {})
        say(t0, f"{key}: {logs[key]['steps']} steps; " + ", ".join(
            f"{k} {first[k]:.4g} -> {last[k]:.4g}" for k in first if k in last))

    results = {"command": command, "seed": seed, "size": dict(size), "demonstrator": demonstrator,
               "bc_nll": bc_losses, "pair_data": pairs, "training": logs, "train_cpu_seconds": cpu}
    traces = {}
    for key, path in models.items():
        results[key], ep = evaluate(path, size["eval_episodes"], eval_seed)
        traces[key] = {"qpos": ep["qpos"][0], "actions": ep["actions"][0]}
        say(t0, f"{key}: " + ", ".join(f"{k} {v:.4g}" for k, v in results[key].items()))
    if size.get("rlhf"):
        from .rlhf import run_rlhf

        say(t0, "RLHF arm: reward model, then PPO")
        with np.load(data) as arrays:
            results["rlhf"] = run_rlhf(dict(arrays), demos, size, seed, eval_seed, say=lambda m: say(t0, m))
    results["verdict"] = {key: verdict(results["bc"], results[key]) for key in ("dpo", "cpl", "sft", "rlhf")
                          if key in results}
    results["minutes"] = round((time.time() - t0) / 60, 1)
    results["cpu_minutes"] = round((time.process_time() - cpu0) / 60, 1)
    frames = _frames({k: models[k] for k in ("bc", "dpo", "cpl")}, eval_seed)
    _picture(traces, frames, out / "policy-reacher.png")
    if docs_dir is not None:
        _picture(traces, frames, Path(docs_dir) / "policy-reacher.png")
    finish(results, out, NAME, format_table(results), docs_dir, markdown_section(results), keep=READING)
    return results


# ---------------------------------------------------------------- the picture


def _frames(models: dict, eval_seed: int, steps=(0, 10, 20, 30, 49), size: int = 240) -> dict | None:
    """Rendered frames of evaluation episode 0 (the same start for every policy), or None when MuJoCo cannot render
    off-screen here (MUJOCO_GL=egl is tried)."""
    import os

    os.environ.setdefault("MUJOCO_GL", "egl")
    try:
        import gymnasium as gym

        out = {}
        for key, path in models.items():
            act = R.policy_actor(get_family("policy").load_trained(path)[0])
            env = gym.make(R.ENV_ID, render_mode="rgb_array", width=size, height=size)
            try:
                obs, _ = env.reset(seed=eval_seed)
                shots = []
                for t in range(R.EPISODE_STEPS):
                    if t in steps:
                        shots.append(env.render())
                    obs, *_ = env.step(np.clip(act(obs[None])[0], -1, 1).astype(np.float32))
            finally:
                env.close()
            out[key] = shots
        return out
    except Exception:  # noqa: BLE001 - no off-screen OpenGL here: the picture goes without frames
        return None


def _picture(traces: dict, frames: dict | None, path: Path) -> None:
    """Joint angles and actions over evaluation episode 0 for BC, DPO and CPL (same start), and rendered frames
    when there are any."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = [k for k in ("bc", "dpo", "cpl") if k in traces]
    labels = dict(METHODS)
    colors = {"bc": "tab:gray", "dpo": "tab:blue", "cpl": "tab:orange"}
    ratios = [1, 1, 1, 1] + ([3.2] if frames else [])
    fig = plt.figure(figsize=(10, 2.2 * sum(ratios)))
    grid = fig.add_gridspec(len(ratios), 1, height_ratios=ratios)
    panels = [("qpos", 0, "joint 1 angle (rad)"), ("qpos", 1, "joint 2 angle (rad)"),
              ("actions", 0, "joint 1 torque"), ("actions", 1, "joint 2 torque")]
    for i, (what, j, title) in enumerate(panels):
        ax = fig.add_subplot(grid[i])
        for k in keys:
            ax.plot(traces[k][what][:, j], color=colors[k], label=labels[k], lw=1.4)
        ax.set_ylabel(title, fontsize=8)
        if i == 0:
            ax.legend(fontsize=8, ncol=3)
        if i == len(panels) - 1:
            ax.set_xlabel("step (0.02 s)")
    if frames:
        ax = fig.add_subplot(grid[4])
        strip = np.concatenate([np.concatenate(frames[k], 1) for k in keys if k in frames], 0)
        ax.imshow(strip)
        ax.set_axis_off()
        ax.set_title("frames at steps 0, 10, 20, 30, 49; rows: " + ", ".join(labels[k] for k in keys), fontsize=8)
    fig.suptitle("Reacher-v5, evaluation episode 0 (same start), deterministic actions", fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)


# ---------------------------------------------------------------- tables


def format_table(results: dict) -> str:
    lines = [f"{'policy':<16}{'jerk':>12}{'vs BC':>8}{'success':>9}{'return':>9}{'distance':>10}"]
    bc = results["bc"]
    for key, label in (("demonstrator", "demonstrator"), *_rows(results)):
        r = results[key]
        lines.append(f"{label[:15]:<16}{r['jerk']:>12.3e}{r['jerk'] / bc['jerk']:>7.2f}×{r['success_rate']:>9.1%}"
                     f"{r['return']:>9.2f}{r['final_distance']:>10.4f}")
    for key in ("dpo", "cpl", "rlhf"):
        if key not in results:
            continue
        v = results["verdict"][key]
        lines.append(f"{key.upper()}: " + ("goal met" if v["met"] else
                                          "goal missed: " + ", ".join(k for k, ok in v.items() if not ok and k != "met")))
    return "\n".join(lines)


PROTOCOL = """\
The issue's experiment, on CPU with no downloads (`dpokit experiment policy`; `dpokit demo policy` is the same
protocol at demo size). The protocol and the decision rule below were committed before the first run.

**Version 2**, committed before its runs: the demonstrator's switching noise is ±0.2 instead of ±0.3, and the pairs
come from the BC policy's deterministic action plus exploration noise (version 1's one fix). Version 1's
demonstrator reached the target only 27% of the time and its BC policy 28%, under the 30% the rule requires, so
version 1 could not count; one calibration of the demonstrator and BC alone (no preference training, no
evaluation of any tuned policy) over noise ±0.3 / ±0.2 / ±0.1 picked the largest noise whose BC policy clears
30% (±0.2: demonstrator 45.5% with jerk 3.3× the noiseless controller's, BC 37%). Nothing else changed; version 1's
results are kept in the reading below.

- **Environment**: gymnasium's `Reacher-v5` (MuJoCo, a two-joint arm; 50-step episodes, 0.02 s a step). One pilot
  of the scripted controller alone (no learning) chose its gains.
- **Demonstrator** (reaches, but jerkily): Jacobian-transpose control of the fingertip toward the target,
  τ = clip(30·Jᵀ(target − fingertip) − 0.03·q̇ + n_t, −1, 1), with switching noise n_t: every 5 steps each joint's
  noise is redrawn as ±0.2 with a random sign (telegraph noise). 200 episodes (10,000 steps) of it.
- **Unaligned policy (BC)**: the policy family's MLP (hidden 64, 64; tanh-squashed Gaussian head, state-independent
  log-std) trained by behaviour cloning (per-step NLL of the demonstrator's actions), 3,000 AdamW steps at batch
  256, learning rate 1e-3.
- **Pairs**: the BC policy's own rollouts (its deterministic action plus N(0, 0.1²) exploration noise in action
  space; version 1 sampled the policy's own Gaussian), `dpokit data build rollouts` with 20,000 steps cut
  into segments of 10 steps, paired at random and labelled by **smoothness**: the segment with the lower mean
  squared jerk of the joint angles (third finite difference of qpos, the recipe's definition) is chosen.
- **Training**, from the BC policy, the same pairs, steps and learning rate for all: DPO (`loss_type: sigmoid`,
  β = 0.1, the BC policy as the reference), CPL (`loss_type: cpl`, reference-free, β = α = 0.1, `cpl_lambda`
  0.5, `rpo_alpha` 0 — no BC term), and preferred-FT (`loss_type: sft`: BC on the chosen segments);
  5 epochs, batch 64, learning rate 1e-4 constant.
- **Measures**, for every policy on the same 200 evaluation episodes (fixed seeds no pair used), acting with the
  policy's deterministic action (the mean, squashed), as SB3's `evaluate_policy(deterministic=True)` does:
  **jerk**, the mean squared third difference of the two joint angles per step over the episode (rad per step³);
  **success rate**, the fraction of episodes whose fingertip is within 0.05 m of the target at the last step;
  **return**, the environment's summed reward.
- **Decision rule**: a method meets the goal when its jerk is at most 0.5× the BC policy's and its success rate is
  at least the BC policy's minus 2 points. The experiment counts only if the BC policy's success rate is at least
  30%. DPO and CPL are judged separately; preferred-FT is shown beside them. If the goal is missed: one round of
  diagnosis and one fix a practitioner would try, reported beside the first result.
- **Against RLHF** (run after the DPO arm, same pairs): a Bradley–Terry reward model (an MLP on (obs, action),
  summed over a segment) fitted to the pairs, then stable-baselines3 PPO from a BC-initialised SB3 policy on that
  reward plus a BC anchor (+0.1·log π_BC(a|s) per step); the same three measures, and the CPU seconds each pipeline
  took (reward model + PPO against DPO's training), measured with `time.process_time` in the same run.
  Budgets (fixed after the DPO arm's runs, before the RLHF arm's first run): the reward model an MLP 64-64 (tanh) on
  the concatenated observation and action, 2,000 Adam steps at batch 128, learning rate 1e-3; the SB3 policy the
  same MLP shape with SB3's state-independent Gaussian, behaviour-cloned on the demonstrations like the BC policy;
  PPO 50,000 environment steps on 8 environments (n_steps 256, batch 64, 10 epochs, learning rate 3e-4, SB3's
  other defaults), the learned reward per step plus 0.1·log π_BC(a|s) of the frozen BC-initialised SB3 policy.
"""


def markdown_section(results: dict) -> str:
    s, p = results["size"], results["pair_data"]
    table = ["| policy | jerk (rad/step³) | jerk vs BC | success rate | return | final distance (m) |",
             "|---|---:|---:|---:|---:|---:|"]
    bc = results["bc"]
    for key, label in (("demonstrator", "demonstrator (with its noise)"), *_rows(results)):
        r = results[key]
        table.append(f"| {label} | {r['jerk']:.3e} | {r['jerk'] / bc['jerk']:.2f}× | {r['success_rate']:.1%} | "
                     f"{r['return']:.2f} | {r['final_distance']:.4f} |")
    verdicts = []
    for key in ("dpo", "cpl", "rlhf"):
        if key not in results:
            continue
        r, v = results[key], results["verdict"][key]
        verdicts.append(f"{key.upper()}: jerk {r['jerk'] / bc['jerk']:.2f}× BC's (goal ≤ {GOAL['jerk_ratio']:g}×), "
                        f"success {r['success_rate']:.1%} against BC's {bc['success_rate']:.1%} (goal ≥ BC's − 2 "
                        f"points): **goal {'met' if v['met'] else 'missed'}**.")
    valid = results["verdict"]["dpo"]["bc_success_at_least_30pct"]
    logs = []
    for key in ("sft", "dpo", "cpl"):
        f, l = results["training"][key].get("first", {}), results["training"][key].get("last", {})
        logs.append(f"{dict(METHODS)[key]} {results['training'][key]['steps']} steps: " + ", ".join(
            f"{k} {f[k]:.3g} → {l[k]:.3g}" for k in ("loss", "rewards/margins") if k in f and k in l))
    return f"""## DPO for a robot arm: smoother reaching on Reacher-v5

{PROTOCOL}
### Results

Rerun: `{results['command']}` ({results['minutes']} min on this machine). Sizes: {s['demo_episodes']} demonstration
episodes; BC {s['bc_steps']} steps at batch {s['bc_batch']}; {p['pairs']} pairs from {s['pair_steps']:,} BC rollout steps
in segments of {s['segment_length']}, {'the policy' + chr(39) + 's own samples' if s.get('pair_exploration') is None
else f"deterministic actions plus N(0, {s['pair_exploration']:g}²) exploration"} (mean segment jerk chosen {p['chosen_jerk']:.3g}, rejected
{p['rejected_jerk']:.3g}); {s['epochs']} epochs at batch {s['batch_size']}, learning rate {s['learning_rate']:g}
(constant), β = {s['beta']:g}, CPL λ = {s['cpl_lambda']:g}; {s['eval_episodes']} evaluation episodes per policy.
{_rlhf_line(results)}

{chr(10).join(table)}

{' '.join(verdicts)} {'' if valid else '(The experiment does not count: the BC policy succeeds less than 30% of the time.)'}

Training logs (first → last logged step): {'; '.join(logs)}.

![joint angles and torques of BC, DPO and CPL on one evaluation episode](policy-reacher.png)

One evaluation episode (the same start for all), deterministic actions: joint angles and torques over the 50 steps.

{READING}
(The reading of these figures is written by hand after the runs; a rerun keeps it.)
"""
