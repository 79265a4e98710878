"""Sequential recommenders: forward(history [B, L] of item indices, 0 padding on the left, the most recent item
last) → logits [B, n_items] over the catalogue, column i for item index i (column 0, the padding, is never scored).

`SASRec` is dpokit's own (Kang & McAuley 2018, "Self-Attentive Sequential Recommendation"): item embeddings
(scaled by √d) plus learned positions, causal transformer blocks (pre-norm `nn.TransformerEncoderLayer`s with
dropout), a final layer norm; the last position's state dotted with the item embeddings gives the logits. Any
other `nn.Module` with that forward is accepted too (`RecommenderFamily(model=module)`).

`slate_log_probs` scores a slate of candidates without the full [B, n_items] logits when the model can say its
state and its items' output embeddings (`encode`, `item_embeddings`, as SASRec does); other models go through
their forward. `Items` is the vocabulary (external item id → index), saved as items.json beside the weights.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from torch import nn

from ...errors import DpokitError

CONFIG_FILE, WEIGHTS_FILE, ITEMS_FILE = "config.json", "model.safetensors", "items.json"
PAD = 0


class Items:
    """The item vocabulary: external ids (compared as strings) → indices 1..n; 0 is the padding. `source` says
    where it came from, for the message about an unknown item."""

    def __init__(self, ids, source: str):
        self.ids = [str(i) for i in ids]
        self.index = {item: i + 1 for i, item in enumerate(self.ids)}
        if len(self.index) != len(self.ids):
            seen = set()
            twice = next(i for i in self.ids if i in seen or seen.add(i))
            raise DpokitError(f"{source}: item {twice!r} is listed twice")
        self.source = source

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def n_items(self) -> int:
        """Logit columns a model over this vocabulary has (the padding's included)."""
        return len(self.ids) + 1

    def to_json(self) -> dict[str, int]:
        return dict(self.index)

    @classmethod
    def from_json(cls, mapping: dict, source: str) -> "Items":
        if not isinstance(mapping, dict) or not all(isinstance(v, int) for v in mapping.values()):
            raise DpokitError(f"{source}: not an items.json (an object of item id → index)")
        ordered = sorted(mapping.items(), key=lambda kv: kv[1])
        if [v for _, v in ordered] != list(range(1, len(ordered) + 1)):
            raise DpokitError(f"{source}: item indices must run 1..{len(ordered)} (0 is the padding)")
        return cls([k for k, _ in ordered], source)


class SASRec(nn.Module):
    """SASRec over `n_items` logit columns (item indices 1..n_items − 1; 0 the padding)."""

    def __init__(self, n_items: int, max_history: int = 50, hidden: int = 64, blocks: int = 2, heads: int = 2,
                 dropout: float = 0.2):
        super().__init__()
        self.config = {"n_items": n_items, "max_history": max_history, "hidden": hidden, "blocks": blocks,
                       "heads": heads, "dropout": float(dropout)}
        self.n_items, self.max_history, self.heads = n_items, max_history, heads
        self.items = nn.Embedding(n_items, hidden, padding_idx=PAD)
        self.positions = nn.Embedding(max_history, hidden)
        self.dropout = nn.Dropout(dropout)
        self.blocks = nn.ModuleList(
            nn.TransformerEncoderLayer(hidden, heads, dim_feedforward=hidden, dropout=dropout, batch_first=True,
                                       norm_first=True) for _ in range(blocks))
        self.norm = nn.LayerNorm(hidden)
        nn.init.normal_(self.items.weight, std=hidden ** -0.5)
        with torch.no_grad():
            self.items.weight[PAD].zero_()

    def encode(self, history: torch.Tensor) -> torch.Tensor:
        """The state after the most recent item, [B, hidden]."""
        history = history[:, -self.max_history:]
        B, L = history.shape
        valid = history != PAD
        pos = torch.arange(self.max_history - L, self.max_history, device=history.device)
        x = self.items(history) * math.sqrt(self.items.embedding_dim) + self.positions(pos)[None]
        x = self.dropout(x) * valid[..., None]
        # Causal and no padding as keys; every position may see itself, so a padding row stays finite.
        causal = torch.ones(L, L, dtype=torch.bool, device=history.device).triu(1)
        blocked = causal[None] | ~valid[:, None, :]
        blocked = blocked & ~torch.eye(L, dtype=torch.bool, device=history.device)[None]
        mask = blocked.repeat_interleave(self.heads, dim=0)  # [B·heads, L, L]
        for block in self.blocks:
            x = block(x, src_mask=mask) * valid[..., None]
        return self.norm(x[:, -1])

    def item_embeddings(self, ids: torch.Tensor) -> torch.Tensor:
        """Output embeddings of item indices (any shape) → [..., hidden]."""
        return self.items(ids)

    def forward(self, history: torch.Tensor) -> torch.Tensor:
        return self.encode(history) @ self.items.weight.T


def catalogue_log_probs(model: nn.Module, history: torch.Tensor) -> torch.Tensor:
    """log-softmax over the whole catalogue (the padding column left out), [B, n_items]."""
    logits = model(history).float()
    logits = logits.clone()
    logits[:, PAD] = -math.inf
    return torch.log_softmax(logits, dim=-1)


def slate_log_probs(model: nn.Module, history: torch.Tensor, slate: torch.Tensor,
                    slate_mask: torch.Tensor | None = None) -> torch.Tensor:
    """log-softmax over each row's slate of item indices [B, S] (`slate_mask` False at padding slots, which get
    −inf), [B, S]. A model with `encode` and `item_embeddings` never builds the catalogue's logits: its state is
    dotted with the slate's output embeddings only; any other model's full logits are gathered."""
    if hasattr(model, "encode") and hasattr(model, "item_embeddings"):
        state = model.encode(history)
        logits = torch.einsum("bh,bsh->bs", state, model.item_embeddings(slate)).float()
    else:
        logits = model(history).float().gather(1, slate)
    if slate_mask is not None:
        logits = logits.masked_fill(~slate_mask, -math.inf)
    return torch.log_softmax(logits, dim=-1)


def save_model(model: nn.Module, items: Items, path: str | Path) -> None:
    """A folder: config.json, model.safetensors, items.json."""
    from safetensors.torch import save_file

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    if isinstance(model, SASRec):
        about = {"format": "dpokit-sasrec", **model.config}
    else:
        about = {"format": "module", "class": type(model).__qualname__, "n_items": items.n_items}
    (path / CONFIG_FILE).write_text(json.dumps(about, indent=2) + "\n")
    save_file({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}, str(path / WEIGHTS_FILE))
    (path / ITEMS_FILE).write_text(json.dumps(items.to_json(), indent=1, ensure_ascii=False) + "\n")


def read_json(file: Path, what: str):
    if not file.is_file():
        raise DpokitError(f"{file.parent}: not a recommender folder (no {file.name}); {what}")
    try:
        return json.loads(file.read_text())
    except json.JSONDecodeError as e:
        raise DpokitError(f"{file}: not valid JSON ({e.msg})") from None


def load_items(path: str | Path) -> Items:
    file = Path(path) / ITEMS_FILE
    return Items.from_json(read_json(file, "give a folder dpokit's recommender family saved"), str(file))


def load_model(path: str | Path) -> nn.Module:
    """A saved SASRec folder; a module of your own's weights are refused (build it and pass it as model=)."""
    from safetensors.torch import load_file

    path = Path(path)
    if not path.exists():
        raise DpokitError(f"{path}: no such folder (model: a recommender folder dpokit saved)")
    config = read_json(path / CONFIG_FILE, "give a folder dpokit's recommender family saved")
    if not isinstance(config, dict) or config.get("format") not in ("dpokit-sasrec", "module"):
        raise DpokitError(f"{path / CONFIG_FILE}: not a config.json dpokit's recommender family wrote")
    if config["format"] == "module":
        raise DpokitError(f"{path}: holds the weights of a module of your own (model.safetensors); build the module, "
                          "load them into it and pass it as RecommenderFamily(model=module)")
    try:
        model = SASRec(config["n_items"], config["max_history"], config["hidden"], config["blocks"], config["heads"],
                       config["dropout"])
        model.load_state_dict(load_file(str(path / WEIGHTS_FILE)))
    except (KeyError, RuntimeError, OSError) as e:
        raise DpokitError(f"{path}: cannot load the recommender ({str(e).splitlines()[0]})") from None
    return model


__all__ = ["Items", "SASRec", "catalogue_log_probs", "load_items", "load_model", "save_model", "slate_log_probs"]
