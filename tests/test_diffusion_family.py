"""The diffusion family (Diffusion-DPO on diffusers): tiny pixel-space and Stable Diffusion pipelines built here,
nothing downloaded."""

from __future__ import annotations

import io
import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("diffusers")
from diffusers import (AutoencoderKL, DDPMPipeline, DDPMScheduler, StableDiffusionPipeline,  # noqa: E402
                       UNet2DConditionModel, UNet2DModel)
from PIL import Image  # noqa: E402
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer  # noqa: E402

from dpokit.config import TrainConfig  # noqa: E402
from dpokit.errors import DataError  # noqa: E402
from dpokit.families import get_family  # noqa: E402
from dpokit.families.base import draw_seeds  # noqa: E402
from dpokit.families.diffusion.scorer import draw  # noqa: E402
from dpokit.objectives import ObjectiveConfig, objective  # noqa: E402
from dpokit.reference import loss_inputs  # noqa: E402
from dpokit.train import Loop  # noqa: E402

N_CLASSES = 3


# ---------------------------------------------------------------- tiny models and data


def pixel_pipeline(path: Path, seed: int = 0, prediction_type: str = "epsilon") -> Path:
    torch.manual_seed(seed)
    unet = UNet2DModel(sample_size=8, in_channels=3, out_channels=3, block_out_channels=(8, 16), layers_per_block=1,
                       norm_num_groups=8, down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                       up_block_types=("AttnUpBlock2D", "UpBlock2D"), attention_head_dim=8, num_class_embeds=N_CLASSES)
    DDPMPipeline(unet=unet, scheduler=DDPMScheduler(num_train_timesteps=100, clip_sample=False,
                                                    prediction_type=prediction_type)).save_pretrained(path)
    return path


def gray_pipeline(path: Path) -> Path:
    """A tiny unconditional 1-channel pixel UNet pipeline."""
    torch.manual_seed(0)
    unet = UNet2DModel(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(8, 16), layers_per_block=1,
                       norm_num_groups=8, down_block_types=("DownBlock2D", "DownBlock2D"),
                       up_block_types=("UpBlock2D", "UpBlock2D"))
    DDPMPipeline(unet=unet, scheduler=DDPMScheduler(num_train_timesteps=100)).save_pretrained(path)
    return path


def clip_tokenizer(folder: Path) -> CLIPTokenizer:
    """A character-level CLIP BPE tokenizer: a vocabulary of letters and no merges."""
    folder.mkdir(parents=True, exist_ok=True)
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for suffix in ("", "</w>"):
        for c in "abcdefghijklmnopqrstuvwxyz":
            vocab[c + suffix] = len(vocab)
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    return CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=12)


def sd_pipeline(path: Path, unet_seed: int = 0, prediction_type: str = "epsilon") -> Path:
    """A tiny Stable Diffusion folder: 8×8 images, latents 4×4×4 (VAE downscale 2). VAE and text encoder
    are always seed 0, so two folders differ only in their UNets."""
    tok = clip_tokenizer(path.parent / f"{path.name}-vocab")
    torch.manual_seed(0)
    text_encoder = CLIPTextModel(CLIPTextConfig(vocab_size=len(tok), hidden_size=16, intermediate_size=32,
                                                num_hidden_layers=1, num_attention_heads=2, max_position_embeddings=12,
                                                bos_token_id=0, eos_token_id=1, pad_token_id=1))
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16), latent_channels=4,
                        norm_num_groups=8, sample_size=8, layers_per_block=1)
    torch.manual_seed(unet_seed)
    unet = UNet2DConditionModel(sample_size=4, in_channels=4, out_channels=4, block_out_channels=(8, 16),
                                layers_per_block=1, norm_num_groups=8, cross_attention_dim=16, attention_head_dim=4,
                                down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"))
    scheduler = DDPMScheduler(num_train_timesteps=100, clip_sample=False, prediction_type=prediction_type)
    StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tok, unet=unet, scheduler=scheduler,
                            safety_checker=None, feature_extractor=None,
                            requires_safety_checker=False).save_pretrained(path)
    return path


