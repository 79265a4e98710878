"""The reference model, and its log-probs cached on disk.

Four ways to get a reference: none (reference-free), a separate model path, the policy's
own base weights with LoRA adapters switched off (no second copy), or a frozen copy of the
policy's starting weights. With `precompute_ref_log_probs` (the default) the reference runs
once over the data before training; its log-probs are stored under a key made from the
reference weights and config, the encoded examples (which covers tokenizer, data and
truncation), the dtype and the loop's autocast, then reused by later epochs and later runs;
any change to one of them is a miss. The reference is not kept in memory while the policy
trains.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import logging
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable, ContextManager

import torch
from torch import nn

from .errors import DpokitError
from .objectives import LossInputs

log = logging.getLogger("dpokit")
CACHE_VERSION = b"dpokit-ref-logps-v3"  # v3: the family fingerprints its examples


# Config keys that never change a log-prob: names, versions, generation and output switches.
_CONFIG_NOISE = {"_name_or_path", "transformers_version", "dtype", "torch_dtype", "use_cache", "output_attentions",
                 "output_hidden_states", "return_dict", "architectures", "_attn_implementation_autoset"}


def _tensor_digest(name: str, tensor: torch.Tensor) -> bytes:
    h = hashlib.blake2b(name.encode(), digest_size=16)
    t = tensor.detach().cpu().contiguous()
    h.update(str(t.dtype).encode())
    h.update(t.reshape(-1).view(torch.uint8).numpy())  # the buffer itself, no copy
    return h.digest()


def weights_fingerprint(model: nn.Module, skip_lora: bool = False) -> str:
    """The reference's weights *and* its config: rope, norm epsilons, logit scaling or softcapping change
    log-probs without changing a weight. Tensors are hashed on several threads (blake2b releases the GIL):
    one thread took 7-11 s for a 0.5B model's 2 GB."""
    h = hashlib.blake2b(digest_size=16)
    config = getattr(model, "config", None)
    if hasattr(config, "to_dict"):
        settings = {k: v for k, v in config.to_dict().items() if k not in _CONFIG_NOISE}
        h.update(json.dumps(settings, sort_keys=True, default=str).encode())
    items = [(name.replace("base_model.model.", ""), t) for name, t in sorted(model.state_dict().items())
             if not (skip_lora and "lora_" in name)]
    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        for digest in pool.map(lambda item: _tensor_digest(*item), items):
            h.update(digest)
    return h.hexdigest()


class Reference:
    """The one way reference scores are computed, in training and in evaluation.

    `scorer` is a family scorer around the reference weights (None when reference-free);
    `adapters_off`, when set, is a callable giving the context in which the scorer's model
    computes as its base weights (the reference of a LoRA run: the policy's own scorer).
    """

    def __init__(self, scorer: nn.Module | None, adapters_off: Callable[[], ContextManager] | None = None):
        self.scorer = scorer
        self.adapters_off = adapters_off

    @property
    def reference_free(self) -> bool:
        return self.scorer is None

    @property
    def model(self) -> nn.Module:
        return _unwrap(self.scorer).model

    @torch.no_grad()
    def scores(self, batch) -> tuple[torch.Tensor, torch.Tensor]:
        """Reference log-likelihood terms (chosen, rejected) of a batch, fp32, in eval mode. A stochastic
        family's batch carries its draw, so this scores the policy's draw."""
        was_training = self.scorer.training
        self.scorer.eval()
        with self.adapters_off() if self.adapters_off else contextlib.nullcontext():
            terms = self.scorer(batch)
        self.scorer.train(was_training)
        return terms.chosen.float(), terms.rejected.float()

    def fingerprint(self) -> str:
        return weights_fingerprint(self.model, skip_lora=self.adapters_off is not None)


def _unwrap(module: nn.Module) -> nn.Module:
    """The scorer inside a DDP/accelerate wrapper."""
    return getattr(module, "module", module)


def loss_inputs(scores, ref: tuple[torch.Tensor, torch.Tensor] | None, batch: dict) -> LossInputs:
    """The one place a batch's policy scores and reference scores become the objective's input; `ref` None
    means reference-free (zeros)."""
    chosen, rejected = scores.chosen.float(), scores.rejected.float()
    ref_c, ref_r = ref if ref is not None else (torch.zeros_like(chosen), torch.zeros_like(rejected))
    return LossInputs(chosen, rejected, ref_c, ref_r, scores.chosen_len, scores.rejected_len, batch["margin"],
                      label=batch.get("label"), rejected_mask=batch.get("rejected_mask"))


@torch.no_grad()
def sync_reference(reference: nn.Module, policy: nn.Module, alpha: float) -> None:
    """TR-DPO's soft update (Gorbatovski et al. 2024), as TRL's SyncRefModelCallback:
    θ_ref ← α·θ + (1 − α)·θ_ref, parameter by parameter. FSDP2 shards are gathered first
    (collective: every rank calls this at the same step)."""
    own = dict(policy.named_parameters())
    for name, p in reference.named_parameters():
        source = own[name]
        if hasattr(source, "full_tensor"):
            source = source.full_tensor()
        p.mul_(1 - alpha).add_(source.detach().to(p.device, p.dtype), alpha=alpha)


def check_sync(reference: nn.Module, policy: nn.Module) -> None:
    """TR-DPO mixes weights name by name: the two models must have the same parameters."""
    own = {name: p.shape for name, p in policy.named_parameters()}
    for name, p in reference.named_parameters():
        if own.get(name) != p.shape:
            raise DpokitError(f"sync_ref_model: the reference's parameter {name!r} has no match of the same shape in "
                              "the policy; TR-DPO needs a reference of the policy's architecture")


def build_reference(cfg, family, policy_model: nn.Module, device, cached: bool) -> Reference:
    """The reference the config names; `cached`: its scores are computed once, before the first step."""
    if cfg.reference_free:
        return Reference(None)
    if cfg.ref_model:
        model = family.load_model(cfg.ref_model, cfg).to(device)
        return Reference(family.scorer(model, cfg))
    if cfg.lora is not None:
        return Reference(family.scorer(policy_model, cfg), adapters_off=lambda: family.adapters_off(policy_model))
    if cached:
        # Before the first step the policy *is* the reference: score with it, keep no copy.
        return Reference(family.scorer(policy_model, cfg))
    frozen = copy.deepcopy(policy_model).requires_grad_(False).eval()
    return Reference(family.scorer(frozen, cfg))


def _bf16_autocast(cfg) -> bool:
    """Whether the loop runs under bf16 autocast (as `train._accelerator` decides)."""
    if cfg.bf16 is not None:
        return bool(cfg.bf16)
    return torch.cuda.is_available() and torch.cuda.is_bf16_supported()


def cache_path(cfg, family, reference: Reference, examples) -> Path:
    """Where the reference scores of `examples` are cached: a key made from the reference's weights and
    config, the family's fingerprint of the examples, the dtype and the loop's autocast."""
    root = Path(cfg.ref_cache_dir or os.environ.get("DPOKIT_CACHE", Path.home() / ".cache" / "dpokit")) / "ref-logps"
    h = hashlib.blake2b(CACHE_VERSION, digest_size=16)
    h.update(reference.fingerprint().encode())
    h.update(family.name.encode())
    h.update(family.fingerprint(examples).encode())
    h.update(cfg.dtype.encode())
    h.update(f"bf16-autocast={_bf16_autocast(cfg)}".encode())  # the loop's mixed precision changes log-probs too
    return root / f"{h.hexdigest()}.safetensors"
