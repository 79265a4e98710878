"""Where each block of a batch lies, and the 3-D M-RoPE positions of the Qwen2-VL line.

An M-RoPE model places an image's tokens on a (time, height, width) grid and the text after it from one past the
grid's extent, on all three axes alike. A reply depends only on its prompt, so its positions are the prompt's next
position + k whatever else shares the row: with prefix sharing the rejected reply restarts where the chosen one
started, exactly as when each is scored beside its own copy of the prompt. The prompt's positions are computed once,
when the row is encoded (`mrope_positions`, the rule of the model's own `get_rope_index`; the tests check the two
agree), and `positions_3d` lays them into the batch block by block.
"""

from __future__ import annotations

import torch

from ..causal_lm import BLOCK_ATTENTION_INNER

# Models whose image tokens attend to each other both ways, each image's run of them, by the processor a batch is
# collated with: Gemma 3 (the tokens its processor marks in `token_type_ids`, which transformers' mask opens in
# training and in prefill alike). The layout opens these spans in every mask; everything else stays causal.
IMAGE_SPAN_PROCESSORS = ("Gemma3Processor",)


def mrope_positions(token_types: list[int], grids: torch.Tensor | None, merge: int) -> tuple[torch.Tensor, int]:
    """[3, P] positions of a prompt whose tokens are text (0) or image (1), the images' (t, h, w) patch grids in
    order, and the position the text after it starts at. As Qwen2-VL's `get_rope_index` for images: a text run
    continues on all three axes; an image spans t × (h/merge) × (w/merge) tokens at start + (t, row, column), and
    the text after it resumes at start + max(h, w)/merge."""
    pieces, pos, i, n_grid = [], 0, 0, 0
    while i < len(token_types):
        if token_types[i] == 0:
            j = i
            while j < len(token_types) and token_types[j] == 0:
                j += 1
            pieces.append((torch.arange(j - i) + pos).expand(3, -1))
            pos += j - i
            i = j
            continue
        t, h, w = (int(x) for x in grids[n_grid])
        n_grid += 1
        h, w = h // merge, w // merge
        grid = torch.stack(torch.meshgrid(torch.arange(t), torch.arange(h), torch.arange(w), indexing="ij"))
        pieces.append(grid.reshape(3, -1) + pos)
        pos += max(h, w)
        i += t * h * w
    return torch.cat(pieces, dim=1), pos


def block_lengths(ex, share_prompt: bool) -> list[list[int]]:
    """An example's blocks as part lengths [prompt, chosen, rejected]: one block shared, two unshared (the causal
    layout's blocks, for a pair)."""
    P, C, R = len(ex.prompt_ids), len(ex.chosen_ids), len(ex.rejected_ids)
    return [[P, C, R]] if share_prompt else [[P, C, 0], [P, 0, R]]


def block_tokens(ex, lengths: list[int]) -> list[int]:
    return ex.prompt_ids + (ex.chosen_ids if lengths[1] else []) + (ex.rejected_ids if lengths[2] else [])


def placements(examples: list, share_prompt: bool, padding_free: bool, pack_tokens: int,
               attn_implementation: str) -> list[tuple[int, int, int, list[int]]]:
    """(example, row, offset, part lengths) of every block, in the order the causal layout's `collate` places them:
    blocks end to end in one row (padding_free with block attention), packed into rows of at most `pack_tokens`, or
    one per row. `check_placements` verifies the result against the batch, so a change of that rule is caught."""
    one_row = padding_free and attn_implementation in BLOCK_ATTENTION_INNER
    out, row, used = [], -1, 0
    for i, ex in enumerate(examples):
        for lengths in block_lengths(ex, share_prompt):
            n = sum(lengths)
            if padding_free and row >= 0 and (one_row or used + n <= pack_tokens):
                out.append((i, row, used, lengths))
                used += n
            else:
                row, used = row + 1, n
                out.append((i, row, 0, lengths))
    return out


def check_placements(examples: list, places, input_ids: torch.Tensor) -> None:
    for i, row, offset, lengths in places:
        tokens = block_tokens(examples[i], lengths)
        if input_ids[row, offset:offset + len(tokens)].tolist() != tokens:
            raise RuntimeError("the vlm family's block placement disagrees with the causal layout's collate")


def positions_3d(examples: list, places, position_ids: torch.Tensor) -> torch.Tensor:
    """[3, rows, T] M-RoPE positions from the layout's 1-D ones: each prompt gets its own 3-D positions, and each
    reply token (1-D position P + k) the prompt's next position + k on all three axes."""
    pos = position_ids[None].repeat(3, 1, 1)
    for i, row, offset, lengths in places:
        ex, P, n = examples[i], lengths[0], sum(lengths)
        pos[:, row, offset:offset + P] = ex.rope
        pos[:, row, offset + P:offset + n] += ex.rope_next - P
    return pos


def image_spans(prompt_ids: list[int], image_ids: set[int]) -> list[tuple[int, int]]:
    """[start, end) of each run of image tokens in a prompt: the spans Gemma 3's mask opens both ways (transformers'
    `get_block_sequence_ids_for_mask` starts a new one wherever an image token follows a text token)."""
    spans, start = [], None
    for k, token in enumerate(prompt_ids + [None]):
        if token in image_ids and start is None:
            start = k
        elif token not in image_ids and start is not None:
            spans.append((start, k))
            start = None
    return spans


def prompt_spans(examples: list, processor) -> list[list[tuple[int, int]]] | None:
    """Per example, the prompt spans that attend both ways for this processor's model; None for a causal model."""
    if type(processor).__name__ not in IMAGE_SPAN_PROCESSORS:
        return None
    image_ids = set(processor.image_token_ids)
    return [image_spans(ex.prompt_ids, image_ids) for ex in examples]
