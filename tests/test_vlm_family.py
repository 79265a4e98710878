"""The vision-language family (`family: vlm`) on tiny LLaVA and Qwen2-VL models built here.

- Exactness: prefix sharing and padding-free blocks give the log-probs of the model's own forward over each
  [prompt | reply] alone, images and M-RoPE positions included, to 1e-5.
- Data: TRL's vision rows, images as paths, bytes, PIL images or a `datasets` Image column, several per row.
- Bad input: one line naming file, row and problem, exit 2.
- The reference cache's key covers the pixels; LoRA on the language model by default, the vision switch; the final
  save loads with `AutoModelForImageTextToText.from_pretrained`.
"""

from __future__ import annotations

import io
import json

import datasets
import numpy as np
import pytest
import torch
from PIL import Image
from transformers import AutoModelForImageTextToText

import dpokit
from dpokit.cli import main
from dpokit.config import load_config
from dpokit.families import get_family
from dpokit.families.vlm.positions import mrope_positions
from dpokit.families.vlm.tiny import QWEN_IMAGE, build_idefics3, build_llava, build_qwen2_vl
from dpokit.reference import Reference, cache_path

TEXTS = ["What is in the picture? A red square. A blue circle. Describe the image. It is green. Which shape? "
         "Two images: the first is larger. Nothing here."]
KINDS = {"llava": (build_llava, "<image>"), "qwen2_vl": (build_qwen2_vl, QWEN_IMAGE),
         "idefics3": (build_idefics3, "<image>")}


def _image(seed: int, h: int, w: int) -> Image.Image:
    return Image.fromarray((np.random.default_rng(seed).random((h, w, 3)) * 255).astype("uint8"))


@pytest.fixture(scope="module")
def image_dir(tmp_path_factory):
    """Three images of different sizes (Qwen2-VL gives each its own grid)."""
    path = tmp_path_factory.mktemp("images")
    for k, (h, w) in enumerate([(16, 24), (24, 24), (32, 16)]):
        _image(k, h, w).save(path / f"{k}.png")
    return path


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory):
    return {kind: build(tmp_path_factory.mktemp(kind), TEXTS) for kind, (build, _) in KINDS.items()}


def rows(placeholder: str, images=("0.png", "1.png", "2.png")) -> list[dict]:
    """Conversational rows (images put in by TRL's rule, and explicit image parts, two images in one row), a standard
    row with the placeholder, and a text-only row."""
    a, b, c = images
    return [
        {"prompt": [{"role": "user", "content": "What is in the picture?"}],
         "chosen": [{"role": "assistant", "content": "A red square."}],
         "rejected": [{"role": "assistant", "content": "A blue circle, it is."}], "images": [a]},
        {"prompt": [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Which shape?"},
                                                 {"type": "image"}]}],
         "chosen": [{"role": "assistant", "content": "It is green."}],
         "rejected": [{"role": "assistant", "content": "Blue."}], "images": [b, c]},
        {"prompt": placeholder + "Describe the image.", "chosen": " A red square.", "rejected": " It is a circle.",
         "image": c},
        {"prompt": "Nothing here.", "chosen": " A red square.", "rejected": " It is a circle."},
    ]


def write_rows(path, items) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in items))
    return str(path)


def config(model_dir, data, tmp_path, **extra):
    values = dict(family="vlm", model=str(model_dir), train_data=str(data), output_dir=str(tmp_path / "out"),
                  ref_cache_dir=str(tmp_path / "cache"), report_to=[], disable_tqdm=True, bf16=False, save_steps=0)
    return load_config(None, **{**values, **extra})


def own_forward(model, processor, ex) -> list[float]:
    """log p(reply | prompt, images) of each reply from the model's own forward over [prompt | reply] alone."""
    out = []
    for reply in (ex.chosen_ids, ex.rejected_ids):
        ids = torch.tensor([ex.prompt_ids + reply])
        inputs = dict(ex.images)
        if "image_grid_thw" in inputs:
            inputs["mm_token_type_ids"] = (ids == processor.image_token_id).long()
        with torch.no_grad():
            logp = model(input_ids=ids, **inputs).logits[0].float().log_softmax(-1)
        P = len(ex.prompt_ids)
        out.append(sum(logp[P - 1 + k, t].item() for k, t in enumerate(reply)))
    return out


