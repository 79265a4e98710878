"""Gemma 3 in the vision-language family, on a tiny model built here: each image's tokens attend to each other both
ways, as the model's own mask has them (transformers 5.25 opens each image's span whenever `token_type_ids` are
given, in training and inference alike), everything else causal, a sliding-window layer cutting both.

- Exactness: with prefix sharing and padding-free blocks (block attention), and in every other layout, dpokit's
  log-probs equal the model's own forward over each [prompt | reply] alone with its `token_type_ids`, to 1e-5.
- Teeth: the same forward with every image token attending causally (`token_type_ids` zeroed) gives other log-probs,
  so the exactness above is the bidirectional images' and not a coincidence.
- TRL: the first training step agrees with TRL 1.16's `DPOTrainer`, which passes Gemma 3 its `token_type_ids`.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import AutoProcessor

from dpokit.config import load_config
from dpokit.families import get_family
from dpokit.families.causal_lm.layout import block_masks
from dpokit.families.vlm.tiny import GEMMA3_IMAGE, build_gemma3
from test_vlm_family import rows as family_rows
from test_vlm_trl import dpokit_first_step, trl_first_step

TEXTS = ["What is in the picture? A red square. A blue circle. Describe the image. It is green. Which shape? "
         "Nothing here."]
SIZES = [(16, 24), (24, 24), (32, 16)]


@pytest.fixture(scope="module")
def image_paths(tmp_path_factory):
    path = tmp_path_factory.mktemp("gemma3-images")
    out = []
    for k, (h, w) in enumerate(SIZES):
        Image.fromarray((np.random.default_rng(k).random((h, w, 3)) * 255).astype("uint8")).save(path / f"{k}.png")
        out.append(path / f"{k}.png")
    return out


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory):
    """(policy folder, reference folder): the same processor, other weights."""
    policy = build_gemma3(tmp_path_factory.mktemp("gemma3-policy"), TEXTS, seed=0)
    processor = AutoProcessor.from_pretrained(policy)
    ref = build_gemma3(tmp_path_factory.mktemp("gemma3-ref"), TEXTS, seed=1, processor=processor)
    return policy, ref


def rows(images) -> list[dict]:
    """test_vlm_family's rows with Gemma 3's image placeholder: a conversational row (its image put in by TRL's
    rule), one with two images, a standard row with the placeholder, and a text-only row."""
    return family_rows(GEMMA3_IMAGE, images)


@pytest.fixture(scope="module")
def loaded(model_dirs, image_paths, tmp_path_factory):
    """(family, model, processor, examples, cfg), every weight trained (no adapters)."""
    tmp = tmp_path_factory.mktemp("gemma3-data")
    data = tmp / "rows.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows([str(p) for p in image_paths])))
    family = get_family("vlm")
    cfg = load_config(None, family="vlm", model=str(model_dirs[0]), train_data=str(data), output_dir=str(tmp / "out"),
                      ref_cache_dir=str(tmp / "cache"), report_to=[], disable_tqdm=True, bf16=False, save_steps=0,
                      full_finetune=True)
    model, processor = family.load_policy(cfg)
    model.eval()
    return family, model, processor, family.examples(str(data), processor, cfg), cfg


def own_forward(model, processor, ex, image_types: bool = True) -> list[float]:
    """log p(reply | prompt, images) of each reply from the model's own forward over [prompt | reply] alone, with the
    `token_type_ids` its processor gives the prompt (1 on image tokens; the reply 0, as TRL has it), or all 0."""
    out = []
    P = len(ex.prompt_ids)
    for reply in (ex.chosen_ids, ex.rejected_ids):
        ids = torch.tensor([ex.prompt_ids + reply])
        types = torch.isin(ids, torch.tensor(processor.image_token_ids)).long() * image_types
        types[:, P:] = 0
        with torch.no_grad():
            logp = model(input_ids=ids, token_type_ids=types, **ex.images).logits[0].float().log_softmax(-1)
        out.append(sum(logp[P - 1 + k, t].item() for k, t in enumerate(reply)))
    return out


def scores(family, model, processor, examples, cfg, share_prompt: bool, padding_free: bool) -> torch.Tensor:
    cfg.share_prompt, cfg.padding_free = share_prompt, padding_free
    try:
        with torch.no_grad():
            s = family.scorer(model, cfg)(family.collate(examples, cfg, processor))
    finally:
        cfg.share_prompt, cfg.padding_free = True, True
    return torch.stack([s.chosen, s.rejected], 1).double()


@pytest.mark.parametrize("share_prompt", [True, False])
@pytest.mark.parametrize("padding_free", [True, False])
def test_every_layout_is_exact(share_prompt, padding_free, loaded):
    family, model, processor, examples, cfg = loaded
    assert [ex.n_images for ex in examples] == [1, 2, 1, 0]
    assert max(len(ex.prompt_ids) for ex in examples) > model.config.text_config.sliding_window  # the window cuts
    expected = torch.tensor([own_forward(model, processor, ex) for ex in examples], dtype=torch.float64)
    got = scores(family, model, processor, examples, cfg, share_prompt, padding_free)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=0)


def test_causal_images_would_fail(loaded):
    """Were image tokens attended causally, the log-probs would be those of the forward with `token_type_ids` zeroed,
    each outside the tolerance the exactness test holds them to (the nearest by 4 times it, the farthest by 600)."""
    family, model, processor, examples, cfg = loaded
    causal = torch.tensor([own_forward(model, processor, ex, image_types=False) for ex in examples],
                          dtype=torch.float64)
    got = scores(family, model, processor, examples, cfg, True, True)
    with_images = got[:3]  # the text-only row has no image to attend to
    off = (with_images - causal[:3]).abs() / (1e-5 * causal[:3].abs())  # in units of the tolerance
    assert (off > 2).all() and off.max() > 100, off
    torch.testing.assert_close(got[3], causal[3], rtol=1e-5, atol=0)


def test_image_spans_open_both_ways(loaded):
    """The block mask opens each image's run of tokens (and only it) both ways, once per copy of the prompt."""
    family, model, processor, examples, cfg = loaded
    batch = family.collate(examples[1:2], cfg, processor)  # two images, one block [prompt | chosen | rejected]
    mask, _ = block_masks(batch, torch.float32, "sdpa")
    image = torch.isin(batch["input_ids"][0], torch.tensor(processor.image_token_ids))
    n = image.shape[0]
    upper = mask[0, 0, :n, :n].triu(1)  # what a token sees after itself
    spans = batch["span_ids"][0]
    assert spans[image].unique().numel() == 2 and (spans[~image] == -1).all()
    assert torch.equal(upper, (spans[:, None] == spans[None, :]).triu(1) & image[:, None])


