"""Replies of a vision-language model to prompts with images: `VLMFamily.sample` (sample-based eval), and the
held-out prompts it reads (`dpokit eval RUN --prompts FILE`).

A prompt is one of the training rows' prompts with its images: a string holding the processor's image token once per
image, or a message list whose image parts (or, with none, TRL's rule: the images before the first user message's
text) take the images in order. The sampler takes `ImagePrompt` / `ImageMessages` (a string or a message list that
carries its images, as `read_prompts` returns them, so judges and the samples file read them as text), rows
(`{"prompt": ..., "images": [...]}` or `"image"`), or plain text prompts. Each prompt is encoded as training encodes
it (the processor, no special tokens added) and given to `model.generate` with its image tensors; the settings and the
returned `Completion`s are the causal-LM sampler's.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

import torch
from torch import nn
from tqdm.auto import tqdm

from ...data import RowProblem, split_implicit_prompt
from ...data.images import image_base
from ...errors import DpokitError
from ..causal_lm import Completion
from .data import TEXT_KEYS, VLMExample, _images, _messages, _place_images, _template, image_token_id, uses_mrope
from .positions import mrope_positions


class ImagePrompt(str):
    """A text prompt (holding the image token once per image) with its images (RGB PIL images)."""

    images: list

    def __new__(cls, text: str, images: Sequence = ()):
        out = super().__new__(cls, text)
        out.images = list(images)
        return out


class ImageMessages(list):
    """A message-list prompt with its images (RGB PIL images)."""

    def __init__(self, messages: Sequence[dict], images: Sequence = ()):
        super().__init__(messages)
        self.images = list(images)


@dataclass
class VLMCompletion(Completion):
    """The causal-LM sampler's `Completion`, with what scoring the reply needs beside its tokens: the prompt's image
    tensors and, for an M-RoPE model, its 3-D positions."""

    images: dict[str, torch.Tensor] = field(default_factory=dict)
    rope: torch.Tensor | None = None
    rope_next: int = 0
    n_images: int = 0

    def example(self) -> VLMExample:
        """The reply alone as an example (chosen = the reply, no rejected), for its log-probs."""
        return VLMExample(self.prompt_ids, self.completion_ids, [], images=self.images, rope=self.rope,
                          rope_next=self.rope_next, n_images=self.n_images)


# ------------------------------------------------------------------ prompts


def _checked(prompt: Any, images: list, processor) -> ImagePrompt | ImageMessages:
    """A prompt checked against its images (a RowProblem when they disagree), as the sampler takes it."""
    if isinstance(prompt, str):
        if not prompt.strip():
            raise RowProblem("field 'prompt' is empty")
        token = getattr(processor, "image_token", None)
        placeholders = prompt.count(token) if token else 0
        if placeholders != len(images):
            raise RowProblem(f"the prompt holds {placeholders} image placeholder(s) ({token!r}) but the row has "
                             f"{len(images)} image(s)")
        return ImagePrompt(prompt, images)
    if isinstance(prompt, list):
        return ImageMessages(_place_images(_messages(prompt, "prompt"), len(images)), images)
    raise RowProblem(f"field 'prompt' must be a string or a message list, got {type(prompt).__name__}")


def read_prompts(source: Any, processor, limit: int | None = None) -> list:
    """Prompts with their images from rows with a `prompt` field (or preference rows with an implicit prompt) and
    `images`/`image`, image paths relative to the file's folder; a bad row is one line naming file and row."""
    from ...evaluate import read_prompts as read_each

    base = image_base(source)
    return read_each(source, limit, lambda row: _checked(_row_prompt(row), _images(row, base), processor))


def _row_prompt(row: dict) -> Any:
    """A row's prompt, or the prompt that chosen and rejected share (message lists split at their last message)."""
    prompt = row.get("prompt")
    if prompt is not None:
        return prompt
    chosen, rejected = row.get("chosen"), row.get("rejected")
    if chosen is None or rejected is None:
        raise RowProblem("missing field 'prompt' (or 'chosen' and 'rejected' to split one from)")
    if isinstance(chosen, list) and isinstance(rejected, list):
        chosen, rejected = _messages(chosen, "chosen"), _messages(rejected, "rejected")
    return split_implicit_prompt(chosen, rejected)[0]


def _as_prompt(prompt: Any, processor) -> ImagePrompt | ImageMessages:
    if isinstance(prompt, (ImagePrompt, ImageMessages)):
        return prompt
    if isinstance(prompt, dict):  # a row: image paths relative to the working directory
        return _checked(prompt.get("prompt"), _images(prompt, None), processor)
    return _checked(prompt, [], processor)


@dataclass
class Encoded:
    ids: list[int]
    inputs: dict[str, torch.Tensor]  # what generate takes: the processor's outputs
    images: dict[str, torch.Tensor]  # the image tensors alone, as the family's examples hold them
    rope: torch.Tensor | None = None
    rope_next: int = 0
    n_images: int = 0


