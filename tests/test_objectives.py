"""Each loss against its paper's formula (written out independently here) and, where TRL has
the loss, against TRL's own code on the same inputs."""

import math

import pytest
import torch

from conftest import ROWS
from dpokit.config import TrainConfig, load_config
from dpokit.data import load_examples
from dpokit.errors import DpokitError
from dpokit.families.causal_lm import CausalLMScorer, collate
from dpokit.objectives import LOSSES, REFERENCE_FREE, LossInputs, ObjectiveConfig, check_losses, is_reference_free, objective
from dpokit.recipes.hierarchy import gw_margin, hierarchy_level


def _terms(seed=0, n=6, margin=None):
    g = torch.Generator().manual_seed(seed)
    clen = torch.randint(2, 30, (n,), generator=g).float()
    rlen = torch.randint(2, 30, (n,), generator=g).float()
    # per-token log-probs in (-3, -0.05): sums scale with length, as real ones do
    pc = -(torch.rand(n, generator=g) * 2.95 + 0.05) * clen
    pr = -(torch.rand(n, generator=g) * 2.95 + 0.05) * rlen
    rc = pc + torch.randn(n, generator=g) * 3
    rr = pr + torch.randn(n, generator=g) * 3
    m = torch.zeros(n) if margin is None else margin
    return LossInputs(pc, pr, rc, rr, clen, rlen, m)


def _sig(x):
    return 1 / (1 + math.exp(-x))


def _rows(t: LossInputs):
    """Per-example python floats, so the oracles below share no code with the library."""
    keys = ("policy_chosen", "policy_rejected", "ref_chosen", "ref_rejected", "chosen_len", "rejected_len", "margin")
    return [dict(zip(keys, vals)) for vals in zip(*(getattr(t, k).tolist() for k in keys))]


# ---------------------------------------------------------------- paper formulas, one oracle per loss


def dpo(r, c):  # Rafailov et al. 2023 eq. 7; ODPO offset (Amini et al. 2024); cDPO label smoothing
    h = c.beta * ((r["policy_chosen"] - r["ref_chosen"]) - (r["policy_rejected"] - r["ref_rejected"])) - r["margin"]
    return -(1 - c.label_smoothing) * math.log(_sig(h)) - c.label_smoothing * math.log(_sig(-h))


def exo(r, c):  # Ji et al. 2024 eq. 16 with K = 2: KL between softmax over the pair and (1 - eps, eps)
    sw = c.beta * (r["policy_chosen"] - r["ref_chosen"]) - r["margin"]
    sl = c.beta * (r["policy_rejected"] - r["ref_rejected"])
    zw, zl = math.exp(sw), math.exp(sl)
    p = [zw / (zw + zl), zl / (zw + zl)]
    target = [1 - c.label_smoothing, c.label_smoothing]
    return sum(pi * math.log(pi / ti) for pi, ti in zip(p, target))


def nca(r, c):  # Chen et al. 2024, NCA for pairwise preference data
    rw = c.beta * (r["policy_chosen"] - r["ref_chosen"])
    rl = c.beta * (r["policy_rejected"] - r["ref_rejected"])
    return -math.log(_sig(rw)) - 0.5 * (math.log(_sig(-rw)) + math.log(_sig(-rl)))


def bco(r, c):  # Jung et al. 2024: binary cross-entropy with the implicit reward as logit, delta = 0
    rw = c.beta * (r["policy_chosen"] - r["ref_chosen"])
    rl = c.beta * (r["policy_rejected"] - r["ref_rejected"])
    return -math.log(_sig(rw)) - math.log(1 - _sig(rl))


def apo_zero(r, c):  # D'Oosterlinck et al. 2024 eq. 7
    rw = c.beta * (r["policy_chosen"] - r["ref_chosen"])
    rl = c.beta * (r["policy_rejected"] - r["ref_rejected"])
    return (1 - _sig(rw)) + _sig(rl)


def apo_down(r, c):  # eq. 8
    rw = c.beta * (r["policy_chosen"] - r["ref_chosen"])
    rl = c.beta * (r["policy_rejected"] - r["ref_rejected"])
    return _sig(rw) + (1 - _sig(rw - rl))


