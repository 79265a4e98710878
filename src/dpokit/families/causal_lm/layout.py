"""The batch layout of token models: where each token lies, what it may attend to, and which hidden state
predicts which scored token. Anything that scores token completions after a prompt (a causal LM, the text
side of a vision-language model) lays its batches out this way.

Each pair becomes one block `[prompt | chosen | rejected]` (share_prompt) or two blocks
`[prompt | chosen]`, `[prompt | rejected]`. With sharing, rejected tokens take positions that
continue from the prompt and may not attend to chosen tokens, so each completion sees exactly
the context it would see alone: the log-probs equal the unshared computation. An S-DPO group
is one block `[prompt | chosen | rejected_1 | … | rejected_K]` under the same rule (each
completion sees the prompt and itself), or K + 1 blocks unshared; an unpaired (KTO) item is a
pair whose "rejected" is the mismatched completion. By default (padding_free) the blocks of a
batch lie end to end in one row with no padding, and attention runs block by block
(attention.py), so no token attends across blocks and attention costs the sum of squared
block lengths. Every target token carries the flat index of the hidden state that predicts it
and the segment (chosen i or rejected i) it is summed into, so one scorer handles every layout.

Some models let parts of the prompt attend to each other both ways (Gemma 3 each image's tokens):
`spans` names them per example, and every mask of the layout lets a span's tokens see each
other, as the model's own mask does, the rest staying causal.
"""

from __future__ import annotations

import torch

from ...data import Example
from .attention import BLOCK_ATTENTION_INNER

PROMPT, CHOSEN, REJECTED = 0, 1, 2  # parts of a block; rejected reply k of a group is part REJECTED + k


def _blocks(ex: Example, share_prompt: bool, K: int) -> list[tuple[list[int], list[int]]]:
    """One example as blocks of (tokens, part lengths [prompt, chosen, rejected_1, …, rejected_K]), padded
    with zero lengths to the batch's K: [p|c|r_1|…] shared, or [p|c], [p|r_1], … unshared."""
    p, c, negatives = ex.prompt_ids, ex.chosen_ids, ex.negatives
    lengths = [len(r) for r in negatives] + [0] * (K - len(negatives))
    if share_prompt:
        return [(p + c + [t for r in negatives for t in r], [len(p), len(c), *lengths])]
    blocks = [(p + c, [len(p), len(c)] + [0] * K)]
    for k, r in enumerate(negatives):
        blocks.append((p + r, [len(p), 0] + [len(r) if j == k else 0 for j in range(K)]))
    return blocks


def _targets(sizes: list[int], base: int, pred: list, target: list, seg: list, tokens: list,
             segments: list[int]) -> None:
    """Which hidden state predicts which completion token, for one block starting at flat index `base`;
    completion part s (1 chosen, 2… rejected) is summed into segment `segments[s - 1]`. The last prompt
    token predicts each completion's first token; with no prompt (tokenization can merge the boundary
    away) the first completion token has nothing before it and is not scored, as in TRL."""
    P = sizes[0]
    start = P
    for n, segment in zip(sizes[1:], segments):
        if n:
            sources = ([P - 1] if P > 0 else []) + list(range(start, start + n - 1))
            pred.extend(base + s for s in sources)
            target.extend(tokens[start + n - len(sources):start + n])
            seg.extend([segment] * len(sources))
        start += n


