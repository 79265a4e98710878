"""KTO on unpaired data (Ethayarajh et al. 2024): the loss against its formula, the loader's
mismatched completions, agreement with TRL's KTOTrainer, and training end to end."""

import json
import math

import datasets
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
from trl import KTOConfig, KTOTrainer

import dpokit
from dpokit.cli import main
from dpokit.data import load_examples
from dpokit.errors import DataError, DpokitError
from dpokit.objectives import ObjectiveConfig, LossInputs, objective

from conftest import QA

# one row per question, every third undesirable: uneven classes, so the two weights matter differently
ROWS = [{"prompt": q, "completion": " " + (good if i % 3 else bad), "label": bool(i % 3)} for i, (q, good, bad) in
        enumerate(QA)]


def _write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _terms(seed=0, B=6):
    g = torch.Generator().manual_seed(seed)
    return LossInputs(policy_chosen=-torch.rand(B, generator=g) * 30, policy_rejected=-torch.rand(B, generator=g) * 30,
                 ref_chosen=-torch.rand(B, generator=g) * 30, ref_rejected=-torch.rand(B, generator=g) * 30,
                 chosen_len=torch.full((B,), 10.0), rejected_len=torch.full((B,), 10.0), margin=torch.zeros(B),
                 label=torch.tensor([True, False, True, True, False, False][:B]))


# ---------------------------------------------------------------- the loss


@pytest.mark.parametrize("shift", [-20.0, 20.0])  # mean KL below zero (clamped) and above
def test_kto_matches_the_paper_formula(shift):
    t, beta, wd, wu = _terms(), 0.15, 1.3, 0.6
    t.policy_rejected = t.policy_rejected + shift
    loss, metrics = objective(t, torch.ones(6), ["kto"], None,
                              ObjectiveConfig(beta=beta, desirable_weight=wd, undesirable_weight=wu))
    sig = lambda x: 1 / (1 + math.exp(-x))  # noqa: E731
    kl = [float(t.policy_rejected[i] - t.ref_rejected[i]) for i in range(6)]
    z0 = max(0.0, sum(kl) / 6)
    assert (z0 > 0) == (shift > 0)
    expected = []
    for i in range(6):
        r = float(t.policy_chosen[i] - t.ref_chosen[i])
        expected.append(wd * (1 - sig(beta * (r - z0))) if t.label[i] else wu * (1 - sig(beta * (z0 - r))))
    assert metrics["loss"].tolist() == pytest.approx(expected, rel=1e-5, abs=1e-7)
    assert loss.item() == pytest.approx(sum(expected) / 6, rel=1e-5)
    assert metrics["kl"][0].item() == pytest.approx(z0, abs=1e-5)
    rewards = [beta * float(t.policy_chosen[i] - t.ref_chosen[i]) for i in range(6)]
    assert metrics["rewards/chosen"].tolist() == pytest.approx([r for r, d in zip(rewards, t.label) if d], rel=1e-5)
    assert metrics["rewards/rejected"].tolist() == pytest.approx([r for r, d in zip(rewards, t.label) if not d],
                                                                 rel=1e-5)
    assert "rewards/accuracies" not in metrics  # nothing is paired


def test_the_kl_point_carries_no_gradient():
    t = _terms()
    t.policy_chosen.requires_grad_(True)
    t.policy_rejected.requires_grad_(True)
    objective(t, torch.ones(6), ["kto"], None, ObjectiveConfig())[0].backward()
    assert t.policy_rejected.grad is None or not t.policy_rejected.grad.any()
    assert t.policy_chosen.grad.all()


def test_apo_zero_unpaired_formula():
    t, beta = _terms(seed=2), 0.5
    _, metrics = objective(t, torch.ones(6), ["apo_zero_unpaired"], None,
                           ObjectiveConfig(beta=beta, desirable_weight=2.0, undesirable_weight=0.5))
    r = beta * (t.policy_chosen - t.ref_chosen)
    expected = torch.where(t.label, 2.0 * (1 - torch.sigmoid(r)), 0.5 * torch.sigmoid(r))
    assert torch.allclose(metrics["loss"], expected)
    assert "kl" not in metrics


