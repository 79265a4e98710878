"""Hugging Face causal language models as a model family.

Batch layout. Each pair becomes one block `[prompt | chosen | rejected]` (share_prompt) or
two blocks `[prompt | chosen]`, `[prompt | rejected]`. Blocks are packed into rows with no
padding between them (padding_free) or one block per padded row. With sharing, rejected
tokens take positions that continue from the prompt and may not attend to chosen tokens,
so each completion sees exactly the context it would see alone: the log-probs equal the
unshared computation. Every target token carries the flat index of the hidden state that
predicts it and the segment (chosen i or rejected i) it is summed into, so one scorer
handles every layout.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..data import Example, load_examples
from ..errors import DpokitError
from .base import LogpTerms

log = logging.getLogger("dpokit")

PROMPT, CHOSEN, REJECTED = 0, 1, 2


# ---------------------------------------------------------------- loading


def _dtype(name: str):
    table = {"auto": "auto", "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    if name not in table:
        raise DpokitError(f"dtype must be one of {', '.join(table)}, got {name!r}")
    return table[name]


def load_model(path: str, cfg) -> nn.Module:
    from transformers import AutoModelForCausalLM

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


def _blocks(ex: Example, share_prompt: bool) -> list[tuple[list[int], list[int], list[int], int]]:
    """(tokens, positions, parts) for one pair, plus the pair's index placeholder."""
    p, c, r = ex.prompt_ids, ex.chosen_ids, ex.rejected_ids
    P, C, R = len(p), len(c), len(r)
    if share_prompt:
        tokens = p + c + r
        positions = list(range(P + C)) + list(range(P, P + R))
        parts = [PROMPT] * P + [CHOSEN] * C + [REJECTED] * R
        return [(tokens, positions, parts)]
    return [
        (p + c, list(range(P + C)), [PROMPT] * P + [CHOSEN] * C),
        (p + r, list(range(P + R)), [PROMPT] * P + [REJECTED] * R),
    ]


def collate(examples: list[Example], pad_token_id: int, share_prompt: bool = True, padding_free: bool = True,
            pack_tokens: int = 2048, attn_implementation: str = "sdpa") -> dict[str, torch.Tensor]:
    B = len(examples)
    rows: list[list[tuple]] = []  # each row: list of (pair index, block)
    for i, ex in enumerate(examples):
        for block in _blocks(ex, share_prompt):
            n = len(block[0])
            if padding_free and rows and sum(len(b[0]) for _, b in rows[-1]) + n <= pack_tokens:
                rows[-1].append((i, block))
            else:
                rows.append([(i, block)])
    T = max(sum(len(b[0]) for _, b in row) for row in rows)
    input_ids = torch.full((len(rows), T), pad_token_id, dtype=torch.long)
    position_ids = torch.zeros((len(rows), T), dtype=torch.long)
    block_id = torch.full((len(rows), T), -1, dtype=torch.long)
    part = torch.full((len(rows), T), -1, dtype=torch.long)
    pred, target, seg = [], [], []
    n_block = 0
    for r, row in enumerate(rows):
        offset = 0
        for i, (tokens, positions, parts) in row:
            n = len(tokens)
            input_ids[r, offset:offset + n] = torch.tensor(tokens)
            position_ids[r, offset:offset + n] = torch.tensor(positions)
            part[r, offset:offset + n] = torch.tensor(parts)
            block_id[r, offset:offset + n] = n_block
            n_block += 1
            base = r * T + offset
            prompt_end = parts.count(PROMPT)  # the last prompt token predicts each completion's first token
            for side in (CHOSEN, REJECTED):
                idx = [k for k, q in enumerate(parts) if q == side]
                if not idx:
                    continue
                sources = [prompt_end - 1] + idx[:-1]
                pred.extend(base + s for s in sources)
                target.extend(tokens[k] for k in idx)
                seg.extend([i if side == CHOSEN else B + i] * len(idx))
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
    if not share_prompt and not padding_free:
        batch["attention_mask"] = (block_id >= 0).long()  # plain padded rows: the library's own causal mask
    else:
        batch["attention_mask"] = _block_mask(block_id, part, attn_implementation)
    return batch


