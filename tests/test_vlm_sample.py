"""Sampling from vision-language models (`family: vlm`): sample-based eval on prompts with images, replies that
depend on the image, and the replies' log-probs as the model's own forward gives them (`dpokit score`: see
test_vlm_score.py)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

import dpokit
from dpokit.cli import main
from dpokit.config import load_config
from dpokit.families import get_family
from dpokit.families.vlm import ImageMessages, ImagePrompt
from dpokit.families.vlm.tiny import QWEN_IMAGE, build_idefics3, build_llava, build_qwen2_vl
from dpokit.scoring import score_examples

TEXTS = ["What is in the picture? A red square. A blue circle. Describe the image. It is green. Which shape? "
         "Two images: the first is larger. Nothing here."]
KINDS = {"llava": (build_llava, "<image>"), "qwen2_vl": (build_qwen2_vl, QWEN_IMAGE),
         "idefics3": (build_idefics3, "<image>")}


def _noise(seed: int, h: int, w: int) -> Image.Image:
    return Image.fromarray((np.random.default_rng(seed).random((h, w, 3)) * 255).astype("uint8"))


@pytest.fixture(scope="module")
def image_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("images")
    for k, (h, w) in enumerate([(16, 24), (24, 24), (32, 16)]):
        _noise(k, h, w).save(path / f"{k}.png")
    return path


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory):
    return {kind: build(tmp_path_factory.mktemp(kind), TEXTS) for kind, (build, _) in KINDS.items()}


def prompt_rows(placeholder: str) -> list[dict]:
    """Prompts as training rows hold them: a standard prompt with the placeholder, messages with image parts (two
    images), messages with none (TRL's rule puts the image first), a preference row's implicit prompt, and text."""
    return [
        {"prompt": placeholder + "Describe the image.", "image": "0.png"},
        {"prompt": [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Which shape?"},
                                                 {"type": "image"}]}], "images": ["1.png", "2.png"]},
        {"prompt": [{"role": "user", "content": "What is in the picture?"}], "images": ["2.png"]},
        {"chosen": [{"role": "user", "content": "What is in the picture?"},
                    {"role": "assistant", "content": "A red square."}],
         "rejected": [{"role": "user", "content": "What is in the picture?"},
                      {"role": "assistant", "content": "A blue circle."}], "images": ["0.png"]},
        {"prompt": "Nothing here."},
    ]


def train_rows(placeholder: str) -> list[dict]:
    return [
        {"prompt": [{"role": "user", "content": "What is in the picture?"}],
         "chosen": [{"role": "assistant", "content": "A red square."}],
         "rejected": [{"role": "assistant", "content": "A blue circle, it is."}], "images": ["0.png"]},
        {"prompt": placeholder + "Describe the image.", "chosen": " A red square.", "rejected": " It is a circle.",
         "image": "2.png"},
    ]


def write_rows(path, items) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in items))
    return str(path)


@pytest.fixture(scope="module")
def llava_run(model_dirs, image_dir, tmp_path_factory):
    """A tiny LLaVA trained one step with LoRA (the family's default): a run folder whose reference is the base with
    the adapters off."""
    out = tmp_path_factory.mktemp("llava-run")
    data = write_rows(image_dir / "train.jsonl", train_rows("<image>"))
    cfg = load_config(None, family="vlm", model=str(model_dirs["llava"]), train_data=data,
                      output_dir=str(out / "run"), ref_cache_dir=str(out / "cache"), report_to=[], disable_tqdm=True,
                      bf16=False, max_steps=1, learning_rate=1e-2, per_device_train_batch_size=2,
                      lora={"r": 4, "lora_alpha": 8})
    dpokit.train(cfg)
    return cfg.output_dir


def test_sample_eval_on_prompts_with_images(llava_run, image_dir, tmp_path, capsys):
    prompts = write_rows(image_dir / "prompts.jsonl", prompt_rows("<image>"))
    samples = tmp_path / "samples.jsonl"
    status = main(["eval", llava_run, "--prompts", prompts, "--max-new-tokens", "4", "--no-embeddings", "--json",
                   "--samples-out", str(samples), "--batch-size", "2"])
    out = capsys.readouterr()
    assert status in (0, None), out.err
    result = json.loads(out.out)
    assert result["reference"] == "the base model with adapters off"
    metrics = result["samples"]
    expected = {"prompts", "kl", "length/policy", "length/reference", "distinct_1/policy", "distinct_1/reference",
                "distinct_2/policy", "distinct_2/reference"}
    assert expected <= set(metrics) and metrics["prompts"] == len(prompt_rows("<image>"))
    assert all(np.isfinite(metrics[k]) for k in expected)
    assert 0 < metrics["length/policy"] <= 4 and 0 < metrics["length/reference"] <= 4
    lines = [json.loads(line) for line in samples.read_text().splitlines()]
    assert len(lines) == len(prompt_rows("<image>"))
    assert lines[0]["prompt"] == "<image>Describe the image."  # prompts are written as text
    assert lines[1]["prompt"][0]["content"][0] == {"type": "image"}
    assert all(isinstance(s["policy"], str) and np.isfinite(s["logp_policy"]) for s in lines)


def test_a_bad_prompt_row_is_one_line(llava_run, image_dir, capsys):
    prompts = write_rows(image_dir / "bad-prompts.jsonl",
                         [prompt_rows("<image>")[0], {**prompt_rows("<image>")[0], "image": "nope.png"}])
    status = main(["eval", llava_run, "--prompts", prompts, "--max-new-tokens", "2", "--no-embeddings"])
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert status == 2 and "Traceback" not in "\n".join(err)
    assert err[-1].startswith(f"dpokit: error: {prompts}, row 2: ") and "not found" in err[-1], err[-1]


def _load(model_dirs, kind):
    family = get_family("vlm")
    cfg = load_config(None, family="vlm", model=str(model_dirs[kind]))
    return family, family.load_model(cfg.model, cfg), family.load_processor(cfg.model, cfg), cfg


def test_the_reply_depends_on_the_image(model_dirs):
    """Greedy replies of one question about different images differ, and generate got each prompt's own pixels."""
    family, model, processor, _ = _load(model_dirs, "llava")
    images = [Image.new("RGB", (16, 16), c) for c in ("black", "white", "red")] + [_noise(7, 16, 16)]
    prompts = [ImagePrompt("<image>Describe the image.", [im]) for im in images]
    seen = []
    generate = model.generate

    def spy(**kwargs):
        seen.append(kwargs["pixel_values"].clone())
        return generate(**kwargs)

    model.generate = spy
    replies = family.sample(model, processor, prompts, max_new_tokens=6, temperature=0)
    assert len(replies) == len(prompts) and len(seen) == len(prompts)
    for image, pixels in zip(images, seen):
        assert torch.equal(pixels, processor.image_processor(image, return_tensors="pt")["pixel_values"])
    assert len({tuple(r.completion_ids) for r in replies}) > 1, [r.text for r in replies]
    # greedy replies are the same whatever the seed; several generations of a greedy prompt are copies
    again = family.sample(model, processor, prompts[:1], max_new_tokens=6, temperature=0, num_generations=3, seed=5)
    assert [r.completion_ids for r in again] == [replies[0].completion_ids] * 3


@pytest.mark.parametrize("kind", list(KINDS))
def test_reply_log_probs_are_the_models_own(kind, model_dirs, image_dir):
    """Sampled replies (two per prompt, temperature 1) scored through the family's batch layout, as sample eval scores
    them, give the log-probs of the model's own forward over [prompt | reply] with the prompt's images."""
    family, model, processor, cfg = _load(model_dirs, kind)
    placeholder = KINDS[kind][1]
    prompts = family.prompts(write_rows(image_dir / f"prompts-{kind}.jsonl", prompt_rows(placeholder)), processor)
    assert isinstance(prompts[0], ImagePrompt) and isinstance(prompts[1], ImageMessages)
    assert [len(p.images) for p in prompts] == [1, 2, 1, 1, 0]
    replies = family.sample(model, processor, prompts, num_generations=2, max_new_tokens=5, seed=0, batch_size=2)
    assert len(replies) == 2 * len(prompts) and all(r.completion_ids for r in replies)
    again = family.sample(model, processor, prompts, num_generations=2, max_new_tokens=5, seed=0, batch_size=2)
    assert [r.completion_ids for r in again] == [r.completion_ids for r in replies]  # the seed fixes the draw
    examples = [family.reply_example(r) for r in replies]
    layouts = [{}, {"share_prompt": False}, {"padding_free": False}, {"share_prompt": False, "padding_free": False}]
    scored = []
    for layout in layouts:  # the reply alone (no rejected) in every batch layout
        layout_cfg = load_config(None, family="vlm", model=cfg.model, **layout)
        scorer = family.scorer(model, layout_cfg).eval()
        with torch.no_grad():
            scored.append(torch.cat([s.scores.chosen for s in
                                     score_examples(family, scorer, examples, layout_cfg, processor, 4)]))
    for ex, *logps in zip(examples, *(s.tolist() for s in scored)):
        ids = torch.tensor([ex.prompt_ids + ex.chosen_ids])
        inputs = dict(ex.images)
        if "image_grid_thw" in inputs:
            inputs["mm_token_type_ids"] = (ids == processor.image_token_id).long()
        with torch.no_grad():
            logits = model(input_ids=ids, **inputs).logits[0].float().log_softmax(-1)
        P = len(ex.prompt_ids)
        own = sum(logits[P - 1 + k, t].item() for k, t in enumerate(ex.chosen_ids))
        assert logps == pytest.approx([own] * len(layouts), rel=1e-5, abs=1e-5)