def simpo(r, c):  # Meng et al. 2024 eq. 6: length-normalised likelihood, target margin gamma, no reference
    h = (c.beta / r["chosen_len"] * r["policy_chosen"] - c.beta / r["rejected_len"] * r["policy_rejected"]
         - c.simpo_gamma - r["margin"])
    return -(1 - c.label_smoothing) * math.log(_sig(h)) - c.label_smoothing * math.log(_sig(-h))


def orpo_ratio(r, c):  # Hong et al. 2024 eqs. 4-7, in probability space
    pw, pl = math.exp(r["policy_chosen"] / r["chosen_len"]), math.exp(r["policy_rejected"] / r["rejected_len"])
    odds_w, odds_l = pw / (1 - pw), pl / (1 - pl)
    return -c.beta * math.log(_sig(math.log(odds_w / odds_l)))


ORACLES = {"sigmoid": dpo, "exo_pair": exo, "nca_pair": nca, "bco_pair": bco, "apo_zero": apo_zero,
           "apo_down": apo_down, "simpo": simpo}


@pytest.mark.parametrize("name", sorted(ORACLES))
def test_loss_matches_paper_formula(name):
    c = ObjectiveConfig(beta=0.3, label_smoothing=0.1 if name in ("exo_pair", "sigmoid", "simpo") else 0.0,
                        simpo_gamma=0.7)
    margin = torch.linspace(0, 1, 6) if name not in ("nca_pair", "bco_pair", "apo_zero", "apo_down") else None
    t = _terms(margin=margin)
    got = LOSSES[name](t, c)
    want = torch.tensor([ORACLES[name](r, c) for r in _rows(t)])
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def _batch_nll(t: LossInputs) -> float:
    return -sum(t.policy_chosen.tolist()) / sum(t.chosen_len.tolist())


def test_orpo_is_nll_plus_odds_ratio_term():
    c = ObjectiveConfig(beta=0.25)
    t = _terms(seed=3)
    loss, metrics = objective(t, torch.ones(6), ["orpo"], None, c)
    want = _batch_nll(t) + sum(orpo_ratio(r, c) for r in _rows(t)) / 6
    assert loss.item() == pytest.approx(want, rel=1e-5)
    assert metrics["nll_loss"].mean().item() == pytest.approx(_batch_nll(t), rel=1e-5)


def test_rpo_alpha_adds_the_token_mean_nll_of_the_chosen():
    c = ObjectiveConfig(beta=0.2, rpo_alpha=0.7)
    t = _terms(seed=4)
    loss, _ = objective(t, torch.ones(6), ["sigmoid"], None, c)
    want = sum(dpo(r, c) for r in _rows(t)) / 6 + 0.7 * _batch_nll(t)
    assert loss.item() == pytest.approx(want, rel=1e-5)
    # the same as TRL 1.16's spelling of RPO: loss_type [sigmoid, sft] with weights [1, alpha]
    same, _ = objective(t, torch.ones(6), ["sigmoid", "sft"], [1.0, 0.7], ObjectiveConfig(beta=0.2))
    assert same.item() == pytest.approx(loss.item(), rel=1e-6)


def test_combined_losses_and_pair_weights():
    c = ObjectiveConfig(beta=0.2, label_smoothing=0.01)
    t = _terms(seed=5)
    w = torch.tensor([1.0, 0.0, 2.0, 0.5, 1.0, 3.0])
    loss, metrics = objective(t, w, ["sigmoid", "exo_pair", "apo_zero"], [0.5, 0.3, 0.2], c)
    per = [0.5 * dpo(r, c) + 0.3 * exo(r, c) + 0.2 * apo_zero(r, c) for r in _rows(t)]
    assert loss.item() == pytest.approx(sum(wi * p for wi, p in zip(w.tolist(), per)) / 6, rel=1e-5)
    assert metrics["loss"][1].item() == 0.0  # a zero-weight pair contributes nothing


def test_odpo_margin_demands_a_bigger_win():
    c = ObjectiveConfig(beta=0.1)
    base = _terms(seed=6)
    shifted = _terms(seed=6, margin=torch.full((6,), 2.0))
    assert (LOSSES["sigmoid"](shifted, c) > LOSSES["sigmoid"](base, c)).all()
    # the margin acts exactly as a lower implicit-reward gap
    t = _terms(seed=6)
    t.policy_chosen = t.policy_chosen - 2.0 / c.beta
    torch.testing.assert_close(LOSSES["sigmoid"](shifted, c), LOSSES["sigmoid"](t, c))