def encode_prompt(prompt: Any, processor, max_prompt_length: int | None = None) -> Encoded:
    """A prompt as training encodes it: the chat template with the generation prompt for messages (continuing a
    final assistant message), the processor with the images, no special tokens added. A text-only prompt keeps its
    last `max_prompt_length` tokens; image tokens are never cut."""
    prompt = _as_prompt(prompt, processor)
    if isinstance(prompt, ImageMessages):
        last = prompt[-1]["role"]
        text = _template(processor, list(prompt), add_generation_prompt=last != "assistant",
                         continue_final_message=last == "assistant")
    else:
        text = str(prompt)
    try:
        out = processor(text=[text], images=[prompt.images] if prompt.images else None, add_special_tokens=False,
                        return_tensors="pt")
    except (ValueError, TypeError, RuntimeError) as e:
        raise RowProblem(f"the processor cannot encode this prompt with its images ({str(e).splitlines()[0]})") \
            from None
    inputs = {k: v for k, v in out.items() if isinstance(v, torch.Tensor)}
    ids = inputs["input_ids"][0].tolist()
    if not ids:
        raise RowProblem("the prompt has no tokens")
    if max_prompt_length is not None and len(ids) > max_prompt_length:
        if prompt.images:
            raise RowProblem(f"the prompt has {len(ids)} tokens, more than max_prompt_length={max_prompt_length}, "
                             "and image tokens cannot be cut")
        ids = ids[len(ids) - max_prompt_length:]
        inputs = {k: v[:, -max_prompt_length:] for k, v in inputs.items() if k in TEXT_KEYS}
    images = {k: v for k, v in inputs.items() if k not in TEXT_KEYS}
    encoded = Encoded(ids, inputs, images, n_images=len(prompt.images))
    if uses_mrope(processor):
        image_id = image_token_id(processor)
        encoded.rope, encoded.rope_next = mrope_positions([int(t == image_id) for t in ids],
                                                          images.get("image_grid_thw"),
                                                          processor.image_processor.merge_size)
    return encoded


# ------------------------------------------------------------------ sampling


def stop_ids(model: nn.Module, tokenizer) -> set[int]:
    """The tokens that end a reply: the tokenizer's EOS and whatever the model's generation config adds (as the
    causal-LM sampler stops)."""
    ids = {tokenizer.eos_token_id}
    configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids.update(configured if isinstance(configured, list) else [configured])
    return {i for i in ids if i is not None}


def _on(inputs: dict[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    """The inputs on the model's device, floating ones (pixels) in its dtype."""
    p = next(model.parameters())
    return {k: v.to(p.device, dtype=p.dtype) if v.is_floating_point() else v.to(p.device) for k, v in inputs.items()}


@torch.no_grad()
def sample(model: nn.Module, processor, prompts: Sequence, *, num_generations: int = 1, max_new_tokens: int = 128,
           temperature: float = 1.0, top_p: float = 1.0, seed: int | None = None, batch_size: int = 8,
           max_prompt_length: int | None = None, group_by_length: bool = False, desc: str = "sample",
           progress: bool = False) -> list[VLMCompletion]:
    """`num_generations` replies of each prompt, with the causal-LM sampler's settings and meaning: `temperature` 0 is
    greedy; otherwise the whole distribution tempered by `temperature` and cut by `top_p` (no top-k cut); `seed` seeds
    torch once before the first prompt. Prompts are generated one at a time, each prompt's replies `batch_size` at a
    time (prompts with images differ in their image tensors' shapes, which a batch of prompts would have to pad);
    `group_by_length` changes nothing here. The model is sampled in eval mode and left in the mode it was in."""
    if not prompts:
        raise DpokitError("no prompts to sample from")
    encoded = []
    for i, p in enumerate(prompts):
        try:
            encoded.append(encode_prompt(p, processor, max_prompt_length))
        except RowProblem as e:
            raise DpokitError(f"prompt {i}: {e}") from None
    tokenizer = processor.tokenizer
    stop = stop_ids(model, tokenizer)
    gen = {"max_new_tokens": max_new_tokens, "do_sample": temperature > 0, "pad_token_id": tokenizer.pad_token_id,
           "eos_token_id": sorted(stop)}
    if temperature > 0:
        gen.update(temperature=temperature, top_p=top_p, top_k=0)
    out: list[VLMCompletion] = []
    was_training = model.training
    model.eval()
    if seed is not None:
        torch.manual_seed(seed)
    try:
        for i, enc in enumerate(tqdm(encoded, desc=desc, disable=not progress)):
            inputs, width = _on(enc.inputs, model), len(enc.ids)
            replies: list[list[int]] = []
            while len(replies) < num_generations:
                n = min(batch_size, num_generations - len(replies)) if temperature > 0 else 1
                seqs = model.generate(**inputs, num_return_sequences=n, **gen)
                for row in seqs[:, width:].tolist():
                    end = next((k for k, t in enumerate(row) if t in stop), None)
                    replies.append(row if end is None else row[:end + 1])
                if temperature <= 0:  # greedy: every generation is the same reply
                    replies *= num_generations
            texts = tokenizer.batch_decode([[t for t in r if t not in stop] for r in replies],
                                           skip_special_tokens=True)
            out += [VLMCompletion(prompts[i], enc.ids, r, text, bool(r) and r[-1] in stop, enc.images, enc.rope,
                                  enc.rope_next, enc.n_images) for r, text in zip(replies, texts)]
    finally:
        model.train(was_training)
    return out
