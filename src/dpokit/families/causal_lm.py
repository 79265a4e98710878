"""Hugging Face causal language models as a model family.

Batch layout. Each pair becomes one block `[prompt | chosen | rejected]` (share_prompt) or
two blocks `[prompt | chosen]`, `[prompt | rejected]`. With sharing, rejected tokens take
positions that continue from the prompt and may not attend to chosen tokens, so each
completion sees exactly the context it would see alone: the log-probs equal the unshared
computation. An S-DPO group is one block `[prompt | chosen | rejected_1 | … | rejected_K]`
under the same rule (each completion sees the prompt and itself), or K + 1 blocks unshared;
an unpaired (KTO) item is a pair whose "rejected" is the mismatched completion.
By default (padding_free) the blocks of a batch lie end to end in one row with no padding,
and attention runs block by block (see "attention block by block" below), so no token
attends across blocks and attention costs the sum of squared block lengths.
Every target token carries the flat index of the hidden state that predicts it and the
segment (chosen i or rejected i) it is summed into, so one scorer handles every layout.
The LM head runs only on those hidden states, `logits_chunk_size` at a time.
"""

from __future__ import annotations

import logging
import sys
from functools import partial
from typing import Any

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..data import Example, load_examples
from ..errors import DpokitError
from .base import Family, Scores, digest

log = logging.getLogger("dpokit")

PROMPT, CHOSEN, REJECTED = 0, 1, 2  # parts of a block; rejected reply k of a group is part REJECTED + k


# ---------------------------------------------------------------- loading


