"""`dpokit bench --family diffusion`: the peer (the diffusers Diffusion-DPO script's step, re-implemented) does
dpokit's work on the same latents and draws, and a very small run reports what it should."""

from __future__ import annotations

import json
import math

import pytest
import torch

pytest.importorskip("diffusers")
from dpokit.bench_diffusion import (SHAPES, DiffusionSettings, ScriptPairs, build_pipeline, collate,  # noqa: E402
                                    dpokit_config, encode_batch, load_script_parts, per_pair_gflop, script_lora,
                                    script_loss, script_optimizer, write_pairs)
from dpokit.families.base import draw_seeds  # noqa: E402
from dpokit.families.diffusion.scorer import draw  # noqa: E402
from dpokit.train import Loop  # noqa: E402


@pytest.fixture(scope="module")
def bench_dir(tmp_path_factory):
    """The bench's tiny pipeline and 4 of its synthetic pairs."""
    root = tmp_path_factory.mktemp("bench-diffusion")
    build_pipeline(root / "model", SHAPES["tiny"], seed=0)
    write_pairs(root, 4, SHAPES["tiny"]["resolution"], seed=0)
    return root


def test_peer_step_is_dpokit_step(bench_dir, tmp_path):
    """With dpokit's latents (the posterior mean) and dpokit's draws, the peer's loss and logged metrics are dpokit's
    first step's, and one AdamW step of the peer moves the LoRA weights where dpokit's step moved them: the two do
    the same work per step, and dpokit's beta is the script's beta_dpo. LoRA starts non-zero
    (init_lora_weights False) so that the policy is not the reference and the loss is not log 2 by construction."""
    s = DiffusionSettings(pairs=4, batch_size=4, weight_decay=0.5)  # decay big enough to see in one step
    lora = {"r": s.rank, "lora_alpha": s.rank, "init_lora_weights": False}
    loop = Loop(dpokit_config(bench_dir, s, tmp_path, lora=lora, max_steps=1, report_to=[]))
    start = {k: v.detach().clone() for k, v in loop.model.state_dict().items() if "lora_" in k}
    first = loop.run().history[0]
    trained = {k: v.detach() for k, v in loop.model.state_dict().items() if "lora_" in k}

    tokenizer, scheduler, text_encoder, vae, unet = load_script_parts(bench_dir / "model", "cpu", torch.float32)
    unet.add_adapter(script_lora(s.rank, init=False))
    assert not unet.load_state_dict(start, strict=False).unexpected_keys
    pairs = ScriptPairs(bench_dir / "pairs.jsonl", tokenizer, SHAPES["tiny"]["resolution"])
    batch = collate([pairs[i] for i in range(len(pairs))])
    latents, text = encode_batch(vae, text_encoder, batch["pixel_values"], batch["input_ids"], 8, sample=False)
    # Pair i of the first epoch draws (t, ε) from seed draw_seeds(seed, epoch + 1, [i]); both images share it.
    draws = [draw(seed, tuple(latents.shape[1:]), scheduler.config.num_train_timesteps)
             for seed in draw_seeds(s.seed, 1, range(len(pairs)))]
    noise = torch.stack([d[1] for d in draws]).repeat(2, 1, 1, 1)
    timesteps = torch.stack([d[0] for d in draws]).repeat(2)
    loss, metrics = script_loss(unet, scheduler, latents, text, noise, timesteps, s.beta_dpo)

    assert abs(loss.item() - math.log(2)) > 1e-2  # the comparison means something
    # The two sum each image's squared error in a different order; beta_dpo = 2500 multiplies that float32 rounding
    # (~1e-7 of an mse near 1, four mse terms per pair) into the logit, and σ' ≤ 1/4 brings it back: up to ~3e-4 in
    # the loss. A beta off by 2x or a different draw moves the loss by more than 1e-2.
    assert first["loss"] == pytest.approx(loss.item(), abs=3e-4)
    assert first["raw_model_loss"] == pytest.approx(metrics["raw_model_loss"].item(), rel=1e-5)
    assert first["ref_loss"] == pytest.approx(metrics["ref_loss"].item(), rel=1e-5)

    params, optimizer = script_optimizer(unet, s)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, s.max_grad_norm)
    grads = {name: p.grad.clone() for name, p in unet.named_parameters() if p.requires_grad}
    optimizer.step()
    moved = {k: v.detach() for k, v in unet.state_dict().items() if "lora_" in k}
    assert set(moved) == set(trained) == set(grads)
    assert max((moved[k] - start[k]).abs().max().item() for k in moved) > 0.5 * s.learning_rate  # it did move
    # Adam's first step is lr·g/(|g| + ε) plus the decay: where |g| is within a few hundred ε, float noise in g (the
    # two sum in different orders) can flip that element's sign, a difference of up to two steps; those few elements
    # are held only to Adam's bound, every other to 0.1% of a step (a wrong lr, sign or decay moves them by a whole
    # fraction of one).
    for k in moved:
        diff = (moved[k] - trained[k]).abs()
        clear = grads[k].abs() > 1e-6
        assert clear.float().mean() > 0.9
        assert diff[clear].max() < 1e-3 * s.learning_rate and diff.max() <= 2.01 * s.learning_rate, k


