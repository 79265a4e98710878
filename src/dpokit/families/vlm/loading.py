"""Loading image-text-to-text models and their processors, and choosing what trains: LoRA on the language model
by default, the vision side (tower and projector) frozen or trained by a switch."""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from torch import nn

from ...errors import DpokitError

DTYPES = {"auto": "auto", "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# Where the models keep their parts, by transformers' attribute names (LLaVA, Qwen2-VL, Idefics3, PaliGemma, Gemma 3).
LANGUAGE_PARTS = ("language_model", "text_model")
VISION_PARTS = ("vision_tower", "visual", "vision_model", "multi_modal_projector", "connector")
# Prefix-LMs, whose whole prompt attends to itself both ways (PaliGemma): refused rather than scored otherwise than the
# model scores them. The layout could open the prompt as it opens Gemma 3's image spans (positions.py), but PaliGemma
# also counts positions from 1 and, in PaliGemma 2, exempts the prefix from its sliding window, both untested here.
PREFIX_LM = ("paligemma",)


def load_model(path: str, cfg) -> nn.Module:
    from transformers import AutoModelForImageTextToText

    if cfg.dtype not in DTYPES:
        raise DpokitError(f"dtype must be one of {', '.join(DTYPES)}, got {cfg.dtype!r}")
    try:
        model = AutoModelForImageTextToText.from_pretrained(
            path, dtype=DTYPES[cfg.dtype], attn_implementation=cfg.attn_implementation,
            trust_remote_code=cfg.trust_remote_code)
    except (OSError, ValueError) as e:
        raise DpokitError(f"cannot load model {path!r} as an image-text-to-text model (family vlm): "
                          f"{str(e).splitlines()[0]}") from None
    if model.config.model_type in PREFIX_LM:
        raise DpokitError(f"{path!r} is a {model.config.model_type} model, a prefix-LM whose whole prompt attends to "
                          "itself both ways; family vlm does not train it yet (it does Gemma 3)")
    return model


def load_processor(path: str, cfg):
    from transformers import AutoProcessor

    try:
        processor = AutoProcessor.from_pretrained(path, trust_remote_code=cfg.trust_remote_code)
    except (OSError, ValueError, TypeError) as e:
        raise DpokitError(f"cannot load processor {path!r}: {str(e).splitlines()[0]}") from None
    if getattr(processor, "image_processor", None) is None:
        raise DpokitError(f"{path!r} has no image processor, so it takes no images: family vlm is for "
                          "vision-language models (use family causal_lm for a text model)")
    tokenizer = processor.tokenizer
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    if tokenizer.eos_token is None:
        raise DpokitError(f"processor {path!r}: its tokenizer has no EOS token; completions must end with one")
    return processor


def parts(model: nn.Module) -> tuple[str, nn.Module, dict[str, nn.Module]]:
    """(name, module) of the language model and the vision side's modules by name, as `named_modules` names them."""
    inner_name = "model" if hasattr(model, "model") else ""
    inner = getattr(model, "model", model)
    prefix = f"{inner_name}." if inner_name else ""
    language = next(((prefix + n, getattr(inner, n)) for n in LANGUAGE_PARTS if hasattr(inner, n)), None)
    if language is None:
        raise DpokitError(f"{type(model).__name__}: no language model found (looked for {', '.join(LANGUAGE_PARTS)})")
    vision = {prefix + n: getattr(inner, n) for n in VISION_PARTS if isinstance(getattr(inner, n, None), nn.Module)}
    return language[0], language[1], vision


def language_lora_targets(model: nn.Module) -> str:
    """A peft `target_modules` pattern for every linear layer of the language model and none of the vision side
    (peft matches a string against each module's whole name)."""
    name, language, _ = parts(model)
    leaves = sorted({n.rsplit(".", 1)[-1] for n, m in language.named_modules() if isinstance(m, nn.Linear)})
    return rf"{re.escape(name)}\..*\.(?:{'|'.join(map(re.escape, leaves))})"


def prepare_training(model: nn.Module, lora: dict | None, train_vision: bool) -> nn.Module:
    """LoRA adapters on the language model (`lora` the peft settings) with the vision side frozen, or, with
    `train_vision`, trained in full beside them (peft's `modules_to_save`: switched off with the adapters, so the
    reference stays the starting model, and saved with them). Without `lora` every weight trains but the vision
    side's, unless `train_vision`."""
    _, _, vision = parts(model)
    if lora is None:
        for module in vision.values():
            module.requires_grad_(train_vision)
        return model
    from peft import LoraConfig, get_peft_model

    settings = {"r": 16, "lora_alpha": 32, "lora_dropout": 0.0, "target_modules": language_lora_targets(model), **lora}
    if train_vision:
        settings["modules_to_save"] = list(settings.get("modules_to_save") or []) + list(vision)
    try:
        return get_peft_model(model, LoraConfig(task_type="CAUSAL_LM", **settings))
    except (TypeError, ValueError) as e:
        raise DpokitError(f"bad lora settings {lora}: {e}") from None


def load_trained(path: str | Path, cfg) -> tuple[nn.Module, object]:
    """The frozen policy saved at `path` — a full model folder, or a peft adapter folder on its base — and its
    processor (the folder's own when it saved one, else the base's)."""
    path = Path(path)
    if not (path / "adapter_config.json").is_file():
        model, processor = load_model(str(path), cfg), load_processor(str(path), cfg)
    else:
        from peft import PeftModel

        base = cfg.model if (path / "config.yaml").is_file() else \
            json.loads((path / "adapter_config.json").read_text()).get("base_model_name_or_path")
        if not base:
            raise DpokitError(f"{path / 'adapter_config.json'}: names no base model (base_model_name_or_path)")
        model = PeftModel.from_pretrained(load_model(base, cfg), str(path))
        own = (path / "processor_config.json").is_file() or (path / "preprocessor_config.json").is_file()
        processor = load_processor(str(path) if own else base, cfg)
    model.requires_grad_(False)
    return model.eval(), processor
