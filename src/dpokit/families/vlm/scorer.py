"""Per-example log-probs of a vision-language model: the causal-LM scorer, with the images encoded first.

The vision tower runs once per batch, outside the text model's call, and its features go in as the model's
`mm_encoder_outputs` (transformers' precomputed-encoder input): the text model may then run with block attention
while the vision tower keeps its own attention (it would otherwise be handed the blocks of the text). With prefix
sharing each prompt, and so each image, appears once in a batch.
"""

from __future__ import annotations

import torch

from ..base import Scores
from ..causal_lm import CausalLMScorer


# The processor outputs that go to the vision side (`get_image_features`), by the models' own names.
IMAGE_INPUTS = ("pixel_values", "image_grid_thw", "image_sizes", "pixel_attention_mask")


class VLMScorer(CausalLMScorer):
    """batch → Scores for an image-text-to-text model (`AutoModelForImageTextToText`)."""

    def __init__(self, model, chunk_size: int = 1024, image_keys: tuple[str, ...] = IMAGE_INPUTS):
        super().__init__(model, chunk_size, extra_inputs=("mm_encoder_outputs",))
        self.image_keys = tuple(image_keys)

    def forward(self, batch: dict[str, torch.Tensor]) -> Scores:
        if "pixel_values" in batch:
            inner = self._base().base_model  # the model without its LM head: it owns get_image_features
            features = inner.get_image_features(**{k: batch[k] for k in self.image_keys if k in batch},
                                                return_dict=True)
            batch = {**batch, "mm_encoder_outputs": {"image": features}}
        return super().forward(batch)
