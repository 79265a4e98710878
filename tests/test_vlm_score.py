"""`dpokit score` for vision-language models (`family: vlm`): prompt + completion rows with their images, each reply
scored as training scores the same reply as a pair's chosen one, the image taking part in the score, and bad rows
stopping in one line that names file and row."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import dpokit
from dpokit.cli import main
from dpokit.config import load_config
from dpokit.evaluate import Models, load_models, preference_eval, score_responses
from dpokit.families.vlm.tiny import QWEN_IMAGE, build_llava, build_qwen2_vl
from test_vlm_sample import image_dir  # noqa: F401 - the shared fixture

TEXTS = ["What is in the picture? A red square. A blue circle. Describe the image. It is green. Which shape? "
         "Two images: the first is larger. Nothing here."]
BETA = 0.5


def write_rows(path, items) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in items))
    return str(path)


def completion_rows(placeholder: str) -> list[dict]:
    """TRL's vision prompt + completion layouts: a standard prompt with the placeholder, messages with image parts
    (two images), messages with none (TRL's rule puts the image first) and a `response`, and text alone."""
    return [
        {"prompt": placeholder + "Describe the image.", "completion": " A red square.", "image": "0.png"},
        {"prompt": [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Which shape?"},
                                                 {"type": "image"}]}],
         "completion": [{"role": "assistant", "content": "Two images: the first is larger."}],
         "images": ["1.png", "2.png"]},
        {"prompt": [{"role": "user", "content": "What is in the picture?"}],
         "response": [{"role": "assistant", "content": "It is green."}], "images": ["2.png"]},
        {"prompt": "Nothing here.", "completion": " A blue circle."},
    ]


def as_pair(row: dict) -> dict:
    """The row as a preference pair whose chosen reply is its completion (and whose rejected one is another)."""
    pair = {k: v for k, v in row.items() if k not in ("completion", "response")}
    reply = row.get("completion", row.get("response"))
    other = " It is a circle." if isinstance(reply, str) else [{"role": "assistant", "content": "It is a circle."}]
    return {**pair, "chosen": reply, "rejected": other}


@pytest.fixture(scope="module")
def llava_run(image_dir, tmp_path_factory):
    """A tiny LLaVA trained one step with LoRA (the family's default): a run folder whose reference is the base with
    the adapters off."""
    out = tmp_path_factory.mktemp("llava-run")
    model = build_llava(out / "model", TEXTS)
    data = write_rows(image_dir / "train.jsonl", [as_pair(r) for r in completion_rows("<image>")])
    cfg = load_config(None, family="vlm", model=str(model), train_data=data, output_dir=str(out / "run"),
                      ref_cache_dir=str(out / "cache"), report_to=[], disable_tqdm=True, bf16=False, max_steps=1,
                      learning_rate=1e-2, per_device_train_batch_size=2, beta=BETA, lora={"r": 4, "lora_alpha": 8})
    dpokit.train(cfg)
    return cfg.output_dir


@pytest.fixture(scope="module")
def qwen_models(tmp_path_factory):
    """A tiny Qwen2-VL (M-RoPE) policy and a second one, same processor, as its explicit reference."""
    out = tmp_path_factory.mktemp("qwen")
    policy = build_qwen2_vl(out / "policy", TEXTS, seed=0)
    cfg = load_config(None, family="vlm", model=str(policy))
    processor = dpokit.families.get_family("vlm").load_processor(str(policy), cfg)
    reference = build_qwen2_vl(out / "reference", TEXTS, seed=1, processor=processor)
    return load_models(policy, str(reference), BETA, ["family=vlm"], device="cpu")


def pair_rewards(models: Models, pairs: str) -> list[float]:
    """β·(log π − log π_ref) of each pair's chosen reply, through the training scorer on the pairs' own batches."""
    examples = models.family.examples(pairs, models.tokenizer, models.cfg)
    with torch.no_grad():
        return [r for s in models.scored(examples, 2, "eval", progress=False)
                for r in (models.cfg.beta * (s.scores.chosen.float() - s.reference[0])).tolist()]