def test_first_step_matches_trl(model_dirs, image_paths, tmp_path):
    """As tests/test_vlm_trl.py, on conversational rows with one or two images each: policy and a different
    reference, one batch, fp32, the first logged step before any update."""
    policy, ref = model_dirs
    processor = AutoProcessor.from_pretrained(policy)

    def pairs(images):
        return [{"prompt": [{"role": "user", "content": question}],
                 "chosen": [{"role": "assistant", "content": chosen}],
                 "rejected": [{"role": "assistant", "content": rejected}], "images": [images[k] for k in which]}
                for question, chosen, rejected, which in
                [("What is in the picture?", "A red square.", "A blue circle, it is.", [0]),
                 ("Which shape?", "It is green.", "Blue.", [1, 2]),
                 ("Describe the image.", "A red square.", "It is a circle.", [2])]]

    pil = [Image.open(p).convert("RGB") for p in image_paths]
    theirs = trl_first_step(pairs(pil), policy, ref, processor, tmp_path / "trl")
    ours = dpokit_first_step(pairs([str(p) for p in image_paths]), policy, ref, tmp_path)
    for key in ("logps/chosen", "logps/rejected", "loss", "grad_norm", "logits/chosen", "logits/rejected"):
        assert ours[key] == pytest.approx(theirs[key], rel=1e-4, abs=0), \
            f"{key}: dpokit {ours[key]} vs TRL {theirs[key]}"
