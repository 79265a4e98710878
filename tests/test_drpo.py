"""DrPO (drift target, reference drift, regression loss) and its one-step DPO baseline, on tiny models built here."""

import math
import sys

import pytest
import torch
from torch import nn

from dpokit.errors import DpokitError
from dpokit.drpo.losses import (dipole_drift, drift_regression_loss, drpo_loss, drpo_target,
                                            onestep_dpo_loss, onestep_dpo_score, reference_drift)
from dpokit.drpo.online import (OneStepUNet, OnlineOneStepConfig, command_reward, drpo_step,
                                                      evaluate, frozen_copy, make_optimizer, train_drpo)


class TinyGenerator(nn.Module):
    """(noise [B, 16], class ids [B]) → 1×8×8 images in [-1, 1]."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(2, 16)
        self.net = nn.Sequential(nn.Linear(16, 64), nn.Tanh(), nn.Linear(64, 64))

    def forward(self, noise, cond):
        return torch.tanh(self.net(noise + self.embed(cond))).view(-1, 1, 8, 8)


def brightness(images, prompts):
    return images.mean(dim=(1, 2, 3))


def random_features():
    w = torch.randn(64, 32, generator=torch.Generator().manual_seed(7)) / 8
    return lambda images: torch.tanh(images.flatten(1) @ w)


def _tiny(seed=0):
    torch.manual_seed(seed)
    return TinyGenerator()


def test_drift_points_from_negatives_to_positives():
    g = torch.Generator().manual_seed(0)
    e = torch.zeros(8)
    e[0] = 3.0
    pos = e + 0.3 * torch.randn(6, 8, generator=g)
    neg = -pos  # mirror image: the symmetric toy case
    x = 0.3 * torch.randn(10, 8, generator=g)
    v = dipole_drift(x, pos, neg)
    direction = pos.mean(0) - neg.mean(0)
    assert (v @ direction > 0).all()  # every sample's drift, not just the mean
    assert torch.allclose(dipole_drift(x, neg, pos), -v, atol=1e-5)  # anti-symmetric


def test_no_positives_or_negatives_no_preference_drift():
    x, pos = torch.randn(5, 4), torch.randn(3, 4)
    assert dipole_drift(x, pos, pos[:0]).abs().max() == 0
    assert dipole_drift(x, pos[:0], pos).abs().max() == 0


def test_reference_term_alone_pulls_toward_base_outputs():
    g = torch.Generator().manual_seed(1)
    ref = torch.randn(12, 16, generator=g)
    shift = torch.zeros(16)
    shift[:4] = 2.0
    x = ref + shift  # the generator has drifted away from the base, on the same seeds
    target, scale = drpo_target(x, x[:0], x[:0], ref, ref_weight=0.5)  # zero positives and negatives
    step = target - x
    assert torch.allclose(step, 0.5 * reference_drift(x, ref, scale=scale * 4), atol=1e-5)  # S = scale·√16
    assert ((step * (ref - x)).sum(1) > 0).all()  # each sample is pulled back toward the base


def test_loss_gradient_is_zero_at_the_target():
    f = torch.randn(6, 5, requires_grad=True)
    drift_regression_loss(f, f.detach().clone(), 0.7).backward()
    assert f.grad.abs().max() == 0
    g = torch.randn(6, 5, requires_grad=True)
    v = torch.randn(6, 5)
    drift_regression_loss(g, g.detach() + v, 0.5).backward()
    assert torch.allclose(g.grad, -2 * v / 0.25 / v.numel())  # −2V/scale² per element: moves along V


def test_drpo_loss_descends_along_the_drift():
    g = torch.Generator().manual_seed(2)
    f = torch.randn(8, 6, generator=g).requires_grad_()
    pos, neg, ref = f[:2].detach(), f[-2:].detach(), f.detach() + 0.01 * torch.randn(8, 6, generator=g)
    drpo_loss(f, pos, neg, ref).backward()
    target, _ = drpo_target(f, pos, neg, ref)
    assert ((-f.grad) * (target - f.detach())).sum() > 0


def test_onestep_dpo_loss_by_hand():
    policy = torch.tensor([[0.0], [3.0]], requires_grad=True)
    ref = torch.tensor([[1.0], [1.5]])
    chosen, rejected = torch.tensor([[2.0]]), torch.tensor([[0.0]])
    # s(π,w) = −(4 + 1)/2 = −2.5, s(π,l) = −(0 + 9)/2 = −4.5: policy gap 2;
    # s(ref,w) = −(1 + 0.25)/2 = −0.625, s(ref,l) = −(1 + 2.25)/2 = −1.625: reference gap 1 → logit β(2 − 1)
    loss = onestep_dpo_loss(policy, ref, chosen, rejected, beta=0.5)
    assert loss.item() == pytest.approx(math.log1p(math.exp(-0.5)), abs=1e-6)
    # two elements per sample and two targets: the score is a mean over pairs and elements
    x, t = torch.tensor([[0.0, 1.0]]), torch.tensor([[1.0, 1.0], [0.0, 3.0]])
    assert onestep_dpo_score(x, t).item() == pytest.approx(-(1 + 0 + 0 + 4) / 4)
    loss.backward()
    # d/dπ_i of β(s(π,w) − s(π,l)) = β(−2(π_i − w) + 2(π_i − l))/2 = β(w − l) = 1; loss' = −σ(−0.5)·1
    assert torch.allclose(policy.grad, torch.full((2, 1), -torch.sigmoid(torch.tensor(-0.5)).item()))


def test_drpo_steps_raise_the_called_reward():
    gen, feats = _tiny(), random_features()
    cfg = OnlineOneStepConfig(num_samples=16, top_k=4, steps=25, lr=3e-3, prompts_per_step=2, seed=3)
    before = evaluate(gen, [0, 1], brightness, feats, noise_shape=(16,))
    log = train_drpo(gen, [0, 1], brightness, feats, cfg, noise_shape=(16,))
    after = evaluate(gen, [0, 1], brightness, feats, noise_shape=(16,))
    assert after["reward_mean"] > before["reward_mean"] + 0.05
    assert log[-1]["reward_mean"] > log[0]["reward_mean"]
    assert {"reward_mean", "diversity", "loss", "reward_best", "reward_worst"} <= set(log[0])


def test_dpo_steps_raise_the_called_reward():
    gen = _tiny()
    cfg = OnlineOneStepConfig(method="dpo", num_samples=16, top_k=4, steps=25, lr=3e-3, prompts_per_step=2, seed=3)
    before = evaluate(gen, [0, 1], brightness, noise_shape=(16,))
    train_drpo(gen, [0, 1], brightness, None, cfg, noise_shape=(16,))
    assert evaluate(gen, [0, 1], brightness, noise_shape=(16,))["reward_mean"] > before["reward_mean"]


def test_reward_is_never_differentiated():
    calls = []

    def fragile(images, prompts):
        if images.requires_grad or torch.is_grad_enabled():
            raise RuntimeError("the reward was given a graph")
        calls.append(len(prompts))
        return [float(v) for v in images.mean(dim=(1, 2, 3))]  # a plain list: not a tensor at all

    gen = _tiny()
    for method in ("drpo", "dpo"):
        cfg = OnlineOneStepConfig(method=method, num_samples=8, top_k=2, seed=0)
        row = drpo_step(gen, frozen_copy(gen), make_optimizer(gen, cfg), [0, 1], fragile, random_features(), cfg,
                        0, (16,))
        assert math.isfinite(row["loss"])
    assert calls == [8, 8]


def test_command_reward():
    script = ("import sys, json, numpy as np; x = np.load(sys.argv[1]); p = json.load(open(sys.argv[2])); "
              "assert len(p) == len(x); print(json.dumps(x.reshape(len(x), -1).mean(1).tolist()))")
    reward = command_reward([sys.executable, "-c", script])
    images = torch.randn(4, 1, 8, 8)
    assert torch.allclose(torch.tensor(reward(images, [0] * 4)), brightness(images, None), atol=1e-6)


def test_seeds_reproducible_and_shared_across_methods():
    logs, params = [], []
    for _ in range(2):
        gen = _tiny()
        cfg = OnlineOneStepConfig(num_samples=8, top_k=2, steps=2, lr=1e-3, seed=5)
        logs.append(train_drpo(gen, [0, 1], brightness, random_features(), cfg, noise_shape=(16,)))
        params.append(torch.cat([p.detach().flatten() for p in gen.parameters()]))
    assert logs[0] == logs[1] and torch.equal(params[0], params[1])
    # step 0 draws the same noises whatever the method: the same on-policy samples and rewards
    dpo = train_drpo(_tiny(), [0, 1], brightness, random_features(),
                     OnlineOneStepConfig(method="dpo", num_samples=8, top_k=2, steps=1, seed=5), noise_shape=(16,))
    assert dpo[0]["reward_mean"] == logs[0][0]["reward_mean"]


def test_feature_function_must_carry_gradients():
    gen = _tiny()
    cfg = OnlineOneStepConfig(num_samples=8, top_k=2)
    detached = lambda images: images.detach().flatten(1)  # noqa: E731
    with pytest.raises(DpokitError, match="differentiable"):
        drpo_step(gen, frozen_copy(gen), make_optimizer(gen, cfg), [0], brightness, detached, cfg, 0, (16,))


def test_onestep_unet_x0_and_class_labels():
    from diffusers import DDPMScheduler, UNet2DModel

    torch.manual_seed(0)
    unet = UNet2DModel(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(8, 16),
                       down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
                       layers_per_block=1, norm_num_groups=4, num_class_embeds=2)
    scheduler = DDPMScheduler(num_train_timesteps=1000)
    gen = OneStepUNet(unet, scheduler)
    z, labels = torch.randn(3, 1, 8, 8), torch.tensor([0, 1, 1])
    eps = unet(z, torch.full((3,), 999), class_labels=labels).sample
    a = scheduler.alphas_cumprod[999]
    assert torch.allclose(gen(z, labels), (z - (1 - a).sqrt() * eps) / a.sqrt(), atol=1e-4)
    cfg = OnlineOneStepConfig(method="dpo", num_samples=4, top_k=1)
    row = drpo_step(gen, frozen_copy(gen), make_optimizer(gen, cfg), [0, 1], brightness, None, cfg, 0, (1, 8, 8))
    assert math.isfinite(row["loss"])
