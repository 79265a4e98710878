"""Online (iterative) DPO: sample from the current policy, label with a judge, train, repeat.

With `online: true`, `dpokit train` runs `online_rounds` rounds. Round r:

1. the policy is the model trained in round r-1 (round 0: `model`);
2. it samples `num_generations` replies to every prompt of `online_prompts` (or, when that
   is unset, of `train_data`: prompt rows, or preference rows whose prompts are used), with
   `max_new_tokens`, `temperature`, `top_p` (TRL's OnlineDPOConfig names) and seed `seed + r`;
3. the judge (`judge`, a spec for `dpokit.judges.load_judge`: a function, a reward model, or
   an LLM judge with a constitution) scores them; best vs worst, kept when the gap is at
   least `online_min_gap` (`dpokit.recipes.judge`), go to `<output_dir>/round-<r>/pairs.jsonl`
   and every scored reply to `samples.jsonl` beside it;
4. `dpokit.train` trains the policy on those pairs into `<output_dir>/round-<r>`, with every
   other setting of the config;
5. a row goes to `<output_dir>/online.jsonl` and is printed: the judge's mean score of the
   round's samples (how good the policy entering the round is), pairs kept, the last logged
   train loss and reward accuracy.

After the last round the final policy is sampled once more the same way, and a row with
`"final": true` records its mean score, so the log shows what the last round bought.

The reference stays fixed across rounds: `ref_model`, or else the original `model`, as in
TRL's OnlineDPOTrainer. Every round's KL penalty therefore pulls toward the starting model,
not toward the previous round's policy (self-rewarding-style schemes that move the
reference each round are not what this does).

With LoRA each round trains fresh adapters on the previous round's weights and saves them
merged (`merge_lora` is forced on), so every round's output is a full model that the next
round samples from and trains; the reference is then loaded from `model` as a separate copy.

Sampling, judging and each round's training run in one process (one device).

With `resume_from_checkpoint`, finished rounds (those with `round.json`) are skipped, and an
unfinished round keeps its pairs file and resumes training from its latest checkpoint.
"""

from __future__ import annotations

import dataclasses
import gc
import json
import logging
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .config import TrainConfig
from .errors import DpokitError
from .families import Family, get_family
from .io import write_text
from .recipes.common import write_jsonl
from .recipes.judge import Judged, judge_pairs, load_policy, pairs_from_scores

log = logging.getLogger("dpokit")


@dataclass
class OnlineResult:
    output_dir: Path
    policy: Path  # the last round's model
    rounds: list[dict] = field(default_factory=list)  # the rows of online.jsonl, the final one included


def _check(cfg: TrainConfig, judge) -> None:
    if cfg.online_rounds < 1:
        raise DpokitError(f"online_rounds must be >= 1, got {cfg.online_rounds}")
    if cfg.num_generations < 2:
        raise DpokitError(f"num_generations must be >= 2 to make a pair, got {cfg.num_generations}")
    if not cfg.online_min_gap >= 0:
        raise DpokitError(f"online_min_gap must be >= 0, got {cfg.online_min_gap}")
    if cfg.max_new_tokens < 1:
        raise DpokitError(f"max_new_tokens must be >= 1, got {cfg.max_new_tokens}")
    if judge is None and cfg.judge is None:
        raise DpokitError("online training needs a judge, e.g. judge: {type: reward_model, model: path/to/rm}")
    if not (cfg.online_prompts or cfg.train_data):
        raise DpokitError("online training needs prompts: set online_prompts (or train_data) to a file of prompts")
    if not cfg.model:
        raise DpokitError("config key 'model' is required (a Hugging Face model path or name)")
    if cfg.missing_eos_penalty is not None and not isinstance(cfg.missing_eos_penalty, (int, float)):
        raise DpokitError(f"missing_eos_penalty must be a number, got {cfg.missing_eos_penalty!r}")
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        # Every process would sample, and call the judge, for the same prompts.
        raise DpokitError("online training runs in one process: start it with `dpokit train`, not under "
                          "torchrun or `accelerate launch`")


def _sample_and_judge(cfg: TrainConfig, family: Family, policy: str, prompts: list, judge, seed: int) -> Judged:
    model, tokenizer = load_policy(policy, cfg, family)
    try:
        return judge_pairs(model, tokenizer, prompts, judge, cfg.num_generations, cfg.online_min_gap,
                           max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature, top_p=cfg.top_p,
                           missing_eos_penalty=cfg.missing_eos_penalty, batch_size=cfg.per_device_eval_batch_size,
                           seed=seed, max_prompt_length=cfg.max_prompt_length, progress=not cfg.disable_tqdm,
                           family=family)
    finally:
        del model  # the round's training loads the policy itself
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def _read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def _sample_stats(judged: Judged) -> dict:
    scores = [s["score"] for s in judged.samples if not math.isnan(s["score"])]
    mean = judged.score_mean
    std = math.sqrt(sum((x - mean) ** 2 for x in scores) / len(scores)) if scores else math.nan
    return {"samples": len(judged.samples), "score_mean": mean, "score_std": std,
            "ended": sum(s["ended"] for s in judged.samples) / max(len(judged.samples), 1)}