def collate(examples: list[Example], pad_token_id: int, share_prompt: bool = True, padding_free: bool = True,
            pack_tokens: int = 2048, attn_implementation: str = "sdpa",
            spans: list[list[tuple[int, int]]] | None = None) -> dict[str, torch.Tensor]:
    """Examples → one batch. Three layouts:

    - blocks (padding_free with sdpa or eager attention, the default): every block of the batch in one
      row with no padding at all; `block_sizes` tells the scorer where blocks are, and attention runs
      block by block (attention.py), so it costs sum(block²) rather than row².
    - packed rows with a 4D mask (padding_free with another attention): blocks packed into rows of at
      most `pack_tokens`, a [rows, 1, T, T] block-diagonal causal mask.
    - padded rows (padding_free off): one block per row; with share_prompt a 4D mask keeps rejected
      blind to chosen, without it the plain causal mask of the library (TRL's layout).

    `spans` (per example, [start, end) ranges of its prompt) are the prompt tokens that attend to each other both
    ways; the batch then carries their `span_ids` ([rows, T], one id per span and copy of the prompt, -1 elsewhere)
    and never the library's own causal mask, which would not know them.
    """
    B = len(examples)
    groups = any(ex.is_group for ex in examples)
    K = max(len(ex.negatives) for ex in examples)
    blocks = [(i, blk) for i, ex in enumerate(examples) for blk in _blocks(ex, share_prompt, K)]
    one_row = padding_free and attn_implementation in BLOCK_ATTENTION_INNER
    rows: list[list[tuple]] = []
    for i, blk in blocks:
        n = len(blk[0])
        if padding_free and rows and (one_row or rows[-1][0] + n <= pack_tokens):
            rows[-1][0] += n
            rows[-1][1].append((i, blk))
        else:
            rows.append([n, [(i, blk)]])
    T = max(n for n, _ in rows)
    input_ids = torch.full((len(rows), T), pad_token_id, dtype=torch.long)
    position_ids = torch.zeros((len(rows), T), dtype=torch.long)
    block_id = torch.full((len(rows), T), -1, dtype=torch.long)
    part = torch.full((len(rows), T), -1, dtype=torch.long)
    span_ids = torch.full((len(rows), T), -1, dtype=torch.long)
    pred, target, seg, sizes, n_spans = [], [], [], [], 0
    for r, (_, row) in enumerate(rows):
        offset = 0
        for i, (tokens, lengths) in row:
            n, P = len(tokens), lengths[0]
            input_ids[r, offset:offset + n] = torch.tensor(tokens)
            # each completion's positions continue from the prompt's, as if the others were not there
            position_ids[r, offset:offset + n] = torch.cat([torch.arange(P)] +
                                                           [torch.arange(P, P + m) for m in lengths[1:]])
            part[r, offset:offset + n] = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))
            block_id[r, offset:offset + n] = len(sizes)
            for start, end in spans[i] if spans else ():  # the prompt opens every block, so each copy has them
                span_ids[r, offset + start:offset + end] = n_spans
                n_spans += 1
            sizes.append(lengths)
            # segments: chosen i → i, rejected k of example i → B + i·K + k
            _targets(lengths, r * T + offset, pred, target, seg, tokens, [i] + [B + i * K + k for k in range(K)])
            offset += n
    batch = {
        "input_ids": input_ids,
        "position_ids": position_ids,
        "pred_index": torch.tensor(pred, dtype=torch.long),
        "target_ids": torch.tensor(target, dtype=torch.long),
        "seg_index": torch.tensor(seg, dtype=torch.long),
        "weight": torch.tensor([ex.weight for ex in examples], dtype=torch.float32),
        "margin": torch.tensor([ex.margin for ex in examples], dtype=torch.float32),
    }
    if groups:  # [B, K]: which of the K rejected slots hold a reply (S-DPO groups differ in size)
        batch["rejected_mask"] = torch.tensor([[k < len(ex.negatives) for k in range(K)] for ex in examples])
    if examples[0].label is not None:
        batch["label"] = torch.tensor([bool(ex.label) for ex in examples])
    both_ways = span_ids if spans and any(spans) else None
    if both_ways is not None:
        batch["span_ids"] = both_ways
    if one_row:
        batch["block_sizes"] = torch.tensor(sizes, dtype=torch.long)
    elif not share_prompt and not padding_free and both_ways is None:
        batch["attention_mask"] = (block_id >= 0).long()  # plain padded rows: the library's own causal mask
    else:
        batch["attention_mask"] = _block_mask(block_id, part, attn_implementation, both_ways)
    return batch


