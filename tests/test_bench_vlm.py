"""`dpokit bench --family vlm`: the synthetic image pairs and the LLaVA are what the bench says; an end-to-end run
(slow) runs both trainers and prints the table."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from dpokit.bench_vlm import (VLMSettings, build_processor, compare, format_table, image_tokens, llava_config,
                              measure, write_pairs)


def test_default_shape_has_196_image_tokens():
    """224-px images in 16-px patches: 196 patch features (the class token dropped) per image, read from the config
    without building the weights."""
    s = VLMSettings()
    processor = build_processor(s)
    config = llava_config(s, processor.tokenizer)
    assert image_tokens(config) >= 196
    assert config.vision_config.image_size == 224 and config.vision_config.num_hidden_layers >= 2


def test_pairs_exist_and_fit(tmp_path):
    s = VLMSettings(image_size=64, max_length=128)  # 16 image tokens: the processor's count, checked below
    processor = build_processor(s)
    data = write_pairs(tmp_path, 6, s.image_size, processor.tokenizer.eos_token, seed=0)
    rows = [json.loads(line) for line in data.read_text().splitlines()]
    assert len(rows) == 6
    for row in rows:
        assert len(row["images"]) == 1 and Path(row["images"][0]).is_file()
        assert row["prompt"].startswith("<image>") and row["chosen"] != row["rejected"]
        assert row["chosen"].endswith(processor.tokenizer.eos_token)
    n_img = image_tokens(llava_config(s, processor.tokenizer))
    assert n_img == 16
    for p, c, r in measure(data, processor):
        assert p > n_img and c > 1 and r > 1  # the image tokens are in the prompt, and text beside them
        assert p + max(c, r) <= s.max_length


@pytest.mark.slow
def test_bench_end_to_end():
    s = VLMSettings(pairs=2, batch_size=2, image_size=32, vision_layers=1, threads=1)
    result = compare(s, repeats=1, say=lambda m: None)
    for kind in ("trl", "dpokit"):
        assert result[kind]["pairs_per_s"] > 0 and result[kind]["peak_rss_mb"] > 0
        assert result[kind]["steps"] == 1
    assert result["info"]["image_tokens"] == 4
    table = format_table(result)
    assert "| trl |" in table and "| dpokit |" in table and "dpokit / TRL" in table
    print(table)
