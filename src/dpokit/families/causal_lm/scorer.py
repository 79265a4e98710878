"""Per-example log-probabilities of a batch's completions: the causal LM's scorer.

The model's body runs once over the batch's rows; the LM head then runs only on the hidden
states that predict a completion token (`pred_index`), `logits_chunk_size` at a time, and
each token's log-prob is summed into its segment (chosen i or rejected i).
"""

from __future__ import annotations

from functools import partial

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..base import Scores
from .attention import use_block_attention
from .layout import block_masks, row_mask


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
    """batch → Scores. Holds the model as a submodule so DDP/FSDP wrap the whole computation.

    `extra_inputs` names batch keys the model reads besides the tokens (a vision-language model's
    `pixel_values`, `image_grid_thw`, ...). They go to the model's body (`base_model`), which for such a
    model merges them into the token embeddings: its text decoder alone would never see them. Without
    them the body is the text decoder. `position_ids` go in as the batch holds them, so a model with
    3-D M-RoPE positions ([3, rows, T]) gets its own."""

    def __init__(self, model: nn.Module, chunk_size: int = 1024, extra_inputs: tuple[str, ...] = ()):
        super().__init__()
        self.model = model
        self.chunk_size = chunk_size
        self.extra_inputs = tuple(extra_inputs)

    def _base(self) -> nn.Module:
        return self.model.get_base_model() if hasattr(self.model, "get_base_model") else self.model

    def _parts(self):
        base = self._base()
        body = base.base_model if self.extra_inputs else base.get_decoder()
        return (body, base.get_output_embeddings(), _logit_scale(base.config),
                getattr(base.config, "final_logit_softcapping", None))

    def _hidden(self, body: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """The last hidden state of every position of the batch's rows."""
        inputs = {key: batch[key] for key in self.extra_inputs if key in batch}
        if "block_sizes" not in batch:
            mask = batch["attention_mask"]
            if mask.dim() == 4 and batch["position_ids"].dim() == 2 and use_block_attention(self._base()):
                inputs["dpokit_positions"] = batch["position_ids"]  # the layout's mask, windowed per layer
        elif not use_block_attention(self._base()):
            # A model that does not dispatch through the AttentionInterface: one row, one big mask.
            mask = row_mask(batch["block_sizes"], body.config._attn_implementation, batch.get("span_ids"))
        else:
            inner = body.config._attn_implementation.removeprefix("dpokit_blocks_")
            # The stacked block masks are 4D, so transformers hands them to the attention untouched.
            mask, inputs["dpokit_blocks"] = block_masks(batch, body.get_input_embeddings().weight.dtype, inner)
        return body(input_ids=batch["input_ids"], position_ids=batch["position_ids"], attention_mask=mask,
                    use_cache=False, **inputs).last_hidden_state

    def forward(self, batch: dict[str, torch.Tensor]) -> Scores:
        body, head, scale, softcap = self._parts()
        hidden = self._hidden(body, batch)
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