def _say(row: dict, rounds: int) -> None:
    r = row["round"]
    head = "online final policy" if row.get("final") else f"online round {r} ({r + 1} of {rounds})"
    text = f"{head}: judge score {row['score_mean']:.4g} (mean of {row['samples']} samples)"
    if not row.get("final"):
        text += (f", {row['pairs']} pairs (mean gap {row['gap_mean']:.3g}); train {row['steps']} steps, "
                 f"loss {row.get('loss', math.nan):.4f}, reward accuracy {row.get('rewards/accuracies', math.nan):.3f}")
    print(f"{text} -> {row['policy']}", flush=True)


def run_online(cfg: TrainConfig, judge=None, family=None) -> OnlineResult:
    """Run the rounds described in the module docstring; returns the rows of online.jsonl.
    `judge` (a `dpokit.judges.Judge` or a function of prompt and reply) overrides `cfg.judge`."""
    from .evaluate import read_prompts
    from .judges import load_judge
    from .train import train

    _check(cfg, judge)
    family = family if family is not None else get_family(cfg.family)
    for capability in ("sample", "load_trained"):
        family.require(capability, "online DPO")
    judge = load_judge(judge if judge is not None else cfg.judge)
    prompts = read_prompts(cfg.online_prompts or cfg.train_data)
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    cfg.save(out / "config.yaml")
    resume = cfg.resume_from_checkpoint not in (False, None)
    log_path = out / "online.jsonl"
    reference = cfg.ref_model or cfg.model
    policy, rows = cfg.model, []
    for r in range(cfg.online_rounds):
        t0 = time.time()
        round_dir = out / f"round-{r}"
        done, pairs_path = round_dir / "round.json", round_dir / "pairs.jsonl"
        samples_path = round_dir / "samples.jsonl"
        if resume and done.is_file():
            rows.append(json.loads(done.read_text()))
            policy = str(round_dir)
            continue
        if resume and pairs_path.is_file() and samples_path.is_file():
            judged = pairs_from_scores(_read_jsonl(samples_path), cfg.online_min_gap, cfg.missing_eos_penalty)
            judged.rows = _read_jsonl(pairs_path)  # what the interrupted training was reading
        else:
            judged = _sample_and_judge(cfg, family, policy, prompts, judge, cfg.seed + r)
            write_jsonl(judged.samples, samples_path)
            write_jsonl(judged.rows, pairs_path)
        if not judged.rows:
            raise DpokitError(f"online round {r}: the judge separated no pair of replies ({judged.summary()}); "
                              "raise num_generations or temperature, or lower online_min_gap")
        round_cfg = dataclasses.replace(
            cfg, online=False, model=policy, train_data=str(pairs_path), output_dir=str(round_dir),
            # round 0 trains the original weights: its own default reference is already the original model
            ref_model=cfg.ref_model if r == 0 else reference,
            merge_lora=cfg.merge_lora or cfg.lora is not None,
            resume_from_checkpoint=cfg.resume_from_checkpoint if resume else False)
        result = train(round_cfg, family)
        last = next((h for h in reversed(result.history) if "loss" in h), {})
        evals = next((h for h in reversed(result.history) if "eval_loss" in h), {})
        gaps = [p["score_chosen"] - p["score_rejected"] for p in judged.rows]
        row = {"round": r, **_sample_stats(judged), "pairs": len(judged.rows), "gap_mean": sum(gaps) / len(gaps),
               "steps": result.global_step, **{k: v for k, v in last.items() if k not in ("step", "epoch")},
               **{k: v for k, v in evals.items() if k != "step"}, "policy": str(round_dir),
               "wall_s": round(time.time() - t0, 2)}
        write_text(done, json.dumps(row))  # whole or absent: a resumed run skips the round on its word
        rows.append(row)
        policy = str(round_dir)
        _say(row, cfg.online_rounds)
        write_jsonl(rows, log_path)

    final = _sample_and_judge(cfg, family, policy, prompts, judge, cfg.seed + cfg.online_rounds)
    row = {"round": cfg.online_rounds, "final": True, **_sample_stats(final), "policy": policy}
    rows.append(row)
    _say(row, cfg.online_rounds)
    write_jsonl(rows, log_path)
    return OnlineResult(out, Path(policy), rows)
