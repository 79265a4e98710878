"""Instructional Segment Embeddings (ISE, Wu et al. 2025) for Llama-shaped causal LMs.

Each token's embedding gets a learned vector for the segment it sits in (which instruction source
wrote it: platform, system, user, tool, data, or the model's own reply), so the source is part of every
token's representation rather than something attention has to infer from a header far back.

Segments are read off delimiter tokens: a token belongs to the segment opened by the last delimiter at
or before it in the same input. Tokens with no delimiter before them get `default_segment`; make that the
reply's segment, because generation with a KV cache feeds each new token alone. Packed rows work as long
as every packed sequence starts with a delimiter (its first source header).

`with_segment_embeddings` turns a `LlamaForCausalLM` into a `SegmentLlamaForCausalLM` with the same
weights and a zero segment table, so it starts as exactly the model it was.

This is experiment code (the GW-DPO hierarchy experiment trains with it), so the core does not import it:
importing this module (or `dpokit.experiments.hierarchy`) registers the class with transformers' Auto
classes, and from then on a saved model loads back through dpokit's loader, or
`AutoModelForCausalLM.from_pretrained`, with no remote code.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

MODEL_TYPE = "dpokit_segment_llama"


def segment_ids(input_ids: torch.Tensor, segment_of_token: torch.Tensor, default_segment: int) -> torch.Tensor:
    """Per-token segment: that of the last delimiter at or before the token in its row (`segment_of_token`
    is -1 for tokens that are not delimiters), else `default_segment`."""
    opened = segment_of_token[input_ids]
    position = torch.arange(input_ids.shape[-1], device=input_ids.device).expand_as(input_ids)
    last = torch.where(opened >= 0, position, -1).cummax(dim=-1).values
    carried = opened.gather(-1, last.clamp(min=0))
    return torch.where(last >= 0, carried, default_segment)


class SegmentEmbedding(nn.Embedding):
    """Token embedding plus a segment embedding; `weight` is the token table, as in `nn.Embedding`, so
    weight tying and the LM head see an ordinary embedding."""

    def __init__(self, num_embeddings: int, embedding_dim: int, padding_idx: int | None,
                 segments: list[list[int]], default_segment: int):
        super().__init__(num_embeddings, embedding_dim, padding_idx)
        self.segments = nn.Embedding(len(segments), embedding_dim)
        nn.init.zeros_(self.segments.weight)
        self.delimiters = [list(ids) for ids in segments]
        self.default_segment = default_segment
        self._table: torch.Tensor | None = None

    def segment_of_token(self, device: torch.device) -> torch.Tensor:
        """Token id → the segment it opens, -1 for non-delimiters. Built on first use rather than held as a
        buffer: from_pretrained builds modules on the meta device, where a non-persistent buffer would
        come back uninitialised."""
        if self._table is None or self._table.device != device:
            table = torch.full((self.num_embeddings,), -1, dtype=torch.long)
            for segment, token_ids in enumerate(self.delimiters):
                table[torch.tensor(token_ids, dtype=torch.long)] = segment
            self._table = table.to(device)
        return self._table

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        seg = segment_ids(input_ids, self.segment_of_token(input_ids.device), self.default_segment)
        return super().forward(input_ids) + self.segments(seg)


class SegmentLlamaConfig(LlamaConfig):
    """A Llama config plus `segments` (segment k is opened by any token id in segments[k]) and
    `default_segment`."""

    model_type = MODEL_TYPE

    def __init__(self, segments: list[list[int]] | None = None, default_segment: int = 0, **kwargs):
        self.segments = [list(ids) for ids in segments or [[]]]
        self.default_segment = default_segment
        super().__init__(**kwargs)


class SegmentLlamaForCausalLM(LlamaForCausalLM):
    config_class = SegmentLlamaConfig

    def __init__(self, config: SegmentLlamaConfig):
        super().__init__(config)
        tokens = self.model.embed_tokens
        self.model.embed_tokens = SegmentEmbedding(tokens.num_embeddings, tokens.embedding_dim, tokens.padding_idx,
                                                   config.segments, config.default_segment)
        self.model.embed_tokens.weight = tokens.weight


def with_segment_embeddings(model: LlamaForCausalLM, segments: list[list[int]],
                            default_segment: int = 0) -> SegmentLlamaForCausalLM:
    """`model` with a zero-initialised segment table added: the same outputs until the table is trained."""
    if type(model) is not LlamaForCausalLM:
        raise TypeError(f"segment embeddings are built for LlamaForCausalLM, got {type(model).__name__}")
    if not 0 <= default_segment < len(segments):
        raise ValueError(f"default_segment {default_segment} is not one of the {len(segments)} segments")
    vocab = model.config.vocab_size
    bad = [t for ids in segments for t in ids if not 0 <= t < vocab]
    if bad:
        raise ValueError(f"delimiter token ids outside the vocabulary (size {vocab}): {bad}")
    plain = {k: v for k, v in model.config.to_diff_dict().items()
             if k not in ("model_type", "architectures", "transformers_version")}
    config = SegmentLlamaConfig(segments=segments, default_segment=default_segment, **plain)
    config._attn_implementation = model.config._attn_implementation
    out = SegmentLlamaForCausalLM(config)
    missing, unexpected = out.load_state_dict(model.state_dict(), strict=False)
    assert not unexpected and missing == ["model.embed_tokens.segments.weight"], (missing, unexpected)
    return out.to(model.dtype).train(model.training)


def register_auto_classes() -> None:
    """Let `AutoModelForCausalLM.from_pretrained` load saved segment models (idempotent)."""
    AutoConfig.register(MODEL_TYPE, SegmentLlamaConfig, exist_ok=True)
    AutoModelForCausalLM.register(SegmentLlamaConfig, SegmentLlamaForCausalLM, exist_ok=True)


register_auto_classes()
