"""CPL (Hejna et al. 2024): the pairwise loss against its formula written out here, the conservative
bias λ, the BC term, the ranking form (K = 1 against `cpl`, masked slots), large scores, and config checks."""

import math

import pytest
import torch

from dpokit.config import TrainConfig, load_config
from dpokit.errors import DpokitError
from dpokit.objectives import (LOSSES, REFERENCE_FREE, LossInputs, ObjectiveConfig, check_data, check_losses,
                               objective)


def _pairs(sw, sl, T=5, margin=None):
    sw, sl = torch.tensor(sw, dtype=torch.float64), torch.tensor(sl, dtype=torch.float64)
    n = len(sw)
    return LossInputs(policy_chosen=sw, policy_rejected=sl, ref_chosen=torch.zeros(n, dtype=torch.float64),
                      ref_rejected=torch.zeros(n, dtype=torch.float64), chosen_len=torch.full((n,), float(T)),
                      rejected_len=torch.full((n,), float(T)),
                      margin=torch.zeros(n, dtype=torch.float64) if margin is None else torch.tensor(margin))


def _groups(sw, sl, mask=None, T=5):
    sw, sl = torch.tensor(sw, dtype=torch.float64), torch.tensor(sl, dtype=torch.float64)
    B, K = sl.shape
    return LossInputs(policy_chosen=sw, policy_rejected=sl, ref_chosen=torch.zeros(B, dtype=torch.float64),
                      ref_rejected=torch.zeros(B, K, dtype=torch.float64), chosen_len=torch.full((B,), float(T)),
                      rejected_len=torch.full((B, K), float(T)), margin=torch.zeros(B, dtype=torch.float64),
                      rejected_mask=None if mask is None else torch.tensor(mask))


def _log_sigmoid(x: float) -> float:
    return -math.log1p(math.exp(-x)) if x >= 0 else x - math.log1p(math.exp(x))


SW, SL = [-3.0, -12.5, -0.4, 2.0], [-7.0, -2.0, -0.5, -9.0]


def test_cpl_is_reference_free_and_reads_pairs():
    assert {"cpl", "cpl_rank"} <= REFERENCE_FREE
    assert TrainConfig(loss_type="cpl").reference_free
    check_data(["cpl"], "pairs")
    check_data(["cpl_rank"], "groups")
    with pytest.raises(DpokitError, match="cpl"):
        check_data(["cpl"], "groups")


def test_cpl_matches_the_formula_by_hand_with_the_bc_term():
    alpha, lam, bc, T = 0.3, 0.6, 0.25, 5
    t = _pairs(SW, SL, T=T)
    loss, metrics = objective(t, torch.ones(4, dtype=torch.float64), ["cpl"], None,
                              ObjectiveConfig(beta=alpha, cpl_lambda=lam, rpo_alpha=bc))
    expected = [-_log_sigmoid(alpha * (w - lam * l)) + bc * (-w / T) for w, l in zip(SW, SL)]
    assert metrics["loss"].tolist() == pytest.approx(expected, rel=1e-9)
    assert loss.item() == pytest.approx(sum(expected) / 4, rel=1e-9)
    # the BC term's mean over the batch is the per-step NLL of every chosen step
    assert (bc * -torch.tensor(SW) / T).mean().item() == pytest.approx(bc * -sum(SW) / (4 * T))


def test_unbiased_cpl_without_bc_is_the_plain_logistic_loss():
    alpha = 0.7
    got = LOSSES["cpl"](_pairs(SW, SL), ObjectiveConfig(beta=alpha, cpl_lambda=1.0))
    expected = [-_log_sigmoid(alpha * (w - l)) for w, l in zip(SW, SL)]
    assert got.tolist() == pytest.approx(expected, rel=1e-12)
    # a margin is an offset the chosen must win by
    m = [0.5, 0.0, 1.0, 2.0]
    got = LOSSES["cpl"](_pairs(SW, SL, margin=m), ObjectiveConfig(beta=alpha))
    assert got.tolist() == pytest.approx([-_log_sigmoid(alpha * (w - l) - mm) for w, l, mm in zip(SW, SL, m)])


def test_lower_lambda_discounts_only_the_rejected_score():
    c1, c_half = ObjectiveConfig(beta=1.0, cpl_lambda=1.0), ObjectiveConfig(beta=1.0, cpl_lambda=0.5)
    # log-probabilities are <= 0: shrinking the loser's (negative) score toward 0 makes the pair harder
    neg = _pairs([-2.0, -5.0], [-4.0, -1.0])
    assert (LOSSES["cpl"](neg, c_half) > LOSSES["cpl"](neg, c1)).all()
    # densities can be positive: then shrinking the loser's score makes it easier
    pos = _pairs([3.0, 1.0], [2.0, 4.0])
    assert (LOSSES["cpl"](pos, c_half) < LOSSES["cpl"](pos, c1)).all()
    # the gradient on the rejected score is λ times the (negated) gradient on the chosen score
    sw = torch.tensor([-2.0], dtype=torch.float64, requires_grad=True)
    sl = torch.tensor([-4.0], dtype=torch.float64, requires_grad=True)
    t = _pairs([0.0], [0.0])
    t.policy_chosen, t.policy_rejected = sw, sl
    LOSSES["cpl"](t, c_half).sum().backward()
    assert sl.grad.item() == pytest.approx(-0.5 * sw.grad.item())