def image(seed: int, bright: bool, size: int = 8, mode: str = "RGB") -> Image.Image:
    """Preferred images are bright, rejected dark, each with some noise."""
    g = np.random.default_rng(seed)
    base = 190 if bright else 60
    pixels = np.clip(base + 40 * g.standard_normal((size, size, 3)), 0, 255).astype(np.uint8)
    return Image.fromarray(pixels, "RGB").convert(mode)


def png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def write_data(folder: Path, n: int, captions: bool) -> Path:
    """JSON Lines with images as paths relative to the file."""
    (folder / "img").mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(n):
        image(2 * i, True).save(folder / "img" / f"{i}w.png")
        image(2 * i + 1, False).save(folder / "img" / f"{i}l.png")
        cond = {"prompt": ["a red cat", "a dog", "sky"][i % 3]} if captions else {"class": i % N_CLASSES}
        rows.append({**cond, "chosen": f"img/{i}w.png", "rejected": f"img/{i}l.png"})
    path = folder / "train.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def config(tmp_path: Path, model: Path, data: Path, **kw) -> TrainConfig:
    settings = dict(family="diffusion", model=str(model), train_data=str(data), output_dir=str(tmp_path / "out"),
                    beta=50.0, learning_rate=1e-3, max_steps=1, per_device_train_batch_size=4, logging_steps=1,
                    report_to=[], disable_tqdm=True, save_steps=0, seed=3, ref_cache_dir=str(tmp_path / "cache"))
    own = {k: kw.pop(k) for k in ("resolution", "encode_batch_size", "cache_encodings") if k in kw}
    settings.update(kw)
    return TrainConfig(**settings, family_config=own)


def pair_scores(family, model, examples, frozen, cfg, streams=range(1, 5)):
    """Scores of every pair, over several draws: (chosen, rejected), each [streams × pairs]."""
    scorer = family.scorer(model, cfg).eval()
    out = []
    with torch.no_grad():
        for stream in streams:
            seeds = draw_seeds(cfg.seed, stream, range(len(examples)))
            batch = family.collate(list(examples), cfg, frozen, draws=seeds)
            s = scorer(batch)
            out.append((s.chosen, s.rejected))
    return torch.cat([c for c, _ in out]), torch.cat([r for _, r in out])


# ---------------------------------------------------------------- training


def test_class_conditional_training_moves_model_and_saves(tmp_path):
    """Full fine-tuning of a class-conditional pixel UNet: step-1 rewards are exactly 0, training lowers the
    chosen denoising loss relative to the rejected (against the starting model), and the saved folder loads with
    DDPMPipeline.from_pretrained holding the trained weights."""
    model = pixel_pipeline(tmp_path / "pixel")
    data = write_data(tmp_path / "data", 8, captions=False)
    cfg = config(tmp_path, model, data, max_steps=25, learning_rate=2e-3, beta=200.0)
    loop = Loop(cfg)
    result = loop.run()
    first = result.history[0]
    assert first["rewards/chosen"] == 0.0 and first["rewards/rejected"] == 0.0 and first["rewards/margins"] == 0.0
    assert first["loss"] == pytest.approx(np.log(2), abs=1e-6)

    family = get_family("diffusion")
    examples, frozen = loop.train_examples, loop.processor
    start = UNet2DModel.from_pretrained(model, subfolder="unet")
    ref_c, ref_r = pair_scores(family, start, examples, frozen, cfg)
    pol_c, pol_r = pair_scores(family, loop.model, examples, frozen, cfg)
    # The DPO margin: (policy − reference) on chosen minus on rejected, averaged over pairs and draws.
    assert ((pol_c - ref_c) - (pol_r - ref_r)).mean() > 0
    assert result.history[-1]["rewards/margins"] > 0

    saved = DDPMPipeline.from_pretrained(cfg.output_dir).unet
    trained = loop.model.state_dict()
    assert set(saved.state_dict()) == set(trained)
    assert all(torch.equal(v, trained[k]) for k, v in saved.state_dict().items())
    assert not all(torch.equal(v, start.state_dict()[k]) for k, v in saved.state_dict().items())