def test_flop_ceiling_is_the_script_work_over_the_step_without_encoding():
    budget = {"vae_encode": 3.0, "text_encoder": 1.0, "unet_forward": 2.0, "unet_forward_backward": 5.0}
    work = per_pair_gflop(budget)
    # script per pair: two images through the VAE, one caption, policy fwd + bwd and reference fwd on both images
    assert work["script"] == 2 * 3.0 + 1.0 + 2 * (5.0 + 2.0)
    assert work["dpokit_step"] == 14.0 and work["ceiling"] == pytest.approx(21.0 / 14.0)


def test_text_only_flags_are_refused_in_one_line(capsys):
    from dpokit.cli import main

    assert main(["bench", "--family", "diffusion", "--device", "cpu", "--trl-set", "beta=0.2"]) == 2
    err = capsys.readouterr().err
    assert "--trl-set" in err and "causal_lm" in err and "Traceback" not in err and err.count("\n") == 1


def test_small_run_writes_the_expected_json(tmp_path, capsys):
    from dpokit.cli import main

    out = tmp_path / "bench.json"
    assert main(["bench", "--family", "diffusion", "--device", "cpu", "--pairs", "4", "--batch-size", "4",
                 "--epochs", "1", "--repeats", "1", "--threads", "1", "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "| diffusers script (re-implemented) |" in printed and "| dpokit |" in printed
    assert "dpokit / script:" in printed and "goal (>= 2x pairs/s, peak memory no higher)" in printed
    result = json.loads(out.read_text())["main"]
    assert set(result) >= {"info", "settings", "peer", "dpokit", "ratio", "memory_ratio", "goal_met"}
    assert result["settings"]["pairs"] == 4 and result["settings"]["shape"] == "tiny"
    for kind in ("peer", "dpokit"):
        r = result[kind]
        (run,) = r["runs"]
        assert run["steps"] == 1 and run["threads"] == 1 and math.isfinite(r["mean_loss"])
        assert r["pairs_per_s"] == pytest.approx(4 / r["seconds"])
        assert 0 < r["encode_s"] < r["seconds"] and r["peak_rss_mb"] > 100 and r["setup_s"] > 0
    assert result["ratio"] == pytest.approx(result["dpokit"]["pairs_per_s"] / result["peer"]["pairs_per_s"])
    assert result["memory_ratio"] == pytest.approx(result["dpokit"]["peak_rss_mb"] / result["peer"]["peak_rss_mb"])
    assert result["goal_met"] == (result["ratio"] >= 2 and result["memory_ratio"] <= 1)
    work = result["info"]["gflop_per_pair"]
    assert 0 < work["encode_share"] < 1 and work["ceiling"] > 1