@pytest.mark.parametrize("lam", [1.0, 0.4])
def test_cpl_rank_with_one_rejected_segment_is_cpl(lam):
    c = ObjectiveConfig(beta=0.9, cpl_lambda=lam)
    pairwise = LOSSES["cpl"](_pairs(SW, SL), c)
    grouped = LOSSES["cpl_rank"](_groups(SW, [[x] for x in SL]), c)
    torch.testing.assert_close(grouped, pairwise, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(LOSSES["cpl_rank"](_pairs(SW, SL), c), pairwise, rtol=1e-12, atol=1e-12)


def test_cpl_rank_matches_plackett_luce_and_ignores_masked_slots():
    alpha, lam = 0.5, 0.8
    sw, sl = [-1.0, -4.0], [[-3.0, -2.0, -6.0], [-5.0, 0.0, 0.0]]
    mask = [[True, True, True], [True, False, False]]
    c = ObjectiveConfig(beta=alpha, cpl_lambda=lam)
    got = LOSSES["cpl_rank"](_groups(sw, sl, mask), c)
    expected = []
    for w, ls, ms in zip(sw, sl, mask):  # −log exp(αS_w) / (exp(αS_w) + Σ_j exp(αλS_j))
        den = math.exp(alpha * w) + sum(math.exp(alpha * lam * l) for l, m in zip(ls, ms) if m)
        expected.append(-(alpha * w - math.log(den)))
    assert got.tolist() == pytest.approx(expected, rel=1e-12)
    # whatever sits in an empty slot changes nothing
    junk = [[-3.0, -2.0, -6.0], [-5.0, 1e6, -1e6]]
    torch.testing.assert_close(LOSSES["cpl_rank"](_groups(sw, junk, mask), c), got)
    # the second group is the pair (sw[1], sl[1][0])
    assert got[1].item() == pytest.approx(LOSSES["cpl"](_pairs([sw[1]], [sl[1][0]]), c).item())


def test_cpl_is_finite_and_has_gradients_for_huge_scores():
    c = ObjectiveConfig(beta=1.0, cpl_lambda=0.5)
    sw = torch.tensor([-1e6, 1e6, -5e5, -1e6], dtype=torch.float32, requires_grad=True)
    sl = torch.tensor([1e6, -1e6, -5e5, -1e6], dtype=torch.float32, requires_grad=True)
    t = LossInputs(policy_chosen=sw, policy_rejected=sl, ref_chosen=torch.zeros(4), ref_rejected=torch.zeros(4),
                   chosen_len=torch.full((4,), 100.0), rejected_len=torch.full((4,), 100.0), margin=torch.zeros(4))
    loss = LOSSES["cpl"](t, c)
    assert torch.isfinite(loss).all() and loss[0].item() == pytest.approx(1.5e6)
    assert loss[1].item() == pytest.approx(0.0, abs=1e-6)
    loss.sum().backward()
    assert torch.isfinite(sw.grad).all() and torch.isfinite(sl.grad).all()
    g = LossInputs(policy_chosen=sw.detach(), policy_rejected=torch.stack([sl.detach(), -sl.detach()], 1),
                   ref_chosen=torch.zeros(4), ref_rejected=torch.zeros(4, 2), chosen_len=torch.full((4,), 100.0),
                   rejected_len=torch.full((4, 2), 100.0), margin=torch.zeros(4),
                   rejected_mask=torch.tensor([[True, False]] * 4))
    rank = LOSSES["cpl_rank"](g, c)
    assert torch.isfinite(rank).all()
    torch.testing.assert_close(rank, loss.detach())


@pytest.mark.parametrize("bad", [0.0, -0.5, 1.5])
def test_cpl_lambda_out_of_range_is_one_clear_line(bad):
    with pytest.raises(DpokitError) as e:
        ObjectiveConfig(cpl_lambda=bad)
    assert "cpl_lambda must lie in (0, 1]" in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(DpokitError, match=r"cpl_lambda must lie in \(0, 1\]"):
        load_config(None, [f"cpl_lambda={bad}", "loss_type=cpl"])
    with pytest.raises(DpokitError, match="expects float"):
        load_config(None, ["cpl_lambda=high"])
    assert load_config(None, ["cpl_lambda=0.5", "loss_type=cpl"]).cpl_lambda == 0.5


def test_cpl_rank_refuses_label_smoothing():
    check_losses(["cpl"], None, 0.1)  # cDPO-style smoothing is fine on the pairwise loss
    with pytest.raises(DpokitError, match="cpl_rank has no label smoothing"):
        check_losses(["cpl_rank"], None, 0.1)