def test_sft_is_half_the_mean_chosen_denoising_loss(tmp_path):
    """sft on scores −½·mse with chosen_len 1: the plain batch mean of ½·mse_w (preferred-FT up to the ½)."""
    mse_w, mse_l = torch.tensor([0.3, 0.9, 0.2]), torch.tensor([0.5, 0.1, 0.4])
    from dpokit.families.base import Scores

    ones = torch.ones(3)
    scores = Scores(-0.5 * mse_w, -0.5 * mse_l, ones, ones)
    batch = {"margin": torch.zeros(3), "weight": ones}
    cfg = TrainConfig(loss_type="sft", family="diffusion")
    loss, _ = objective(loss_inputs(scores, None, batch), ones, ["sft"], None, ObjectiveConfig.from_config(cfg))
    assert loss.item() == pytest.approx(0.5 * mse_w.mean().item(), abs=1e-7)


# ---------------------------------------------------------------- agreement with the Diffusion-DPO script


def script_loss(policy_dir: Path, ref_dir: Path, rows: list[dict], base: Path, seeds: list[int], beta_dpo: float):
    """One step of diffusers' examples/research_projects/diffusion_dpo/train_diffusion_dpo.py, re-implemented:
    pixels in [-1, 1] with [w; l] concatenated, VAE-encoded (the posterior mean here, where the script samples: the
    family caches a deterministic latent), × scaling_factor; the same noise for w and l; one timestep per pair;
    the text encoder's last hidden state repeated for both halves; UNet and reference UNet forwards; the loss."""
    vae = AutoencoderKL.from_pretrained(policy_dir, subfolder="vae")
    text_encoder = CLIPTextModel.from_pretrained(policy_dir, subfolder="text_encoder")
    tokenizer = CLIPTokenizer.from_pretrained(policy_dir, subfolder="tokenizer")
    unet = UNet2DConditionModel.from_pretrained(policy_dir, subfolder="unet")
    ref_unet = UNet2DConditionModel.from_pretrained(ref_dir, subfolder="unet")
    noise_scheduler = DDPMScheduler.from_pretrained(policy_dir, subfolder="scheduler")

    def pixels(key):
        arrays = [np.asarray(Image.open(base / r[key]).convert("RGB"), dtype=np.float32) / 255.0 for r in rows]
        return (torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2) - 0.5) / 0.5

    with torch.no_grad():
        feed_pixel_values = torch.cat([pixels("chosen"), pixels("rejected")])
        latents = vae.encode(feed_pixel_values).latent_dist.mean * vae.config.scaling_factor
        bsz = latents.shape[0] // 2
        draws = [draw(s, tuple(latents.shape[1:]), noise_scheduler.config.num_train_timesteps) for s in seeds]
        noise = torch.stack([d[1] for d in draws]).repeat(2, 1, 1, 1)
        timesteps = torch.stack([d[0] for d in draws]).repeat(2)
        noisy_model_input = noise_scheduler.add_noise(latents, noise, timesteps)
        ids = tokenizer([r["prompt"] for r in rows], max_length=tokenizer.model_max_length, padding="max_length",
                        truncation=True, return_tensors="pt").input_ids
        encoder_hidden_states = text_encoder(ids)[0].repeat(2, 1, 1)
        if noise_scheduler.config.prediction_type == "epsilon":
            target = noise
        else:
            target = noise_scheduler.get_velocity(latents, noise, timesteps)
        model_pred = unet(noisy_model_input, timesteps, encoder_hidden_states).sample
        model_losses = F.mse_loss(model_pred.float(), target.float(), reduction="none")
        model_losses = model_losses.mean(dim=list(range(1, len(model_losses.shape))))
        model_losses_w, model_losses_l = model_losses.chunk(2)
        model_diff = model_losses_w - model_losses_l
        ref_preds = ref_unet(noisy_model_input, timesteps, encoder_hidden_states).sample
        ref_loss = F.mse_loss(ref_preds.float(), target.float(), reduction="none")
        ref_loss = ref_loss.mean(dim=list(range(1, len(ref_loss.shape))))
        ref_losses_w, ref_losses_l = ref_loss.chunk(2)
        ref_diff = ref_losses_w - ref_losses_l
        inside_term = -0.5 * beta_dpo * (model_diff - ref_diff)
        assert bsz == len(rows)
        return {"loss": -F.logsigmoid(inside_term).mean().item(),
                "raw_model_loss": (0.5 * (model_losses_w.mean() + model_losses_l.mean())).item(),
                "ref_loss": ref_loss.mean().item(),
                "implicit_acc": ((inside_term > 0).sum().float() / inside_term.size(0)).item()}


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_first_step_loss_equals_diffusion_dpo_script(tmp_path, prediction_type):
    """The loop's logged first-step loss (sigmoid, beta) equals the script's (beta_dpo) on the same pipeline,
    pairs and draws, with a reference UNet of other weights so the loss is not log 2 by construction."""
    policy = sd_pipeline(tmp_path / "sd", unet_seed=0, prediction_type=prediction_type)
    ref = sd_pipeline(tmp_path / "sd-ref", unet_seed=1, prediction_type=prediction_type)
    data = write_data(tmp_path / "data", 4, captions=True)
    cfg = config(tmp_path, policy, data, ref_model=str(ref), beta=100.0)
    result = Loop(cfg).run()
    rows = [json.loads(line) for line in data.read_text().splitlines()]
    # The first step's batch is every pair; pair i draws with seed draw_seeds(seed, epoch + 1, [i]).
    expected = script_loss(policy, ref, rows, data.parent, draw_seeds(cfg.seed, 1, range(4)), 100.0)
    assert abs(expected["loss"] - np.log(2)) > 1e-3  # the comparison means something
    # the loss, and the script's own metrics under its names
    for key, value in expected.items():
        assert result.history[0][key] == pytest.approx(value, abs=1e-5), key