def _block_mask(block_id: torch.Tensor, part: torch.Tensor, attn_implementation: str) -> torch.Tensor:
    """[rows, 1, T, T]: causal within a block, none across blocks, rejected blind to chosen."""
    T = block_id.shape[1]
    same = block_id[:, :, None] == block_id[:, None, :]
    causal = torch.ones(T, T, dtype=torch.bool).tril()
    cross = (part[:, :, None] == REJECTED) & (part[:, None, :] == CHOSEN)
    allowed = same & causal & ~cross
    allowed |= torch.eye(T, dtype=torch.bool)  # pad queries see themselves, so no row is all -inf
    allowed = allowed[:, None]
    if attn_implementation == "sdpa":
        return allowed
    return torch.zeros(allowed.shape).masked_fill_(~allowed, torch.finfo(torch.float32).min)


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
    logits = head(hidden).float()
    if scale != 1.0:
        logits = logits * scale
    if softcap:
        logits = torch.tanh(logits / softcap) * softcap
    logp = logits.gather(-1, targets[:, None]).squeeze(-1) - torch.logsumexp(logits, dim=-1)
    return logp, logits.detach().mean(-1)


class CausalLMScorer(nn.Module):
    """batch → LogpTerms. Holds the model as a submodule so DDP/FSDP wrap the whole computation."""

    def __init__(self, model: nn.Module, chunk_size: int = 1024):
        super().__init__()
        self.model = model
        self.chunk_size = chunk_size

    def _parts(self):
        base = self.model.get_base_model() if hasattr(self.model, "get_base_model") else self.model
        return (base.get_decoder(), base.get_output_embeddings(), _logit_scale(base.config),
                getattr(base.config, "final_logit_softcapping", None))

    def forward(self, batch: dict[str, torch.Tensor]) -> LogpTerms:
        decoder, head, scale, softcap = self._parts()
        hidden = decoder(
            input_ids=batch["input_ids"], position_ids=batch["position_ids"],
            attention_mask=batch["attention_mask"], use_cache=False,
        ).last_hidden_state
        hidden = hidden.reshape(-1, hidden.shape[-1]).index_select(0, batch["pred_index"])
        targets = batch["target_ids"]
        n = targets.shape[0]
        if n <= self.chunk_size:
            logp, mean_logit = _token_logps(head, hidden, targets, scale, softcap)
        else:
            # Recompute each chunk's logits in backward, so peak memory follows the chunk, not tokens x vocab.
            pieces = [
                checkpoint(_token_logps, head, hidden[s:s + self.chunk_size], targets[s:s + self.chunk_size],
                           scale, softcap, use_reentrant=False)
                for s in range(0, n, self.chunk_size)
            ]
            logp = torch.cat([p[0] for p in pieces])
            mean_logit = torch.cat([p[1] for p in pieces])
        B = batch["weight"].shape[0]
        seg = batch["seg_index"]
        sums = torch.zeros(2 * B, dtype=logp.dtype, device=logp.device).index_add(0, seg, logp)
        counts = torch.zeros(2 * B, dtype=logp.dtype, device=logp.device).index_add(0, seg, torch.ones_like(logp))
        logit_sums = torch.zeros(2 * B, dtype=logp.dtype, device=logp.device).index_add(0, seg, mean_logit)
        mean_logits = logit_sums / counts.clamp(min=1)
        return LogpTerms(sums[:B], sums[B:], counts[:B], counts[B:], mean_logits[:B], mean_logits[B:])


# ---------------------------------------------------------------- the family


class CausalLMFamily:
    name = "causal_lm"

    def load_policy(self, cfg):
        if not cfg.model:
            raise DpokitError("config key 'model' is required (a Hugging Face model path or name)")
        model = load_model(cfg.model, cfg)
        tokenizer = load_tokenizer(cfg.model, cfg)
        if cfg.lora is not None:
            model = apply_lora(model, cfg.lora)
        return model, tokenizer

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
