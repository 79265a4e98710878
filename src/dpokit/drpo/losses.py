"""DrPO's drift target and its one-step DPO baseline: pure tensor functions, features in, drift or loss out.

DrPO (Jiang, Wen, Liu 2026, "Drifting Preference Optimization for One-Step Generative Models", arXiv 2606.02521;
code UGVly/DrPO, `src/drpo/drift.py::drift_loss` and `training/trainer.py::_compute_prompt_terms`) tunes a
deterministic one-step generator G. For each prompt it samples N images on different seeds, ranks them with a reward
that is only called, and moves their features φ(G(z)) along a drift field built from the best k (positives) and
worst k (negatives), plus a reference drift toward the frozen base generator's outputs. The field is the drifting
field of "Generative Modeling via Drifting" (Deng, Li, Li, Du, He 2026, arXiv 2602.04770, §3), there
V_{p,q}(x) = V⁺_p(x) − V⁻_q(x) with V^±(x) = E[k(x, y^±)(y^± − x)] / Z^±(x), which combines to
V(x) = E_{y⁺, y⁻}[k(x, y⁺) k(x, y⁻)(y⁺ − y⁻)] / (Z⁺ Z⁻): an anti-symmetric dipole (swap p and q, V flips sign).

Notation: x_i ∈ R^D the (detached) features of the generated samples, y⁺_j the positives, y⁻_m the negatives,
r_i the base generator's features on the same seeds, S the mean distance from the x_i to the anchors (distances are
measured in units of S, so a temperature means the same thing whatever the feature scale), σ the logistic function.
(The DrPO paper's method section was not readable where this was written, so the docstrings give the equations as
the official code computes them rather than the paper's equation numbers.)

The kernel is Laplacian, k(x, y) = exp(−‖x − y‖ / (τ S)), at three temperatures τ ∈ {0.02, 0.05, 0.2}, each
drift normalized to unit RMS and the three summed: the Drifting paper's kernel and temperatures (its kernel
ablation: the temperatures together beat any one; small τ is nearest-anchor attraction, large τ the anchors'
barycenter) and DrPO's defaults (`--drifting_kernel laplacian --drifting_pref_r_list 0.02,0.05,0.2`). The
Laplacian's heavy tail keeps far anchors in play where a Gaussian's weights underflow in high dimension.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F

TEMPERATURES = (0.02, 0.05, 0.2)
_MASKED = -1e9  # the logit of an excluded (self) pair: finite, so a column with nothing left gives no NaN
_FLOOR = 1e-6  # the official code's floor on the kernel product: every anchor keeps a little weight


def kernel_scale(x: torch.Tensor, anchors: torch.Tensor) -> torch.Tensor:
    """S = mean_{i,j} ‖x_i − a_j‖, the distance unit of the kernel (Drifting §3, feature normalization; DrPO's
    `scale`). Detached; 1 when there are no anchors."""
    if anchors.shape[0] == 0 or x.shape[0] == 0:
        return x.new_tensor(1.0, dtype=torch.float32)
    return torch.cdist(x.detach().flatten(1).float(), anchors.detach().flatten(1).float()).mean().clamp_min(1e-8)


@torch.no_grad()
def dipole_drift(x: torch.Tensor, pos: torch.Tensor, neg: torch.Tensor, *,
                 temperatures: Sequence[float] = TEMPERATURES, scale: torch.Tensor | float | None = None,
                 exclude_self: bool = False) -> torch.Tensor:
    """DrPO's dipole preference field (UGVly/DrPO `drift_loss`; the Drifting field V⁺ − V⁻ of Deng et al. 2026)
    at each sample x_i, [N, D] in the features' own units. Per temperature τ, over the anchors t = [y⁺; y⁻]:

        L_ij = −‖x_i − t_j‖ / (τ S),   A = sqrt(max(softmax_j(L) ⊙ softmax_i(L), 1e-6))
        P_i = Σ_{j∈pos} A_ij,   N_i = Σ_{j∈neg} A_ij
        V_τ(x_i) = N_i Σ_{j∈pos} A_ij (y⁺_j − x_i) − P_i Σ_{j∈neg} A_ij (y⁻_j − x_i) = P_i N_i (ȳ⁺_i − ȳ⁻_i)

    with ȳ^± the A-weighted anchor means: attraction to the positives minus repulsion from the negatives, pointing
    from the nearby negatives toward the nearby positives. Rows and columns are normalized as in the Drifting code;
    the floor is the DrPO code's and gives every anchor a little weight, a global pull from the mean negative
    toward the mean positive (without it the field drifts to cosine ~0.7 of the official one). V = (S/√D) Σ_τ
    V_τ / rms(V_τ): each τ's field has unit RMS in the coordinates x·√D/S (where the mean distance is √D), as the
    Drifting paper normalizes the drift.
    Swapping pos and neg flips V. No positives or no negatives: V = 0.

    exclude_self: neg are the samples x themselves (same rows), and x_i is not its own negative (the reference
    drift's `mask_negative_self`). The official code's per-anchor weights (3000 for both sides) cancel under the
    RMS normalization when equal and are left out, as are its weight-1 extra negatives (the generated samples
    themselves, 1/3000 of an anchor's weight)."""
    x = x.detach().flatten(1).float()
    pos, neg = pos.detach().flatten(1).float(), neg.detach().flatten(1).float()
    if pos.shape[0] == 0 or neg.shape[0] == 0:
        return torch.zeros_like(x)
    anchors = torch.cat([pos, neg])
    s = kernel_scale(x, anchors) if scale is None else torch.as_tensor(scale, dtype=x.dtype, device=x.device)
    dist = torch.cdist(x, anchors)
    k = pos.shape[0]
    mask = torch.zeros_like(dist, dtype=torch.bool)
    if exclude_self:
        if neg.shape[0] != x.shape[0]:
            raise ValueError("exclude_self needs the negatives to be the samples themselves")
        mask[:, k:].fill_diagonal_(True)
    drift = torch.zeros_like(x)
    for tau in temperatures:
        logits = (-dist / (tau * s)).masked_fill(mask, _MASKED)
        a = (logits.softmax(dim=1) * logits.softmax(dim=0)).clamp_min(_FLOOR).sqrt()
        a_pos, a_neg = a[:, :k], a[:, k:]
        force = a_neg.sum(1, keepdim=True) * (a_pos @ pos) - a_pos.sum(1, keepdim=True) * (a_neg @ neg)
        drift += force / force.pow(2).mean().sqrt().clamp_min(1e-8)
    return drift * (s / math.sqrt(x.shape[1]))


def reference_drift(x: torch.Tensor, ref: torch.Tensor, *, temperatures: Sequence[float] = TEMPERATURES,
                    scale: torch.Tensor | float | None = None) -> torch.Tensor:
    """DrPO's reference drift (UGVly/DrPO `_compute_prompt_terms`: `drift_loss(gen, ref, gen.detach(),
    mask_negative_self=True)`): the same dipole with the frozen base generator's outputs r (same seeds) as the
    positives and the current samples as the negatives, x_i excluded from its own. It is the Drifting field
    V_{p_base, q_θ}: it pulls the generated distribution back toward the base's, kernel-weighted (mostly toward the
    nearby base outputs, its own seed's among them), not a per-seed tether. It is not zero at the start, where
    x = r: x_i's own base output sits at distance 0 and pulls nowhere, so what is left is repulsion from the other
    samples, a spreading force (on the tests' toy, ref_weight >= 1 leaves the samples more diverse than the base's)."""
    return dipole_drift(x, ref, x, temperatures=temperatures, scale=scale, exclude_self=True)


def drift_regression_loss(features: torch.Tensor, target: torch.Tensor, scale: torch.Tensor | float = 1.0
                          ) -> torch.Tensor:
    """The drifting loss (Deng et al. 2026, §3, "training objective"; DrPO `drift_loss`): mean over samples and
    feature elements of ((φ(G(z)) − sg(target)) / scale)². With target = φ + V its value is mean(V²)/scale² and its
    gradient in φ is −2V/scale² per element: the generator is moved along V, never through it. scale = S/√D
    makes the loss blind to the features' scale."""
    diff = (features.flatten(1).float() - target.detach().flatten(1).float()) / scale
    return diff.pow(2).mean()


def drpo_target(x: torch.Tensor, pos: torch.Tensor, neg: torch.Tensor, ref: torch.Tensor, *,
                ref_weight: float = 0.2, temperatures: Sequence[float] = TEMPERATURES
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """DrPO's detached regression target and the loss scale: (x + V_pref + ref_weight·V_ref, S/√D), with V_pref the
    `dipole_drift` of x between pos and neg, V_ref the `reference_drift` toward ref, and one S for both: the mean
    distance from the x_i to the samples and the base outputs, [x; ref]. The official code regresses onto the two
    targets separately, pref_loss + 0.2·ref_loss (`--drifting_ref_loss_weight 0.2`), with a scale of its own per
    term; one target with ref_weight gives the gradient −2(V_pref + ref_weight·V_ref)/scale², the same sum with the
    two terms' kernels sharing one distance unit. Against a transcription of the official drift_loss on random
    features its direction agrees to cosine >= 0.995 and its size to within 3% near the base; it is 0.93x (0.7x)
    when each sample's base output is 0.45x (1.3x) the samples' mean pairwise distance away (the shared S grows)."""
    x = x.detach().flatten(1).float()
    ref = ref.detach().flatten(1).float()
    s = kernel_scale(x, torch.cat([x, ref]))
    drift = dipole_drift(x, pos, neg, temperatures=temperatures, scale=s)
    if ref_weight:
        drift = drift + ref_weight * reference_drift(x, ref, temperatures=temperatures, scale=s)
    return x + drift, s / math.sqrt(x.shape[1])


def drpo_loss(features: torch.Tensor, pos: torch.Tensor, neg: torch.Tensor, ref: torch.Tensor, *,
              ref_weight: float = 0.2, temperatures: Sequence[float] = TEMPERATURES) -> torch.Tensor:
    """DrPO's loss for one prompt: `drift_regression_loss` of the features φ(G(z)) [N, D] onto `drpo_target`, with
    pos / neg the detached features of the best / worst k samples and ref the base's features on the same seeds."""
    target, scale = drpo_target(features, pos, neg, ref, ref_weight=ref_weight, temperatures=temperatures)
    return drift_regression_loss(features, target, scale)


# ---------------------------------------------------------------- the one-step DPO baseline


def onestep_dpo_score(samples: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """The DPO₁step baseline's pseudo log-likelihood (UGVly/DrPO `baselines/dpo/train_lora.py`,
    `pairwise_preference_score`, metric l2): s(X, T) = −mean_{i,j} mean_d (x_i,d − t_j,d)², every sample of the
    prompt against every target, a scalar. A one-step generator has no denoising chain, so this replaces the
    Diffusion-DPO ELBO term."""
    x, t = samples.flatten(1).float(), targets.flatten(1).float()
    return -(x[:, None, :] - t[None, :, :]).pow(2).mean()


def onestep_dpo_loss(policy: torch.Tensor, ref: torch.Tensor, chosen: torch.Tensor, rejected: torch.Tensor,
                     beta: float = 30.0) -> torch.Tensor:
    """One-step DPO, the DrPO paper's DPO₁step baseline (UGVly/DrPO `baselines/dpo/train_lora.py`, online mode):
    −log σ(β[(s(π, w) − s(π, l)) − (s(ref, w) − s(ref, l))]) with s = `onestep_dpo_score`, π the N samples G_θ(z)
    of the prompt, ref the frozen base's samples on the same z, w / l the detached best / worst k of the π samples
    by reward (chosen / rejected). The policy gap rises as the samples move toward the chosen and away from the
    rejected. β = 30 is the official script's `--dpo_beta` (in the generator's output space, `--preference_space
    latent`). A scalar for the prompt."""
    chosen, rejected, ref = chosen.detach(), rejected.detach(), ref.detach()
    policy_gap = onestep_dpo_score(policy, chosen) - onestep_dpo_score(policy, rejected)
    ref_gap = onestep_dpo_score(ref, chosen) - onestep_dpo_score(ref, rejected)
    return -F.logsigmoid(beta * (policy_gap - ref_gap))
