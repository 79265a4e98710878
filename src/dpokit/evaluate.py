"""Evaluating a trained policy against its reference.

- `preference_eval`: on a preference file, the training objective's own metrics with the
  reference scored live: loss, reward accuracy (the share of pairs whose implicit reward
  ranks the chosen reply above the rejected one), mean reward margin, rewards, log-probs.
- `score_responses`: the DPO model as a reward model. A (prompt, response) row gets
  r(x, y) = β·(log π(y|x) − log π_ref(y|x)), the implicit reward DPO trains (Rafailov et al.
  2023, eq. 5, without the prompt-only term β·log Z(x), which cancels between replies to the
  same prompt). Reference-free runs (SimPO, ORPO) get their own reward, β·log π(y|x)/|y|.
- `sample_eval` (in `sample_eval.py`): generate from policy and reference and compare.

`load_models` finds a policy and its reference: from a dpokit run dir (its config.yaml
names the starting model, reference and β), a LoRA adapter dir (the reference is the base
with adapters off), or any model dir with an explicit reference.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from torch import nn

from .config import TrainConfig, load_config
from .data import Example, Pair, RowProblem, read_rows, split_implicit_prompt, tokenize_pair
from .data.formats import text_field
from .data.readers import describe
from .errors import DataError, DpokitError
from .families import Family, get_family
from .io import write_text
from .objectives import ObjectiveConfig, objective
from .reference import Reference, loss_inputs
from .scoring import ScoredBatch, score_examples

log = logging.getLogger("dpokit")


@dataclass
class Models:
    """A policy, its reference and what scores them."""

    cfg: TrainConfig
    family: Family
    tokenizer: Any
    policy: nn.Module
    reference: nn.Module | None  # a separate model; None: adapters off (adapters_off) or reference-free
    adapters_off: bool
    device: torch.device
    reference_name: str

    def scorer(self, model: nn.Module):
        """A scorer in eval mode: `Reference.scores` puts its scorer back in the mode it found it in."""
        return self.family.scorer(model, self.cfg).eval()

    def reference_scorer(self) -> Reference:
        if self.adapters_off:
            return Reference(self.scorer(self.policy), adapters_off=lambda: self.family.adapters_off(self.policy))
        return Reference(None if self.reference is None else self.scorer(self.reference))

    def scored(self, examples, batch_size: int | None, desc: str, progress: bool = True) -> Iterator[ScoredBatch]:
        """The policy's and the reference's scores of `examples`, batch by batch."""
        return score_examples(self.family, self.scorer(self.policy), examples, self.cfg, self.tokenizer,
                              batch_size or self.cfg.per_device_eval_batch_size, self.device, self.reference_scorer(),
                              desc, progress)


def load_models(model: str | Path, ref_model: str | None = None, beta: float | None = None,
                overrides: list[str] = (), device: str | None = None) -> Models:
    """The policy at `model` and its reference.

    The reference is, in order: `ref_model` if given; the run's `ref_model`; for a LoRA
    adapter, its base model with the adapters switched off; for a reference-free run, none;
    for a dpokit run dir, the run's starting model (`model` in its config.yaml). A plain
    model dir with none of these is an error. β and the other settings come from the run's
    config.yaml when there is one, then from `beta` and `key=value` overrides.
    """
    path = Path(model)
    if not path.exists():
        raise DpokitError(f"{path}: no such model directory")
    run_config = path / "config.yaml"
    from_run = run_config.is_file()
    extra = {} if beta is None else {"beta": beta}
    cfg = load_config(run_config, overrides, **extra) if from_run else load_config(None, overrides, model=str(path),
                                                                                    **extra)
    if not from_run and beta is None:
        log.warning("%s has no dpokit config.yaml: using beta=%s (set it with --beta)", path, cfg.beta)
    family = get_family(cfg.family)
    family.require("load_trained", "evaluating a trained model")
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    policy, tokenizer = family.load_trained(str(path), cfg)
    reference, adapters_off = None, False
    ref_path = ref_model or cfg.ref_model
    if ref_path:
        reference, name = family.load_model(str(ref_path), cfg), str(ref_path)
    elif (path / "adapter_config.json").is_file():
        adapters_off, name = True, "the base model with adapters off"
    elif cfg.reference_free:
        name = "none (reference-free)"
    elif from_run:
        reference, name = family.load_model(cfg.model, cfg), cfg.model
    else:
        raise DpokitError(f"{path}: no reference model; pass --ref-model, or point at a dpokit run directory "
                          f"(its config.yaml names the starting model)")
    return Models(cfg, family, tokenizer, policy.to(dev), None if reference is None else reference.to(dev),
                  adapters_off, dev, name)


@torch.no_grad()
def preference_eval(models: Models, data: Any, batch_size: int | None = None, progress: bool = True) -> dict:
    """Means over the pairs of the objective's metrics (TRL names: `rewards/accuracies`,
    `rewards/margins`, `loss`, ...), plus `pairs`. Accuracy counts a tie as wrong, as TRL does."""
    cfg = models.cfg
    examples = models.family.examples(data, models.tokenizer, cfg)
    obj_cfg = ObjectiveConfig.from_config(cfg)
    sums: dict[str, float] = {}
    counts: dict[str, int] = {}  # unpaired data: chosen/rejected metrics cover only their own class
    for s in models.scored(examples, batch_size, "eval", progress):
        inputs = loss_inputs(s.scores, s.reference, s.batch)
        _, metrics = objective(inputs, s.batch["weight"], cfg.loss_types, cfg.loss_weights, obj_cfg)
        metrics.update(models.family.metrics(inputs))
        for k, v in metrics.items():
            sums[k] = sums.get(k, 0.0) + v.float().sum().item()
            counts[k] = counts.get(k, 0) + v.numel()
    return {"pairs": len(examples), **{k: v / counts[k] for k, v in sums.items() if counts[k]}}


# ---------------------------------------------------------------- the DPO model as a reward model


def completion_example(prompt, response, tokenizer, max_length: int | None, max_prompt_length: int | None) -> Example:
    """One (prompt, response) encoded exactly as training encodes a chosen reply: `tokenize_pair`
    with an empty stand-in for the rejected reply, which is then dropped (the batch scores nothing
    for it)."""
    if isinstance(prompt, str) != isinstance(response, str):
        raise RowProblem("prompt and response must both be text or both be message lists")
    stand_in = "" if isinstance(response, str) else [{"role": "assistant", "content": ""}]
    ex = tokenize_pair(Pair(prompt, response, stand_in), tokenizer, max_length, max_prompt_length)
    return Example(ex.prompt_ids, ex.chosen_ids, [])


def read_completions(source: Any, tokenizer, cfg) -> list[tuple[int, Example]]:
    """Rows with `prompt` and `completion` (TRL's unpaired layout) or `response` → (row number, Example)."""
    name = str(source)
    out = []
    for number, row in read_rows(source):
        try:
            prompt = text_field(row, "prompt")
            response = text_field(row, "completion", "response")
            out.append((number, completion_example(prompt, response, tokenizer, cfg.max_length, cfg.max_prompt_length)))
        except RowProblem as e:
            raise DataError(name, number, str(e)) from None
    if not out:
        raise DataError(name, None, "no rows")
    return out


@torch.no_grad()
def score_responses(models: Models, source: Any, batch_size: int | None = None, progress: bool = True) -> list[dict]:
    """One dict per row: `row`, `reward` (β·(log π − log π_ref), or β·log π/|y| reference-free),
    `logp`, `ref_logp` (None reference-free) and `tokens` (the response's length)."""
    rows = models.family.completions(source, models.tokenizer, models.cfg)
    beta = models.cfg.beta
    numbers = iter(number for number, _ in rows)
    out = []
    for s in models.scored([ex for _, ex in rows], batch_size, "score", progress):
        for i in range(len(s.examples)):
            logp, n = s.scores.chosen[i].float().item(), int(s.scores.chosen_len[i].item())
            if s.reference is None:  # reference-free
                reward, ref_logp = beta * logp / max(n, 1), None
            else:
                ref_logp = s.reference[0][i].item()
                reward = beta * (logp - ref_logp)
            out.append({"row": next(numbers), "reward": reward, "logp": logp, "ref_logp": ref_logp, "tokens": n})
    return out


# ---------------------------------------------------------------- held-out prompts


def text_prompt(row: dict):
    """A row's text prompt: its `prompt` field, or a preference row's implicit prompt."""
    if row.get("prompt") is not None:
        return text_field(row, "prompt")
    text_field(row, "chosen")
    text_field(row, "rejected")
    return split_implicit_prompt(row["chosen"], row["rejected"])[0]


def read_prompts(source: Any, limit: int | None = None, prompt_of: Callable[[dict], Any] = text_prompt) -> list:
    """The first `limit` prompts of `source`, `prompt_of` reading each row's (a RowProblem stops with file and
    row): text prompts by default; a family with prompts of its own (images) passes its reader."""
    name = describe(source)
    prompts = []
    for number, row in read_rows(source):
        try:
            prompts.append(prompt_of(row))
        except RowProblem as e:
            raise DataError(name, number, str(e)) from None
        if limit and len(prompts) >= limit:
            break
    if not prompts:
        raise DataError(name, None, "no prompts")
    return prompts


def run_eval(model: str | Path, data: Any = None, prompts: Any = None, *, ref_model: str | None = None,
             beta: float | None = None, batch_size: int | None = None, judge: Any = None,
             num_prompts: int | None = None, max_new_tokens: int = 128, temperature: float = 1.0, top_p: float = 1.0,
             seed: int = 0, embeddings: bool = True, samples_out: str | Path | None = None, overrides: list[str] = (),
             progress: bool = True) -> dict:
    """What `dpokit eval` does: preference eval on `data` and/or sample-based eval on `prompts`."""
    if not data and not prompts:
        raise DpokitError("nothing to evaluate: give --data (a preference file), --prompts (held-out prompts), or both")
    from .judges import load_judge
    from .sample_eval import sample_eval

    judge = load_judge(judge)  # a bad judge spec fails before any model is loaded
    models = load_models(model, ref_model, beta, overrides)
    if prompts:
        models.family.require("sample", "sample-based eval (--prompts)")
    result: dict[str, Any] = {"model": str(model), "reference": models.reference_name, "beta": models.cfg.beta}
    if data:
        result["preference_source"] = str(data)
        result["preference"] = preference_eval(models, data, batch_size, progress)
    if prompts:
        if models.reference is None and not models.adapters_off:
            raise DpokitError("sample-based eval needs a reference model to compare with; pass --ref-model")
        chosen = models.family.prompts(prompts, models.tokenizer, num_prompts)
        out = sample_eval(models.policy, models.reference, models.tokenizer, chosen, judge,
                          max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                          batch_size=batch_size or models.cfg.per_device_eval_batch_size, seed=seed,
                          max_prompt_length=models.cfg.max_prompt_length,
                          embedder="minilm" if embeddings else None, progress=progress, family=models.family,
                          cfg=models.cfg)
        result["samples_source"] = str(prompts)
        result["samples"] = out.metrics
        if samples_out:
            write_text(samples_out, "".join(json.dumps(s) + "\n" for s in out.samples))
    return result


def format_results(result: dict) -> str:
    """The eval result as aligned `name  value` lines."""
    lines = [f"model: {result['model']}", f"reference: {result['reference']}", f"beta: {result['beta']}"]
    for section, title in (("preference", "preference eval"), ("samples", "sample-based eval")):
        if section in result:
            lines.append(f"{title} ({result[section + '_source']}):")
            width = max(len(k) for k in result[section])
            for k, v in result[section].items():
                shown = "nan" if isinstance(v, float) and math.isnan(v) else f"{v:.4f}" if isinstance(v, float) else v
                lines.append(f"  {k:<{width}}  {shown}")
    return "\n".join(lines)
