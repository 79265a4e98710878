"""TR-DPO (Gorbatovski et al. 2024): a reference pulled toward the policy every τ steps,
θ_ref ← α·θ + (1 − α)·θ_ref (`sync_ref_model`, `ref_model_mixup_alpha`, `ref_model_sync_steps`)."""

import math
import shutil

import datasets
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
from trl import DPOConfig, DPOTrainer

from dpokit.config import load_config
from dpokit.errors import DpokitError
from dpokit.train import REFERENCE_FILE, Loop

from conftest import ROWS


def _cfg(tmp_path, model_dir, pairs_file, name="run", **kw):
    base = dict(model=str(model_dir), train_data=str(pairs_file), output_dir=str(tmp_path / name), max_steps=4,
                per_device_train_batch_size=4, learning_rate=1e-2, logging_steps=1, save_steps=0, disable_tqdm=True,
                ref_cache_dir=str(tmp_path / "cache"), report_to=[], sync_ref_model=True)
    base.update(kw)
    return load_config(None, **base)


def _weights(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.named_parameters()}


def test_reference_follows_the_mixup_of_policy_snapshots(tiny_model_dir, pairs_file, tmp_path):
    alpha = 0.3
    loop = Loop(_cfg(tmp_path, tiny_model_dir, pairs_file, max_steps=5, ref_model_sync_steps=2,
                     ref_model_mixup_alpha=alpha))
    assert not loop.cfg.precompute_ref_log_probs  # a moving reference is never cached
    expected = _weights(loop.model)  # the reference starts as the policy's starting weights
    synced = []
    sync = loop._sync_reference

    def recording():
        snapshot = _weights(loop.model)
        synced.append(snapshot)
        for k in expected:
            expected[k] = alpha * snapshot[k] + (1 - alpha) * expected[k]
        sync()

    loop._sync_reference = recording
    loop.run()
    assert len(synced) == 2  # after steps 2 and 4 of 5
    reference, policy = _weights(loop.reference.scorer.model), _weights(loop.model)
    for k in expected:
        assert torch.allclose(reference[k], expected[k], atol=1e-6), k
    moved = max((reference[k] - synced[0][k]).abs().max().item() for k in expected)
    assert moved > 1e-3  # a real mixture: neither a snapshot nor the start
    assert any(not torch.allclose(reference[k], policy[k]) for k in expected)


def test_alpha_zero_is_dpo_with_a_frozen_reference(tiny_model_dir, pairs_file, tmp_path):
    trdpo = Loop(_cfg(tmp_path, tiny_model_dir, pairs_file, "a", ref_model_mixup_alpha=0.0, ref_model_sync_steps=1))
    plain = Loop(_cfg(tmp_path, tiny_model_dir, pairs_file, "b", sync_ref_model=False,
                      precompute_ref_log_probs=False))
    cached = Loop(_cfg(tmp_path, tiny_model_dir, pairs_file, "c", sync_ref_model=False))
    a, b, c = trdpo.run().history, plain.run().history, cached.run().history
    assert a == b  # exactly: α = 0 leaves every reference weight as it was
    for ra, rc in zip(a, c):
        for k in ("loss", "rewards/chosen", "rewards/rejected", "grad_norm"):
            assert ra[k] == pytest.approx(rc[k], abs=1e-5), (ra["step"], k)
    assert a[-1]["rewards/margins"] > 0.05  # it trained away from the (frozen) reference


def test_alpha_one_every_step_resets_the_rewards(tiny_model_dir, pairs_file, tmp_path):
    """With α = 1 and τ = 1 the reference becomes the policy after each step: from step 2 on every
    reward is 0 and the DPO loss is log 2."""
    history = Loop(_cfg(tmp_path, tiny_model_dir, pairs_file, ref_model_mixup_alpha=1.0,
                        ref_model_sync_steps=1)).run().history
    for row in history:
        assert row["loss"] == pytest.approx(math.log(2), abs=1e-6)
        assert row["rewards/chosen"] == pytest.approx(0, abs=1e-6)
    slow = Loop(_cfg(tmp_path, tiny_model_dir, pairs_file, "slow", ref_model_mixup_alpha=1.0,
                     ref_model_sync_steps=3)).run().history
    assert abs(slow[2]["loss"] - math.log(2)) > 1e-3  # step 3 sees a reference two steps old
    assert slow[3]["loss"] == pytest.approx(math.log(2), abs=1e-6)