@pytest.mark.parametrize("kind", ["llava", "qwen2_vl"])
def test_a_reply_scores_as_the_chosen_reply_of_a_pair(kind, request, image_dir):
    """Each row's reward is β·(policy − reference log-prob) of the same reply scored as a pair's chosen one: the
    completion is encoded exactly as training encodes a chosen reply, images and (Qwen2-VL) M-RoPE positions
    included. The LoRA run's reference is the base with adapters off; Qwen's is a second model."""
    models = load_models(request.getfixturevalue("llava_run"), device="cpu") if kind == "llava" \
        else request.getfixturevalue("qwen_models")
    placeholder = "<image>" if kind == "llava" else QWEN_IMAGE
    rows = completion_rows(placeholder)
    data = write_rows(image_dir / f"completions-{kind}.jsonl", rows)
    pairs = write_rows(image_dir / f"pairs-{kind}.jsonl", [as_pair(r) for r in rows])
    scored = score_responses(models, data, batch_size=3, progress=False)
    assert [r["row"] for r in scored] == [1, 2, 3, 4]
    expected = pair_rewards(models, pairs)
    assert [r["reward"] for r in scored] == pytest.approx(expected, rel=1e-5, abs=1e-5)
    assert all(r["reward"] == pytest.approx(BETA * (r["logp"] - r["ref_logp"])) for r in scored)
    assert min(abs(r) for r in expected) > 1e-4  # policy and reference differ: the check is not 0 == 0
    # the training objective's own metric agrees: the mean chosen reward of the pairs
    mean = preference_eval(models, pairs, batch_size=4, progress=False)["rewards/chosen"]
    assert np.mean([r["reward"] for r in scored]) == pytest.approx(mean, rel=1e-5, abs=1e-6)
    # the encoding itself: the same prompt ids, image tensors and reply ids as the pair's chosen reply
    replies = [ex for _, ex in models.family.completions(data, models.tokenizer, models.cfg)]
    for reply, pair in zip(replies, models.family.examples(pairs, models.tokenizer, models.cfg)):
        assert (reply.prompt_ids, reply.chosen_ids, reply.rejected_ids) == (pair.prompt_ids, pair.chosen_ids, [])
        assert reply.images.keys() == pair.images.keys()
        assert all(torch.equal(reply.images[k], pair.images[k]) for k in pair.images)
        assert (reply.rope is None) == (kind == "llava")
        assert reply.rope is None or torch.equal(reply.rope, pair.rope)


def test_the_image_changes_the_score(llava_run, image_dir, tmp_path, capsys):
    """The same prompt and reply with another image: another log-prob, under policy and reference alike (read
    through the CLI's --output)."""
    row = completion_rows("<image>")[0]
    data = write_rows(image_dir / "two-images.jsonl", [row, {**row, "image": "1.png"}])
    out = tmp_path / "scores.jsonl"
    status = main(["score", llava_run, "--data", data, "--output", str(out)])
    captured = capsys.readouterr()
    assert status in (0, None), captured.err
    first, second = (json.loads(line) for line in out.read_text().splitlines())
    assert first["tokens"] == second["tokens"]
    assert abs(first["logp"] - second["logp"]) > 1e-5
    assert abs(first["ref_logp"] - second["ref_logp"]) > 1e-5
    assert "mean reward" in captured.out


BAD = {  # case: (rows as written, the row at fault, words of the message)
    "missing image": (lambda rows: [rows[0], {**rows[0], "image": "nope.png"}], 2, "not found"),
    "placeholders vs images": (lambda rows: [rows[3], {**rows[0], "prompt": "<image><image>Describe."}], 2,
                               "2 image placeholder(s)"),
    "parts vs images": (lambda rows: [{**rows[1], "images": ["0.png"]}], 1, "2 image part(s) but the row has 1"),
    "missing completion": (lambda rows: [rows[0], {"prompt": rows[0]["prompt"], "image": "0.png"}], 2,
                           "missing field 'completion' or 'response'"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_a_bad_row_is_one_line(case, llava_run, image_dir, capsys):
    make, row, words = BAD[case]
    data = write_rows(image_dir / f"bad-{case.replace(' ', '-')}.jsonl", make(completion_rows("<image>")))
    status = main(["score", llava_run, "--data", data])
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert status == 2 and "Traceback" not in "\n".join(err)
    assert sum("dpokit: error" in line for line in err) == 1
    assert err[-1].startswith(f"dpokit: error: {data}, row {row}: ") and words in err[-1], err[-1]
