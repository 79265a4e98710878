"""S-DPO: one chosen reply against several rejected ones (Chen et al. 2024).

The loss against its formula written out here, K = 1 against DPO, the group layout's
log-probs against scoring each reply alone, the loader, and training end to end.
"""

import json
import math

import pytest
import torch

import dpokit
from dpokit.cli import main
from dpokit.data import Example, load_examples
from dpokit.errors import DataError, DpokitError
from dpokit.families.causal_lm import CausalLMScorer, collate
from dpokit.objectives import ObjectiveConfig, LossInputs, objective
from dpokit.recipes.rankings import rankings_to_pairs

GROUPS = [
    {"prompt": "What is 2+2?", "chosen": " It is 4.", "rejected": [" It is 5, I think.", " Seven.", " A chair."]},
    {"prompt": "Name a color.", "chosen": " Blue is one.", "rejected": [" Seven."]},
    {"prompt": "Say hello politely.", "chosen": " Hello, nice to meet you.", "rejected": [" Go away.", " No."]},
    {"prompt": "Is water wet?", "chosen": " Yes, by most definitions.", "rejected": " No."},  # a plain pair
]


def _write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _group_terms(seed=0, B=5, K=4):
    g = torch.Generator().manual_seed(seed)
    mask = torch.ones(B, K, dtype=torch.bool)
    mask[1, 2:] = False
    mask[3, 1:] = False
    return LossInputs(policy_chosen=-torch.rand(B, generator=g) * 30, policy_rejected=-torch.rand(B, K, generator=g) * 30,
                 ref_chosen=-torch.rand(B, generator=g) * 30, ref_rejected=-torch.rand(B, K, generator=g) * 30,
                 chosen_len=torch.full((B,), 10.0), rejected_len=torch.full((B, K), 10.0),
                 margin=torch.rand(B, generator=g), rejected_mask=mask)


# ---------------------------------------------------------------- the loss


def test_sdpo_matches_the_paper_formula():
    t, beta = _group_terms(), 0.7
    loss, metrics = objective(t, torch.ones(5), ["sdpo"], None, ObjectiveConfig(beta=beta))
    expected = []
    for i in range(5):  # −log σ(−log Σ_j exp(β(Δ_j − Δ_w) + m)), in float64, one group at a time
        dw = float(t.policy_chosen[i]) - float(t.ref_chosen[i])
        s = sum(math.exp(beta * ((float(t.policy_rejected[i, j]) - float(t.ref_rejected[i, j])) - dw)
                         + float(t.margin[i])) for j in range(4) if t.rejected_mask[i, j])
        expected.append(-math.log(1 / (1 + math.exp(math.log(s)))))
    assert metrics["loss"].tolist() == pytest.approx(expected, rel=1e-5)
    assert loss.item() == pytest.approx(sum(expected) / 5, rel=1e-5)
    # metrics: the mean over each group's own rejected replies; accurate only if the chosen beats them all
    rewards = beta * (t.policy_rejected - t.ref_rejected)
    for i in range(5):
        own = rewards[i][t.rejected_mask[i]]
        assert metrics["rewards/rejected"][i].item() == pytest.approx(own.mean().item(), rel=1e-6)
        assert metrics["rewards/accuracies"][i].item() == float(bool((metrics["rewards/chosen"][i] > own).all()))


def test_padded_slots_change_nothing():
    t = _group_terms()
    loss, _ = objective(t, torch.ones(5), ["sdpo"], None, ObjectiveConfig())
    t.policy_rejected = torch.where(t.rejected_mask, t.policy_rejected, torch.tensor(1e4))  # garbage in empty slots
    again, _ = objective(t, torch.ones(5), ["sdpo"], None, ObjectiveConfig())
    assert again.item() == loss.item()


def test_one_rejected_is_dpo_exactly():
    t = _group_terms(seed=3, K=1)
    t.rejected_mask = None
    pairs = LossInputs(t.policy_chosen, t.policy_rejected[:, 0], t.ref_chosen, t.ref_rejected[:, 0], t.chosen_len,
                  t.rejected_len[:, 0], t.margin)
    for cfg in (ObjectiveConfig(beta=0.1), ObjectiveConfig(beta=2.5)):
        sdpo, _ = objective(t, torch.ones(5), ["sdpo"], None, cfg)
        sdpo_on_pairs, m1 = objective(pairs, torch.ones(5), ["sdpo"], None, cfg)
        dpo, m2 = objective(pairs, torch.ones(5), ["sigmoid"], None, cfg)
        assert torch.equal(sdpo, dpo) and torch.equal(sdpo_on_pairs, dpo)
        assert all(torch.equal(m1[k], m2[k]) for k in m2)