def test_losses_and_data_must_fit():
    with pytest.raises(DpokitError, match="'sigmoid' reads preference pairs.*unpaired rows.*kto"):
        objective(_terms(), torch.ones(6), ["sigmoid"], None, ObjectiveConfig())
    pairs = _terms()
    pairs.label = None
    with pytest.raises(DpokitError, match="'kto' reads unpaired rows"):
        objective(pairs, torch.ones(6), ["kto"], None, ObjectiveConfig())
    with pytest.raises(DpokitError, match="rpo_alpha"):
        objective(_terms(), torch.ones(6), ["kto"], None, ObjectiveConfig(rpo_alpha=0.5))
    with pytest.raises(DpokitError, match="desirable_weight must be >= 0"):
        ObjectiveConfig(desirable_weight=-1.0)


# ---------------------------------------------------------------- the loader


def test_each_row_gets_a_mismatched_completion(tokenizer, tmp_path):
    rows = [{"prompt": "What is 2+2?", "completion": " It is 4.", "label": True},
            {"prompt": "What is 2+2?", "completion": " Seven.", "label": False},  # same prompt as the row before
            {"prompt": "Name a color.", "completion": " Blue is one.", "label": True, "weight": 0.5}]
    ex = load_examples(_write(tmp_path / "u.jsonl", rows), tokenizer, None, None)
    assert [e.label for e in ex] == [True, False, True] and ex[2].weight == 0.5
    # row i takes row i-1's completion (cyclically), skipping rows with its own prompt
    assert ex[0].rejected_ids == ex[2].chosen_ids
    assert ex[1].rejected_ids == ex[2].chosen_ids
    assert ex[2].rejected_ids == ex[1].chosen_ids
    # the mismatched completion is cut to this row's room under max_length
    # (row 0 has the longest prompt, so the least room: 2 tokens; row 2's own completion keeps more)
    L = len(ex[0].prompt_ids) + 2
    short = load_examples(_write(tmp_path / "u.jsonl", rows), tokenizer, L, None)
    assert len(short[2].chosen_ids) > 2 and short[0].rejected_ids == short[2].chosen_ids[:2]


@pytest.mark.parametrize("rows,problem", [
    ([{"prompt": "a", "completion": " b", "label": "yes"}, {"prompt": "c", "completion": " d", "label": True}],
     "row 1: field 'label' must be true .desirable. or false"),
    ([{"prompt": "a", "completion": " b", "label": True}, {"prompt": "c", "chosen": " d", "rejected": " e"}],
     "row 2: unpaired rows .* and preference rows .* are mixed"),
    ([{"prompt": "a", "completion": " b", "label": True, "chosen": " x"}], "row 1: a row is either a pair"),
    ([{"completion": " b", "label": True}], "row 1: missing field 'prompt'"),
    ([{"prompt": "a", "completion": " b", "label": True}], "needs at least 2 rows"),
])
def test_bad_unpaired_rows(tokenizer, tmp_path, rows, problem):
    with pytest.raises(DataError, match=problem):
        load_examples(_write(tmp_path / "bad.jsonl", rows), tokenizer, None, None)


# ---------------------------------------------------------------- against TRL


def test_first_step_agrees_with_trl(tiny_model_dir, tiny_ref_dir, tmp_path):
    """One batch holding the whole data in file order: TRL's in-batch rotation of completions is then
    dpokit's load-time one. Policy and reference are chosen so the batch KL is above zero (not clamped)."""
    policy, ref = tiny_ref_dir, tiny_model_dir
    settings = dict(beta=2.0, desirable_weight=1.3, undesirable_weight=0.7, learning_rate=1e-6, max_steps=1,
                    logging_steps=1, per_device_train_batch_size=len(ROWS), max_length=None)
    trainer = KTOTrainer(
        model=AutoModelForCausalLM.from_pretrained(policy), ref_model=AutoModelForCausalLM.from_pretrained(ref),
        args=KTOConfig(output_dir=str(tmp_path / "trl"), report_to=[], use_cpu=True, bf16=False,
                       gradient_checkpointing=False, save_strategy="no", disable_tqdm=True, seed=0, **settings),
        train_dataset=datasets.Dataset.from_list(ROWS), processing_class=AutoTokenizer.from_pretrained(policy))
    trainer.train()
    theirs = trainer.state.log_history[0]
    ours = dpokit.train(dpokit.TrainConfig(
        model=str(policy), ref_model=str(ref), train_data=str(_write(tmp_path / "kto.jsonl", ROWS)),
        output_dir=str(tmp_path / "ours"), ref_cache_dir=str(tmp_path / "cache"), loss_type="kto",
        max_prompt_length=None, report_to=[], bf16=False, disable_tqdm=True, save_steps=0, **settings)).history[0]
    assert theirs["kl"] > 0.01
    for key in ("loss", "kl", "grad_norm", "logps/chosen", "logps/rejected"):
        assert ours[key] == pytest.approx(theirs[key], rel=1e-4), key
    for key in ("rewards/chosen", "rewards/rejected"):  # β x a difference of two ~50-nat sums: float32 cancellation
        assert ours[key] == pytest.approx(theirs[key], abs=2e-4), key