# ---------------------------------------------------------------- LoRA, saving and the encodings cache


def test_sd_lora_reference_is_adapters_off_and_saved_lora_loads(tmp_path):
    model = sd_pipeline(tmp_path / "sd")
    data = write_data(tmp_path / "data", 4, captions=True)
    cfg = config(tmp_path, model, data, lora={"r": 4, "lora_alpha": 8}, learning_rate=5e-2, max_steps=3)
    loop = Loop(cfg)
    loop.run()
    family, examples, frozen = get_family("diffusion"), loop.train_examples, loop.processor
    batch = family.collate(list(examples), cfg, frozen, draws=draw_seeds(cfg.seed, 7, range(len(examples))))
    base = UNet2DConditionModel.from_pretrained(model, subfolder="unet")
    with torch.no_grad():
        base_scores = family.scorer(base, cfg)(batch)
        policy_scores = family.scorer(loop.model, cfg).eval()(batch)
    ref_c, ref_r = loop.reference.scores(batch)
    assert torch.allclose(ref_c, base_scores.chosen, atol=1e-6)
    assert torch.allclose(ref_r, base_scores.rejected, atol=1e-6)
    assert not torch.allclose(policy_scores.chosen, base_scores.chosen, atol=1e-4)  # the adapters moved

    assert (Path(cfg.output_dir) / "pytorch_lora_weights.safetensors").is_file()
    pipe = StableDiffusionPipeline.from_pretrained(model)
    pipe.load_lora_weights(cfg.output_dir)
    with torch.no_grad():
        loaded = family.scorer(pipe.unet, cfg).eval()(batch)
    assert torch.allclose(loaded.chosen, policy_scores.chosen, atol=1e-5)
    assert torch.allclose(loaded.rejected, policy_scores.rejected, atol=1e-5)


def test_pixel_lora_reference_and_adapter_folder(tmp_path):
    """A UNet2DModel takes LoRA through peft: the reference is the base (peft's disable_adapter), the save is
    peft's adapter folder."""
    from peft import PeftModel

    model = pixel_pipeline(tmp_path / "pixel")
    data = write_data(tmp_path / "data", 4, captions=False)
    cfg = config(tmp_path, model, data, lora={"r": 4}, learning_rate=5e-2, max_steps=2)
    loop = Loop(cfg)
    loop.run()
    family, examples = get_family("diffusion"), loop.train_examples
    batch = family.collate(list(examples), cfg, loop.processor, draws=draw_seeds(cfg.seed, 7, range(4)))
    with torch.no_grad():
        base = family.scorer(UNet2DModel.from_pretrained(model, subfolder="unet"), cfg)(batch)
        policy = family.scorer(loop.model, cfg).eval()(batch)
    ref_c, _ = loop.reference.scores(batch)
    assert torch.allclose(ref_c, base.chosen, atol=1e-6)
    assert not torch.allclose(policy.chosen, base.chosen, atol=1e-4)
    loaded = PeftModel.from_pretrained(UNet2DModel.from_pretrained(model, subfolder="unet"), cfg.output_dir)
    with torch.no_grad():
        again = family.scorer(loaded, cfg).eval()(batch)
    assert torch.allclose(again.chosen, policy.chosen, atol=1e-5)


