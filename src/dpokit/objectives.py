"""Preference objectives: pure tensor functions, log-likelihood terms in, loss and metrics out.

Every loss reads a `LossInputs` (per-example policy and reference log-likelihoods, lengths,
margins) and returns a per-example loss of shape [batch]. `objective` combines the chosen
losses with their weights, applies per-pair weights, and computes the metrics under TRL's
names. Adding a loss is one function with `@register("name")`.

Notation in the docstrings: Δ_w = log π(y_w|x) − log π_ref(y_w|x) (chosen log-ratio), Δ_l
the same for the rejected reply, |y| the reply's length in tokens, m the pair's margin, σ
the logistic function. Log-likelihoods are sums over the reply unless a loss says
"per token", which divides by |y|.

Three kinds of data reach the losses (see `data_kind`): pairs; S-DPO groups, where the
rejected terms have shape [batch, K] with `rejected_mask` marking the K slots in use; and
unpaired (KTO) items, where `label` says whether the completion (the "chosen" terms) is
desirable and the "rejected" terms belong to a mismatched completion, for the KL estimate.
Each loss declares the kinds it reads.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from .errors import DpokitError


@dataclass
class LossInputs:
    policy_chosen: torch.Tensor
    policy_rejected: torch.Tensor
    ref_chosen: torch.Tensor
    ref_rejected: torch.Tensor
    chosen_len: torch.Tensor
    rejected_len: torch.Tensor
    margin: torch.Tensor  # the chosen must win by this much (ODPO); zeros by default
    label: torch.Tensor | None = None  # unpaired data: True where the completion is desirable
    rejected_mask: torch.Tensor | None = None  # S-DPO groups: [batch, K], True where a rejected reply exists

    @property
    def kind(self) -> str:
        if self.label is not None:
            return "unpaired"
        return "groups" if self.policy_rejected.dim() == 2 else "pairs"

    @property
    def slots(self) -> torch.Tensor:
        """Groups: [batch, K], True where a rejected reply exists."""
        if self.rejected_mask is not None:
            return self.rejected_mask
        return torch.ones(self.policy_rejected.shape, dtype=torch.bool, device=self.policy_rejected.device)

    @property
    def chosen_logratios(self) -> torch.Tensor:
        return self.policy_chosen - self.ref_chosen

    @property
    def rejected_logratios(self) -> torch.Tensor:
        return self.policy_rejected - self.ref_rejected

    @property
    def chosen_avg(self) -> torch.Tensor:
        """Per-token log-likelihood of the chosen reply under the policy."""
        return self.policy_chosen / self.chosen_len.clamp(min=1)

    @property
    def rejected_avg(self) -> torch.Tensor:
        return self.policy_rejected / self.rejected_len.clamp(min=1)


@dataclass
class ObjectiveConfig:
    beta: float = 0.1
    label_smoothing: float = 0.0
    simpo_gamma: float = 0.5  # SimPO target reward margin γ (TRL CPOConfig name)
    rpo_alpha: float | None = None  # RPO: adds α × NLL of the chosen reply to any loss (TRL's former DPOConfig name)
    desirable_weight: float = 1.0  # KTO: λ_D, the weight of desirable completions' losses (TRL KTOConfig name)
    undesirable_weight: float = 1.0  # KTO: λ_U
    cpl_lambda: float = 1.0  # CPL: conservative bias λ ∈ (0, 1] on the rejected segment's score (`contrastive_bias`)

    def __post_init__(self):
        if not 0 < self.cpl_lambda <= 1:
            raise DpokitError(f"cpl_lambda must lie in (0, 1] (CPL's conservative bias on the rejected segment), "
                              f"got {self.cpl_lambda}")
        if self.rpo_alpha is not None and self.rpo_alpha < 0:
            raise DpokitError(f"rpo_alpha must be >= 0, got {self.rpo_alpha}")
        for name in ("desirable_weight", "undesirable_weight"):
            if getattr(self, name) < 0:
                raise DpokitError(f"{name} must be >= 0, got {getattr(self, name)}")

    @classmethod
    def from_config(cls, cfg) -> "ObjectiveConfig":
        """The objective's keys, read by name from a TrainConfig (or anything with those attributes)."""
        return cls(**{f.name: getattr(cfg, f.name) for f in dataclasses.fields(cls) if hasattr(cfg, f.name)})