# ---------------------------------------------------------------- training


def test_cli_trains_kto(tiny_model_dir, tmp_path):
    data = _write(tmp_path / "kto.jsonl", ROWS)
    out = tmp_path / "run"
    cfg = tmp_path / "kto.yaml"
    # two steps of 4 rows per logged row: each row covers an epoch, so both classes are in it
    cfg.write_text("loss_type: kto\nper_device_train_batch_size: 4\nmax_steps: 4\nlogging_steps: 2\nsave_steps: 0\n"
                   "disable_tqdm: true\nlearning_rate: 1.0e-3\nbeta: 0.5\nundesirable_weight: 1.5\n")
    code = main(["train", str(cfg), f"model={tiny_model_dir}", f"train_data={data}", f"output_dir={out}",
                 f"ref_cache_dir={tmp_path / 'cache'}"])
    assert not code
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [2, 4]
    assert {"loss", "kl", "rewards/chosen", "rewards/rejected", "logps/chosen", "logps/rejected"} <= rows[0].keys()
    # the loss lies between all-desirable (1 - σ) and all-undesirable 1.5 (1 - σ) at rewards near 0
    assert 0.4 < rows[0]["loss"] < 0.8
    assert rows[-1]["loss"] < rows[0]["loss"]
    assert rows[-1]["rewards/chosen"] > 0 > rows[-1]["rewards/rejected"]  # desirable up, undesirable down
    with pytest.raises(DpokitError, match="per_device_train_batch_size must be >= 2"):
        dpokit.train(dpokit.TrainConfig(model=str(tiny_model_dir), train_data=str(data), loss_type="kto",
                                        per_device_train_batch_size=1, output_dir=str(tmp_path / "bs1")))


def test_a_kto_csv_trains_as_its_jsonl_does(tiny_model_dir, tokenizer, tmp_path):
    """CSV has no types: `label` cells spelt true/false (or 1/0) are read as labels, and the CSV trains to the
    numbers the same rows give as JSON Lines. A label that spells neither names its row."""
    import csv

    path = tmp_path / "kto.csv"
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["prompt", "completion", "label"])
        writer.writerows([r["prompt"], r["completion"], "true" if r["label"] else "0"] for r in ROWS)
    assert [ex.label for ex in load_examples(path, tokenizer, 64, 32)] == [r["label"] for r in ROWS]
    common = dict(model=str(tiny_model_dir), loss_type="kto", per_device_train_batch_size=4, max_steps=2,
                  logging_steps=1, save_steps=0, disable_tqdm=True, ref_cache_dir=str(tmp_path / "cache"))
    from_csv = dpokit.train(dpokit.TrainConfig(train_data=str(path), output_dir=str(tmp_path / "csv"), **common))
    jsonl = _write(tmp_path / "kto.jsonl", ROWS)
    from_jsonl = dpokit.train(dpokit.TrainConfig(train_data=str(jsonl), output_dir=str(tmp_path / "jsonl"), **common))
    assert from_csv.history == from_jsonl.history and "kl" in from_csv.history[0]
    path.write_text(path.read_text().replace(",true", ",maybe", 1))
    with pytest.raises(DataError, match=r"kto\.csv, row 3: field 'label' must be true .* got 'maybe'"):
        load_examples(path, tokenizer, 64, 32)