@pytest.fixture(scope="module")
def loaded(model_dirs, image_dir, tmp_path_factory):
    """(family, model, processor, examples, cfg) per kind, full fine-tuning (no adapters), from a JSON Lines file."""
    family = get_family("vlm")
    out = {}
    for kind, (_, placeholder) in KINDS.items():
        tmp = tmp_path_factory.mktemp(f"data-{kind}")
        data = write_rows(image_dir / f"rows-{kind}.jsonl", rows(placeholder))
        cfg = config(model_dirs[kind], data, tmp, full_finetune=True)
        model, processor = family.load_policy(cfg)
        model.eval()
        out[kind] = (family, model, processor, family.examples(data, processor, cfg), cfg)
    return out


@pytest.mark.parametrize("kind", list(KINDS))
def test_every_layout_is_exact(kind, loaded):
    family, model, processor, examples, cfg = loaded[kind]
    assert [ex.n_images for ex in examples] == [1, 2, 1, 0]
    scorer = family.scorer(model, cfg)
    expected = torch.tensor([own_forward(model, processor, ex) for ex in examples], dtype=torch.float64)
    for share_prompt in (True, False):
        for padding_free in (True, False):
            cfg.share_prompt, cfg.padding_free = share_prompt, padding_free
            batch = family.collate(examples, cfg, processor)
            # each image once per pair with prefix sharing, once per block without
            pixels = [ex.images["pixel_values"] for ex in examples if ex.images]
            axis = 1 if pixels[0].dim() == 5 else 0  # Idefics3: [texts, tiles, C, H, W]
            n_pixels = sum(p.shape[axis] for p in pixels)
            assert batch["pixel_values"].shape[axis] == n_pixels * (1 if share_prompt else 2)
            with torch.no_grad():
                scores = scorer(batch)
            got = torch.stack([scores.chosen, scores.rejected], 1).double()
            torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    cfg.share_prompt, cfg.padding_free = True, True


def test_mrope_positions_match_the_models_own(loaded):
    family, model, processor, examples, cfg = loaded["qwen2_vl"]
    for ex in examples:
        ids = torch.tensor([ex.prompt_ids + ex.chosen_ids])
        types = (ids == processor.image_token_id).long()
        theirs, _ = model.model.get_rope_index(ids, types, image_grid_thw=ex.images.get("image_grid_thw"))
        ours, start = mrope_positions(types[0, :len(ex.prompt_ids)].tolist(), ex.images.get("image_grid_thw"),
                                      processor.image_processor.merge_size)
        P = len(ex.prompt_ids)
        assert torch.equal(theirs[:, 0, :P], ours)
        assert torch.equal(theirs[:, 0, P:], (torch.arange(len(ex.chosen_ids)) + start).expand(3, -1))
    batch = family.collate(examples, cfg, processor)
    assert batch["position_ids"].shape[0] == 3  # the layout's positions are 3-D for an M-RoPE model


def test_image_forms_agree(loaded, image_dir, tmp_path):
    """Paths, bytes, PIL images and a `datasets` Image column (in memory and through Parquet) encode alike."""
    family, _, processor, _, cfg = loaded["qwen2_vl"]

    def two_rows(images):  # one image, then two (TRL's rule puts both before the question)
        return [{**rows("")[0], "images": images[:1]}, {**rows("")[0], "images": images[1:]}]

    paths = [str(image_dir / f"{k}.png") for k in range(3)]
    raw = [(image_dir / f"{k}.png").read_bytes() for k in range(3)]
    expected = family.examples(two_rows(paths), processor, cfg)
    assert [ex.n_images for ex in expected] == [1, 2]
    dataset = datasets.Dataset.from_list(two_rows(paths)).cast_column("images", datasets.Sequence(datasets.Image()))
    dataset.to_parquet(str(tmp_path / "rows.parquet"))
    forms = {"bytes": two_rows(raw), "pil": two_rows([Image.open(io.BytesIO(b)) for b in raw]),
             "datasets": dataset, "parquet": str(tmp_path / "rows.parquet")}
    for form, source in forms.items():
        for ours, ref in zip(family.examples(source, processor, cfg), expected, strict=True):
            assert ours.prompt_ids == ref.prompt_ids, form
            for key, value in ref.images.items():
                assert torch.equal(ours.images[key], value), (form, key)