def test_full_sd_save_loads_and_encodings_are_cached(tmp_path, monkeypatch):
    """Full fine-tuning saves a StableDiffusionPipeline folder with the trained UNet; a second run on the same
    data reads latents and text embeddings from the cache: the VAE is not called again."""
    calls = []
    encode = AutoencoderKL.encode
    def counted(self, x, *args, **kwargs):
        calls.append(len(x))
        return encode(self, x, *args, **kwargs)

    monkeypatch.setattr(AutoencoderKL, "encode", counted)
    model = sd_pipeline(tmp_path / "sd")
    data = write_data(tmp_path / "data", 4, captions=True)
    cfg = config(tmp_path, model, data, max_steps=2, learning_rate=1e-2)
    loop = Loop(cfg)
    loop.run()
    assert sum(calls) == 8  # 4 pairs, two images each
    assert len(list((tmp_path / "cache" / "diffusion").glob("*.safetensors"))) == 1

    saved = StableDiffusionPipeline.from_pretrained(cfg.output_dir).unet.state_dict()
    trained = loop.model.state_dict()
    assert set(saved) == set(trained) and all(torch.equal(v, trained[k]) for k, v in saved.items())
    start = UNet2DConditionModel.from_pretrained(model, subfolder="unet").state_dict()
    assert not all(torch.equal(v, start[k]) for k, v in saved.items())

    calls.clear()
    again = Loop(config(tmp_path, model, data, output_dir=str(tmp_path / "out2")))
    assert calls == []
    fam = get_family("diffusion")
    assert fam.fingerprint(again.train_examples) == fam.fingerprint(loop.train_examples)
    (tmp_path / "data" / "img" / "0w.png").write_bytes(png(image(99, True)))  # new pixels: a new key, encoded anew
    Loop(config(tmp_path, model, data, output_dir=str(tmp_path / "out3")))
    assert sum(calls) == 8


# ---------------------------------------------------------------- data


def test_pick_a_pic_rows(tmp_path, caplog):
    """label_0 = 1: jpg_0 preferred; 0: jpg_1; 0.5: dropped and counted. Bytes, {"bytes", "path"} and PIL values."""
    model = sd_pipeline(tmp_path / "sd")
    family = get_family("diffusion")
    cfg = config(tmp_path, model, tmp_path / "unused.jsonl", cache_encodings=False)
    frozen = family.load_processor(str(model), cfg)
    a, b = image(1, True), image(2, False)
    pick = [{"caption": "a cat", "jpg_0": png(a), "jpg_1": {"bytes": png(b), "path": None}, "label_0": 1},
            {"caption": "a cat", "jpg_0": png(a), "jpg_1": png(b), "label_0": 0.5},
            {"caption": "a cat", "jpg_0": a, "jpg_1": png(b), "label_0": 0}]
    plain = [{"prompt": "a cat", "chosen": png(a), "rejected": png(b)}]
    with caplog.at_level(logging.WARNING):
        got = family.examples(pick, frozen, cfg)
    assert "dropped 1 tied pair" in caplog.text
    want = family.examples(plain, frozen, cfg)[0]
    assert len(got) == 2
    assert torch.equal(got[0].chosen, want.chosen) and torch.equal(got[0].rejected, want.rejected)
    assert torch.equal(got[1].chosen, want.rejected) and torch.equal(got[1].rejected, want.chosen)
    assert torch.equal(got[0].text, want.text)


