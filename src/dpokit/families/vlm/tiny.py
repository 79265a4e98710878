"""Tiny vision-language models and their processors, built on the spot (nothing downloaded), for tests and
benchmarks: a LLaVA (CLIP tower, Llama text model), a Qwen2-VL (M-RoPE), an Idefics3 (SmolVLM's shape: images
split into tiles) and a Gemma 3 (image tokens attending to each other both ways, sliding-window layers), each saved
as a folder that `AutoModelForImageTextToText` and `AutoProcessor` load.

Qwen2-VL's processor holds a video processor, which transformers builds only with torchvision installed; images
need none, so the tiny one is `Qwen2VLImageProcessor` (registered with `AutoProcessor`, so its folder loads in a
process that imported this module).
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Iterable

# One template for both: a message's content is a string or a list of text and image parts; an image part renders
# as the model's placeholder.
_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{% if m['content'] is string %}{{ m['content'] }}{% else %}"
    "{% for p in m['content'] %}{% if p['type'] == 'image' %}IMAGE{% else %}{{ p['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<|end|>{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
QWEN_IMAGE = "<|vision_start|><|image_pad|><|vision_end|>"
_QWEN_TOKENS = ["<|vision_start|>", "<|image_pad|>", "<|vision_end|>", "<|video_pad|>"]


def _tokenizer(texts: Iterable[str], specials: list[str]):
    from ...tiny import build_tokenizer

    return build_tokenizer(list(texts) * 3, vocab_size=400, extra_special_tokens=specials)


def _text_config(tok, **extra) -> dict:
    return dict(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
                bos_token_id=tok.bos_token_id, **extra)


def build_llava(path: str | Path, texts: Iterable[str], seed: int = 0, image_size: int = 16, patch_size: int = 4,
                processor=None) -> Path:
    """A LLaVA with a one-layer CLIP tower: (image_size / patch_size)² image tokens per image. `processor`: reuse
    one (a second model with the same vocabulary, e.g. a reference)."""
    import torch
    from transformers import CLIPImageProcessor, LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor

    if processor is None:
        tok = _tokenizer(texts, ["<image>"])
        images = CLIPImageProcessor(size={"shortest_edge": image_size},
                                    crop_size={"height": image_size, "width": image_size})
        processor = LlavaProcessor(image_processor=images, tokenizer=tok, patch_size=patch_size,
                                   vision_feature_select_strategy="default", num_additional_image_tokens=1,
                                   chat_template=_TEMPLATE.replace("IMAGE", "<image>"))
    tok = processor.tokenizer
    config = LlavaConfig(
        vision_config=dict(model_type="clip_vision_model", hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                           num_attention_heads=2, image_size=image_size, patch_size=patch_size),
        text_config=dict(model_type="llama", **_text_config(tok)),
        image_token_id=tok.convert_tokens_to_ids("<image>"), vision_feature_layer=-1,
        vision_feature_select_strategy="default", num_additional_image_tokens=1,
    )
    torch.manual_seed(seed)
    path = Path(path)
    LlavaForConditionalGeneration(config).save_pretrained(path)
    processor.save_pretrained(path)
    return path


@functools.cache
def _qwen_processor_class():
    from transformers import AutoProcessor, Qwen2VLConfig, Qwen2VLProcessor

    class Qwen2VLImageProcessor(Qwen2VLProcessor):
        """Qwen2-VL's processor without its video processor (transformers builds that only with torchvision)."""

        def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
            super().__init__(image_processor, tokenizer, None, chat_template=chat_template, **kwargs)

    AutoProcessor.register(Qwen2VLConfig, Qwen2VLImageProcessor, exist_ok=True)
    return Qwen2VLImageProcessor


def build_qwen2_vl(path: str | Path, texts: Iterable[str], seed: int = 0, processor=None) -> Path:
    """A Qwen2-VL with a one-layer tower, 4-pixel patches merged 2 × 2: an image of h × w pixels (resized to
    multiples of 8, 64 to 256 pixels²·4) gives (h/8)·(w/8) image tokens."""
    import torch
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    cls = _qwen_processor_class()
    if processor is None:
        tok = _tokenizer(texts, _QWEN_TOKENS)
        images = Qwen2VLImageProcessorPil(min_pixels=8 * 8 * 4, max_pixels=16 * 16 * 4, patch_size=4, merge_size=2,
                                          temporal_patch_size=2)
        processor = cls(image_processor=images, tokenizer=tok, chat_template=_TEMPLATE.replace("IMAGE", QWEN_IMAGE))
    tok = processor.tokenizer
    ids = {t: tok.convert_tokens_to_ids(t) for t in _QWEN_TOKENS}
    config = Qwen2VLConfig(
        text_config=_text_config(tok, rope_parameters={"rope_type": "default", "mrope_section": [1, 1, 2],
                                                       "rope_theta": 10000.0}),
        vision_config=dict(depth=1, embed_dim=16, hidden_size=32, num_heads=2, patch_size=4, spatial_merge_size=2,
                           temporal_patch_size=2, in_channels=3, mlp_ratio=2),
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
        pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, bos_token_id=tok.bos_token_id,
    )
    torch.manual_seed(seed)
    path = Path(path)
    Qwen2VLForConditionalGeneration(config).save_pretrained(path)
    processor.save_pretrained(path)
    return path


