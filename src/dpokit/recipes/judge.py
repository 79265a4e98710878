"""Judge (RLAIF) → pairs: sample k replies per prompt from a model, score each with a judge,
pair the best-scored reply against the worst.

Input: one prompt per row, as `dpokit eval --prompts` reads them: rows with `prompt` (text
or a message list), or preference rows whose prompt is implicit in `chosen`/`rejected`.

For each prompt, `k` replies are sampled from the model (temperature and top-p as given,
no top-k cut) by the family's sampler, the one sample-based evaluation uses, and the judge scores
every reply: a Python function, a reward model, or an LLM judge told to judge by a
constitution (`--judge`, a spec for `dpokit.judges.load_judge`, e.g.
`'{type: llm, base_url: "http://127.0.0.1:8000/v1", model: judge, constitution: [...]}'`).
The best-scored reply is chosen and the worst rejected when their scores differ by at
least `min_gap`; a tie is never a preference, whatever `min_gap`. Blank replies (a pair
file cannot hold them) and replies the judge left unscored (NaN) take no part.
`missing_eos_penalty` (TRL's OnlineDPOConfig name) is subtracted from the score of a reply
cut off at `max_new_tokens` before the choice: an unfinished reply wins only by more than that.

The pair file holds the replies as text: training re-tokenizes them (and ends each with
EOS, as it does every completion). With `margin_scale` s, each pair gets margin = s · gap.
Output rows: prompt, chosen, rejected, score_chosen, score_rejected[, margin]; a message-list
prompt gives conversational rows, each reply one assistant message.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Sequence

from ..config import TrainConfig
from ..errors import DpokitError
from ..families import Family, get_family
from .common import Built, same_text

NAME = "judge"
HELP = "prompts → sample k replies from a model, score them with a judge (RLAIF), best vs worst"


@dataclass
class Judged(Built):
    """Pairs and counts, plus every sampled reply: `index` (of its prompt), `prompt`, `response`,
    `ended` (False when cut off at `max_new_tokens`) and `score`."""

    samples: list[dict] = field(default_factory=list)

    def summary(self) -> str:
        return f"{super().summary()}, mean judge score: {self.score_mean:.4g}"

    @property
    def score_mean(self) -> float:
        """The judge's mean score of the replies (its own scores, before any missing-EOS penalty)."""
        kept = [s["score"] for s in self.samples if not math.isnan(s["score"])]
        return sum(kept) / len(kept) if kept else math.nan


def _check(k: int, min_gap: float) -> None:
    if k < 2:
        raise DpokitError(f"k (replies per prompt) must be >= 2 to make a pair, got {k}")
    if not min_gap >= 0:
        raise DpokitError(f"min_gap must be >= 0, got {min_gap}")


def pairs_from_scores(samples: Sequence[dict], min_gap: float = 0.0, missing_eos_penalty: float | None = None,
                      margin_scale: float | None = None) -> Judged:
    """Best vs worst reply per prompt from scored samples (grouped by `index`)."""
    out = Judged(samples=list(samples))
    groups: dict[int, list[dict]] = {}
    for s in samples:
        groups.setdefault(s["index"], []).append(s)
    for group in groups.values():
        out.counts["prompts"] += 1
        out.counts["samples"] += len(group)
        candidates = []
        for s in group:
            if not s["response"].strip():
                out.counts["blank_replies"] += 1
            elif math.isnan(s["score"]):
                out.counts["unscored_replies"] += 1
            else:
                penalty = missing_eos_penalty if missing_eos_penalty and not s["ended"] else 0.0
                candidates.append((s["score"] - penalty, s["response"]))
        if not candidates:
            out.counts["no_pair"] += 1
            continue
        best = max(candidates, key=lambda c: c[0])
        others = [c for c in candidates if not same_text(c[1], best[1])]
        worst = min(others, key=lambda c: c[0]) if others else None
        gap = best[0] - worst[0] if worst else 0.0
        if worst is None or gap <= 0 or gap < min_gap:
            out.counts["no_pair"] += 1
            continue
        prompt = group[0]["prompt"]
        reply = (lambda t: t) if isinstance(prompt, str) else (lambda t: [{"role": "assistant", "content": t}])
        row = {"prompt": prompt, "chosen": reply(best[1]), "rejected": reply(worst[1]),
               "score_chosen": best[0], "score_rejected": worst[0]}
        if margin_scale is not None:
            row["margin"] = margin_scale * gap
        out.rows.append(row)
        out.counts["pairs"] += 1
    return out


