"""Online / iterative DPO: each round samples from the current policy, a judge labels the
replies, the policy trains on the new pairs.

The model is a tiny random Llama over a word-level vocabulary of 20 tokens, so that its
samples are near-uniform over a few words and a judge that counts one word ("yes") sets a
preference DPO can learn in a few steps: about 0.3 "yes" per 6-word reply at the start.
"""

import itertools
import json
import shutil

import pytest
import yaml

from dpokit.cli import main

WORDS = ["yes", "no", "maybe", "ok", "sure", "never", "fine", "later", "now", "say", "tell", "me", "answer", "please",
         "word", "a"]
PROMPTS = [f"{a} {b} {c}" for a, b, c in itertools.product(["say", "tell me", "answer"], ["a word", "now", "later"],
                                                             ["please", "ok"])]
K = 4


def word_tokenizer():
    """Whole words as tokens, each with a leading-space marker, so a decoded reply (" yes no")
    re-tokenizes to the same words after the prompt."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(["<pad>", "<eos>", "<bos>", "<unk>"] + ["▁" + w for w in WORDS])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="never")
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", pad_token="<pad>", bos_token="<bos>",
                                   unk_token="<unk>")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from dpokit.tiny import build_llama

    root = tmp_path_factory.mktemp("online")
    tokenizer = word_tokenizer()
    build_llama(tokenizer, hidden_size=32, num_layers=2, num_heads=4, seed=0).save_pretrained(root / "sft")
    tokenizer.save_pretrained(root / "sft")
    (root / "prompts.jsonl").write_text("".join(json.dumps({"prompt": p}) + "\n" for p in PROMPTS))
    (root / "online_judges.py").write_text("def count_yes(prompt, response):\n"
                                           "    return response.split().count('yes')\n")
    config = {"model": str(root / "sft"), "online_prompts": str(root / "prompts.jsonl"),
              "judge": {"type": "callable", "function": "online_judges:count_yes"},
              "num_generations": K, "max_new_tokens": 6, "temperature": 1.0, "learning_rate": 1e-2, "beta": 0.1,
              "per_device_train_batch_size": 8, "num_train_epochs": 2, "logging_steps": 1, "save_steps": 0,
              "disable_tqdm": True, "seed": 0, "ref_cache_dir": str(root / "ref-cache")}
    (root / "online.yaml").write_text(yaml.safe_dump(config))
    with pytest.MonkeyPatch.context() as mp:
        mp.syspath_prepend(str(root))
        yield root


def _rows(path):
    return [json.loads(ln) for ln in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def online_run(setup):
    out = setup / "run"
    assert main(["train", str(setup / "online.yaml"), "online=true", "online_rounds=2", f"output_dir={out}"]) == 0
    return out


def test_online_rounds_raise_the_judge_score(online_run, setup, capsys):
    rows = _rows(online_run / "online.jsonl")
    assert [r["round"] for r in rows] == [0, 1, 2] and rows[-1]["final"] and "final" not in rows[0]
    scores = [r["score_mean"] for r in rows]
    # Round 0 samples the starting model, round 1 the model round 0 trained, the final row the last model.
    assert scores[0] < scores[1] < scores[2] and scores[2] >= scores[0] + 0.3, scores
    for r, row in enumerate(rows[:2]):
        round_dir = online_run / f"round-{r}"
        samples, pairs = _rows(round_dir / "samples.jsonl"), _rows(round_dir / "pairs.jsonl")
        assert len(samples) == row["samples"] == K * len(PROMPTS)
        assert row["score_mean"] == pytest.approx(sum(s["score"] for s in samples) / len(samples))
        assert row["pairs"] == len(pairs) > 0
        assert all(p["score_chosen"] > p["score_rejected"] and
                   p["chosen"].split().count("yes") == p["score_chosen"] for p in pairs)
        assert row["steps"] == 2 * -(-len(pairs) // 8) and 0 <= row["rewards/accuracies"] <= 1
        assert (round_dir / "model.safetensors").is_file() and row["policy"] == str(round_dir)


def test_online_policy_moves_and_reference_stays(online_run, setup):
    cfg1 = yaml.safe_load((online_run / "round-1" / "config.yaml").read_text())
    assert cfg1["model"] == str(online_run / "round-0") and cfg1["ref_model"] == str(setup / "sft")
    assert cfg1["online"] is False and cfg1["train_data"] == str(online_run / "round-1" / "pairs.jsonl")
    # At its first step a round's policy is the previous round's model: equal to the reference
    # in round 0 (implicit rewards exactly 0), not in round 1, whose reference is still the original.
    first = [_rows(online_run / f"round-{r}" / "metrics.jsonl")[0] for r in (0, 1)]
    assert first[0]["rewards/chosen"] == 0 and first[0]["rewards/rejected"] == 0
    assert abs(first[1]["rewards/chosen"]) > 1e-3


def test_online_resume_skips_finished_rounds(online_run, tmp_path, setup, capsys):
    out = tmp_path / "run"
    shutil.copytree(online_run, out)
    (out / "round-1" / "round.json").unlink()  # as if stopped while round 1 trained
    weights0 = (out / "round-0" / "model.safetensors").stat().st_mtime_ns
    pairs1 = (out / "round-1" / "pairs.jsonl").read_text()
    assert main(["train", str(setup / "online.yaml"), "online=true", "online_rounds=3", f"output_dir={out}",
                 "resume_from_checkpoint=true"]) == 0
    printed = capsys.readouterr().out
    assert "online round 0 " not in printed and "online round 1 (2 of 3)" in printed and "online round 2 " in printed
    assert (out / "round-0" / "model.safetensors").stat().st_mtime_ns == weights0
    assert (out / "round-1" / "pairs.jsonl").read_text() == pairs1  # round 1 trained on its own pairs again
    rows = _rows(out / "online.jsonl")
    assert [r["round"] for r in rows] == [0, 1, 2, 3] and rows[0] == _rows(online_run / "online.jsonl")[0]
    assert yaml.safe_load((out / "round-2" / "config.yaml").read_text())["model"] == str(out / "round-1")


def test_online_with_lora_merges_each_round(setup, tmp_path):
    out = tmp_path / "run"
    assert main(["train", str(setup / "online.yaml"), "online=true", "online_rounds=2", f"output_dir={out}",
                 "lora={r: 4, lora_alpha: 8}", "num_train_epochs=1"]) == 0
    for r in (0, 1):
        assert (out / f"round-{r}" / "model.safetensors").is_file()
        assert not (out / f"round-{r}" / "adapter_config.json").exists()
    cfg1 = yaml.safe_load((out / "round-1" / "config.yaml").read_text())
    assert cfg1["model"] == str(out / "round-0") and cfg1["ref_model"] == str(setup / "sft") and cfg1["merge_lora"]
    assert len(_rows(out / "online.jsonl")) == 3


@pytest.mark.parametrize("override, message", [
    ("judge=null", "online training needs a judge"),
    ("num_generations=1", "num_generations must be >= 2"),
    ("online_rounds=0", "online_rounds must be >= 1"),
    ("online_min_gap=100", "the judge separated no pair"),
])
def test_online_user_errors(setup, tmp_path, override, message, capsys):
    assert main(["train", str(setup / "online.yaml"), "online=true", f"output_dir={tmp_path / 'run'}",
                 override]) == 2
    assert message in capsys.readouterr().err