def test_margin_with_a_loss_that_has_none_is_an_error():
    t = _terms(margin=torch.ones(6))
    with pytest.raises(DpokitError, match="nca_pair.*margin"):
        objective(t, torch.ones(6), ["nca_pair"], None, ObjectiveConfig())
    objective(t, torch.ones(6), ["sigmoid", "sft"], None, ObjectiveConfig())  # sft has no margin to ignore


def test_reference_free_losses_never_read_the_reference():
    c = ObjectiveConfig(beta=2.0, simpo_gamma=0.5)
    a, b = _terms(seed=7), _terms(seed=7)
    b.ref_chosen, b.ref_rejected = b.ref_chosen + 100, b.ref_rejected - 50
    for name in sorted(REFERENCE_FREE):
        torch.testing.assert_close(LOSSES[name](a, c), LOSSES[name](b, c))
    assert is_reference_free(["simpo"]) and is_reference_free(["orpo"]) and is_reference_free(["simpo", "sft"])
    assert not is_reference_free(["simpo", "sigmoid"])


def test_reference_free_is_set_by_the_config():
    assert TrainConfig(loss_type="simpo").reference_free
    assert TrainConfig(loss_type="orpo,sft").reference_free
    assert not TrainConfig(loss_type="sigmoid,sft").reference_free


def test_objective_config_reads_the_train_config():
    cfg = load_config(None, ["loss_type=simpo", "simpo_gamma=1.25", "beta=2.5", "rpo_alpha=0.5"])
    oc = ObjectiveConfig.from_config(cfg)
    assert (oc.beta, oc.simpo_gamma, oc.rpo_alpha) == (2.5, 1.25, 0.5)


def test_loss_checks():
    with pytest.raises(DpokitError, match="exo_pair needs 0 < label_smoothing"):
        check_losses(["exo_pair"], None, 0.0)
    with pytest.raises(DpokitError, match="unknown loss_type"):
        check_losses(["simpo", "no_such_loss"], None, 0.0)
    with pytest.raises(DpokitError, match="rpo_alpha"):
        ObjectiveConfig(rpo_alpha=-1.0)


# ---------------------------------------------------------------- GW-DPO offsets


def test_gw_margin_schedules():
    # linear: proportional to the privilege gap only
    assert gw_margin("system", "user") == 1.0
    assert gw_margin("platform", "data", scale=0.5) == 2.0
    assert gw_margin(4, 2) == gw_margin(3, 1) == 2.0
    # bilateral: the same gap costs more when the overridden (victim) level is more privileged
    assert gw_margin(4, 2, "bilateral") > gw_margin(3, 1, "bilateral")
    assert gw_margin(5, 3, "bilateral") == pytest.approx(2.0)  # equals linear for the top victim
    assert gw_margin(3, 1, "bilateral") == pytest.approx(2.0 * 3 / 5)
    for p in range(2, 6):
        for q in range(1, p):
            assert gw_margin(p, q, "bilateral") <= gw_margin(p, q, "linear")
            if q > 1:
                assert gw_margin(p, q - 1, "bilateral") > gw_margin(p, q, "bilateral")  # grows with the gap
    assert hierarchy_level("Platform") == 5 and hierarchy_level(1) == 1
    for bad in [(2, 2), (1, 3), ("user", "system")]:
        with pytest.raises(ValueError, match="must be above"):
            gw_margin(*bad)
    with pytest.raises(ValueError, match="schedule"):
        gw_margin(3, 1, "quadratic")
    with pytest.raises(ValueError, match="level"):
        gw_margin(6, 1)


# ---------------------------------------------------------------- against TRL's own code


