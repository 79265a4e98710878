"""Vision-language models (transformers' image-text-to-text models) as a model family: `family: vlm`.

It is the causal-LM family with images in the prompt: the same batch layout (prefix sharing, padding-free blocks,
block attention), the same scorer once the images are encoded, and the same reference cache, whose key covers the
pixels.

- data.py: TRL's vision rows → encoded pairs (token ids, the prompt's image tensors, M-RoPE positions);
- positions.py: where each block lies in a batch, and the 3-D positions of M-RoPE models (Qwen2-VL's line);
- scorer.py: `VLMScorer`, the vision tower once per batch, then the causal-LM scorer;
- loading.py: models, processors, LoRA on the language model, the vision switch;
- sampling.py: replies to prompts with images (sample eval) and the held-out prompts it reads;
- images.py: images as rows hold them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ...config import TrainConfig
from ...errors import DpokitError
from ..base import Family, digest
from ..causal_lm import collate as causal_collate
from .data import VLMExample, completion_texts, load_examples, numbered_examples, row_check
from .loading import load_model, load_processor, load_trained, prepare_training
from .positions import check_placements, placements, positions_3d, prompt_spans
from .sampling import ImageMessages, ImagePrompt, VLMCompletion, read_prompts, sample
from .scorer import VLMScorer


@dataclass
class VLMConfig:
    """The vlm family's own keys. By default LoRA adapters train on the language model (`lora` sets their peft
    settings) and the vision side (tower and projector) stays frozen."""

    train_vision_tower: bool = False  # train the vision tower and projector in full (with LoRA: beside the adapters)
    full_finetune: bool = False  # train every language-model weight instead of LoRA adapters (when `lora` is unset)

    def __post_init__(self):
        for key in ("train_vision_tower", "full_finetune"):
            if not isinstance(getattr(self, key), bool):
                raise DpokitError(f"{key} must be true or false, got {getattr(self, key)!r}")


def _per_image(examples: list[VLMExample], key: str) -> bool:
    """Whether `key` holds one row per text with that text's images beneath (Idefics3's 5-D pixel values and
    their mask), rather than one row per image or patch."""
    pixels = next(ex.images["pixel_values"] for ex in examples if "pixel_values" in ex.images)
    return pixels.dim() == 5 and key in ("pixel_values", "pixel_attention_mask")


def _pad_cat(pieces: list[torch.Tensor]) -> torch.Tensor:
    """Concatenate along the first axis, zero-padding the others to the largest (as a processor pads a batch)."""
    shape = [max(p.shape[d] for p in pieces) for d in range(1, pieces[0].dim())]
    padded = []
    for p in pieces:
        pad = [x for d in reversed(range(1, p.dim())) for x in (0, shape[d - 1] - p.shape[d])]
        padded.append(torch.nn.functional.pad(p, pad) if any(pad) else p)
    return torch.cat(padded)


def collate_images(examples: list[VLMExample], places) -> dict[str, torch.Tensor]:
    """The image tensors of every block, in the order the blocks lie in the batch (the order the model matches
    image features to image tokens in): once per pair with prefix sharing, once per block without. A model that
    keeps each text's images together (Idefics3) gets them all as one text's."""
    keys = sorted({k for ex in examples for k in ex.images})
    out = {}
    for key in keys:
        pieces = [examples[i].images[key] for i, *_ in places if key in examples[i].images]
        if not pieces:
            continue
        if _per_image(examples, key):
            out[key] = _pad_cat([p[0] for p in pieces])[None]
        else:
            out[key] = _pad_cat(pieces)
    return out


class VLMFamily(Family):
    name = "vlm"
    likelihood = "exact"
    config_class = VLMConfig
    capabilities = frozenset({"sample", "load_trained"})

    def load_policy(self, cfg):
        if not cfg.model:
            raise DpokitError("config key 'model' is required (a Hugging Face image-text-to-text model path or name)")
        settings = self.settings(cfg)
        if cfg.lora is None and not settings.full_finetune:
            # LoRA is this family's default. The loop reads `cfg.lora` to take the reference as the base weights
            # with the adapters off (no second copy), so the default is written back into the config.
            cfg.lora = {}
        model = prepare_training(load_model(cfg.model, cfg), cfg.lora, settings.train_vision_tower)
        return model, load_processor(cfg.model, cfg)

    def load_model(self, path, cfg):
        model = load_model(path, cfg)
        model.requires_grad_(False)
        return model.eval()

    def load_processor(self, path, cfg):
        return load_processor(path, cfg)

    def examples(self, source, processor, cfg) -> list[VLMExample]:
        return load_examples(source, processor, cfg.max_length, cfg.max_prompt_length, cfg.on_bad_row)

    def collate(self, examples, cfg, processor):
        batch = causal_collate(examples, processor.tokenizer.pad_token_id, cfg.share_prompt, cfg.padding_free,
                               cfg.pack_tokens, cfg.attn_implementation, prompt_spans(examples, processor))
        places = placements(examples, cfg.share_prompt, cfg.padding_free, cfg.pack_tokens, cfg.attn_implementation)
        check_placements(examples, places, batch["input_ids"])
        batch.update(collate_images(examples, places))
        if any(ex.rope is not None for ex in examples):
            batch["position_ids"] = positions_3d(examples, places, batch["position_ids"])
        return batch

    def scorer(self, model, cfg):
        return VLMScorer(model, cfg.logits_chunk_size)

    def fingerprint(self, examples) -> str:
        """Token ids of every prompt and reply and every image tensor's values and shape: the same text with
        another image is another entry."""
        parts = []
        for ex in examples:
            parts.extend(torch.tensor(ids, dtype=torch.int64).numpy().tobytes()
                         for ids in (ex.prompt_ids, ex.chosen_ids, ex.rejected_ids))
            for key in sorted(ex.images):
                t = ex.images[key].detach().cpu().contiguous()
                parts += [f"{key}:{t.dtype}:{tuple(t.shape)}".encode(),
                          t.reshape(-1).view(torch.uint8).numpy().tobytes()]
        return digest(*parts)

    def save(self, model, processor, path, merge_lora=False):
        if merge_lora and hasattr(model, "merge_and_unload"):
            model = model.merge_and_unload()
        model.save_pretrained(path, safe_serialization=True)
        processor.save_pretrained(path)

    # ------------------------------------------------------------ for code that builds its own runs (bench_vlm)

    def lora_targets(self, model) -> str:
        """peft `target_modules` for every linear layer of the language model and none of the vision side."""
        from .loading import language_lora_targets

        return language_lora_targets(model)

    def vision_modules(self, model) -> dict:
        """The vision tower and projector by module name."""
        from .loading import parts

        return parts(model)[2]

    def chat_template(self, image_token: str) -> str:
        """The small chat template the tiny test models use, with `image_token` for an image part."""
        from .tiny import _TEMPLATE

        return _TEMPLATE.replace("IMAGE", image_token)

    def sample(self, model, processor, prompts, **settings) -> list[VLMCompletion]:
        """Replies to prompts with images (`ImagePrompt`, `ImageMessages`, rows with `prompt` and `images`, or text);
        the settings (num_generations, max_new_tokens, temperature, top_p, seed, batch_size, ...) are the causal-LM
        sampler's."""
        return sample(model, processor, prompts, **settings)

    def prompts(self, source, processor, limit=None) -> list:
        """Held-out prompts with their images (`dpokit eval --prompts`): the training rows' prompts and
        `images`/`image`, paths relative to the file."""
        return read_prompts(source, processor, limit)

    def reply_example(self, completion: VLMCompletion) -> VLMExample:
        return completion.example()

    def completions(self, source, processor, cfg) -> list[tuple[int, VLMExample]]:
        """Prompt + completion rows with their images (`dpokit score`), each completion encoded as training encodes
        a chosen reply; a bad row is one line naming file and row, as in training data."""
        return numbered_examples(source, processor, cfg.max_length, cfg.max_prompt_length, cfg.on_bad_row,
                                 completion_texts)

    def row_check(self, source, processor, cfg):
        return row_check(source, processor, cfg.max_length, cfg.max_prompt_length)

    def load_trained(self, path, cfg=None):
        """The frozen policy at `path` (a full model folder, or a peft adapter folder on its base) and its
        processor."""
        return load_trained(path, cfg if cfg is not None else TrainConfig(family="vlm"))


__all__ = ["VLMFamily", "VLMConfig", "VLMExample", "VLMScorer", "VLMCompletion", "ImagePrompt", "ImageMessages"]