def test_second_step_agrees_with_trl(tiny_model_dir, tiny_ref_dir, pairs_file, tmp_path):
    """A separate reference, synced after step 1 with α = 0.5: step 2's metrics read the mixed reference.
    One batch holds the whole data, so example order cannot matter."""
    settings = dict(beta=0.5, learning_rate=1e-3, max_steps=2, logging_steps=1, per_device_train_batch_size=len(ROWS),
                    max_length=None, sync_ref_model=True, ref_model_mixup_alpha=0.5, ref_model_sync_steps=1)
    trainer = DPOTrainer(
        model=AutoModelForCausalLM.from_pretrained(tiny_model_dir),
        ref_model=AutoModelForCausalLM.from_pretrained(tiny_ref_dir),
        args=DPOConfig(output_dir=str(tmp_path / "trl"), report_to=[], use_cpu=True, bf16=False,
                       gradient_checkpointing=False, save_strategy="no", disable_tqdm=True, seed=0,
                       precompute_ref_log_probs=False, **settings),
        train_dataset=datasets.Dataset.from_list(ROWS), processing_class=AutoTokenizer.from_pretrained(tiny_model_dir))
    trainer.train()
    theirs = [row for row in trainer.state.log_history if "loss" in row]
    ours = Loop(_cfg(tmp_path, tiny_model_dir, pairs_file, ref_model=str(tiny_ref_dir), max_prompt_length=None,
                     **settings)).run().history
    for step in (0, 1):
        for key in ("loss", "rewards/chosen", "rewards/rejected", "logps/chosen", "logps/rejected"):
            assert ours[step][key] == pytest.approx(theirs[step][key], rel=1e-4, abs=1e-4), (step + 1, key)
    # the sync is what step 2 measures: against the unmoved reference its rewards differ
    unsynced = Loop(_cfg(tmp_path, tiny_model_dir, pairs_file, "unsynced", ref_model=str(tiny_ref_dir),
                         max_prompt_length=None, **{**settings, "sync_ref_model": False})).run().history
    assert abs(unsynced[1]["rewards/chosen"] - ours[1]["rewards/chosen"]) > 1e-2


def test_resume_restores_the_moved_reference(tiny_model_dir, pairs_file, tmp_path):
    settings = dict(ref_model_mixup_alpha=0.5, ref_model_sync_steps=1, save_steps=2)
    whole = Loop(_cfg(tmp_path, tiny_model_dir, pairs_file, "whole", **settings))
    full = whole.run().history
    saved = tmp_path / "whole" / "checkpoint-2"
    assert (saved / REFERENCE_FILE).exists()
    resumed = Loop(_cfg(tmp_path, tiny_model_dir, pairs_file, "resumed", resume_from_checkpoint=str(saved), **settings))
    rest = resumed.run().history
    assert [r["step"] for r in rest] == [3, 4]
    for ra, rb in zip(full[2:], rest):
        for k in ("loss", "rewards/chosen", "rewards/rejected", "grad_norm"):
            assert rb[k] == pytest.approx(ra[k], abs=1e-6), (ra["step"], k)
    for (name, a), b in zip(_weights(whole.reference.scorer.model).items(),
                            _weights(resumed.reference.scorer.model).values()):
        assert torch.allclose(a, b, atol=1e-6), name
    # a checkpoint without the reference cannot resume a TR-DPO run
    bare = tmp_path / "bare" / "checkpoint-2"
    shutil.copytree(saved, bare)
    (bare / REFERENCE_FILE).unlink()
    with pytest.raises(DpokitError, match="no reference.safetensors"):
        Loop(_cfg(tmp_path, tiny_model_dir, pairs_file, "bare", resume_from_checkpoint=str(bare), **settings)).run()


def test_unsupported_combinations(tiny_model_dir, pairs_file, tmp_path):
    with pytest.raises(DpokitError, match="not supported with lora"):
        Loop(_cfg(tmp_path, tiny_model_dir, pairs_file, lora={"r": 4}))
    with pytest.raises(DpokitError, match="reference-free"):
        Loop(_cfg(tmp_path, tiny_model_dir, pairs_file, loss_type="simpo"))
    with pytest.raises(DpokitError, match="ref_model_mixup_alpha must lie in"):
        _cfg(tmp_path, tiny_model_dir, pairs_file, ref_model_mixup_alpha=1.5)
    with pytest.raises(DpokitError, match="ref_model_sync_steps must be >= 1"):
        _cfg(tmp_path, tiny_model_dir, pairs_file, ref_model_sync_steps=0)