LossFn = Callable[[LossInputs, ObjectiveConfig], torch.Tensor]
LOSSES: dict[str, LossFn] = {}
REFERENCE_FREE: set[str] = set()  # losses that never read the reference log-likelihoods
NO_MARGIN: set[str] = set()  # pairwise losses with no place for a per-pair margin
DATA: dict[str, tuple[str, ...]] = {}  # loss → the kinds of data it reads: pairs, groups, unpaired
# loss → why it needs an exact log-probability (a family's `likelihood` "exact"), for those that do
NEEDS_PROBABILITY: dict[str, str] = {}


def register(name: str, reference_free: bool = False, margin: bool = True, data: tuple[str, ...] = ("pairs",),
             needs_probability: str | None = None):
    """Register a loss under `name`: whether it reads the reference, has a per-pair margin, the kinds of data
    it reads, and (`needs_probability`: the reason) whether it only makes sense on an exact log-probability."""
    def wrap(fn: LossFn) -> LossFn:
        LOSSES[name] = fn
        DATA[name] = data
        if needs_probability:
            NEEDS_PROBABILITY[name] = needs_probability
        if reference_free:
            REFERENCE_FREE.add(name)
        if not margin:
            NO_MARGIN.add(name)
        return fn
    return wrap


def is_reference_free(loss_types: list[str]) -> bool:
    """True when none of the losses reads a reference model (SimPO, ORPO, SFT alone or combined)."""
    return bool(loss_types) and all(name in REFERENCE_FREE for name in loss_types)


def _dpo_logits(t: LossInputs, c: ObjectiveConfig) -> torch.Tensor:
    return c.beta * (t.chosen_logratios - t.rejected_logratios) - t.margin


def _smoothed(z: torch.Tensor, eps: float) -> torch.Tensor:
    return -(1 - eps) * F.logsigmoid(z) - eps * F.logsigmoid(-z)


def _nll(t: LossInputs) -> torch.Tensor:
    """Per-example share of the chosen replies' token-mean NLL over the batch.

    The mean of these values over the batch is −Σ_i log π(y_w,i|x_i) / Σ_i |y_w,i|: the
    cross-entropy over every chosen token of the batch, as TRL computes its NLL terms
    (DPO `sft` and RPO, CPO, ORPO). Long replies weigh more than in a per-sequence mean.
    """
    return -t.policy_chosen / t.chosen_len.float().mean().clamp(min=1)


