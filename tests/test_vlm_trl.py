"""The vlm family's first training step agrees with TRL's `DPOTrainer` on tiny LLaVA, Qwen2-VL and Idefics3 models.

Both trainers see one batch holding the whole data set, a policy and a *different* reference model, fp32, no
dropout; the first logged step comes before any weight update. dpokit runs its defaults (prefix sharing,
padding-free blocks, the reference scored once and cached) with every weight trained, as TRL trains them, so the
gradient norm is comparable too. TRL 1.16 refuses `precompute_ref_log_probs` with images, so it scores its
reference on the fly. Its vision collator appends no EOS to standard replies while dpokit does (as for text), so the
standard rows below end with the EOS token already.
"""

from __future__ import annotations

import json

import datasets
import numpy as np
import pytest
from PIL import Image
from transformers import AutoModelForImageTextToText, AutoProcessor
from trl import DPOConfig, DPOTrainer

import dpokit
from dpokit.config import load_config
from dpokit.families.vlm.tiny import QWEN_IMAGE, build_idefics3, build_llava, build_qwen2_vl

BETA = 2.0
TEXTS = ["What is in the picture? A red square. A blue circle. Describe the image. It is green. Which shape?"]
KINDS = {"llava": (build_llava, "<image>"), "qwen2_vl": (build_qwen2_vl, QWEN_IMAGE),
         "idefics3": (build_idefics3, "<image>")}
# (question, chosen, rejected, images): one row with two images; the images differ in size (Qwen2-VL's grids)
QA = [("What is in the picture?", "A red square.", "A blue circle, it is.", [0]),
      ("Which shape?", "It is green.", "Blue.", [1, 2]),
      ("Describe the image.", "A red square.", "It is a circle.", [2])]


@pytest.fixture(scope="module")
def image_paths(tmp_path_factory):
    path = tmp_path_factory.mktemp("trl-images")
    out = []
    for k, (h, w) in enumerate([(16, 24), (24, 24), (32, 16)]):
        image = Image.fromarray((np.random.default_rng(k).random((h, w, 3)) * 255).astype("uint8"))
        image.save(path / f"{k}.png")
        out.append(path / f"{k}.png")
    return out


@pytest.fixture(scope="module")
def model_pairs(tmp_path_factory):
    """(policy folder, reference folder) per kind: the same processor, other weights."""
    out = {}
    for kind, (build, _) in KINDS.items():
        policy = build(tmp_path_factory.mktemp(f"{kind}-policy"), TEXTS, seed=0)
        processor = AutoProcessor.from_pretrained(policy)
        ref = build(tmp_path_factory.mktemp(f"{kind}-ref"), TEXTS, seed=1, processor=processor)
        out[kind] = (policy, ref)
    return out


def make_rows(layout: str, placeholder: str, eos: str, images: list) -> list[dict]:
    rows = []
    for question, chosen, rejected, which in QA:
        if layout == "conversational":  # TRL puts the images before the first user message's text
            row = {"prompt": [{"role": "user", "content": question}],
                   "chosen": [{"role": "assistant", "content": chosen}],
                   "rejected": [{"role": "assistant", "content": rejected}]}
        else:
            row = {"prompt": placeholder * len(which) + question, "chosen": f" {chosen}{eos}",
                   "rejected": f" {rejected}{eos}"}
        rows.append({**row, "images": [images[k] for k in which]})
    return rows


def trl_first_step(rows, policy, ref, processor, out) -> dict:
    trainer = DPOTrainer(
        model=AutoModelForImageTextToText.from_pretrained(policy),
        ref_model=AutoModelForImageTextToText.from_pretrained(ref),
        args=DPOConfig(output_dir=str(out), beta=BETA, per_device_train_batch_size=len(rows), max_length=None,
                       max_steps=1, logging_steps=1, learning_rate=1e-6, report_to=[], use_cpu=True, bf16=False,
                       gradient_checkpointing=False, save_strategy="no", disable_tqdm=True, seed=0,
                       precompute_ref_log_probs=False),
        train_dataset=datasets.Dataset.from_list(rows),
        processing_class=processor,
    )
    trainer.train()
    return trainer.state.log_history[0]


def dpokit_first_step(rows, policy, ref, tmp) -> dict:
    data = tmp / "pairs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    result = dpokit.train(load_config(
        None, family="vlm", model=str(policy), ref_model=str(ref), train_data=str(data), output_dir=str(tmp / "out"),
        ref_cache_dir=str(tmp / "cache"), beta=BETA, per_device_train_batch_size=len(rows), max_length=None,
        max_prompt_length=None, max_steps=1, logging_steps=1, learning_rate=1e-6, report_to=[], bf16=False,
        disable_tqdm=True, save_steps=0, full_finetune=True, train_vision_tower=True,
    ))
    return result.history[0]


@pytest.mark.parametrize("layout", ["standard", "conversational"])
@pytest.mark.parametrize("kind", list(KINDS))
def test_first_step_matches_trl(kind, layout, model_pairs, image_paths, tmp_path):
    policy, ref = model_pairs[kind]
    processor = AutoProcessor.from_pretrained(policy)
    placeholder, eos = KINDS[kind][1], processor.tokenizer.eos_token
    pil = [Image.open(p).convert("RGB") for p in image_paths]
    theirs = trl_first_step(make_rows(layout, placeholder, eos, pil), policy, ref, processor, tmp_path / "trl")
    ours = dpokit_first_step(make_rows(layout, placeholder, eos, [str(p) for p in image_paths]), policy, ref, tmp_path)
    for key in ("logps/chosen", "logps/rejected", "loss", "grad_norm", "logits/chosen", "logits/rejected"):
        assert ours[key] == pytest.approx(theirs[key], rel=1e-4, abs=0), \
            f"{key}: dpokit {ours[key]} vs TRL {theirs[key]}"
    # rewards are differences of ~40-nat sums: compare to 1e-5 of the sums (see test_trl_agreement.py)
    scale = BETA * 1e-5 * max(abs(theirs["logps/chosen"]), abs(theirs["logps/rejected"]))
    for key in ("rewards/chosen", "rewards/rejected", "rewards/margins"):
        assert ours[key] == pytest.approx(theirs[key], abs=scale), f"{key}: dpokit {ours[key]} vs TRL {theirs[key]}"
