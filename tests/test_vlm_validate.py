"""`dpokit data validate FILE --family vlm --model M`: every image row through the vlm family's own loader, so each
problem is one training would raise (with its row), token lengths count the image tokens, and truncation by
max_length is counted; without --model, one line."""

from __future__ import annotations

import json

import pytest

from dpokit.cli import main
from dpokit.families.vlm.tiny import build_llava
from test_vlm_sample import image_dir  # noqa: F401 - the shared fixture

IMAGE_TOKENS = 16  # build_llava's 16-px images in 4-px patches


@pytest.fixture(scope="module")
def llava(tmp_path_factory):
    return build_llava(tmp_path_factory.mktemp("llava") / "model", ["What is it? A red square. A blue circle."])


def _rows(path, rows) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


GOOD = {"prompt": "<image>What is it?", "chosen": " A red square.", "rejected": " A blue circle.", "images": ["0.png"]}


def test_image_rows_are_checked_by_the_family(image_dir, llava, capsys):
    data = _rows(image_dir / "validate.jsonl", [
        GOOD,
        {**GOOD, "images": ["missing.png"]},  # row 2: no such image
        {**GOOD, "images": ["0.png", "1.png"]},  # row 3: one placeholder, two images
        {**GOOD, "rejected": GOOD["chosen"]},  # row 4: identical replies
        {"prompt": [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What?"}]}],
         "chosen": [{"role": "assistant", "content": "A red square."}],
         "rejected": [{"role": "assistant", "content": "A blue circle."}], "images": ["1.png"]},
    ])
    rc = main(["data", "validate", data, "--family", "vlm", "--model", str(llava), "--json"])
    out, err = capsys.readouterr()
    assert rc == 2 and "3 of 5 rows have problems" in err
    report = json.loads(out)
    assert report["rows"] == 5 and report["usable"] == 2
    rows_of = {problem: rows for problem, rows in report["problems"].items()}
    assert sorted(r for rows in rows_of.values() for r in rows) == [2, 3, 4]
    assert any("missing.png" in p for p in rows_of if rows_of[p] == [2])
    assert any("placeholder" in p for p in rows_of if rows_of[p] == [3])
    assert report["identical"] == 1
    # the prompt's token count holds the image's tokens, which a text validator could not know
    assert report["tokens"]["prompt"]["min"] > IMAGE_TOKENS


def test_truncation_is_counted_and_a_clean_file_passes(image_dir, llava, capsys):
    data = _rows(image_dir / "clean.jsonl", [GOOD, {**GOOD, "chosen": " A red square. " * 8}])
    rc = main(["data", "validate", data, "--family", "vlm", "--model", str(llava), "--json"])
    report = json.loads(capsys.readouterr().out)
    assert rc in (0, None) and report["usable"] == 2 and report["truncated_completion"] == 0
    main(["data", "validate", data, "--family", "vlm", "--model", str(llava), "--json", "--max-length",
          str(IMAGE_TOKENS + 12)])
    report = json.loads(capsys.readouterr().out)
    assert report["usable"] == 2 and report["truncated_completion"] == 1  # the long reply is cut, the short one not


def test_one_line_without_a_model(image_dir, capsys):
    data = _rows(image_dir / "one.jsonl", [GOOD])
    assert main(["data", "validate", data, "--family", "vlm"]) == 2
    assert "needs --model" in capsys.readouterr().err
    # the text validator points image rows at the vlm family
    assert main(["data", "validate", data]) == 2
    assert "family: vlm" in capsys.readouterr().out