def sample_replies(model, tokenizer, prompts: Sequence, k: int, *, max_new_tokens: int = 64,
                   temperature: float = 0.9, top_p: float = 1.0, batch_size: int = 8, seed: int = 0,
                   max_prompt_length: int | None = None, progress: bool = True,
                   family: Family | None = None) -> list[dict]:
    """`k` sampled replies per prompt, in prompt order: dicts with `index` (of the prompt), `prompt`,
    `response` (text, without the end token) and `ended` (False when cut off at `max_new_tokens`).
    `family` samples them (default: the causal LM)."""
    family = family if family is not None else get_family("causal_lm")
    family.require("sample", "the judge recipe")
    if temperature <= 0:
        raise DpokitError(f"temperature must be > 0: k greedy replies would all be the same, got {temperature}")
    replies = family.sample(model, tokenizer, prompts, num_generations=k, max_new_tokens=max_new_tokens,
                            temperature=temperature, top_p=top_p, batch_size=batch_size, seed=seed,
                            max_prompt_length=max_prompt_length, progress=progress)
    return [{"index": n // k, "prompt": c.prompt, "response": c.text, "ended": c.ended} for n, c in enumerate(replies)]


def judge_pairs(model, tokenizer, prompts: Sequence, judge, k: int = 4, min_gap: float = 0.0, *,
                max_new_tokens: int = 64, temperature: float = 0.9, top_p: float = 1.0,
                missing_eos_penalty: float | None = None, margin_scale: float | None = None, batch_size: int = 8,
                seed: int = 0, max_prompt_length: int | None = None, progress: bool = True,
                family: Family | None = None) -> Judged:
    """Sample `k` replies per prompt from `model`, score them with `judge` (a `dpokit.judges.Judge`),
    and keep best vs worst where the gap is at least `min_gap` (see the module docstring)."""
    _check(k, min_gap)
    samples = sample_replies(model, tokenizer, prompts, k, max_new_tokens=max_new_tokens, temperature=temperature,
                             top_p=top_p, batch_size=batch_size, seed=seed, max_prompt_length=max_prompt_length,
                             progress=progress, family=family)
    scores = judge.score([s["prompt"] for s in samples], [s["response"] for s in samples])
    if len(scores) != len(samples):
        raise DpokitError(f"the judge returned {len(scores)} scores for {len(samples)} replies")
    for s, score in zip(samples, scores):
        s["score"] = float(score)
    return pairs_from_scores(samples, min_gap, missing_eos_penalty, margin_scale)


def load_policy(path: str, cfg: TrainConfig | None = None, family: Family | None = None):
    """A trained policy (a model folder, or a LoRA adapter folder on its base) and its processor, for sampling,
    on the GPU when there is one. `cfg` gives the loading settings (defaults when None); `family` loads it
    (default: `cfg`'s family)."""
    import torch

    cfg = cfg if cfg is not None else TrainConfig()
    family = family if family is not None else get_family(cfg.family)
    family.require("load_trained", "sampling from a saved model")
    model, processor = family.load_trained(str(path), cfg)
    return model.to("cuda" if torch.cuda.is_available() else "cpu"), processor


def add_arguments(p) -> None:
    p.add_argument("--model", required=True, help="the model to sample replies from (a model dir or name)")
    p.add_argument("--judge", required=True, help="a judge spec: a YAML/JSON file or an inline mapping, e.g. "
                                                  "'{type: callable, function: \"mypkg.rewards:score\"}'")
    p.add_argument("--k", type=int, default=4, help="replies sampled per prompt (default 4)")
    p.add_argument("--min-gap", type=float, default=0.0,
                   help="keep a pair only when best - worst score >= this (ties are always dropped)")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.9)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--missing-eos-penalty", type=float, default=None,
                   help="subtracted from the score of a reply cut off at --max-new-tokens")
    p.add_argument("--margin-scale", type=float, default=None, help="write margin = scale * score gap")
    p.add_argument("--max-prompt-length", type=int, default=512, help="keep the last N prompt tokens")
    p.add_argument("--num-prompts", type=int, default=None, help="use the first N prompts")
    p.add_argument("--batch-size", type=int, default=8, help="sequences generated at once")
    p.add_argument("--dtype", default="auto", help="auto | float32 | bfloat16 | float16")
    p.add_argument("--seed", type=int, default=0)


def build(args) -> Built:
    from ..evaluate import read_prompts
    from ..judges import load_judge

    _check(args.k, args.min_gap)
    judge = load_judge(args.judge)  # a bad spec fails before the model loads
    prompts = read_prompts(args.input, args.num_prompts)
    model, tokenizer = load_policy(args.model, TrainConfig(dtype=args.dtype))
    return judge_pairs(model, tokenizer, prompts, judge, args.k, args.min_gap, max_new_tokens=args.max_new_tokens,
                       temperature=args.temperature, top_p=args.top_p, missing_eos_penalty=args.missing_eos_penalty,
                       margin_scale=args.margin_scale, batch_size=args.batch_size, seed=args.seed,
                       max_prompt_length=args.max_prompt_length)


