"""`dpokit demo`: DPO on a task whose true preference is known, with no downloads.

The task (dpokit.demo_task) asks for a positive line about a subject; the ground-truth reward
counts positive minus negative adjectives (and gives -1 to anything malformed). Steps:

1. a byte-level BPE tokenizer and a small Llama, built from scratch (dpokit.tiny);
2. supervised warm-up on lines of a random tone: the model learns the language of the task
   but not the preference (mean reward ≈ 0);
3. preference pairs as in the DPO paper: two responses sampled from the policy (temperature
   1) per pair, the one with the higher ground-truth reward chosen, ties dropped;
4. DPO with `dpokit.train`, the warm-up model as the reference throughout, in rounds: each
   round samples fresh pairs from the current policy (on-policy, "iterative DPO") and
   continues training it. Round 1 is the DPO paper's setup exactly;
5. before/after on held-out prompts (subjects no training pair names): ground-truth reward
   of fresh samples, accuracy on held-out pairs sampled from the warm-up model, and
   KL(π ‖ warm-up) estimated on the samples.

Why rounds: a model this small generalises "push the rejected line down" into breaking the
line's form, so one offline round at a learning rate that moves the policy far enough
sometimes collapses into malformed text (likelihood displacement; it did for 2 of 3 seeds
at twice the rate used here). The next round samples those lines, the ground truth scores
them -1, and DPO pushes them down: with rounds the result holds across seeds and rates.

For the warm-up model the policy is its own reference, so its implicit reward margin is 0;
its accuracy column is the plain likelihood preference, log π(chosen) > log π(rejected).
The DPO rows give the implicit-reward accuracy: β·log π/π_warm-up ranks chosen first.
"""

from __future__ import annotations

import json
import random
import time
from pathlib import Path

import torch

from . import demo_task
from .config import TrainConfig
from .data import Example, load_examples
from .families import get_family
from .io import write_text
from .recipes.common import write_jsonl
from .scoring import score_examples
from .tiny import build_llama, build_tokenizer, single_thread
from .train import train

FULL = dict(hidden=64, layers=2, sft_rows=8000, sft_steps=400, sft_lr=3e-3, samples_per_prompt=32,
            eval_samples=16, rounds=3, dpo_epochs=2, dpo_lr=7e-5, beta=0.1)
QUICK = dict(hidden=64, layers=2, sft_rows=4000, sft_steps=200, sft_lr=3e-3, samples_per_prompt=16,
             eval_samples=8, rounds=2, dpo_epochs=2, dpo_lr=7e-5, beta=0.1)
BATCH = 64
MAX_NEW_TOKENS = 16
MAX_LENGTH, MAX_PROMPT_LENGTH = 64, 32


def warm_up(model, tokenizer, rows: list[dict], steps: int, lr: float, batch_size: int = BATCH, seed: int = 0) -> float:
    """Supervised fine-tuning on (prompt, completion) rows, loss on completion tokens; returns the last loss."""
    eos = tokenizer.eos_token_id
    encoded = []
    for r in rows:
        p = tokenizer(r["prompt"])["input_ids"]
        full = tokenizer(r["prompt"] + r["completion"])["input_ids"] + [eos]
        encoded.append((full, [-100] * len(p) + full[len(p):]))
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 20) * max(0.0, 1 - s / steps))
    g = torch.Generator().manual_seed(seed)
    model.train()
    loss = torch.tensor(float("nan"))
    for _ in range(steps):
        idx = torch.randint(len(encoded), (batch_size,), generator=g).tolist()
        T = max(len(encoded[i][0]) for i in idx)
        ids = torch.full((batch_size, T), tokenizer.pad_token_id)
        labels = torch.full((batch_size, T), -100)
        mask = torch.zeros((batch_size, T), dtype=torch.long)
        for b, i in enumerate(idx):
            x, y = encoded[i]
            ids[b, :len(x)], labels[b, :len(y)], mask[b, :len(x)] = torch.tensor(x), torch.tensor(y), 1
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
    model.eval()
    return loss.item()


@torch.no_grad()
def pair_logps(model, examples: list[Example], tokenizer, batch_size: int = 128):
    """log π(chosen | x) and log π(rejected | x), summed over completion tokens, by the training scorer."""
    family, cfg = get_family("causal_lm"), TrainConfig()
    scored = list(score_examples(family, family.scorer(model, cfg).eval(), examples, cfg, tokenizer, batch_size))
    return torch.cat([s.scores.chosen for s in scored]), torch.cat([s.scores.rejected for s in scored])


def malformed_line(reply: str) -> bool:
    return demo_task.adjectives_of(reply) is None


