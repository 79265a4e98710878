"""Scoring examples over batches with any family: the one loop that turns a list of examples into
per-example scores outside training (evaluation, sample-based eval's log-probs, the demo's and the
experiments' measurements)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterator, Sequence

import torch
from tqdm.auto import tqdm

from .families import Family, Scorer, Scores
from .families.base import draw_seeds
from .reference import Reference


@dataclass
class ScoredBatch:
    examples: Sequence  # the batch's examples, in order
    batch: dict[str, torch.Tensor]  # as the family collated them, on the scorer's device
    scores: Scores  # the scorer's, per example
    reference: tuple[torch.Tensor, torch.Tensor] | None  # (chosen, rejected) reference scores, fp32; None: none


def score_examples(family: Family, scorer: Scorer, examples: Sequence, cfg, processor: Any, batch_size: int,
                   device: torch.device | str | None = None, reference: Reference | None = None,
                   desc: str = "score", progress: bool = False) -> Iterator[ScoredBatch]:
    """`examples` in order, `batch_size` at a time: collated by `family`, moved to `device` (default: where the
    scorer's weights are), scored by `scorer` and, when `reference` is given and not reference-free, by it too.
    Gradients flow as the caller's grad mode says: evaluation runs under torch.no_grad, a measurement of
    gradients (the frontier's first step) without it."""
    device = device if device is not None else next(scorer.parameters()).device
    for start in tqdm(range(0, len(examples), batch_size), desc=desc, disable=not progress):
        chunk = examples[start:start + batch_size]
        # a stochastic family draws its noise from seeds that follow the example, as in training's evaluation
        draws = {"draws": draw_seeds(cfg.seed, 0, range(start, start + len(chunk)))} if family.stochastic else {}
        batch = {k: v.to(device) for k, v in family.collate(chunk, cfg, processor, **draws).items()}
        scores = scorer(batch)
        ref = None if reference is None or reference.reference_free else reference.scores(batch)
        yield ScoredBatch(chunk, batch, scores, ref)
