"""Loading diffusers models from a folder (never downloaded), LoRA on the UNet, and saving.

Two layouts: a pixel-space pipeline (`unet/` UNet2DModel, `scheduler/`; what DDPMPipeline saves) and Stable
Diffusion's (`unet/` UNet2DConditionModel, `vae/`, `text_encoder/`, `tokenizer/`, `scheduler/`). Only the UNet is
trained; the VAE and text encoder are frozen and used once, to encode the data (see encode.py).
"""

from __future__ import annotations

import contextlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ...errors import DpokitError

# Diffusion-DPO's script puts LoRA on the attention projections (rank r, alpha r, gaussian init).
LORA_DEFAULTS = {"r": 4, "lora_alpha": 4, "init_lora_weights": "gaussian",
                 "target_modules": ["to_k", "to_q", "to_v", "to_out.0"]}


@dataclass
class Frozen:
    """The family's processor: the frozen parts of the pipeline and what the data must look like."""

    path: str
    scheduler: Any
    vae: Any = None  # None: pixel space
    text_encoder: Any = None
    tokenizer: Any = None
    unet_class: str = ""
    sample_size: int = 0
    in_channels: int = 0
    num_class_embeds: int | None = None

    @property
    def latent(self) -> bool:
        return self.vae is not None

    @property
    def vae_scale(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1) if self.vae is not None else 1

    @property
    def image_channels(self) -> int:
        return self.vae.config.in_channels if self.vae is not None else self.in_channels


def _dtype(name: str) -> torch.dtype:
    table = {"auto": torch.float32, "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    if name not in table:
        raise DpokitError(f"dtype must be one of {', '.join(table)}, got {name!r}")
    return table[name]


def _unet_class(path: Path) -> str:
    config = path / "unet" / "config.json"
    if not config.is_file():
        raise DpokitError(f"{path}: not a diffusers pipeline folder (no unet/config.json); the diffusion family "
                          "loads models from a local folder with unet/ and scheduler/ (and vae/, text_encoder/, "
                          "tokenizer/ for Stable Diffusion)")
    return json.loads(config.read_text()).get("_class_name", "")


def load_unet(path: str, cfg) -> nn.Module:
    import diffusers

    name = _unet_class(Path(path))
    if name not in ("UNet2DModel", "UNet2DConditionModel"):
        raise DpokitError(f"{path}/unet: a {name or 'unknown'} model; the diffusion family trains UNet2DModel or "
                          "UNet2DConditionModel")
    try:
        return getattr(diffusers, name).from_pretrained(path, subfolder="unet", torch_dtype=_dtype(cfg.dtype))
    except (OSError, ValueError) as e:
        raise DpokitError(f"cannot load UNet from {path!r}: {str(e).splitlines()[0]}") from None


def load_frozen(path: str, cfg) -> Frozen:
    """Scheduler, VAE, text encoder and tokenizer. The scheduler is read as DDPMScheduler whatever the folder
    names (the training noise schedule is DDPM's; a PNDM or DDIM config holds the same betas), as the
    Diffusion-DPO script does."""
    from diffusers import AutoencoderKL, DDPMScheduler

    root = Path(path)
    name = _unet_class(root)
    unet_config = json.loads((root / "unet" / "config.json").read_text())
    if not (root / "scheduler").is_dir():
        raise DpokitError(f"{path}: no scheduler/ folder (the noise schedule the UNet was trained with)")
    try:
        scheduler = DDPMScheduler.from_pretrained(path, subfolder="scheduler")
        frozen = Frozen(path, scheduler, unet_class=name, sample_size=unet_config.get("sample_size") or 0,
                        in_channels=unet_config.get("in_channels", 3),
                        num_class_embeds=unet_config.get("num_class_embeds"))
        if name == "UNet2DConditionModel":
            from transformers import CLIPTextModel, CLIPTokenizer

            frozen.vae = AutoencoderKL.from_pretrained(path, subfolder="vae").requires_grad_(False).eval()
            frozen.text_encoder = CLIPTextModel.from_pretrained(path, subfolder="text_encoder").requires_grad_(False)
            frozen.text_encoder.eval()
            frozen.tokenizer = CLIPTokenizer.from_pretrained(path, subfolder="tokenizer")
    except (OSError, ValueError) as e:
        raise DpokitError(f"cannot load the frozen parts of {path!r}: {str(e).splitlines()[0]}") from None
    if isinstance(unet_config.get("sample_size"), (list, tuple)):
        raise DpokitError(f"{path}/unet: a non-square sample_size {unet_config['sample_size']}; set 'resolution'")
    return frozen


def apply_lora(unet: nn.Module, lora: dict) -> nn.Module:
    """LoRA on the UNet. Stable Diffusion's UNet takes it through diffusers' own `add_adapter` (so the adapter
    saves in the form `pipeline.load_lora_weights` reads); UNet2DModel has no adapter support in diffusers, so it
    is wrapped by peft (`get_peft_model`)."""
    from peft import LoraConfig, get_peft_model

    unet.requires_grad_(False)
    try:
        config = LoraConfig(**{**LORA_DEFAULTS, **lora})
        if hasattr(unet, "add_adapter"):
            unet.add_adapter(config)
            return unet
        return get_peft_model(unet, config)
    except (TypeError, ValueError) as e:
        raise DpokitError(f"bad lora settings {lora}: {e}") from None


@contextlib.contextmanager
def diffusers_adapters_off(unet: nn.Module):
    """The reference of a LoRA run on a diffusers UNet: its base weights, as the Diffusion-DPO script scores it
    (`disable_adapters()` ... `enable_adapters()`)."""
    unet.disable_adapters()
    try:
        yield
    finally:
        unet.enable_adapters()


def save(unet: nn.Module, frozen: Frozen, path: str, merge_lora: bool) -> None:
    """Full fine-tuning: the whole pipeline folder with the trained UNet (DiffusionPipeline.from_pretrained loads
    it). LoRA on Stable Diffusion: `pytorch_lora_weights.safetensors` via `save_lora_weights` (what
    `pipeline.load_lora_weights` reads). LoRA on a UNet2DModel: peft's adapter folder (adapter_config.json and
    adapter_model.safetensors). merge_lora: the adapters merged into the UNet, saved as full fine-tuning."""
    from peft import PeftModel

    if isinstance(unet, PeftModel):
        if not merge_lora:
            unet.save_pretrained(path, safe_serialization=True)
            return
        unet = unet.merge_and_unload()
    elif getattr(unet, "peft_config", None):
        if not merge_lora:
            from diffusers import StableDiffusionPipeline
            from diffusers.utils import convert_state_dict_to_diffusers
            from peft.utils import get_peft_model_state_dict

            layers = convert_state_dict_to_diffusers(get_peft_model_state_dict(unet))
            # The adapter's config goes in the file's metadata, so a lora_alpha other than r loads back right.
            StableDiffusionPipeline.save_lora_weights(path, unet_lora_layers=layers, safe_serialization=True,
                                                      unet_lora_adapter_metadata=unet.peft_config["default"].to_dict())
            return
        unet.fuse_lora()
        unet.unload_lora()
    _save_pipeline(unet, frozen, path)


def _save_pipeline(unet: nn.Module, frozen: Frozen, path: str) -> None:
    from diffusers import DDPMPipeline, DiffusionPipeline

    if (Path(frozen.path) / "model_index.json").is_file():
        pipe = DiffusionPipeline.from_pretrained(frozen.path, unet=unet)  # the other parts as the source holds them
    else:
        pipe = DDPMPipeline(unet=unet, scheduler=frozen.scheduler)
    pipe.save_pretrained(path, safe_serialization=True)