def test_sdpo_gradient_is_a_softmax_over_the_rejected():
    """d loss / d Δ_j = β σ(lse) softmax_j: the hardest negatives get the largest push."""
    t, beta = _group_terms(seed=5), 0.5
    t.policy_rejected.requires_grad_(True)
    objective(t, torch.ones(5), ["sdpo"], None, ObjectiveConfig(beta=beta))[0].backward()
    z = beta * (t.policy_rejected - t.ref_rejected - (t.policy_chosen - t.ref_chosen)[:, None]) + t.margin[:, None]
    z = z.detach().masked_fill(~t.rejected_mask, -math.inf)
    lse = torch.logsumexp(z, 1, keepdim=True)
    expected = beta * torch.sigmoid(lse) * torch.softmax(z, 1) / 5
    assert torch.allclose(t.policy_rejected.grad, expected, atol=1e-7)


def test_pairwise_losses_refuse_groups():
    with pytest.raises(DpokitError, match="'sigmoid' reads preference pairs.*S-DPO groups.*sdpo"):
        objective(_group_terms(), torch.ones(5), ["sigmoid"], None, ObjectiveConfig())
    with pytest.raises(DpokitError, match="sdpo has no label smoothing"):
        from dpokit.objectives import check_losses
        check_losses(["sdpo"], None, 0.1)


# ---------------------------------------------------------------- the layout


@pytest.mark.parametrize("share,free,attn", [(True, True, "sdpa"), (True, True, "eager"), (True, False, "sdpa"),
                                             (False, True, "sdpa"), (False, False, "sdpa")])
def test_each_rejected_scores_as_if_alone(tokenizer, tiny_model_dir, tmp_path, share, free, attn):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, attn_implementation=attn).eval()
    examples = load_examples(_write(tmp_path / "groups.jsonl", GROUPS), tokenizer, None, None)
    assert [len(ex.negatives) for ex in examples] == [3, 1, 2, 1]
    with torch.no_grad():
        t = CausalLMScorer(model)(collate(examples, tokenizer.pad_token_id, share, free, 2048, attn))
        assert t.rejected.shape == (4, 3) and t.rejected_len.shape == (4, 3)
        for i, ex in enumerate(examples):
            alone = CausalLMScorer(model)(collate([Example(ex.prompt_ids, ex.chosen_ids, ex.chosen_ids[:1])],
                                                  tokenizer.pad_token_id, False, False))
            assert t.chosen[i].item() == pytest.approx(alone.chosen.item(), abs=1e-5)
            for k, ids in enumerate(ex.negatives):
                alone = CausalLMScorer(model)(collate([Example(ex.prompt_ids, ids, ids[:1])],
                                                      tokenizer.pad_token_id, False, False))
                assert t.rejected[i, k].item() == pytest.approx(alone.chosen.item(), abs=1e-5), (i, k)
                assert t.rejected_len[i, k].item() == len(ids)
            assert (t.rejected_len[i, len(ex.negatives):] == 0).all()  # empty slots hold nothing


# ---------------------------------------------------------------- data


def test_loader_reads_groups(tokenizer, tmp_path):
    examples = load_examples(_write(tmp_path / "g.jsonl", GROUPS), tokenizer, None, None)
    assert all(ex.is_group for ex in examples)  # the plain pair became a group of one
    ids = lambda text: tokenizer(text + tokenizer.eos_token)["input_ids"]  # noqa: E731
    assert examples[0].negatives[1] == ids(" Seven.")[-len(examples[0].negatives[1]):]
    # implicit prompts: every dialogue must share the prompt
    turn = "\n\nHuman: hi\n\nAssistant:"
    hh = {"chosen": turn + " hello", "rejected": [turn + " go", turn + " no"]}
    (ex,) = load_examples(_write(tmp_path / "hh.jsonl", [hh]), tokenizer, None, None)
    assert len(ex.negatives) == 2
    bad = dict(hh, rejected=[turn + " go", "\n\nHuman: bye\n\nAssistant: no"])
    with pytest.raises(DataError, match="row 1: chosen and rejected differ before their last assistant turn"):
        load_examples(_write(tmp_path / "bad.jsonl", [bad]), tokenizer, None, None)
    same = {"prompt": "Hi", "chosen": " a", "rejected": [" b", " a"]}
    with pytest.raises(DataError, match="chosen and rejected reply 1 are identical"):
        load_examples(_write(tmp_path / "same.jsonl", [same]), tokenizer, None, None)
    empty = {"prompt": "Hi", "chosen": " a", "rejected": [" b", " "]}
    with pytest.raises(DataError, match=r"field 'rejected\[1\]' is empty"):
        load_examples(_write(tmp_path / "empty.jsonl", [empty]), tokenizer, None, None)