@pytest.fixture(scope="module")
def trl_dpo(tokenizer, tmp_path_factory):
    """TRL's DPOTrainer and dpokit's scorer on the same tiny policy and reference."""
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    from dpokit.tiny import build_llama

    policy = build_llama(tokenizer, hidden_size=32, num_layers=2, num_heads=4, seed=0)
    ref = build_llama(tokenizer, hidden_size=32, num_layers=2, num_heads=4, seed=1)
    args = DPOConfig(output_dir=str(tmp_path_factory.mktemp("trl")), per_device_train_batch_size=8, report_to=[],
                     use_cpu=True, max_length=None, bf16=False)
    trainer = DPOTrainer(model=policy, ref_model=ref, args=args, train_dataset=Dataset.from_list(ROWS),
                         processing_class=tokenizer)
    trl_batch = trainer.data_collator([trainer.train_dataset[i] for i in range(len(ROWS))])
    batch = collate(load_examples(ROWS, tokenizer, None, None), tokenizer.pad_token_id)
    with torch.no_grad():
        p, r = CausalLMScorer(trainer.model)(batch), CausalLMScorer(trainer.ref_model)(batch)
    terms = LossInputs(p.chosen, p.rejected, r.chosen, r.rejected, p.chosen_len, p.rejected_len, batch["margin"])
    assert len(set(terms.chosen_len.tolist())) > 1  # lengths differ, so per-token normalisation matters
    return trainer, trl_batch, terms


@pytest.mark.parametrize("loss_types,loss_weights,eps,rpo_alpha", [
    (["sigmoid"], None, 0.0, None),
    (["robust"], None, 0.2, None),
    (["hinge"], None, 0.0, None),
    (["ipo"], None, 0.0, None),
    (["exo_pair"], None, 1e-3, None),
    (["nca_pair"], None, 0.0, None),
    (["bco_pair"], None, 0.0, None),
    (["apo_zero"], None, 0.0, None),
    (["apo_down"], None, 0.0, None),
    (["sft"], None, 0.0, None),
    (["sigmoid", "bco_pair", "sft"], [0.8, 0.2, 1.0], 0.0, None),  # MPO, as in TRL's docs
    (["sigmoid"], None, 0.0, 0.5),  # RPO: TRL 1.16 spells it [sigmoid, sft] with weights [1, alpha]
])
def test_matches_trl_dpo_trainer(trl_dpo, loss_types, loss_weights, eps, rpo_alpha):
    trainer, trl_batch, terms = trl_dpo
    beta = 0.5
    trainer.beta, trainer.label_smoothing = beta, eps
    trainer.loss_types = loss_types + (["sft"] if rpo_alpha else [])
    trainer.loss_weights = (loss_weights or [1.0] * len(loss_types)) + ([rpo_alpha] if rpo_alpha else [])
    with torch.no_grad():
        want = trainer.compute_loss(trainer.model, trl_batch).item()
    got, _ = objective(terms, torch.ones(len(ROWS)), loss_types, loss_weights,
                       ObjectiveConfig(beta=beta, label_smoothing=eps, rpo_alpha=rpo_alpha))
    # Same tokens, separately computed log-probs (TRL's fused head vs dpokit's packed scorer): float32 noise only.
    # (bf16=False above: TRL's default runs the reference forward under CPU bf16 autocast.)
    assert got.item() == pytest.approx(want, rel=2e-5, abs=2e-5)


def _trl_terms(trainer, batch):
    """Per-token-average log-probs from TRL's own forward, turned back into dpokit's sums and lengths."""
    with torch.no_grad():
        chosen_avg, rejected_avg = trainer.concatenated_forward(trainer.model, batch)[:2]
    clen = (batch["chosen_labels"][:, 1:] != -100).sum(-1).float()
    rlen = (batch["rejected_labels"][:, 1:] != -100).sum(-1).float()
    zero = torch.zeros_like(clen)
    return LossInputs(chosen_avg * clen, rejected_avg * rlen, zero, zero, clen, rlen, zero)


