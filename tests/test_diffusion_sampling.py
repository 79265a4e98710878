"""Sampling images from the diffusion family and `dpokit sample`: tiny pixel-space and Stable Diffusion pipelines
built by test_diffusion_family's helpers, nothing downloaded."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("diffusers")
from diffusers import UNet2DModel  # noqa: E402
from PIL import Image  # noqa: E402
from test_diffusion_family import config, gray_pipeline, pixel_pipeline, sd_pipeline, write_data  # noqa: E402

from dpokit.cli import main  # noqa: E402
from dpokit.errors import DpokitError  # noqa: E402
from dpokit.families import get_family  # noqa: E402
from dpokit.train import Loop  # noqa: E402

STEPS = 4


def pixels(images: list[list[Image.Image]]) -> np.ndarray:
    return np.stack([np.asarray(img) for row in images for img in row])


@pytest.fixture(scope="module")
def pixel_run(tmp_path_factory):
    """A class-conditional pixel UNet, fully fine-tuned a few steps: (run dir, starting pipeline)."""
    tmp = tmp_path_factory.mktemp("pixel")
    model = pixel_pipeline(tmp / "pixel")
    cfg = config(tmp, model, write_data(tmp / "data", 4, captions=False), max_steps=4, learning_rate=2e-2)
    Loop(cfg).run()
    return Path(cfg.output_dir), model


def test_same_seed_same_images_other_seed_other_images(pixel_run):
    family = get_family("diffusion")
    unet, frozen = family.load_trained(str(pixel_run[0]))

    def draw(seed, **kw):
        return family.sample(unet, frozen, [0, "2"], num_generations=2, num_inference_steps=STEPS, seed=seed, **kw)

    first = draw(0)
    assert [len(row) for row in first] == [2, 2] and first[0][0].size == (8, 8) and first[0][0].mode == "RGB"
    assert np.array_equal(pixels(first), pixels(draw(0)))
    one_by_one = pixels(draw(0, batch_size=1)).astype(int)  # the same noise: equal up to batched arithmetic
    assert np.abs(one_by_one - pixels(first)).max() <= 1
    assert not np.array_equal(pixels(first), pixels(draw(1)))
    assert not np.array_equal(np.asarray(first[0][0]), np.asarray(first[0][1]))  # two samples of one prompt differ
    assert not unet.training and not any(p.requires_grad for p in unet.parameters())


def test_bad_prompts_and_settings_are_one_line(pixel_run):
    family = get_family("diffusion")
    unet, frozen = family.load_trained(str(pixel_run[0]))
    for prompts, settings, problem in [([7], {}, "prompt 1: .*unknown class id 7"),
                                       (["a cat"], {}, "integer class id"),
                                       ([0], {"max_new_tokens": 5}, "takes no max_new_tokens")]:
        with pytest.raises(DpokitError, match=problem):
            family.sample(unet, frozen, prompts, **settings)


def test_cli_writes_images_and_grid_and_base_is_the_starting_model(pixel_run, tmp_path, capsys):
    run, start = pixel_run
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": c}) + "\n" for c in (0, 1)))
    args = ["sample", str(run), "--prompts", str(prompts), "2", "--num", "3", "--steps", str(STEPS), "--seed", "5"]
    assert main([*args, "--out", str(tmp_path / "run")]) == 0
    assert main([*args, "--out", str(tmp_path / "base"), "--base"]) == 0
    assert "grid.png" in capsys.readouterr().out

    names = {f"{i}-{k}.png" for i in range(3) for k in range(3)} | {"grid.png", "prompts.json"}
    assert {p.name for p in (tmp_path / "run").iterdir()} == names
    grid = Image.open(tmp_path / "run" / "grid.png")
    assert grid.size == (3 * 8, 3 * 8)  # columns = samples, rows = prompts, 8×8 images
    cell = Image.open(tmp_path / "run" / "2-1.png")
    assert np.array_equal(np.asarray(grid.crop((8, 16, 16, 24))), np.asarray(cell))

    family = get_family("diffusion")
    unet = UNet2DModel.from_pretrained(start, subfolder="unet").eval()
    direct = family.sample(unet, family.load_processor(str(start), None), [0, 1, 2], num_generations=3,
                           num_inference_steps=STEPS, seed=5)
    base = [[Image.open(tmp_path / "base" / f"{i}-{k}.png") for k in range(3)] for i in range(3)]
    trained = [[Image.open(tmp_path / "run" / f"{i}-{k}.png") for k in range(3)] for i in range(3)]
    assert np.array_equal(pixels(base), pixels(direct))
    assert not np.array_equal(pixels(base), pixels(trained))


def test_sd_lora_run_loads_back_and_samples(tmp_path):
    model = sd_pipeline(tmp_path / "sd")
    cfg = config(tmp_path, model, write_data(tmp_path / "data", 4, captions=True), lora={"r": 4, "lora_alpha": 8},
                 learning_rate=5e-2, max_steps=2)
    loop = Loop(cfg)
    loop.run()
    family = get_family("diffusion")
    unet, frozen = family.load_trained(cfg.output_dir)  # the base from the run's config.yaml, LoRA on it
    x, text = torch.randn(2, 4, 4, 4, generator=torch.Generator().manual_seed(0)), torch.randn(2, 12, 16)
    with torch.no_grad():  # the loaded UNet computes as the trained one
        assert torch.allclose(unet(x, 50, text).sample, loop.model.eval()(x, 50, text).sample, atol=1e-5)

    def draw(seed):
        return family.sample(unet, frozen, ["a red cat", "sky"], num_generations=2, seed=seed,
                             num_inference_steps=STEPS, guidance_scale=3.0)

    first = draw(0)
    assert [len(row) for row in first] == [2, 2] and first[1][1].size == (8, 8)
    assert np.array_equal(pixels(first), pixels(draw(0)))
    out = tmp_path / "samples"
    assert main(["sample", cfg.output_dir, "--prompts", "a red cat", "sky", "--num", "2", "--steps", str(STEPS),
                 "--guidance", "3", "--out", str(out)]) == 0
    assert np.array_equal(pixels([[Image.open(out / f"{i}-{k}.png") for k in range(2)] for i in range(2)]),
                          pixels(first))
    base_unet, base_frozen = family.load_trained(str(model), cfg)
    base = family.sample(base_unet, base_frozen, ["a red cat", "sky"], num_generations=2, seed=0,
                         num_inference_steps=STEPS, guidance_scale=3.0)
    assert not np.array_equal(pixels(first), pixels(base))


def test_pixel_lora_run_loads_back_for_sampling_and_eval(tmp_path, capsys):
    """A peft adapter folder goes on the run's starting UNet; `dpokit eval` scores it through the same load."""
    model = pixel_pipeline(tmp_path / "pixel")
    data = write_data(tmp_path / "data", 4, captions=False)
    cfg = config(tmp_path, model, data, lora={"r": 4}, learning_rate=5e-2, max_steps=2)
    loop = Loop(cfg)
    loop.run()
    family = get_family("diffusion")
    unet, frozen = family.load_trained(cfg.output_dir)
    x, t = torch.randn(2, 3, 8, 8), torch.tensor([10, 60])
    with torch.no_grad():
        assert torch.allclose(unet(x, t, class_labels=torch.tensor([0, 2])).sample,
                              loop.model.eval()(x, t, class_labels=torch.tensor([0, 2])).sample, atol=1e-5)
    assert len(family.sample(unet, frozen, [1], num_generations=2, num_inference_steps=STEPS)[0]) == 2
    assert main(["eval", cfg.output_dir, "--data", str(data), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["preference"]["pairs"] == 4


def test_unconditional_model_samples_without_prompts(tmp_path):
    gray_pipeline(tmp_path / "gray")
    family = get_family("diffusion")
    unet, frozen = family.load_trained(str(tmp_path / "gray"))  # a pipeline folder: no run config needed
    (row,) = family.sample(unet, frozen, [None], num_generations=2, num_inference_steps=STEPS)
    assert [img.mode for img in row] == ["L", "L"] and row[0].size == (8, 8)
    with pytest.raises(DpokitError, match="unconditional model takes no prompt"):
        family.sample(unet, frozen, ["a cat"])


def test_write_images_refuses_what_is_not_an_image(tmp_path):
    from dpokit.images import write_images

    with pytest.raises(DpokitError, match="samples are str, not images"):
        write_images(["a reply"], tmp_path)
    with pytest.raises(DpokitError, match="different sizes"):
        write_images([[Image.new("RGB", (8, 8)), Image.new("RGB", (4, 4))]], tmp_path)
    assert not list(tmp_path.iterdir())


def test_missing_run_is_one_line_exit_2(tmp_path, capsys):
    assert main(["sample", str(tmp_path / "nope"), "--prompts", "0", "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "not a dpokit run directory" in err[0]
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------- sample grids in report.html


def data_uris(page: str) -> list[bytes]:
    import base64
    import re

    return [base64.b64decode(m) for m in re.findall(r'<img src="data:image/png;base64,([^"]+)"', page)]


def train_yaml(tmp_path: Path, model: Path, data: Path, **own) -> Path:
    """A config file for `dpokit train`, with the family's own keys beside the shared ones."""
    import yaml

    path = tmp_path / "run.yaml"
    cfg = config(tmp_path, model, data, max_steps=2, learning_rate=2e-2)
    path.write_text(yaml.safe_dump({**cfg.to_dict(), **own}))
    return path


def test_train_with_sample_prompts_puts_base_and_trained_grids_in_the_report(tmp_path, capsys):
    """After `dpokit train` with sample_prompts: samples/{base,trained}/grid.png on the same seeds, embedded in
    report.html side by side (base first) with the prompts; the base grid is what `dpokit sample RUN --base`
    draws, and training changed the trained one."""
    model = pixel_pipeline(tmp_path / "pixel")
    path = train_yaml(tmp_path, model, write_data(tmp_path / "data", 4, captions=False), sample_prompts=[0, 2],
                      sample_num=2)
    assert main(["train", str(path)]) == 0
    assert "sample grids of the base and the trained model" in capsys.readouterr().out
    run = tmp_path / "out"
    grids = [run / "samples" / name / "grid.png" for name in ("base", "trained")]
    page = (run / "report.html").read_text()
    assert "<h2>Samples</h2>" in page and data_uris(page) == [g.read_bytes() for g in grids]
    assert page.index('data-name="base"') < page.index('data-name="trained"')
    assert "<span>0</span><span>2</span>" in page  # each grid's rows named by their prompts
    assert Image.open(grids[0]).size == (2 * 8, 2 * 8)

    assert main(["sample", str(run), "--base", "--prompts", "0", "2", "--num", "2", "--out", str(tmp_path / "b")]) == 0
    assert np.array_equal(np.asarray(Image.open(tmp_path / "b" / "grid.png")), np.asarray(Image.open(grids[0])))
    assert not np.array_equal(np.asarray(Image.open(grids[0])), np.asarray(Image.open(grids[1])))


def test_no_sample_prompts_no_samples_until_dpokit_sample_writes_them(tmp_path, capsys):
    """Without sample_prompts training draws nothing and the report has no Samples; `dpokit sample RUN` with no
    --out writes RUN/samples/trained, which `dpokit report RUN` then shows."""
    model = pixel_pipeline(tmp_path / "pixel")
    assert main(["train", str(train_yaml(tmp_path, model, write_data(tmp_path / "data", 4, captions=False)))]) == 0
    run = tmp_path / "out"
    assert not (run / "samples").exists() and "Samples" not in (run / "report.html").read_text()
    assert main(["sample", str(run), "--prompts", "1", "--num", "2", "--steps", str(STEPS)]) == 0
    assert "dpokit report" in capsys.readouterr().out
    assert (run / "samples" / "trained" / "grid.png").is_file()
    assert main(["report", str(run)]) == 0
    page = (run / "report.html").read_text()
    assert data_uris(page) == [(run / "samples" / "trained" / "grid.png").read_bytes()]


@pytest.mark.parametrize("value, problem", [([7], "sample_prompts: prompt 1: .*unknown class id 7"),
                                            (["a cat"], "sample_prompts: .*integer class id"),
                                            ("0", "sample_prompts must be a non-empty list")])
def test_bad_sample_prompts_fail_before_training(tmp_path, capsys, value, problem):
    import re

    model = pixel_pipeline(tmp_path / "pixel")
    path = train_yaml(tmp_path, model, write_data(tmp_path / "data", 2, captions=False), sample_prompts=value)
    assert main(["train", str(path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and re.search(problem, err[0])
    assert not (tmp_path / "out" / "metrics.jsonl").exists()
