"""The recommender family's own config keys (flat in the YAML beside the shared ones)."""

from __future__ import annotations

from dataclasses import dataclass

from ...errors import DpokitError

SCORE_OVER = ("catalogue", "slate")


def _positive_int(value, key: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise DpokitError(f"{key} must be a positive integer, got {value!r}")


@dataclass
class RecommenderConfig:
    # The item vocabulary: a text file (one id per line), a RecBole `.item` atomic file (column `item_id:token`) or a
    # CSV with an `item` column. None: every id seen in train_data (saved as items.json beside the model).
    item_catalogue: str | None = None
    max_history: int = 50  # items of history a context keeps (the most recent); a fresh SASRec's positions
    # A fresh SASRec (Kang & McAuley 2018), built when `model` is not given.
    rec_hidden: int = 64  # embedding and hidden size
    rec_blocks: int = 2  # causal transformer blocks
    rec_heads: int = 2  # attention heads (rec_hidden must divide by it)
    rec_dropout: float = 0.2
    # What an item's score is normalised over: the whole catalogue, or the row's `candidates` (the shown slate).
    score_over: str = "catalogue"
    # The length of the lists measured at each eval (NDCG@k, HR@k, coverage, Gini, popularity, genre diversity).
    eval_top_k: int = 10

    def __post_init__(self):
        if self.item_catalogue is not None and (not isinstance(self.item_catalogue, str) or not self.item_catalogue):
            raise DpokitError(f"item_catalogue must be a file path, got {self.item_catalogue!r}")
        for key in ("max_history", "rec_hidden", "rec_blocks", "rec_heads", "eval_top_k"):
            _positive_int(getattr(self, key), key)
        if self.rec_hidden % self.rec_heads:
            raise DpokitError(f"rec_hidden ({self.rec_hidden}) must divide by rec_heads ({self.rec_heads})")
        d = self.rec_dropout
        if isinstance(d, bool) or not isinstance(d, (int, float)) or not 0 <= d < 1:
            raise DpokitError(f"rec_dropout must lie in [0, 1), got {d!r}")
        if self.score_over not in SCORE_OVER:
            raise DpokitError(f"score_over must be one of {', '.join(SCORE_OVER)}, got {self.score_over!r}")
