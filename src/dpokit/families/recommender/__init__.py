"""Recommenders (DPO and S-DPO on interactions): a sequential recommender p(item | history), scored on the item a
user chose next against the item(s) shown but not chosen.

- config.py: the family's own keys (`RecommenderConfig`: the catalogue, max_history, a fresh SASRec's size,
  score_over);
- models.py: dpokit's SASRec, the slate scoring that never builds the catalogue's logits, the vocabulary (`Items`)
  and the folder format (config.json + model.safetensors + items.json);
- data.py: interaction rows from JSON Lines, checked against the vocabulary, left-padded in batches;
- scorer.py: the item score (log-softmax over the catalogue or the slate);
- sampling.py: the `sample` capability, the top-k items for each context (history), measured by dpokit.ranking;
- lists.py: the `list_metrics` capability, those lists for the eval rows measured at every eval (ranking quality
  and the collapse guards: coverage, Gini of exposure, popularity, genre diversity), plotted in report.html.

Behaviour cloning is `loss_type: sft` (the next-item cross-entropy); several rejected items per row are S-DPO
groups (`sdpo`, `dmpo`).
"""

from __future__ import annotations


import torch
from torch import nn

from ...errors import DpokitError
from ..base import Family, digest
from .config import RecommenderConfig
from .data import RecExample, collate, items_of_data, load_examples, read_catalogue
from .models import Items, SASRec, load_items, load_model, save_model, slate_log_probs
from .scorer import RecommenderScorer


class RecommenderFamily(Family):
    """`recommender`: pass `model=` a module of your own (forward(history [B, L], 0-padded on the left) → logits
    [B, n_items], column i for item index i) and optionally `items=` its vocabulary (an `Items`, or a list of ids
    for indices 1..n) to train it through `dpokit.train.train(cfg, family=RecommenderFamily(model=module))`."""

    name = "recommender"
    likelihood = "exact"
    config_class = RecommenderConfig
    capabilities = frozenset({"load_trained", "sample", "list_metrics"})
    rebuilds_base = True  # no `model`: load_trained(None, cfg) is the fresh SASRec the run started from

    def __init__(self, model: nn.Module | None = None, items=None):
        self.model = model
        self.items = items if items is None or isinstance(items, Items) else Items(items, "the items given")

    # ------------------------------------------------------------ the vocabulary and the model

    def _items(self, cfg) -> Items:
        """The vocabulary of a run without a saved model: given, the catalogue, or the training data's items."""
        if self.items is not None:
            return self.items
        s = self.settings(cfg)
        if s.item_catalogue:
            return read_catalogue(s.item_catalogue)
        return items_of_data(cfg.train_data)

    def _fresh(self, cfg, items: Items) -> SASRec:
        s = self.settings(cfg)
        with torch.random.fork_rng(devices=[]):  # the start is a function of the config: eval rebuilds it
            torch.manual_seed(cfg.seed)
            return SASRec(items.n_items, s.max_history, s.rec_hidden, s.rec_blocks, s.rec_heads, s.rec_dropout)

    def _saved(self, path: str, cfg) -> tuple[nn.Module, Items]:
        model, items = load_model(path), load_items(path)
        if model.n_items != items.n_items:
            raise DpokitError(f"{path}: the model has {model.n_items - 1} items but items.json lists {len(items)}")
        s = self.settings(cfg) if cfg is not None else None
        if s is not None and s.item_catalogue:
            catalogue = read_catalogue(s.item_catalogue)
            unknown = next((i for i in catalogue.ids if i not in items.index), None)
            if unknown is not None:
                raise DpokitError(f"item_catalogue {s.item_catalogue}: unknown item {unknown!r}: the model at {path} "
                                  f"was trained on the {len(items)} items of its items.json, which lack it")
        return model, items

    def load_policy(self, cfg):
        if cfg.lora is not None:
            raise DpokitError("the recommender family does not take lora (its models are small): remove 'lora'")
        if self.model is not None:
            items = self._items(cfg)
            n = getattr(self.model, "n_items", None)
            if n is not None and n != items.n_items:
                raise DpokitError(f"the model has {n} logit columns, but the vocabulary ({items.source}) needs "
                                  f"{items.n_items} (its {len(items)} items and the padding, index 0)")
            return self.model, items
        if cfg.model:
            return self._saved(cfg.model, cfg)
        items = self._items(cfg)
        return self._fresh(cfg, items), items

    def load_model(self, path, cfg):
        """A frozen recommender from `path`; no path (a run that started from a fresh SASRec): that SASRec again,
        which the run's seed and vocabulary determine."""
        if path:
            model = self._saved(path, cfg)[0]
        elif self.model is not None:
            raise DpokitError("a module of your own has no fresh start to rebuild: give ref_model a saved folder")
        else:
            model = self._fresh(cfg, self._items(cfg))
        return model.requires_grad_(False).eval()

    def load_processor(self, path, cfg):
        return load_items(path)

    def load_trained(self, path, cfg=None):
        """The recommender at `path` (None: the fresh SASRec a run without `model` started from), frozen, and its
        vocabulary."""
        if path:
            model, items = self._saved(path, cfg)
        else:
            items = self._items(cfg)
            model = self._fresh(cfg, items)
        return model.requires_grad_(False).eval(), items

    def save(self, model, items, path, merge_lora=False):
        save_model(model, items, path)

    def sample(self, model, items, prompts, **settings):
        """Top-k lists: for each prompt (a history, a list of item ids oldest first) the `num_generations` (k,
        default 10) items with the highest logits, best first, the history's own items left out
        (`exclude_history=False` keeps them)."""
        from .sampling import recommend

        return recommend(model, items, prompts, **settings)

    def list_metrics(self, model, items, examples, cfg):
        """The top-`eval_top_k` lists for the eval rows' histories, measured (lists.py); genre diversity where the
        `item_catalogue` file has a genre column."""
        from ...recipes.interactions import read_genres
        from .lists import list_metrics

        s = self.settings(cfg)
        return list_metrics(model, items, examples, s.eval_top_k, read_genres(s.item_catalogue))

    def new_model(self, items, max_history: int = 50, hidden: int = 64, blocks: int = 2, heads: int = 2,
                  dropout: float = 0.2) -> SASRec:
        """A fresh SASRec over `items` (an `Items` or a list of ids), for code that trains it itself."""
        items = items if isinstance(items, Items) else Items(items, "the items given")
        return SASRec(items.n_items, max_history, hidden, blocks, heads, dropout)

    # ------------------------------------------------------------ data

    def examples(self, source, items, cfg):
        s = self.settings(cfg) if cfg is not None else RecommenderConfig()
        if not isinstance(items, Items):
            raise DpokitError("the recommender family reads data against an item vocabulary (items=): none given")
        return load_examples(source, items, s.max_history, s.score_over == "slate")

    def collate(self, examples, cfg, items):
        return collate(examples)

    def scorer(self, model, cfg):
        return RecommenderScorer(model)

    def fingerprint(self, examples):
        """Every context's history, items and slate (or none), as indices."""
        parts = []
        for ex in examples:
            parts.append(repr((ex.history, ex.chosen, ex.rejected, ex.candidates)).encode())
        return digest(*parts)


__all__ = ["Items", "RecExample", "RecommenderConfig", "RecommenderFamily", "RecommenderScorer", "SASRec",
           "slate_log_probs"]