def _log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 − exp(x)) for x < 0, accurate at both ends (Mächler 2012)."""
    return torch.where(x > -math.log(2), torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


# ---------------------------------------------------------------- losses with a reference


@register("sigmoid")
def sigmoid_loss(t: LossInputs, c: ObjectiveConfig) -> torch.Tensor:
    """DPO (Rafailov et al. 2023): −log σ(β(Δ_w − Δ_l) − m). With label_smoothing ε > 0 this is
    conservative DPO (cDPO): the label is trusted with probability 1 − ε. A margin m makes it
    ODPO (Amini et al. 2024): the chosen reply must win by m."""
    return _smoothed(_dpo_logits(t, c), c.label_smoothing)


@register("robust")
def robust_loss(t: LossInputs, c: ObjectiveConfig) -> torch.Tensor:
    """Robust DPO (Chowdhury et al. 2024): unbiased under labels flipped with probability ε."""
    z = _dpo_logits(t, c)
    eps = c.label_smoothing
    return (-(1 - eps) * F.logsigmoid(z) + eps * F.logsigmoid(-z)) / (1 - 2 * eps)


@register("hinge")
def hinge_loss(t: LossInputs, c: ObjectiveConfig) -> torch.Tensor:
    """SLiC-HF calibration loss (Zhao et al. 2023): max(0, 1 − (β(Δ_w − Δ_l) − m))."""
    return torch.relu(1 - _dpo_logits(t, c))


@register("ipo")
def ipo_loss(t: LossInputs, c: ObjectiveConfig) -> torch.Tensor:
    """IPO (Azar et al. 2023), eq. 17, on per-token-averaged log-ratios (as TRL and the IPO authors use)."""
    delta = t.chosen_logratios / t.chosen_len.clamp(min=1) - t.rejected_logratios / t.rejected_len.clamp(min=1)
    return (delta - t.margin - 1 / (2 * c.beta)) ** 2


@register("exo_pair")
def exo_pair_loss(t: LossInputs, c: ObjectiveConfig) -> torch.Tensor:
    """EXO (Ji et al. 2024, eq. 16, K = 2): KL(p_θ ‖ p_label) with p_θ = softmax over the pair of
    β·Δ and p_label = (1 − ε, ε), ε = label_smoothing > 0. With z = β(Δ_w − Δ_l) − m:
    σ(z)(log σ(z) − log(1 − ε)) + σ(−z)(log σ(−z) − log ε)."""
    z = _dpo_logits(t, c)
    eps = c.label_smoothing
    return (torch.sigmoid(z) * (F.logsigmoid(z) - math.log1p(-eps))
            + torch.sigmoid(-z) * (F.logsigmoid(-z) - math.log(eps)))


@register("nca_pair", margin=False)
def nca_pair_loss(t: LossInputs, c: ObjectiveConfig) -> torch.Tensor:
    """NCA (Chen et al. 2024, pairwise): −log σ(βΔ_w) − ½ log σ(−βΔ_w) − ½ log σ(−βΔ_l).
    Each reply's reward is judged on its own, so the chosen reply's likelihood is pushed up."""
    rw, rl = c.beta * t.chosen_logratios, c.beta * t.rejected_logratios
    return -F.logsigmoid(rw) - 0.5 * F.logsigmoid(-rw) - 0.5 * F.logsigmoid(-rl)


@register("bco_pair", margin=False)
def bco_pair_loss(t: LossInputs, c: ObjectiveConfig) -> torch.Tensor:
    """BCO (Jung et al. 2024), paired form as TRL's `bco_pair`: a binary classifier whose logit is
    the implicit reward, chosen labelled 1 and rejected 0: −log σ(βΔ_w) − log σ(−βΔ_l). (The
    paper's running reward shift δ is left out, as in TRL's DPOTrainer.)"""
    return -F.logsigmoid(c.beta * t.chosen_logratios) - F.logsigmoid(-c.beta * t.rejected_logratios)


@register("apo_zero", margin=False)
def apo_zero_loss(t: LossInputs, c: ObjectiveConfig) -> torch.Tensor:
    """APO-zero (D'Oosterlinck et al. 2024, eq. 7): 1 − σ(βΔ_w) + σ(βΔ_l). Raises the chosen
    likelihood and lowers the rejected: for chosen replies better than the model's own."""
    return 1 - torch.sigmoid(c.beta * t.chosen_logratios) + torch.sigmoid(c.beta * t.rejected_logratios)


@register("apo_down", margin=False)
def apo_down_loss(t: LossInputs, c: ObjectiveConfig) -> torch.Tensor:
    """APO-down (eq. 8): σ(βΔ_w) + 1 − σ(β(Δ_w − Δ_l)). Lowers both, the rejected more: for
    chosen replies worse than the model's own."""
    return torch.sigmoid(c.beta * t.chosen_logratios) + 1 - torch.sigmoid(
        c.beta * (t.chosen_logratios - t.rejected_logratios))


@register("sdpo", data=("pairs", "groups"))
def sdpo_loss(t: LossInputs, c: ObjectiveConfig) -> torch.Tensor:
    """S-DPO (Chen et al. 2024, "On Softmax Direct Preference Optimization for Recommendation", eq. 12):
    −log σ(−log Σ_j exp(β(Δ_j − Δ_w) + m)) over the K rejected replies j of the prompt, a softmax
    over the negatives (Plackett–Luce with the chosen on top). With K = 1 it is DPO's sigmoid loss."""
    rejected = t.rejected_logratios if t.rejected_logratios.dim() == 2 else t.rejected_logratios[:, None]
    z = c.beta * (rejected - t.chosen_logratios[:, None]) + t.margin[:, None]
    if t.rejected_mask is not None:
        z = z.masked_fill(~t.rejected_mask, -math.inf)  # empty slots of smaller groups
    return -F.logsigmoid(-torch.logsumexp(z, dim=1))


@register("dmpo", data=("pairs", "groups"))
def dmpo_loss(t: LossInputs, c: ObjectiveConfig) -> torch.Tensor:
    """DMPO (Bai et al. 2024, "Finetuning Large Language Model for Personalized Ranking", Direct Multi-Preference
    Optimization): the chosen reply against the mean of the K rejected replies' log-ratios,
    −log σ(β(Δ_w − (1/K) Σ_j Δ_j) − m), over the slots in use (empty slots of smaller groups are left out of
    the mean). With K = 1 it is DPO's sigmoid loss; unlike `sdpo`'s softmax, every negative weighs the same."""
    rejected = t.rejected_logratios if t.rejected_logratios.dim() == 2 else t.rejected_logratios[:, None]
    mask = t.rejected_mask if t.rejected_mask is not None else torch.ones_like(rejected, dtype=torch.bool)
    mean = torch.where(mask, rejected, torch.zeros_like(rejected)).sum(1) / mask.sum(1).clamp(min=1)
    return -F.logsigmoid(c.beta * (t.chosen_logratios - mean) - t.margin)


# ---------------------------------------------------------------- unpaired losses (KTO)


def kto_kl(t: LossInputs) -> torch.Tensor:
    """KTO's reference point z0 = max(0, mean over the batch of log π(y'|x) − log π_ref(y'|x)) on
    mismatched pairs (x, y'), detached (Ethayarajh et al. 2024, §4.1; TRL's KTOTrainer). TRL also
    averages it over processes; here it is the micro-batch's own."""
    return t.rejected_logratios.detach().mean().clamp(min=0)


@register("kto", margin=False, data=("unpaired",))
def kto_loss(t: LossInputs, c: ObjectiveConfig) -> torch.Tensor:
    """KTO (Ethayarajh et al. 2024, eqs. 7–8), as TRL's KTOTrainer `kto`: with r = Δ of the completion
    and z0 = `kto_kl`, a desirable completion costs λ_D·(1 − σ(β(r − z0))), an undesirable one
    λ_U·(1 − σ(β(z0 − r))); λ_D = desirable_weight, λ_U = undesirable_weight."""
    r, z0 = t.chosen_logratios, kto_kl(t)
    return torch.where(t.label, c.desirable_weight * (1 - torch.sigmoid(c.beta * (r - z0))),
                       c.undesirable_weight * (1 - torch.sigmoid(c.beta * (z0 - r))))


@register("apo_zero_unpaired", margin=False, data=("unpaired",))
def apo_zero_unpaired_loss(t: LossInputs, c: ObjectiveConfig) -> torch.Tensor:
    """APO-zero, unpaired (D'Oosterlinck et al. 2024; TRL KTOTrainer's `apo_zero_unpaired`): a desirable
    completion costs λ_D·(1 − σ(βr)), an undesirable one λ_U·σ(βr); no KL reference point."""
    r = c.beta * t.chosen_logratios
    return torch.where(t.label, c.desirable_weight * (1 - torch.sigmoid(r)), c.undesirable_weight * torch.sigmoid(r))


# ---------------------------------------------------------------- reference-free losses


@register("sft", reference_free=True, margin=False, data=("pairs", "groups"))
def sft_loss(t: LossInputs, c: ObjectiveConfig) -> torch.Tensor:
    """NLL of the chosen replies, per token over the batch (TRL DPO's `sft`). Combined with DPO
    (`loss_type: [sigmoid, sft]`, `loss_weights: [1, α]`) it is RPO; `rpo_alpha` is shorthand."""
    return _nll(t)


@register("simpo", reference_free=True, needs_probability="its reward is the per-unit average log-probability")
def simpo_loss(t: LossInputs, c: ObjectiveConfig) -> torch.Tensor:
    """SimPO (Meng et al. 2024, eq. 6), reference-free: −log σ(β·(log π(y_w|x)/|y_w| −
    log π(y_l|x)/|y_l|) − γ − m), γ = simpo_gamma; label_smoothing as in TRL's CPOTrainer."""
    z = c.beta * (t.chosen_avg - t.rejected_avg) - c.simpo_gamma - t.margin
    return _smoothed(z, c.label_smoothing)


@register("orpo", reference_free=True, margin=False, needs_probability="it computes log(1 − p) from the log-probability")
def orpo_loss(t: LossInputs, c: ObjectiveConfig) -> torch.Tensor:
    """ORPO (Hong et al. 2024, eqs. 6–7): NLL(y_w) − λ log σ(log odds(y_w) − log odds(y_l)),
    odds(y) = P/(1 − P) with P = exp of the per-token log-likelihood; λ = beta (TRL ORPOConfig).
    The NLL is per token over the batch's chosen replies: the authors' `disable_prompt_loss`
    variant. TRL's ORPOTrainer (like the authors' default) also counts the prompt tokens."""
    log_odds = (t.chosen_avg - t.rejected_avg) - (_log1mexp(t.chosen_avg) - _log1mexp(t.rejected_avg))
    return _nll(t) - c.beta * F.logsigmoid(log_odds)


@register("cpl", reference_free=True)
def cpl_loss(t: LossInputs, c: ObjectiveConfig) -> torch.Tensor:
    """CPL (Hejna et al. 2024, "Contrastive Preference Learning: Learning from Human Feedback without
    RL", ICLR 2024: the CPL loss with the conservative bias of §3.2), reference-free: −log σ(α·(S_w − λ·S_l) − m), where
    S = Σ_t log π(a_t|s_t) is a segment's summed log-likelihood, α = beta (the temperature) and
    λ = cpl_lambda ∈ (0, 1], which scales only the rejected segment's score, as the authors' code
    (`biased_bce_with_logits`: adv_w − bias·adv_l with adv = α·log π) does; λ = 1 is the unbiased loss.
    CPL's BC regulariser (`bc_coeff`, on the preferred segments: `bc_data: pos`) is `rpo_alpha`: a
    per-step NLL of the chosen segments. label_smoothing as in cDPO."""
    z = c.beta * (t.policy_chosen - c.cpl_lambda * t.policy_rejected) - t.margin
    return _smoothed(z, c.label_smoothing)


@register("cpl_rank", reference_free=True, data=("pairs", "groups"))
def cpl_rank_loss(t: LossInputs, c: ObjectiveConfig) -> torch.Tensor:
    """CPL over a ranking (Hejna et al. 2024, which notes that CPL extends to rankings): the chosen segment
    on top of K rejected ones under Plackett–Luce with the same bias, −log(exp(αS_w) / (exp(αS_w) +
    Σ_j exp(αλS_j − m))) = −log σ(−log Σ_j exp(α(λS_j − S_w) + m)), a log-sum-exp over the K slots in
    use (empty slots of smaller groups are masked out). With K = 1 it is `cpl`. (The authors' code for
    scored segments, `biased_bce_with_scores`, averages the pairwise loss over every ordered pair
    instead; this is the softmax form, as `sdpo` is for DPO.)"""
    rejected = t.policy_rejected if t.policy_rejected.dim() == 2 else t.policy_rejected[:, None]
    z = c.beta * (c.cpl_lambda * rejected - t.policy_chosen[:, None]) + t.margin[:, None]
    if t.rejected_mask is not None:
        z = z.masked_fill(~t.rejected_mask, -math.inf)  # empty slots of smaller groups
    return -F.logsigmoid(-torch.logsumexp(z, dim=1))


# ---------------------------------------------------------------- combining


def check_losses(loss_types: list[str], loss_weights: list[float] | None, label_smoothing: float) -> None:
    unknown = [name for name in loss_types if name not in LOSSES]
    if unknown:
        raise DpokitError(f"unknown loss_type {unknown[0]!r}; known: {', '.join(sorted(LOSSES))}")
    if not loss_types:
        raise DpokitError("loss_type is empty")
    if loss_weights is not None and len(loss_weights) != len(loss_types):
        raise DpokitError(f"loss_weights has {len(loss_weights)} entries for {len(loss_types)} loss types")
    if "robust" in loss_types and not 0 <= label_smoothing < 0.5:
        raise DpokitError(f"robust DPO needs 0 <= label_smoothing < 0.5, got {label_smoothing}")
    if "exo_pair" in loss_types and not 0 < label_smoothing < 1:
        raise DpokitError(f"exo_pair needs 0 < label_smoothing < 1 (the paper uses 1e-3), got {label_smoothing}")
    if not 0 <= label_smoothing <= 1:
        raise DpokitError(f"label_smoothing must lie in [0, 1], got {label_smoothing}")
    for name in ("sdpo", "cpl_rank", "dmpo"):
        if name in loss_types and label_smoothing:
            raise DpokitError(f"{name} has no label smoothing; set label_smoothing: 0 (got {label_smoothing})")


def check_likelihood(loss_types: list[str], family: str, likelihood: str) -> None:
    """Whether the losses fit what the family's score is: "exact", "density" or "surrogate"
    (`dpokit.families.base.LIKELIHOODS`)."""
    for name in loss_types:
        if name in NEEDS_PROBABILITY and likelihood != "exact":
            raise DpokitError(f"loss_type {name!r} needs an exact log-probability ({NEEDS_PROBABILITY[name]}), but "
                              f"family {family!r} gives a {likelihood} score, not an exact log-probability; use a loss that reads log-ratios, "
                              "such as sigmoid")


KIND_NAMES = {"pairs": "preference pairs (prompt, chosen, rejected)",
              "groups": "S-DPO groups (a list of replies in 'rejected')",
              "unpaired": "unpaired rows (prompt, completion, label)"}


def check_data(loss_types: list[str], kind: str, rpo_alpha: float | None = None,
               batch_size: int | None = None) -> None:
    """Whether the losses can read this kind of data (see `dpokit.data.data_kind`)."""
    for name in loss_types:
        if kind not in DATA[name]:
            fits = sorted(n for n in LOSSES if kind in DATA[n])
            raise DpokitError(f"loss_type {name!r} reads {' or '.join(KIND_NAMES[k] for k in DATA[name])}, but the "
                              f"data holds {KIND_NAMES[kind]}; for those use one of {', '.join(fits)}")
    if kind == "unpaired" and rpo_alpha:
        raise DpokitError("rpo_alpha adds the NLL of the chosen reply, and unpaired data has no chosen reply")
    if kind == "unpaired" and "kto" in loss_types and batch_size is not None and batch_size < 2:
        raise DpokitError("kto estimates its KL reference point over the micro-batch: per_device_train_batch_size "
                          "must be >= 2 (as in TRL)")


def objective(terms: LossInputs, weight: torch.Tensor, loss_types: list[str], loss_weights: list[float] | None,
              config: ObjectiveConfig) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Scalar loss and per-example metrics (each [batch], detached) under TRL's names.

    loss = mean_i weight_i · (Σ_k w_k · L_k(i) + rpo_alpha · NLL_i).
    """
    loss_weights = loss_weights or [1.0] * len(loss_types)
    check_data(loss_types, terms.kind, config.rpo_alpha)
    ignoring = [name for name in loss_types if name in NO_MARGIN and name != "sft"]
    if ignoring and bool((terms.margin != 0).any()):
        raise DpokitError(f"loss_type {ignoring[0]!r} has no per-pair margin, but the data sets 'margin'; drop the "
                          f"margins or use one of {', '.join(sorted(set(LOSSES) - NO_MARGIN))}")
    per_example = sum(w * LOSSES[name](terms, config) for name, w in zip(loss_types, loss_weights))
    if config.rpo_alpha:
        per_example = per_example + config.rpo_alpha * _nll(terms)
    loss = (weight * per_example).mean()
    with torch.no_grad():
        if is_reference_free(loss_types):
            # No reference: rewards are the policy's own per-token log-likelihoods, as TRL's CPO and ORPO log them.
            chosen_rewards = config.beta * terms.chosen_avg.detach()
            rejected_rewards = config.beta * terms.rejected_avg.detach()
        else:
            chosen_rewards = config.beta * terms.chosen_logratios.detach()
            rejected_rewards = config.beta * terms.rejected_logratios.detach()
        metrics = {"loss": (weight * per_example).detach()}
        if terms.kind == "unpaired":
            # As TRL's KTOTrainer: "chosen" metrics average the desirable completions, "rejected" the undesirable.
            # (Uneven lengths: the loop's means count elements.) No accuracy or margin: nothing is paired.
            good = terms.label
            metrics.update({
                "rewards/chosen": chosen_rewards[good],
                "rewards/rejected": chosen_rewards[~good],
                "logps/chosen": terms.policy_chosen.detach()[good],
                "logps/rejected": terms.policy_chosen.detach()[~good],
            })
            if "kto" in loss_types:
                metrics["kl"] = kto_kl(terms).expand(len(good))
            return loss, metrics
        logps_rejected = terms.policy_rejected.detach()
        beaten = rejected_rewards
        if terms.kind == "groups":
            # Per group: the mean over its rejected replies; accurate when the chosen beats every one of them.
            mask = terms.slots
            n = mask.sum(1).clamp(min=1)
            beaten = rejected_rewards.masked_fill(~mask, -math.inf).amax(1)
            rejected_rewards = (rejected_rewards * mask).sum(1) / n
            logps_rejected = (logps_rejected * mask).sum(1) / n
        metrics.update({
            "rewards/chosen": chosen_rewards,
            "rewards/rejected": rejected_rewards,
            "rewards/accuracies": (chosen_rewards > beaten).float(),
            "rewards/margins": chosen_rewards - rejected_rewards,
            "logps/chosen": terms.policy_chosen.detach(),
            "logps/rejected": logps_rejected,
        })
        if config.rpo_alpha or any(name in ("sft", "orpo") for name in loss_types):
            metrics["nll_loss"] = _nll(terms).detach()
    return loss, metrics


def logit_metrics(terms: LossInputs, chosen_logits: torch.Tensor | None,
                  rejected_logits: torch.Tensor | None) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """TRL's `logits/chosen` and `logits/rejected`: the mean logit over every completion token, so each
    completion's mean logit comes with its token count as weight. Desirable and undesirable completions
    when unpaired, every rejected reply of a group."""
    if chosen_logits is None:
        return {}
    chosen, rejected = (chosen_logits, terms.chosen_len), (rejected_logits, terms.rejected_len)
    if terms.kind == "unpaired":
        good = terms.label
        chosen, rejected = tuple(t[good] for t in chosen), tuple(t[~good] for t in chosen)
    elif terms.kind == "groups":
        rejected = tuple(t[terms.slots] for t in rejected)
    return {"logits/chosen": chosen, "logits/rejected": rejected}