@pytest.mark.parametrize("case, problem", [
    ("missing", "not found"),
    ("unreadable", "unreadable image"),
    ("sizes", "same size"),
    ("label", "label_0 must be 0, 0.5 or 1"),
    ("grayscale", "image mode 'L'"),
    ("class", "unknown class id 7"),
])
def test_bad_input_is_one_line_naming_file_and_row(tmp_path, case, problem):
    model = pixel_pipeline(tmp_path / "pixel")
    family = get_family("diffusion")
    folder = tmp_path / "data"
    folder.mkdir()
    image(0, True).save(folder / "w.png")
    image(1, False).save(folder / "l.png")
    image(2, False, size=10).save(folder / "big.png")
    image(3, False, mode="L").save(folder / "gray.png")
    (folder / "bad.png").write_bytes(b"not an image")
    good = {"class": 0, "chosen": "w.png", "rejected": "l.png"}
    bad = {"missing": {**good, "rejected": "nope.png"}, "unreadable": {**good, "chosen": "bad.png"},
           "sizes": {**good, "rejected": "big.png"}, "grayscale": {**good, "rejected": "gray.png"},
           "class": {**good, "class": 7},
           "label": {"class": 1, "jpg_0": "w.png", "jpg_1": "l.png", "label_0": 0.3}}[case]
    path = folder / "pairs.jsonl"
    path.write_text(json.dumps(good) + "\n" + json.dumps(bad) + "\n")
    cfg = config(tmp_path, model, path)
    frozen = family.load_processor(str(model), cfg)
    with pytest.raises(DataError) as err:
        family.examples(str(path), frozen, cfg)
    message = str(err.value)
    assert "\n" not in message and message.startswith(f"{path}, row 2: ") and problem in message


def test_grayscale_converted_for_one_channel_model(tmp_path):
    gray_pipeline(tmp_path / "gray")
    family = get_family("diffusion")
    cfg = config(tmp_path, tmp_path / "gray", tmp_path / "unused.jsonl")
    frozen = family.load_processor(str(tmp_path / "gray"), cfg)
    rows = [{"chosen": image(0, True, size=16), "rejected": image(1, False, size=16, mode="L")}]
    (ex,) = family.examples(rows, frozen, cfg)
    assert ex.chosen.shape == (1, 8, 8) and ex.chosen.min() >= -1 and ex.chosen.max() <= 1
    assert ex.chosen.mean() > ex.rejected.mean()  # bright chosen stays brighter after conversion and resizing


# ---------------------------------------------------------------- unpaired rows (KTO)