def _dtype(name: str):
    table = {"auto": "auto", "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    if name not in table:
        raise DpokitError(f"dtype must be one of {', '.join(table)}, got {name!r}")
    return table[name]


def load_model(path: str, cfg) -> nn.Module:
    from transformers import AutoModelForCausalLM

    from ..segments import register_auto_classes

    register_auto_classes()

    try:
        model = AutoModelForCausalLM.from_pretrained(
            path, dtype=_dtype(cfg.dtype), attn_implementation=cfg.attn_implementation,
            trust_remote_code=cfg.trust_remote_code, use_safetensors=None,
        )
    except (OSError, ValueError) as e:
        raise DpokitError(f"cannot load model {path!r}: {str(e).splitlines()[0]}") from None
    return model


def load_tokenizer(path: str, cfg):
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(path, trust_remote_code=cfg.trust_remote_code)
    except (OSError, ValueError) as e:
        raise DpokitError(f"cannot load tokenizer {path!r}: {str(e).splitlines()[0]}") from None
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    if tok.eos_token is None:
        raise DpokitError(f"tokenizer {path!r} has no EOS token; completions must end with one")
    return tok


def apply_lora(model: nn.Module, lora: dict) -> nn.Module:
    from peft import LoraConfig, get_peft_model

    settings = {"r": 16, "lora_alpha": 32, "lora_dropout": 0.0, "target_modules": "all-linear", **lora}
    try:
        return get_peft_model(model, LoraConfig(task_type="CAUSAL_LM", **settings))
    except (TypeError, ValueError) as e:
        raise DpokitError(f"bad lora settings {lora}: {e}") from None


# ---------------------------------------------------------------- batches


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
            pack_tokens: int = 2048, attn_implementation: str = "sdpa") -> dict[str, torch.Tensor]:
    """Examples → one batch. Three layouts:

    - blocks (padding_free with sdpa or eager attention, the default): every block of the batch in one
      row with no padding at all; `block_sizes` tells the scorer where blocks are, and attention runs
      block by block (`_block_attention`), so it costs sum(block²) rather than row².
    - packed rows with a 4D mask (padding_free with another attention): blocks packed into rows of at
      most `pack_tokens`, a [rows, 1, T, T] block-diagonal causal mask.
    - padded rows (padding_free off): one block per row; with share_prompt a 4D mask keeps rejected
      blind to chosen, without it the plain causal mask of the library (TRL's layout).
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
    pred, target, seg, sizes = [], [], [], []
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
    if one_row:
        batch["block_sizes"] = torch.tensor(sizes, dtype=torch.long)
    elif not share_prompt and not padding_free:
        batch["attention_mask"] = (block_id >= 0).long()  # plain padded rows: the library's own causal mask
    else:
        batch["attention_mask"] = _block_mask(block_id, part, attn_implementation)
    return batch


def _sees(part: torch.Tensor) -> torch.Tensor:
    """[..., T, T]: query part may look at key part — the prompt and its own completion only."""
    return (part[..., None, :] == PROMPT) | (part[..., :, None] == part[..., None, :])


def _block_mask(block_id: torch.Tensor, part: torch.Tensor, attn_implementation: str) -> torch.Tensor:
    """[rows, 1, T, T]: causal within a block, none across blocks, each completion blind to the others."""
    T = block_id.shape[1]
    same = block_id[:, :, None] == block_id[:, None, :]
    causal = torch.ones(T, T, dtype=torch.bool).tril()
    allowed = same & causal & _sees(part)
    allowed |= torch.eye(T, dtype=torch.bool)  # pad queries see themselves, so no row is all -inf
    allowed = allowed[:, None]
    if attn_implementation == "sdpa":
        return allowed
    return torch.zeros(allowed.shape).masked_fill_(~allowed, torch.finfo(torch.float32).min)


# ---------------------------------------------------------------- attention block by block
#
# Packing many blocks into one row and masking across them makes attention cost row² while
# only sum(block²) is needed: with 8 pairs of ~200 tokens that is 8x the attention work, as
# much as the rest of the model. Instead the model runs with an attention function that
# transformers dispatches to by name (its AttentionInterface): given the blocks, it calls
# the model's own sdpa or eager attention once per block with that block's small mask, so
# the linear layers see one unpadded row and attention never looks across blocks. Without
# blocks (generation, plain padded batches) it is exactly the model's own attention.
#
# On a GPU the same blocks are gathered into one padded [blocks, heads, L, L] call per layer
# instead: there a model of this size is bound by kernel launches rather than FLOPs, so the
# padding costs less than the extra calls would (the two were not timed apart). cuDNN's
# attention is left out there, because it builds a new execution plan for every new sequence
# length (~75 ms each on an H100: with one call per block, dpokit trained a 0.5B model 6x
# slower than now); the memory-efficient kernel takes the boolean mask with no per-shape setup.

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
    def attention(module, query, key, value, attention_mask, dpokit_blocks=None, **kwargs):
        fn = _inner_attention(module, inner)
        if dpokit_blocks is None:
            return fn(module, query, key, value, attention_mask, **kwargs)
        window = kwargs.get("sliding_window", getattr(module, "sliding_window", None))  # Mistral, Gemma, ...
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


def _blocks_kwargs(batch: dict[str, torch.Tensor], dtype: torch.dtype, inner: str):
    """The per-block masks (stacked, padded to the longest block rounded up to 16), the blocks' lengths and
    positions, and for the one-call GPU path the packed index of each padded slot and the padded slots that
    are real tokens."""
    sizes = batch["block_sizes"]  # [blocks, parts]: prompt, chosen, rejected_1, … lengths
    ends = sizes.cumsum(1)
    lengths = ends[:, -1]
    L = -(-int(lengths.max()) // 16) * 16  # fewer distinct shapes, and a mask the fused kernels accept unpadded
    idx = torch.arange(L, device=sizes.device)[None, :]
    # the part each token lies in (an empty part is skipped; padding past the block gets the last part)
    part = (idx[:, :, None] >= ends[:, None, :-1]).sum(-1)
    start = (ends - sizes).gather(1, part)
    positions = torch.where(part == PROMPT, idx, sizes[:, :1] + idx - start)  # completions continue the prompt
    causal = idx[:, :, None] >= idx[:, None, :]
    allowed = causal & _sees(part)
    mask = allowed[:, None]
    if inner == "eager":
        mask = torch.zeros(mask.shape, dtype=dtype, device=sizes.device).masked_fill_(~mask, torch.finfo(dtype).min)
    real = idx < lengths[:, None]
    gather = torch.where(real, (lengths.cumsum(0) - lengths)[:, None] + idx, 0)
    return mask, (lengths.tolist(), positions, gather, real.flatten().nonzero().squeeze(1))


def _row_mask(sizes: torch.Tensor, attn_implementation: str) -> torch.Tensor:
    """The [1, 1, N, N] mask of a one-row block batch, for models without block attention."""
    block_id = torch.repeat_interleave(torch.arange(len(sizes), device=sizes.device), sizes.sum(1))[None]
    parts = torch.arange(sizes.shape[1], device=sizes.device).repeat(len(sizes))
    part = torch.repeat_interleave(parts, sizes.flatten())[None]
    return _block_mask(block_id, part, attn_implementation)


# ---------------------------------------------------------------- scoring


def _logit_scale(config) -> float:
    """The factor some models apply to the LM head's output in their own forward (Cohere, Granite,
    Falcon-H1, MiniCPM3, ...), which a scorer calling the head directly must apply too (as TRL does)."""
    for key in ("logit_scale", "output_multiplier", "lm_head_multiplier"):
        if getattr(config, key, None) is not None:
            return float(getattr(config, key))
    scaling = getattr(config, "logits_scaling", None)
    if scaling is not None:
        return float(scaling) if config.model_type == "hyperclovax" else 1 / scaling
    return 1.0


def _token_logps(head: nn.Module, hidden: torch.Tensor, targets: torch.Tensor, scale: float, softcap: float | None):
    logits = head(hidden)
    if logits.dtype not in (torch.float32, torch.float64):
        logits = logits.float()  # log-softmax in at least fp32
    if scale != 1.0:
        logits = logits * scale
    if softcap:
        logits = torch.tanh(logits / softcap) * softcap
    logp = -nn.functional.cross_entropy(logits, targets, reduction="none")  # one fused log-softmax + pick
    return logp, logits.detach().mean(-1)


class CausalLMScorer(nn.Module):
    """batch → Scores. Holds the model as a submodule so DDP/FSDP wrap the whole computation."""

    def __init__(self, model: nn.Module, chunk_size: int = 1024):
        super().__init__()
        self.model = model
        self.chunk_size = chunk_size

    def _base(self) -> nn.Module:
        return self.model.get_base_model() if hasattr(self.model, "get_base_model") else self.model

    def _parts(self):
        base = self._base()
        return (base.get_decoder(), base.get_output_embeddings(), _logit_scale(base.config),
                getattr(base.config, "final_logit_softcapping", None))

    def _decode(self, decoder, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        if "block_sizes" not in batch:
            return decoder(input_ids=batch["input_ids"], position_ids=batch["position_ids"],
                           attention_mask=batch["attention_mask"], use_cache=False).last_hidden_state
        config = decoder.config
        if not use_block_attention(self._base()):
            # A model that does not dispatch through the AttentionInterface: one row, one big mask.
            mask = _row_mask(batch["block_sizes"], config._attn_implementation)
            return decoder(input_ids=batch["input_ids"], position_ids=batch["position_ids"], attention_mask=mask,
                           use_cache=False).last_hidden_state
        inner = config._attn_implementation.removeprefix("dpokit_blocks_")
        mask, blocks = _blocks_kwargs(batch, decoder.get_input_embeddings().weight.dtype, inner)
        # The stacked block masks are 4D, so transformers hands them to the attention untouched.
        return decoder(input_ids=batch["input_ids"], position_ids=batch["position_ids"], attention_mask=mask,
                       use_cache=False, dpokit_blocks=blocks).last_hidden_state

    def forward(self, batch: dict[str, torch.Tensor]) -> Scores:
        decoder, head, scale, softcap = self._parts()
        hidden = self._decode(decoder, batch)
        hidden = hidden.reshape(-1, hidden.shape[-1]).index_select(0, batch["pred_index"])
        targets = batch["target_ids"]
        n = targets.shape[0]
        size = self.chunk_size
        if not size or n <= size:  # logits_chunk_size=0 turns chunking off
            logp, mean_logit = _token_logps(head, hidden, targets, scale, softcap)
        else:
            # Recompute each chunk's logits in backward, so peak memory follows the chunk, not tokens x vocab.
            # Without gradients there is nothing to recompute: the chunks simply run one after the other.
            run = partial(checkpoint, _token_logps, use_reentrant=False) if torch.is_grad_enabled() else _token_logps
            pieces = [run(head, hidden[s:s + size], targets[s:s + size], scale, softcap) for s in range(0, n, size)]
            logp = torch.cat([p[0] for p in pieces])
            mean_logit = torch.cat([p[1] for p in pieces])
        B = batch["weight"].shape[0]
        K = batch["rejected_mask"].shape[1] if "rejected_mask" in batch else 1
        seg = batch["seg_index"]
        sums = torch.zeros((1 + K) * B, dtype=logp.dtype, device=logp.device).index_add(0, seg, logp)
        counts = torch.zeros((1 + K) * B, dtype=logp.dtype, device=logp.device).index_add(0, seg, torch.ones_like(logp))
        logit_sums = torch.zeros((1 + K) * B, dtype=logp.dtype, device=logp.device).index_add(0, seg, mean_logit)
        mean_logits = logit_sums / counts.clamp(min=1)
        # rejected terms: [B] for pairs, [B, K] for S-DPO groups
        shape = (B, K) if "rejected_mask" in batch else (B,)
        return Scores(sums[:B], sums[B:].view(shape), counts[:B], counts[B:].view(shape), mean_logits[:B],
                         mean_logits[B:].view(shape))


# ---------------------------------------------------------------- the family


class CausalLMFamily(Family):
    name = "causal_lm"
    likelihood = "exact"

    def fingerprint(self, examples) -> str:
        """Token ids of every prompt and output; a group's size too (a group of one caches [N, 1] where a
        pair caches [N], so they must not share a key)."""
        parts = []
        for ex in examples:
            if ex.is_group:
                parts.append(b"group" + len(ex.negatives).to_bytes(4, "little"))
            parts.extend(torch.tensor(ids, dtype=torch.int64).numpy().tobytes()
                         for ids in (ex.prompt_ids, ex.chosen_ids, *ex.negatives))
        return digest(*parts)

    def load_policy(self, cfg):
        if not cfg.model:
            raise DpokitError("config key 'model' is required (a Hugging Face model path or name)")
        model = load_model(cfg.model, cfg)
        tokenizer = load_tokenizer(cfg.model, cfg)
        if cfg.lora is not None:
            model = apply_lora(model, cfg.lora)
        return model, tokenizer

    def load_processor(self, path, cfg):
        return load_tokenizer(path, cfg)

    def load_model(self, path, cfg):
        model = load_model(path, cfg)
        model.requires_grad_(False)
        return model.eval()

    def examples(self, source: Any, tokenizer, cfg) -> list[Example]:
        return load_examples(source, tokenizer, cfg.max_length, cfg.max_prompt_length, cfg.on_bad_row)

    def collate(self, examples, cfg, tokenizer):
        return collate(examples, tokenizer.pad_token_id, cfg.share_prompt, cfg.padding_free, cfg.pack_tokens,
                       cfg.attn_implementation)

    def scorer(self, model, cfg):
        return CausalLMScorer(model, cfg.logits_chunk_size)

    def save(self, model, tokenizer, path, merge_lora=False):
        if merge_lora and hasattr(model, "merge_and_unload"):
            model = model.merge_and_unload()
        model.save_pretrained(path, safe_serialization=True)
        tokenizer.save_pretrained(path)