def build_idefics3(path: str | Path, texts: Iterable[str], seed: int = 0, processor=None) -> Path:
    """An Idefics3 (SmolVLM's architecture) with a one-layer SigLIP tower: each image is split into 16-pixel tiles
    plus a global view (longest side resized to 32), 4 image tokens per tile."""
    import torch
    from transformers import Idefics3Config, Idefics3ForConditionalGeneration, Idefics3Processor
    from transformers.models.idefics3.image_processing_pil_idefics3 import Idefics3ImageProcessorPil

    if processor is None:
        specials = ["<fake_token_around_image>", "<image>", "<end_of_utterance>", "<global-img>"]
        specials += [f"<row_{i + 1}_col_{j + 1}>" for i in range(6) for j in range(6)]
        tok = _tokenizer(texts, specials)
        images = Idefics3ImageProcessorPil(do_image_splitting=True, size={"longest_edge": 32},
                                           max_image_size={"longest_edge": 16})
        processor = Idefics3Processor(image_processor=images, tokenizer=tok, image_seq_len=4,
                                      chat_template=_TEMPLATE.replace("IMAGE", "<image>"))
    tok = processor.tokenizer
    config = Idefics3Config(
        vision_config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                           image_size=16, patch_size=4),
        text_config=dict(model_type="llama", **_text_config(tok)), scale_factor=2,
        image_token_id=tok.convert_tokens_to_ids("<image>"), pad_token_id=tok.pad_token_id,
    )
    torch.manual_seed(seed)
    path = Path(path)
    Idefics3ForConditionalGeneration(config).save_pretrained(path)
    processor.save_pretrained(path)
    return path


GEMMA3_IMAGE = "<start_of_image>"  # what a prompt holds per image; the processor expands it into the image's tokens


def build_gemma3(path: str | Path, texts: Iterable[str], seed: int = 0, processor=None,
                 sliding_window: int = 8) -> Path:
    """A Gemma 3 with a one-layer SigLIP tower: each image resized to 16 × 16 pixels, 4-pixel patches pooled 2 × 2
    into 4 image tokens between its begin and end tokens. Its two text layers are a sliding-window one (window
    `sliding_window`, shorter than a prompt, so the window is exercised) and a global one. The projector, which
    transformers initialises to zero (every image would then be the same tokens), is drawn at random, and the text
    weights at 5 times the usual scale, so that how tokens attend shows in the log-probs."""
    import torch
    from transformers import Gemma3Config, Gemma3ForConditionalGeneration, Gemma3Processor, PreTrainedTokenizerFast
    from transformers.models.gemma3.image_processing_pil_gemma3 import Gemma3ImageProcessorPil

    if processor is None:
        named = {"boi_token": GEMMA3_IMAGE, "eoi_token": "<end_of_image>", "image_token": "<image_soft_token>"}
        base = _tokenizer(texts, list(named.values()))
        # the processor finds its image tokens by these names (tokenizer.boi_token, ...)
        tok = PreTrainedTokenizerFast(tokenizer_object=base.backend_tokenizer, eos_token=base.eos_token,
                                      pad_token=base.pad_token, bos_token=base.bos_token, extra_special_tokens=named)
        images = Gemma3ImageProcessorPil(size={"height": 16, "width": 16})
        processor = Gemma3Processor(image_processor=images, tokenizer=tok, image_seq_length=4,
                                    chat_template=_TEMPLATE.replace("IMAGE", GEMMA3_IMAGE))
    tok = processor.tokenizer
    config = Gemma3Config(
        text_config=_text_config(tok, head_dim=8, query_pre_attn_scalar=8, sliding_window=sliding_window,
                                 layer_types=["sliding_attention", "full_attention"], initializer_range=0.1),
        vision_config=dict(model_type="siglip_vision_model", hidden_size=16, intermediate_size=32,
                           num_hidden_layers=1, num_attention_heads=2, image_size=16, patch_size=4),
        mm_tokens_per_image=4, image_token_id=tok.image_token_id, boi_token_index=tok.boi_token_id,
        eoi_token_index=tok.eoi_token_id, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
        bos_token_id=tok.bos_token_id,
    )
    torch.manual_seed(seed)
    model = Gemma3ForConditionalGeneration(config)
    torch.nn.init.normal_(model.model.multi_modal_projector.mm_input_projection_weight, std=0.5)
    path = Path(path)
    model.save_pretrained(path)
    processor.save_pretrained(path)
    return path
