"""Loading Hugging Face causal language models, their tokenizers and LoRA adapters."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from ...errors import DpokitError
from .gguf import resolve


def _dtype(name: str):
    table = {"auto": "auto", "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    if name not in table:
        raise DpokitError(f"dtype must be one of {', '.join(table)}, got {name!r}")
    return table[name]


def load_model(path: str, cfg) -> nn.Module:
    """The model at `path`: a folder, a hub name, or a GGUF file (converted once to a cached folder)."""
    from transformers import AutoModelForCausalLM

    path = resolve(path)
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

    path = resolve(path)
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


def adapter_base(path: Path, cfg) -> str:
    """The base model of the peft adapter at `path`: the run's starting model (`cfg.model`) when the folder is a
    dpokit run (its config.yaml names it, and a run may have moved since), else the adapter's own record."""
    if (path / "config.yaml").is_file():
        return cfg.model
    base = json.loads((path / "adapter_config.json").read_text()).get("base_model_name_or_path")
    if not base:
        raise DpokitError(f"{path / 'adapter_config.json'}: names no base model (base_model_name_or_path)")
    return base


def load_trained(path: str | Path, cfg) -> tuple[nn.Module, object]:
    """The frozen policy saved at `path` — a full model folder, or a peft adapter folder on its base — and its
    tokenizer (the adapter folder's own when it saved one, else the base's)."""
    path = Path(path)
    if not (path / "adapter_config.json").is_file():
        model = load_model(str(path), cfg)
        tokenizer = load_tokenizer(str(path), cfg)
    else:
        from peft import PeftModel

        base = adapter_base(path, cfg)
        model = PeftModel.from_pretrained(load_model(base, cfg), str(path))
        tokenizer = load_tokenizer(str(path) if (path / "tokenizer_config.json").is_file() else base, cfg)
    model.requires_grad_(False)
    return model.eval(), tokenizer