def _sees(part: torch.Tensor) -> torch.Tensor:
    """[..., T, T]: query part may look at key part — the prompt and its own completion only."""
    return (part[..., None, :] == PROMPT) | (part[..., :, None] == part[..., None, :])


def _both_ways(span_ids: torch.Tensor) -> torch.Tensor:
    """[..., T, T]: query and key lie in one span whose tokens attend to each other both ways (the same id >= 0)."""
    return (span_ids[..., :, None] == span_ids[..., None, :]) & (span_ids[..., :, None] >= 0)


def _open_spans(causal: torch.Tensor, span_ids: torch.Tensor | None) -> torch.Tensor:
    """The causal mask with each span opened both ways: OR(causal, span), as transformers composes Gemma 3's mask
    (a sliding window, applied afterwards by the attention, then cuts both, as in the model)."""
    return causal if span_ids is None else causal | _both_ways(span_ids)


def _block_mask(block_id: torch.Tensor, part: torch.Tensor, attn_implementation: str,
                span_ids: torch.Tensor | None = None) -> torch.Tensor:
    """[rows, 1, T, T]: causal (spans both ways) within a block, none across blocks, each completion blind to the
    others."""
    T = block_id.shape[1]
    same = block_id[:, :, None] == block_id[:, None, :]
    causal = torch.ones(T, T, dtype=torch.bool).tril()
    allowed = same & _open_spans(causal, span_ids) & _sees(part)
    allowed |= torch.eye(T, dtype=torch.bool)  # pad queries see themselves, so no row is all -inf
    allowed = allowed[:, None]
    if attn_implementation == "sdpa":
        return allowed
    return torch.zeros(allowed.shape).masked_fill_(~allowed, torch.finfo(torch.float32).min)


def row_mask(sizes: torch.Tensor, attn_implementation: str, span_ids: torch.Tensor | None = None) -> torch.Tensor:
    """The [1, 1, N, N] mask of a one-row block batch, for models without block attention."""
    block_id = torch.repeat_interleave(torch.arange(len(sizes), device=sizes.device), sizes.sum(1))[None]
    parts = torch.arange(sizes.shape[1], device=sizes.device).repeat(len(sizes))
    part = torch.repeat_interleave(parts, sizes.flatten())[None]
    return _block_mask(block_id, part, attn_implementation, span_ids)


def block_masks(batch: dict[str, torch.Tensor], dtype: torch.dtype, inner: str):
    """What block attention is handed for a one-row block batch: the per-block masks (stacked, padded to the
    longest block rounded up to 16), and the blocks' lengths and positions, with, for the one-call GPU path,
    the packed index of each padded slot and the padded slots that are real tokens."""
    sizes = batch["block_sizes"]  # [blocks, parts]: prompt, chosen, rejected_1, … lengths
    ends = sizes.cumsum(1)
    lengths = ends[:, -1]
    L = -(-int(lengths.max()) // 16) * 16  # fewer distinct shapes, and a mask the fused kernels accept unpadded
    idx = torch.arange(L, device=sizes.device)[None, :]
    # the part each token lies in (an empty part is skipped; padding past the block gets the last part)
    part = (idx[:, :, None] >= ends[:, None, :-1]).sum(-1)
    start = (ends - sizes).gather(1, part)
    positions = torch.where(part == PROMPT, idx, sizes[:, :1] + idx - start)  # completions continue the prompt
    real = idx < lengths[:, None]
    gather = torch.where(real, (lengths.cumsum(0) - lengths)[:, None] + idx, 0)
    span_ids = torch.where(real, batch["span_ids"][0][gather], -1) if "span_ids" in batch else None
    causal = idx[:, :, None] >= idx[:, None, :]
    allowed = _open_spans(causal, span_ids) & _sees(part)
    mask = allowed[:, None]
    if inner == "eager":
        mask = torch.zeros(mask.shape, dtype=dtype, device=sizes.device).masked_fill_(~mask, torch.finfo(dtype).min)
    return mask, (lengths.tolist(), positions, gather, real.flatten().nonzero().squeeze(1))