def sample_stats(model, ref_model, tokenizer, prompts: list[str], n: int, seed: int,
                 max_new_tokens: int = MAX_NEW_TOKENS, reward_fn=demo_task.reward, malformed=malformed_line) -> dict:
    """Ground-truth reward of `n` fresh samples per prompt, and KL(π ‖ π_ref) estimated on them. The task's
    defaults are dpokit.demo_task's; `malformed=None` where a task has no such notion."""
    torch.manual_seed(seed)  # every model compared draws with the same generator state
    samples = demo_task.sample(model, tokenizer, prompts, n, max_new_tokens, reward_fn=reward_fn)
    rewards = torch.tensor([s.reward for s in samples])
    # Each sample is scored as a "pair" with itself; only the chosen half is read.
    as_pairs = [Example(s.prompt_ids, s.response_ids, s.response_ids) for s in samples]
    logp, _ = pair_logps(model, as_pairs, tokenizer)
    ref_logp, _ = pair_logps(ref_model, as_pairs, tokenizer)
    return {
        "mean_reward": rewards.mean().item(),
        "all_positive": (rewards == 1).float().mean().item(),
        "malformed": None if malformed is None else
        torch.tensor([malformed(s.response) for s in samples]).float().mean().item(),
        "kl_to_warmup": (logp - ref_logp).mean().item(),
        "samples": [{"prompt": s.prompt, "response": s.response, "reward": s.reward} for s in samples[::n][:8]],
    }


def heldout_accuracy(model, ref_model, examples: list[Example], tokenizer) -> tuple[float, float]:
    """(log-prob accuracy of `model`, implicit-reward accuracy of `model` against `ref_model`)."""
    c, r = pair_logps(model, examples, tokenizer)
    ref_c, ref_r = pair_logps(ref_model, examples, tokenizer)
    return (c > r).float().mean().item(), ((c - ref_c) > (r - ref_r)).float().mean().item()


def _say(t0: float, message: str) -> None:
    print(f"[demo {time.time() - t0:5.1f}s] {message}", flush=True)


def format_table(results: dict) -> str:
    head = (f"{'model':<15}{'pairs':>6}{'reward of samples':>19}{'all positive':>14}{'malformed':>11}"
            f"{'held-out pref. acc.':>23}{'KL to warm-up':>15}")
    lines = [head, "-" * len(head)]
    for r in results["rows"]:
        acc = f"{r['heldout_accuracy']:.3f} ({r['accuracy_kind']})"
        lines.append(f"{r['model']:<15}{r.get('pairs', ''):>6}{r['mean_reward']:>+19.3f}{r['all_positive']:>14.1%}"
                     f"{r['malformed']:>11.1%}{acc:>23}{r['kl_to_warmup']:>15.2f}")
    return "\n".join(lines)


def run_demo(output_dir: str | Path = "runs/demo", seed: int = 0, quick: bool = False) -> dict:
    """Warm-up, then DPO, on the controlled task; prints the before/after table and returns the results
    (also written to `<output_dir>/demo_results.json`)."""
    from transformers.utils import logging as hf_logging

    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # a load/save bar per round would bury the demo's own lines
    try:
        with single_thread():
            return _run(Path(output_dir), seed, quick)
    finally:
        if bars:
            hf_logging.enable_progress_bar()


