"""The causal-LM scorer and sampler as other families reuse them: batch keys the scorer is told of reach the
model's body (a vision-language model's pixels), position ids go in as the batch holds them (3-D for M-RoPE),
and the sampler hands completions back in prompt order however it batches them."""

import pytest
import torch
from transformers.models.llama.modeling_llama import LlamaModel

from dpokit.data import Example
from dpokit.families import get_family
from dpokit.families.causal_lm import CausalLMScorer, collate
from dpokit.tiny import build_llama


class PixelBody(LlamaModel):
    """A Llama body that also reads `pixel_values` ([rows, T], a shift added to each token's embedding: image
    features merged into the embeddings, in miniature) and M-RoPE-shaped position ids ([3, rows, T], of which
    it uses the first section), recording what it was called with."""

    def forward(self, input_ids=None, position_ids=None, pixel_values=None, **kwargs):
        self.calls.append({"pixel_values": pixel_values, "position_ids": position_ids})
        embeds = self.embed_tokens(input_ids)
        if pixel_values is not None:
            embeds = embeds + pixel_values[..., None]
        if position_ids.dim() == 3:
            position_ids = position_ids[0]
        return super().forward(inputs_embeds=embeds, position_ids=position_ids, **kwargs)


def _pixel_model(tokenizer):
    model = build_llama(tokenizer, hidden_size=32, num_layers=2, seed=0)
    body = PixelBody(model.config)
    body.load_state_dict(model.model.state_dict())
    body.calls = []
    model.model = body
    return model.eval()


def _examples(tokenizer):
    ids = lambda text: tokenizer(text)["input_ids"]  # noqa: E731
    return [Example(ids("What is 2+2?"), ids(" It is 4."), ids(" Five.")),
            Example(ids("Name a color."), ids(" Blue."), ids(" Seven, I think."))]


@pytest.mark.parametrize("padding_free", [True, False], ids=["blocks", "padded"])
def test_extra_inputs_reach_the_model_body(tokenizer, padding_free):
    model = _pixel_model(tokenizer)
    batch = collate(_examples(tokenizer), tokenizer.pad_token_id, padding_free=padding_free)
    pixels = torch.randn(batch["input_ids"].shape)
    plain = CausalLMScorer(model)({**batch, "pixel_values": pixels})
    assert model.model.calls[-1]["pixel_values"] is None  # a key the scorer was not told of stays out

    vlm = CausalLMScorer(model, extra_inputs=("pixel_values", "image_grid_thw"))  # a named key may be absent
    seen = vlm({**batch, "pixel_values": pixels})
    assert model.model.calls[-1]["pixel_values"] is pixels
    assert (seen.chosen - plain.chosen).abs().min() > 1e-4  # the pixels changed every score
    blank = vlm({**batch, "pixel_values": torch.zeros_like(pixels)})
    torch.testing.assert_close(blank.chosen, plain.chosen)
    torch.testing.assert_close(blank.rejected, plain.rejected)


@pytest.mark.parametrize("padding_free", [True, False], ids=["blocks", "padded"])
def test_three_dimensional_position_ids_pass_through(tokenizer, padding_free):
    model = _pixel_model(tokenizer)
    batch = collate(_examples(tokenizer), tokenizer.pad_token_id, padding_free=padding_free)
    plain = CausalLMScorer(model)(batch)
    mrope = batch["position_ids"].expand(3, *batch["position_ids"].shape)  # [3, rows, T]
    scores = CausalLMScorer(model, extra_inputs=("pixel_values",))({**batch, "position_ids": mrope})
    assert model.model.calls[-1]["position_ids"] is mrope
    torch.testing.assert_close(scores.chosen, plain.chosen)


def test_sampler_returns_completions_in_prompt_order_whatever_the_batching(tiny_model_dir):
    family = get_family("causal_lm")
    model, tokenizer = family.load_trained(tiny_model_dir)
    prompts = ["What is the capital of France?", "Hi.", "Name a color.", "Give me a fruit.", "Is water wet?"]
    assert len({len(tokenizer(p)["input_ids"]) for p in prompts}) > 2
    greedy = dict(max_new_tokens=5, temperature=0)
    alone = [family.sample(model, tokenizer, [p], **greedy)[0] for p in prompts]
    for group_by_length in (False, True):
        got = family.sample(model, tokenizer, prompts, batch_size=2, group_by_length=group_by_length, **greedy)
        assert [c.prompt for c in got] == prompts
        assert [c.completion_ids for c in got] == [c.completion_ids for c in alone]
        assert all(c.prompt_ids == tokenizer(p)["input_ids"] for c, p in zip(got, prompts))
    drawn = family.sample(model, tokenizer, prompts, num_generations=3, max_new_tokens=5, seed=1, batch_size=4,
                          group_by_length=True)
    assert [c.prompt for c in drawn] == [p for p in prompts for _ in range(3)]
    again = family.sample(model, tokenizer, prompts, num_generations=3, max_new_tokens=5, seed=1, batch_size=4,
                          group_by_length=True)
    assert [c.completion_ids for c in drawn] == [c.completion_ids for c in again]
    assert all(c.ended == (c.completion_ids[-1:] == [tokenizer.eos_token_id]) for c in drawn)