@pytest.mark.parametrize("cpo_alpha", [0.0, 1.0])
def test_simpo_matches_trl_cpo_trainer(tokenizer, tmp_path, cpo_alpha):
    from datasets import Dataset
    from trl.experimental.cpo import CPOConfig, CPOTrainer

    from dpokit.tiny import build_llama

    args = CPOConfig(output_dir=str(tmp_path), report_to=[], use_cpu=True, bf16=False, loss_type="simpo", beta=2.0,
                     simpo_gamma=0.8, cpo_alpha=cpo_alpha, per_device_train_batch_size=8)
    trainer = CPOTrainer(model=build_llama(tokenizer, hidden_size=32, num_layers=2, num_heads=4, seed=0), args=args,
                         train_dataset=Dataset.from_list(ROWS), processing_class=tokenizer)
    batch = next(iter(trainer.get_train_dataloader()))
    with torch.no_grad():
        want, _ = trainer.get_batch_loss_metrics(trainer.model, batch)
    t = _trl_terms(trainer, batch)
    # CPO-SimPO (cpo_alpha = 1) is SimPO plus the chosen NLL: dpokit's [simpo, sft]
    types_, weights = (["simpo"], None) if cpo_alpha == 0 else (["simpo", "sft"], [1.0, cpo_alpha])
    got, _ = objective(t, torch.ones(len(ROWS)), types_, weights, ObjectiveConfig(beta=2.0, simpo_gamma=0.8))
    assert got.item() == pytest.approx(want.item(), rel=1e-5)


def test_orpo_matches_trl_orpo_trainer(tokenizer, tmp_path):
    from datasets import Dataset
    from trl.experimental.orpo import ORPOConfig, ORPOTrainer

    from dpokit.tiny import build_llama

    args = ORPOConfig(output_dir=str(tmp_path), report_to=[], use_cpu=True, bf16=False, beta=0.3,
                      per_device_train_batch_size=8)
    trainer = ORPOTrainer(model=build_llama(tokenizer, hidden_size=32, num_layers=2, num_heads=4, seed=0), args=args,
                          train_dataset=Dataset.from_list(ROWS), processing_class=tokenizer)
    batch = next(iter(trainer.get_train_dataloader()))
    with torch.no_grad():
        want, metrics = trainer.get_batch_loss_metrics(trainer.model, batch)
        logits = trainer.model(batch["chosen_input_ids"], attention_mask=batch["chosen_attention_mask"]).logits
    t = _trl_terms(trainer, batch)
    got, ours = objective(t, torch.ones(len(ROWS)), ["orpo"], None, ObjectiveConfig(beta=0.3))
    # TRL's NLL also covers the prompt tokens (the authors' code); dpokit's covers the chosen reply only,
    # the authors' `disable_prompt_loss` variant. The odds-ratio term is the same.
    completion_nll = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1),
                                                       batch["chosen_labels"][:, 1:].flatten())
    assert ours["nll_loss"].mean().item() == pytest.approx(completion_nll.item(), rel=1e-5)
    odds_term = want.item() - float(metrics["nll_loss"])
    assert got.item() - completion_nll.item() == pytest.approx(odds_term, rel=1e-5)


def test_simpo_training_loads_no_reference(tiny_model_dir, pairs_file, cache_dir, tmp_path, tokenizer):
    from dpokit import train

    cfg = load_config(None, ["loss_type=simpo", "beta=2.0", "simpo_gamma=0.3", f"model={tiny_model_dir}",
                             f"train_data={pairs_file}", f"output_dir={tmp_path / 'run'}", "max_steps=1",
                             "per_device_train_batch_size=8", "disable_tqdm=true", "save_steps=0"])
    assert cfg.reference_free
    result = train(cfg)
    assert not cache_dir.exists() or not any(cache_dir.rglob("*.safetensors"))  # nothing was scored by a reference
    # the logged step-1 loss is SimPO on the starting weights, with no reference anywhere
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    batch = collate(load_examples(ROWS, tokenizer, cfg.max_length, cfg.max_prompt_length), tokenizer.pad_token_id)
    with torch.no_grad():
        p = CausalLMScorer(model)(batch)
    zero = torch.zeros_like(p.chosen)
    want, metrics = objective(LossInputs(p.chosen, p.rejected, zero, zero, p.chosen_len, p.rejected_len, zero),
                              torch.ones(len(ROWS)), ["simpo"], None, ObjectiveConfig.from_config(cfg))
    assert result.history[0]["loss"] == pytest.approx(want.item(), rel=1e-4)
    assert result.history[0]["rewards/chosen"] == pytest.approx(metrics["rewards/chosen"].mean().item(), rel=1e-4)