def _run(out: Path, seed: int, quick: bool) -> dict:
    size = QUICK if quick else FULL
    t0 = time.time()
    out.mkdir(parents=True, exist_ok=True)
    random.seed(seed)
    torch.manual_seed(seed)

    train_prompts, heldout_prompts = demo_task.split_prompts(seed)
    tokenizer = build_tokenizer(demo_task.corpus(), vocab_size=600)  # enough merges for one token per word
    warm = build_llama(tokenizer, hidden_size=size["hidden"], num_layers=size["layers"], seed=seed)
    # The warm-up corpus names every subject but carries no preference, so held-out pairs stay unseen.
    rows = demo_task.sft_rows(train_prompts + heldout_prompts, size["sft_rows"], seed)
    loss = warm_up(warm, tokenizer, rows, size["sft_steps"], size["sft_lr"], seed=seed)
    warm_dir = out / "warmup"
    warm.save_pretrained(warm_dir)
    tokenizer.save_pretrained(warm_dir)
    _say(t0, f"warm-up: {size['sft_steps']} steps on {len(rows)} lines of random tone, loss {loss:.3f} -> {warm_dir}")

    k = size["samples_per_prompt"]
    torch.manual_seed(seed + 1)
    heldout_path = out / "heldout_pairs.jsonl"
    heldout_samples = demo_task.sample(warm, tokenizer, heldout_prompts, k, MAX_NEW_TOKENS)
    write_jsonl(demo_task.make_pairs(heldout_samples), heldout_path)
    heldout = load_examples(heldout_path, tokenizer, MAX_LENGTH, MAX_PROMPT_LENGTH)
    n = size["eval_samples"]
    warm_acc, _ = heldout_accuracy(warm, warm, heldout, tokenizer)
    rows_out = [{"model": "warm-up (SFT)", "heldout_accuracy": warm_acc, "accuracy_kind": "log-prob",
                 **sample_stats(warm, warm, tokenizer, heldout_prompts, n, seed + 2)}]
    _say(t0, f"{len(heldout)} held-out pairs sampled from the warm-up model on {len(heldout_prompts)} prompts "
             f"whose subjects no training pair names")

    policy, policy_dir, history = warm, warm_dir, []
    for r in range(1, size["rounds"] + 1):
        torch.manual_seed(seed + 10 + r)
        drawn = demo_task.sample(policy, tokenizer, train_prompts, k, MAX_NEW_TOKENS)
        pairs = demo_task.make_pairs(drawn)
        round_dir = out / f"dpo-round{r}"
        round_dir.mkdir(parents=True, exist_ok=True)
        write_jsonl(pairs, round_dir / "pairs.jsonl")
        cfg = TrainConfig(
            model=str(policy_dir), ref_model=str(warm_dir), train_data=str(round_dir / "pairs.jsonl"),
            eval_data=str(heldout_path), output_dir=str(round_dir), beta=size["beta"], learning_rate=size["dpo_lr"],
            num_train_epochs=size["dpo_epochs"], per_device_train_batch_size=32, per_device_eval_batch_size=128,
            warmup_ratio=0.1, max_length=MAX_LENGTH, max_prompt_length=MAX_PROMPT_LENGTH, logging_steps=10,
            save_steps=0, disable_tqdm=True, seed=seed, ref_cache_dir=str(out / "ref-cache"),
        )
        result = train(cfg)
        history.append(result.history[-1])
        policy, policy_dir = get_family("causal_lm").load_trained(round_dir)[0], round_dir
        _, acc = heldout_accuracy(policy, warm, heldout, tokenizer)
        rows_out.append({"model": f"DPO round {r}", "pairs": len(pairs), "dpo_steps": result.global_step,
                         "heldout_accuracy": acc, "accuracy_kind": "implicit",
                         **sample_stats(policy, warm, tokenizer, heldout_prompts, n, seed + 2)})
        mean_drawn = sum(s.reward for s in drawn) / len(drawn)
        _say(t0, f"DPO round {r}: {len(pairs)} pairs sampled from the current policy (their mean reward "
                 f"{mean_drawn:+.2f}), {result.global_step} steps -> {round_dir}")

    before, after = rows_out[0], rows_out[-1]
    gate = after["heldout_accuracy"] >= 0.9 and after["mean_reward"] - before["mean_reward"] >= 0.3
    results = {
        "rows": rows_out, "warmup": before, "dpo": after, "final_eval": history[-1],
        "seed": seed, "quick": quick, "settings": size, "heldout_pairs": len(heldout),
        "heldout_samples": len(heldout_prompts) * n,
        "columns": {
            "pairs": "training pairs of the round, sampled from the policy the round starts from",
            "reward of samples": "mean ground-truth reward, in [-1, 1], of samples on held-out prompts (temperature 1)",
            "all positive": "share of those samples whose adjectives are all positive (reward 1)",
            "malformed": "share of those samples that are not a well-formed list of adjectives (reward -1)",
            "held-out pref. acc.": "share of held-out pairs (sampled from the warm-up model, never trained on) ranked "
                                   "chosen first: the warm-up model by log-prob, DPO models by implicit reward "
                                   "beta*log(pi/pi_warmup)",
            "KL to warm-up": "mean of log pi(y|x) - log pi_warmup(y|x) over the samples, nats per response",
        },
        "gate": "final DPO held-out accuracy >= 0.9 and reward of samples up by >= 0.3", "gate_passed": gate,
        "wall_s": round(time.time() - t0, 1),
    }
    write_text(out / "demo_results.json", json.dumps(results, indent=2))
    print()
    print(format_table(results))
    print()
    for row in (before, after):
        for s in row["samples"][:2]:
            print(f"{row['model']:>15}: {s['prompt']}{s['response']}   (reward {s['reward']:+.2f})")
    print(f"\n{results['gate']}: {'passed' if gate else 'NOT met'}. "
          f"{results['wall_s']:.0f}s; results in {out / 'demo_results.json'}")
    return results
