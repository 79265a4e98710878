"""Attention block by block, through transformers' AttentionInterface.

Packing many blocks into one row and masking across them makes attention cost row² while
only sum(block²) is needed: with 8 pairs of ~200 tokens that is 8x the attention work, as
much as the rest of the model. Instead the model runs with an attention function that
transformers dispatches to by name (its AttentionInterface): given the blocks, it calls
the model's own sdpa or eager attention once per block with that block's small mask, so
the linear layers see one unpadded row and attention never looks across blocks. Without
blocks (generation, plain padded batches) it is exactly the model's own attention, but for a
prepared 4D mask (`dpokit_positions` given), which sliding-window layers get cut to their window.

On a GPU the same blocks are gathered into one padded [blocks, heads, L, L] call per layer
instead: there a model of this size is bound by kernel launches rather than FLOPs, so the
padding costs less than the extra calls would (the two were not timed apart). cuDNN's
attention is left out there, because it builds a new execution plan for every new sequence
length (~75 ms each on an H100: with one call per block, dpokit trained a 0.5B model 6x
slower than now); the memory-efficient kernel takes the boolean mask with no per-shape setup.
"""

from __future__ import annotations

import sys

import torch
from torch import nn

BLOCK_ATTENTION_INNER = ("sdpa", "eager")


def _inner_attention(module: nn.Module, inner: str):
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    if inner == "eager":  # each modeling file has its own eager function (softcapping, sinks, ...)
        own = getattr(sys.modules.get(type(module).__module__), "eager_attention_forward", None)
        if own is None:
            from transformers.models.llama.modeling_llama import eager_attention_forward as own
        return own
    return ALL_ATTENTION_FUNCTIONS[inner]


def _window_mask(mask: torch.Tensor, positions: torch.Tensor, window: int) -> torch.Tensor:
    near = (positions[..., :, None] - positions[..., None, :]) < window
    return mask & near if mask.dtype == torch.bool else mask.masked_fill(~near, torch.finfo(mask.dtype).min)


def one_call(query: torch.Tensor) -> bool:
    """Whether the blocks go through one gathered call (GPU) rather than one call each (CPU)."""
    return query.is_cuda


def _gathered_attention(fn, inner, module, query, key, value, attention_mask, blocks, window, kwargs):
    """All blocks in one padded call: [1, heads, N, d] → [blocks, heads, L, d] and back to [1, N, heads, d]."""
    _, positions, gather, valid = blocks
    mask = attention_mask if window is None else _window_mask(attention_mask, positions[:, None], window)
    q, k, v = (t[0][:, gather].transpose(0, 1) for t in (query, key, value))
    if query.is_cuda and inner == "sdpa":
        from torch.nn.attention import SDPBackend, sdpa_kernel

        with sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]):
            out, _ = fn(module, q, k, v, mask, **kwargs)
    else:
        out, _ = fn(module, q, k, v, mask, **kwargs)
    return out.flatten(0, 1).index_select(0, valid)[None], None


def _block_attention(inner: str):
    def attention(module, query, key, value, attention_mask, dpokit_blocks=None, dpokit_positions=None, **kwargs):
        fn = _inner_attention(module, inner)
        window = kwargs.get("sliding_window", getattr(module, "sliding_window", None))  # Mistral, Gemma, ...
        if dpokit_blocks is None:
            if dpokit_positions is not None and window is not None:
                # transformers hands a prepared 4D mask to every layer as it is, so a sliding-window layer would see
                # past its window: cut it here, by the tokens' positions (packed blocks each start from 0)
                attention_mask = _window_mask(attention_mask, dpokit_positions[:, None], window)
            return fn(module, query, key, value, attention_mask, **kwargs)
        if one_call(query):
            return _gathered_attention(fn, inner, module, query, key, value, attention_mask, dpokit_blocks, window,
                                       kwargs)
        lengths, positions = dpokit_blocks[:2]
        # split, not slicing: its backward is one concatenation, where each slice's would be a zeroed full-size
        # gradient (per block, per tensor, per layer) summed afterwards.
        pieces = zip(query.split(lengths, dim=2), key.split(lengths, dim=2), value.split(lengths, dim=2))
        outs = []
        for b, (q, k, v) in enumerate(pieces):
            n = lengths[b]
            mask = attention_mask[b:b + 1, :, :n, :n]
            if window is not None and n > window:
                mask = _window_mask(mask, positions[b, :n], window)
            out, _ = fn(module, q, k, v, mask, **kwargs)
            outs.append(out)
        return torch.cat(outs, dim=1), None

    return attention


def use_block_attention(model: nn.Module) -> bool:
    """Switch `model` to block attention around its current sdpa/eager; False if it cannot be."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface

    config = getattr(model, "config", None)
    current = getattr(config, "_attn_implementation", None)
    if current is not None and current.startswith("dpokit_blocks_"):
        return True
    if current not in BLOCK_ATTENTION_INNER or not getattr(model, "_supports_attention_backend", False):
        return False
    name = f"dpokit_blocks_{current}"
    AttentionInterface.register(name, _block_attention(current))
    AttentionMaskInterface.register(name, ALL_MASK_ATTENTION_FUNCTIONS[current])  # the usual masks without blocks
    model.set_attn_implementation(name)
    return True
