"""Rows of TRL's vision layout given to a text-only model (`family: causal_lm`): one line naming file, row and
problem, exit 2, for standard rows with an `images`/`image` field and for conversational rows with image parts."""

import json

import pytest

from dpokit.cli import main
from dpokit.data import RowProblem, row_to_item

GOOD = {"prompt": "What is 2+2?", "chosen": " It is 4.", "rejected": " It is 5."}
CHAT = {"prompt": [{"role": "user", "content": "What is 2+2?"}],
        "chosen": [{"role": "assistant", "content": "It is 4."}],
        "rejected": [{"role": "assistant", "content": "It is 5."}]}
IMAGE_CHAT = {"prompt": [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is it?"}]}],
              "chosen": [{"role": "assistant", "content": [{"type": "text", "text": "A square."}]}],
              "rejected": [{"role": "assistant", "content": [{"type": "text", "text": "A dog."}]}],
              "images": ["square.png"]}

CASES = {
    "standard row with images": ([GOOD, {**GOOD, "prompt": "<image>What is it?", "images": ["a.png"]}], 2,
                                 "field 'images' holds images"),
    "standard row with one image": ([GOOD, GOOD, {**GOOD, "image": "a.png"}], 3, "field 'image' holds images"),
    "conversational row with image parts": ([CHAT, IMAGE_CHAT], 2, "field 'images' holds images"),
    "image parts without an images field": ([CHAT, {k: v for k, v in IMAGE_CHAT.items() if k != "images"}], 2,
                                            "field 'prompt' holds images (message 0 has an image part)"),
}


def train(tmp_path, model_dir, rows, capsys, **extra):
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = {"model": str(model_dir), "train_data": str(data), "output_dir": str(tmp_path / "out"),
           "family": "causal_lm", "max_steps": 1, **extra}
    path = tmp_path / "cfg.yaml"
    path.write_text("".join(f"{k}: {json.dumps(v)}\n" for k, v in cfg.items()))
    status = main(["train", str(path)])
    err = capsys.readouterr().err
    return status, [line for line in err.splitlines() if line.strip()], err, data


@pytest.mark.parametrize("case", list(CASES))
def test_text_only_model_refuses_rows_with_images(case, tmp_path, tiny_model_dir, capsys):
    rows, row, problem = CASES[case]
    status, lines, err, data = train(tmp_path, tiny_model_dir, rows, capsys)
    assert status == 2
    assert "Traceback" not in err
    assert err.count("dpokit: error") == 1
    line = lines[-1]
    assert line.startswith("dpokit: error: ")
    for part in (str(data), f"row {row}", problem, "a text-only model cannot read them",
                 "use family: vlm with an image-text-to-text model"):
        assert part in line, (part, line)


def test_empty_images_list_is_text(tmp_path, tiny_model_dir, capsys):
    """`images: []` (a text row of a mixed vision data set) holds no image: the row is text."""
    status, _, err, _ = train(tmp_path, tiny_model_dir, [{**GOOD, "images": []}, GOOD], capsys,
                              per_device_train_batch_size=2)
    assert status == 0, err


@pytest.mark.parametrize("row", [{**GOOD, "images": ["a.png"]}, IMAGE_CHAT,
                                 {"prompt": GOOD["prompt"], "completion": " It is 4.", "label": True, "image": "a.png"},
                                 {**GOOD, "rejected": [" It is 5.", " Six."], "images": ["a.png"]}])
def test_every_row_kind_refuses_images(row):
    with pytest.raises(RowProblem, match="holds images: a text-only model cannot read them"):
        row_to_item(row)


def test_vlm_rows_do_not_go_through_the_text_checks():
    """The vlm family reads its rows with its own code (families/vlm/data.py), which never calls the text row
    checks, so the refusal above cannot reach it."""
    import inspect

    from dpokit.families.vlm import data as vlm_data

    source = inspect.getsource(vlm_data)
    for name in ("row_to_item", "row_to_pair", "text_field", "load_examples(source, tokenizer"):
        assert name not in source
