"""The world model: a causal transformer over a user's events that predicts the user's response to the next item.

An event is an item and its observed outcomes. Position t embeds event t (the item's embedding, plus a projection of
its outcomes: each outcome's value and a flag saying it is known, so an event whose outcome is missing is still an
input) and a learned position; causal pre-norm transformer blocks give a state h_t of the events up to t. The
outcomes of the item at t+1 are predicted from [h_t, the embedding of that item]: an MLP with one head per outcome,
`rating` (real-valued, regressed with MSE on ratings standardised by the training log's mean and deviation) and/or
`engaged` (a logit, binary cross-entropy). So the model is p(outcome | past events, next item), the user
simulator of AMRS (Chan et al. 2026, arXiv 2605.28810) with SASRec's encoder (Kang & McAuley 2018).

A history is a list of events, oldest first; an event is an item id (outcomes unknown), a pair (item id, {outcome:
value}) or a dict {"item": id, outcome: value, ...}. `predict` takes histories and candidate items as ids and returns
each outcome in its own scale (a rating; an engagement probability).
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from ..errors import DpokitError

OUTCOMES = ("rating", "engaged")
PAD = 0


class WorldModel(nn.Module):
    """A causal transformer predicting `outcomes` (a subset of OUTCOMES) of the next item. `items` is the vocabulary
    (ids as strings; index i + 1 for items[i], 0 is the padding). `engaged_threshold`, when set, is how the data's
    engagement was defined from ratings (rating ≥ it), kept with the model so that its config says so."""

    def __init__(self, items: Sequence, outcomes: Sequence[str] = OUTCOMES, max_history: int = 50, hidden: int = 64,
                 blocks: int = 2, heads: int = 2, dropout: float = 0.1, engaged_threshold: float | None = None):
        super().__init__()
        outcomes = tuple(outcomes)
        if not outcomes or any(o not in OUTCOMES for o in outcomes) or len(set(outcomes)) != len(outcomes):
            raise DpokitError(f"outcomes must be distinct names among {', '.join(OUTCOMES)}, got {list(outcomes)}")
        self.items = [str(i) for i in items]
        if not self.items:
            raise DpokitError("a world model needs at least one item")
        self.index = {item: i + 1 for i, item in enumerate(self.items)}
        if len(self.index) != len(self.items):
            raise DpokitError("the world model's items list an item twice")
        self.outcomes = outcomes
        self.max_history, self.hidden, self.blocks, self.heads = max_history, hidden, blocks, heads
        self.dropout_p = dropout
        self.engaged_threshold = engaged_threshold
        self.item_emb = nn.Embedding(len(self.items) + 1, hidden, padding_idx=PAD)
        self.pos_emb = nn.Embedding(max_history, hidden)
        self.outcome_proj = nn.Linear(2 * len(outcomes), hidden)
        self.drop = nn.Dropout(dropout)
        self.layers = nn.ModuleList(
            nn.TransformerEncoderLayer(hidden, heads, dim_feedforward=2 * hidden, dropout=dropout, batch_first=True,
                                       norm_first=True) for _ in range(blocks))
        self.norm = nn.LayerNorm(hidden)
        self.head = nn.Sequential(nn.Linear(2 * hidden, hidden), nn.GELU(), nn.Linear(hidden, len(outcomes)))
        # ratings are standardised with the training log's statistics (set by fit; saved with the weights)
        self.register_buffer("rating_mean", torch.zeros(()))
        self.register_buffer("rating_std", torch.ones(()))

    def config(self) -> dict:
        return {"format": "dpokit-worldmodel", "outcomes": list(self.outcomes), "max_history": self.max_history,
                "hidden": self.hidden, "blocks": self.blocks, "heads": self.heads, "dropout": self.dropout_p,
                "engaged_threshold": self.engaged_threshold}

    # ------------------------------------------------------------ tensors

    def encode(self, items: torch.Tensor, outcomes: torch.Tensor) -> torch.Tensor:
        """items [B, L] (right-padded with 0), outcomes [B, L, 2·n_outcomes] (standardised value, known flag) →
        states [B, L, hidden], h_t seeing events ≤ t only."""
        L = items.shape[1]
        if L > self.max_history:
            raise DpokitError(f"a history of {L} events is longer than the world model's max_history "
                              f"{self.max_history}")
        pos = torch.arange(L, device=items.device)
        x = self.item_emb(items) + self.outcome_proj(outcomes) + self.pos_emb(pos)[None]
        x = self.drop(x)
        causal = torch.triu(torch.ones(L, L, dtype=torch.bool, device=items.device), diagonal=1)
        for block in self.layers:
            x = block(x, src_mask=causal)  # right padding: a real position never sees a padded one
        return self.norm(x)

    def heads_out(self, states: torch.Tensor, next_items: torch.Tensor) -> torch.Tensor:
        """states [..., hidden] and the next items [...] → raw outputs [..., n_outcomes] (standardised rating,
        engagement logit)."""
        return self.head(torch.cat([states, self.item_emb(next_items)], dim=-1))

    def forward(self, items: torch.Tensor, outcomes: torch.Tensor, next_items: torch.Tensor) -> torch.Tensor:
        """Teacher forcing: at each position t the raw outputs for next_items[:, t] (the item of event t+1)."""
        return self.heads_out(self.encode(items, outcomes), next_items)

    # ------------------------------------------------------------ events as ids

    def item_index(self, item, where: str) -> int:
        index = self.index.get(str(item))
        if index is None:
            raise DpokitError(f"{where}: unknown item {str(item)!r} (the world model knows {len(self.items)} items)")
        return index

    def event_features(self, values: dict) -> list[float]:
        """An event's outcomes → [value, known] per outcome (the rating standardised; unknown: 0, 0)."""
        out: list[float] = []
        for name in self.outcomes:
            v = values.get(name)
            if v is None:
                out += [0.0, 0.0]
            elif name == "rating":
                out += [(float(v) - float(self.rating_mean)) / float(self.rating_std), 1.0]
            else:
                out += [float(v), 1.0]
        return out

    def history_tensors(self, histories: Sequence, where: str = "history") -> tuple[torch.Tensor, torch.Tensor,
                                                                                   torch.Tensor]:
        """Histories (lists of events) → items [B, L], outcome features [B, L, F], lengths [B]; the most recent
        max_history events of each."""
        rows = []
        for n, h in enumerate(histories, start=1):
            events = [parse_event(e, f"{where} {n}") for e in (h if isinstance(h, (list, tuple)) else [h])]
            if not events:
                raise DpokitError(f"{where} {n}: an empty history (the world model needs at least one earlier event)")
            events = events[-self.max_history:]
            rows.append(([self.item_index(i, f"{where} {n}") for i, _ in events],
                         [self.event_features(v) for _, v in events]))
        if not rows:
            raise DpokitError(f"no {where}s given")
        L = max(len(r[0]) for r in rows)
        items = torch.zeros(len(rows), L, dtype=torch.long)
        feats = torch.zeros(len(rows), L, 2 * len(self.outcomes))
        for b, (ids, fs) in enumerate(rows):
            items[b, :len(ids)] = torch.tensor(ids)
            feats[b, :len(ids)] = torch.tensor(fs)
        return items, feats, torch.tensor([len(r[0]) for r in rows])

    def to_outcomes(self, raw: torch.Tensor) -> dict[str, torch.Tensor]:
        """Raw outputs [..., n_outcomes] → {"rating": ratings in the log's scale, "engaged": probabilities}."""
        out = {}
        for j, name in enumerate(self.outcomes):
            out[name] = raw[..., j] * self.rating_std + self.rating_mean if name == "rating" else raw[..., j].sigmoid()
        return out

    @torch.no_grad()
    def predict(self, histories: Sequence, candidates: Sequence[Sequence]) -> dict[str, torch.Tensor]:
        """For each history and each of its candidate items (the same number for every history), the predicted
        outcomes: {outcome: [B, C]}; eval mode for the call."""
        if len(candidates) != len(histories):
            raise DpokitError(f"{len(histories)} histories but {len(candidates)} candidate lists")
        widths = {len(c) for c in candidates}
        if len(widths) != 1 or 0 in widths:
            raise DpokitError("every history needs the same, non-zero number of candidate items")
        was = self.training
        self.eval()
        try:
            items, feats, lengths = self.history_tensors(histories)
            device = self.item_emb.weight.device
            states = self.encode(items.to(device), feats.to(device))
            last = states[torch.arange(len(lengths)), lengths.to(device) - 1]  # [B, H]
            cand = torch.tensor([[self.item_index(c, f"candidates {n}") for c in cs]
                                 for n, cs in enumerate(candidates, start=1)], device=device)
            raw = self.heads_out(last[:, None].expand(-1, cand.shape[1], -1), cand)
            return {k: v.float().cpu() for k, v in self.to_outcomes(raw).items()}
        finally:
            self.train(was)


def parse_event(event, where: str) -> tuple[str, dict]:
    """An item id, (item id, {outcome: value}) or {"item": id, outcome: value} → (item id, {outcome: value})."""
    if isinstance(event, dict):
        if "item" not in event:
            raise DpokitError(f"{where}: an event as a dict needs an 'item' key, got {sorted(event)}")
        return str(event["item"]), {k: v for k, v in event.items() if k in OUTCOMES and v is not None}
    if isinstance(event, tuple):
        if len(event) != 2 or not isinstance(event[1], dict):
            raise DpokitError(f"{where}: an event as a tuple is (item id, {{outcome: value}}), got {event!r}")
        return str(event[0]), {k: v for k, v in event[1].items() if k in OUTCOMES and v is not None}
    return str(event), {}


def event_item(event) -> str:
    """The item id of an event in any of its forms."""
    return parse_event(event, "event")[0]