def write_unpaired(folder: Path, n: int, image_key: str = "image") -> Path:
    """JSON Lines of labelled images: even rows bright and liked, odd rows dark and disliked."""
    (folder / "img").mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(n):
        liked = i % 2 == 0
        image(i, liked).save(folder / "img" / f"{i}.png")
        rows.append({"class": i % N_CLASSES, image_key: f"img/{i}.png", "label": liked})
    path = folder / "unpaired.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_kto_on_unpaired_images_lowers_liked_error_and_raises_disliked(tmp_path):
    """`loss_type: kto` on {class, image, label} rows: step 1 (policy = reference) costs ½ per row; after training
    the policy denoises liked images better than the reference does and disliked ones worse, over fresh draws."""
    model = pixel_pipeline(tmp_path / "pixel")
    cfg = config(tmp_path, model, write_unpaired(tmp_path / "data", 8), loss_type="kto", max_steps=25,
                 learning_rate=2e-3, beta=200.0)
    loop = Loop(cfg)
    result = loop.run()
    first = result.history[0]
    assert first["loss"] == pytest.approx(0.5, abs=1e-6) and first["rewards/chosen"] == 0.0 and first["kl"] == 0.0
    assert "rewards/accuracies" not in first and "implicit_acc" not in first  # nothing is paired

    family, examples = get_family("diffusion"), loop.train_examples
    start = UNet2DModel.from_pretrained(model, subfolder="unet")
    ref, _ = pair_scores(family, start, examples, loop.processor, cfg)
    policy, _ = pair_scores(family, loop.model, examples, loop.processor, cfg)
    liked = torch.tensor([ex.label for ex in examples]).repeat(len(policy) // len(examples))
    gain = policy - ref  # −½·(mse_policy − mse_ref): > 0 where the policy denoises better than the reference
    assert gain[liked].mean() > 0 > gain[~liked].mean()


def test_unpaired_rows_take_a_mismatched_image_under_their_own_condition(tmp_path):
    """'completion' (TRL's name) reads as 'image' does; labels as true/false or 1/0 (CSV text too); each row's
    rejected image is the previous row's with another condition, shared, not encoded twice."""
    model = sd_pipeline(tmp_path / "sd")
    family = get_family("diffusion")
    cfg = config(tmp_path, model, tmp_path / "unused.jsonl", cache_encodings=False)
    frozen = family.load_processor(str(model), cfg)
    imgs = [image(i, i % 2 == 0) for i in range(4)]
    captions = ["a cat", "a cat", "a dog", "sky"]
    rows = [{"prompt": c, "completion": png(img), "label": label}
            for c, img, label in zip(captions, imgs, [True, 0, 1, False])]
    got = family.examples(rows, frozen, cfg)
    plain = family.examples([{"prompt": c, "image": png(img), "label": True} for c, img in zip(captions, imgs)],
                            frozen, cfg)
    assert [ex.label for ex in got] == [True, False, True, False]
    assert all(torch.equal(a.chosen, b.chosen) and torch.equal(a.rejected, b.rejected) for a, b in zip(got, plain))
    # row 0 takes row 3's image (cyclically); row 1 skips row 0 (same caption) for row 3; rows 2, 3 their previous
    mismatch = [next(j for j, other in enumerate(got) if torch.equal(ex.rejected, other.chosen)) for ex in got]
    assert mismatch == [3, 3, 1, 2]
    assert torch.equal(got[1].text, got[0].text) and not torch.equal(got[2].text, got[0].text)
    with pytest.raises(DataError, match="at least 2 rows"):  # a row's KL term needs another row's image
        family.examples(rows[:1], frozen, cfg)

    folder = tmp_path / "csv"
    folder.mkdir()
    for i, img in enumerate(imgs[:2]):
        img.save(folder / f"{i}.png")
    (folder / "rows.csv").write_text("prompt,image,label\na cat,0.png,1\nsky,1.png,false\n")
    assert [ex.label for ex in family.examples(str(folder / "rows.csv"), frozen, cfg)] == [True, False]


@pytest.mark.parametrize("row, problem", [
    ({"class": 1, "image": "w.png", "label": "maybe"}, "field 'label' must be true"),
    ({"class": 1, "image": "w.png", "label": 2}, "field 'label' must be true"),
    ({"class": 1, "image": "w.png"}, "missing field 'label'"),
    ({"class": 1, "label": False}, "no image: an unpaired row needs 'image'"),
    ({"class": 1, "image": "nope.png", "label": False}, "not found"),
    ({"class": 1, "chosen": "w.png", "rejected": "w.png"}, "mixed in one file"),
    ({"class": 1, "image": "w.png", "chosen": "w.png", "label": True}, "not both"),
])
def test_bad_unpaired_rows_are_one_line(tmp_path, row, problem):
    model = pixel_pipeline(tmp_path / "pixel")
    family = get_family("diffusion")
    image(0, True).save(tmp_path / "w.png")
    path = tmp_path / "rows.jsonl"
    path.write_text(json.dumps({"class": 0, "image": "w.png", "label": True}) + "\n" + json.dumps(row) + "\n")
    cfg = config(tmp_path, model, path)
    with pytest.raises(DataError) as err:
        family.examples(str(path), family.load_processor(str(model), cfg), cfg)
    message = str(err.value)
    assert "\n" not in message and message.startswith(f"{path}, row 2: ") and problem in message


def test_cli_bad_label_exits_2_naming_the_row(tmp_path, capsys):
    import yaml

    from dpokit.cli import main

    model = pixel_pipeline(tmp_path / "pixel")
    data = write_unpaired(tmp_path / "data", 3)
    lines = data.read_text().splitlines()
    lines[2] = json.dumps({**json.loads(lines[2]), "label": "yes please"})
    data.write_text("\n".join(lines) + "\n")
    path = tmp_path / "kto.yaml"
    path.write_text(yaml.safe_dump({**config(tmp_path, model, data).to_dict(), "loss_type": "kto"}))
    assert main(["train", str(path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"{data}, row 3: field 'label' must be true" in err[0] and "'yes please'" in err[0]
    assert not (tmp_path / "out" / "unet").exists()