def test_reference_cache_key_covers_pixels(loaded, image_dir, tmp_path):
    family, model, processor, examples, cfg = loaded["llava"]
    placeholder = KINDS["llava"][1]
    one = family.examples(write_rows(image_dir / "a.jsonl", rows(placeholder)[2:3]), processor, cfg)
    again = family.examples(write_rows(image_dir / "b.jsonl", rows(placeholder)[2:3]), processor, cfg)
    other = family.examples(write_rows(image_dir / "c.jsonl", rows(placeholder, ("0.png", "1.png", "0.png"))[2:3]),
                            processor, cfg)
    assert one[0].prompt_ids == other[0].prompt_ids and one[0].chosen_ids == other[0].chosen_ids  # same text
    reference = Reference(family.scorer(model, cfg))
    assert cache_path(cfg, family, reference, one) == cache_path(cfg, family, reference, again)
    assert cache_path(cfg, family, reference, one) != cache_path(cfg, family, reference, other)


def _trainable(model) -> list[str]:
    return [n for n, p in model.named_parameters() if p.requires_grad]


def test_lora_on_the_language_model_by_default(model_dirs, image_dir, tmp_path):
    family = get_family("vlm")
    data = write_rows(tmp_path / "rows.jsonl", rows("<image>", [str(image_dir / f"{k}.png") for k in range(3)]))
    cfg = config(model_dirs["llava"], data, tmp_path)
    model, _ = family.load_policy(cfg)
    assert cfg.lora == {}  # the loop takes the reference as the base with adapters off
    names = _trainable(model)
    assert names and all("lora_" in n and ".language_model." in n for n in names)
    cfg = config(model_dirs["llava"], data, tmp_path, train_vision_tower=True)
    names = _trainable(family.load_policy(cfg)[0])
    assert any("vision_tower" in n for n in names) and any("multi_modal_projector" in n for n in names)
    assert not any("lora_" in n and "vision_tower" in n for n in names)  # the tower trains in full, not by adapters
    cfg = config(model_dirs["qwen2_vl"], data, tmp_path, full_finetune=True)
    names = _trainable(family.load_policy(cfg)[0])
    assert cfg.lora is None and any("language_model" in n for n in names) and not any("visual" in n for n in names)


@pytest.mark.parametrize("merge_lora", [False, True])
def test_final_save_loads_with_auto_model(merge_lora, model_dirs, image_dir, tmp_path):
    """A LoRA run with the vision tower trained: its final save (an adapter folder, or merged) loads with
    `AutoModelForImageTextToText.from_pretrained` and gives the trained policy's log-probs."""
    data = write_rows(image_dir / "save-rows.jsonl", rows("<image>"))
    cfg = config(model_dirs["llava"], data, tmp_path, train_vision_tower=True, merge_lora=merge_lora, max_steps=2,
                 learning_rate=1e-2, per_device_train_batch_size=4, logging_steps=1, lora={"r": 4, "lora_alpha": 8})
    dpokit.train(cfg)
    family = get_family("vlm")
    trained, processor = family.load_trained(cfg.output_dir, cfg)
    examples = family.examples(data, processor, cfg)
    loaded = AutoModelForImageTextToText.from_pretrained(cfg.output_dir).eval()
    start = AutoModelForImageTextToText.from_pretrained(cfg.model).eval()
    for ex in examples[:3]:
        ours = own_forward(loaded, processor, ex)
        assert ours == pytest.approx(own_forward(trained, processor, ex), rel=1e-5)
        assert ours != pytest.approx(own_forward(start, processor, ex), rel=1e-4)  # training did move it