# ---------------------------------------------------------------- training


def _cfg(tmp_path, model_dir, data, **kw):
    base = dict(model=str(model_dir), train_data=str(data), output_dir=str(tmp_path / "run"), loss_type="sdpo",
                per_device_train_batch_size=2, max_steps=3, learning_rate=1e-3, logging_steps=1, save_steps=0,
                disable_tqdm=True, ref_cache_dir=str(tmp_path / "cache"), report_to=["jsonl"], beta=0.5)
    base.update(kw)
    return dpokit.TrainConfig(**base)


def test_cached_reference_equals_live_reference(tiny_model_dir, tmp_path):
    """The reference cache stores [N, K]; batches slice their own K from it."""
    data = _write(tmp_path / "g.jsonl", GROUPS)
    cached = dpokit.train(_cfg(tmp_path, tiny_model_dir, data, output_dir=str(tmp_path / "a"))).history
    assert list((tmp_path / "cache" / "ref-logps").glob("*.safetensors"))
    live = dpokit.train(_cfg(tmp_path, tiny_model_dir, data, output_dir=str(tmp_path / "b"),
                             precompute_ref_log_probs=False)).history
    for a, b in zip(cached, live):
        for k in ("loss", "rewards/chosen", "rewards/rejected", "rewards/margins", "logps/rejected"):
            assert a[k] == pytest.approx(b[k], abs=1e-5), (a["step"], k)
    assert cached[-1]["rewards/margins"] > 0  # it learns: the chosen pulls away from the group


def test_pairwise_loss_on_groups_is_refused_before_training(tiny_model_dir, tmp_path):
    data = _write(tmp_path / "g.jsonl", GROUPS)
    with pytest.raises(DpokitError, match="S-DPO groups"):
        dpokit.train(_cfg(tmp_path, tiny_model_dir, data, loss_type="ipo"))


def test_cli_trains_on_the_rankings_recipe_groups(tiny_model_dir, tmp_path):
    ranked = [{"prompt": r["prompt"], "ranking": [r["chosen"], *([r["rejected"]] if isinstance(r["rejected"], str)
                                                                  else r["rejected"])]} for r in GROUPS]
    built = rankings_to_pairs(str(_write(tmp_path / "ranked.jsonl", ranked)), pairs="sdpo")
    data = _write(tmp_path / "sdpo.jsonl", built.rows)
    out = tmp_path / "cli"
    cfg = tmp_path / "sdpo.yaml"
    cfg.write_text("loss_type: [sdpo, sft]\nloss_weights: [1.0, 0.1]\nper_device_train_batch_size: 4\nmax_steps: 2\n"
                   "logging_steps: 1\nsave_steps: 0\ndisable_tqdm: true\nlearning_rate: 1.0e-3\n")
    code = main(["train", str(cfg), f"model={tiny_model_dir}", f"train_data={data}", f"output_dir={out}",
                 f"ref_cache_dir={tmp_path / 'cache'}"])
    assert not code
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2]
    assert {"loss", "rewards/accuracies", "rewards/rejected", "nll_loss"} <= rows[0].keys()
    # step 1: policy = reference, so every reward is 0 and a group of K costs log(1 + K), plus 0.1 x the NLL
    assert rows[0]["rewards/margins"] == pytest.approx(0, abs=1e-5)
    sdpo = sum(math.log(1 + len(r["rejected"])) for r in built.rows) / len(built.rows)
    assert rows[0]["loss"] == pytest.approx(sdpo + 0.1 * rows[0]["nll_loss"], rel=1e-5)
    assert rows[1]["loss"] < rows[0]["loss"]