PROBLEMS = {  # case: (rows as written, the row at fault, words of the message)
    "missing image": (lambda p: [rows(p)[0], {**rows(p)[0], "images": ["nope.png"]}], 2, "not found"),
    "unreadable image": (lambda p: [{**rows(p)[0], "images": ["broken.png"]}], 1, "unreadable image"),
    "parts vs images": (lambda p: [rows(p)[0], {**rows(p)[1], "images": ["0.png"]}], 2,
                        "2 image part(s) but the row has 1 image(s)"),
    "placeholders vs images": (lambda p: [{**rows(p)[2], "prompt": p + p + "Describe."}], 1,
                               "2 image placeholder(s)"),
    "image in a reply": (lambda p: [{**rows(p)[0], "chosen": [{"role": "assistant", "content": [{"type": "image"}]}]}],
                         1, "images belong to the prompt"),
    "image tokens do not fit": (lambda p: [rows(p)[3], rows(p)[0]], 2, "image tokens"),
}


@pytest.mark.parametrize("case", list(PROBLEMS))
def test_bad_input_is_one_line(case, model_dirs, image_dir, tmp_path, capsys):
    make, row, words = PROBLEMS[case]
    (image_dir / "broken.png").write_bytes(b"not a png")
    data = write_rows(image_dir / f"bad-{case.replace(' ', '-')}.jsonl", make("<image>"))
    extra = {"max_length": 20} if case == "image tokens do not fit" else {}
    cfg = {"family": "vlm", "model": str(model_dirs["llava"]), "train_data": data,
           "output_dir": str(tmp_path / "out"), **extra}
    path = tmp_path / "cfg.yaml"
    path.write_text("".join(f"{k}: {json.dumps(v)}\n" for k, v in cfg.items()))
    status = main(["train", str(path)])
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert status == 2 and "Traceback" not in "\n".join(err)
    assert err[-1].startswith(f"dpokit: error: {data}, row {row}: "), err[-1]
    assert words in err[-1], err[-1]


def test_text_model_refuses_vision_data(model_dirs, tiny_model_dir, image_dir, tmp_path, capsys):
    """An image part in a text-only model's data (causal_lm) and a text-only model under family vlm: one line, 2."""
    data = write_rows(image_dir / "text-model.jsonl", rows("<image>")[1:2])
    for family, model in (("causal_lm", tiny_model_dir), ("vlm", tiny_model_dir)):
        path = tmp_path / f"{family}.yaml"
        path.write_text(f"family: {family}\nmodel: {model}\ntrain_data: {data}\noutput_dir: {tmp_path / 'out'}\n")
        assert main(["train", str(path)]) == 2
        err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
        assert len([e for e in err if "dpokit: error" in e]) == 1 and "Traceback" not in "\n".join(err)
        assert (f"{data}, row 1" if family == "causal_lm" else "image-text-to-text") in err[-1], err[-1]


def test_prefix_lm_models_are_refused(tmp_path):
    """PaliGemma's whole prompt attends to itself both ways (a prefix-LM), which the layout does not do: refused."""
    from transformers import PaliGemmaConfig, PaliGemmaForConditionalGeneration

    config = PaliGemmaConfig(
        text_config=dict(model_type="gemma", vocab_size=300, hidden_size=32, intermediate_size=64,
                         num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1, head_dim=16),
        vision_config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                           image_size=16, patch_size=4, projection_dim=32), projection_dim=32, image_token_id=299)
    PaliGemmaForConditionalGeneration(config).save_pretrained(tmp_path / "paligemma")
    with pytest.raises(dpokit.DpokitError, match="paligemma model, a prefix-LM whose whole prompt attends to itself"):
        get_family("vlm").load_policy(load_config(None, family="vlm", model=str(tmp_path / "paligemma")))


def test_bad_rows_can_be_skipped(loaded, image_dir, caplog):
    family, _, processor, _, _ = loaded["llava"]
    data = write_rows(image_dir / "skip.jsonl", [rows("<image>")[0], {**rows("<image>")[0], "images": ["nope.png"]}])
    with caplog.at_level("WARNING", logger="dpokit"):
        examples = family.examples(data, processor, config(loaded["llava"][4].model, data, image_dir,
                                                           on_bad_row="skip", full_finetune=True))
    assert len(examples) == 1 and "skipped 1 bad row(s)" in caplog.text and "not found" in caplog.text
