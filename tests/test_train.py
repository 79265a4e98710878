"""The training loop: resume, accumulation, schedule, eval, reference options, LoRA, final save."""

import json
import math
import os
import signal
import subprocess
import sys
import time
import types

import pytest
import torch
from safetensors.torch import load_file

from dpokit import checkpoint
from dpokit.config import load_config
from dpokit.tiny import build_llama
from dpokit.train import Loop, train

from conftest import ROWS


def _cfg(tmp_path, model_dir, pairs_file, name="run", **kw):
    base = dict(model=str(model_dir), train_data=str(pairs_file), output_dir=str(tmp_path / name), max_steps=4,
                per_device_train_batch_size=4, learning_rate=1e-3, logging_steps=1, save_steps=0, disable_tqdm=True,
                ref_cache_dir=str(tmp_path / "cache"), report_to=["jsonl"])
    base.update(kw)
    return load_config(None, **base)


def _rows(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line]


def assert_same_rows(a, b, tol=1e-6):
    assert [r["step"] for r in a] == [r["step"] for r in b]
    for ra, rb in zip(a, b):
        assert ra.keys() == rb.keys()
        for k in ra:
            assert ra[k] == pytest.approx(rb[k], abs=tol, rel=tol), (ra["step"], k)


@pytest.fixture(scope="module")
def dropout_model_dir(tmp_path_factory, tokenizer):
    """A tiny Llama with attention dropout, so a resumed run matches only if the RNG state is restored."""
    path = tmp_path_factory.mktemp("dropout_model")
    model = build_llama(tokenizer, hidden_size=32, num_layers=2, num_heads=4, seed=0)
    model.config.attention_dropout = 0.2
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture
def pairs16(tmp_path):
    path = tmp_path / "pairs16.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in ROWS * 2))
    return path


class _Crash(Exception):
    pass


# ---------------------------------------------------------------- resume


def test_dropout_is_live(dropout_model_dir, pairs16, tmp_path):
    """Guard for the resume tests: in training mode the model's forward really draws random numbers."""
    loop = Loop(_cfg(tmp_path, dropout_model_dir, pairs16))
    batch = loop._batch(loop.train_examples, [0, 1], None)
    loop.scorer.train()
    with torch.no_grad():
        a, b = loop.scorer(batch).chosen, loop.scorer(batch).chosen
    assert not torch.equal(a, b)


def test_resume_after_crash_gives_the_uninterrupted_metrics(dropout_model_dir, pairs16, tmp_path, monkeypatch):
    common = dict(max_steps=7, save_steps=2, gradient_accumulation_steps=2, per_device_train_batch_size=3,
                  eval_data=str(pairs16), eval_steps=3)
    whole = train(_cfg(tmp_path, dropout_model_dir, pairs16, "whole", **common))
    assert whole.global_step == 7

    from dpokit import sinks

    real_log = sinks.JsonlSink.log

    def log_then_crash(self, step, metrics):
        real_log(self, step, metrics)
        if step == 5 and "loss" in metrics:
            raise _Crash()

    monkeypatch.setattr(sinks.JsonlSink, "log", log_then_crash)
    cfg = _cfg(tmp_path, dropout_model_dir, pairs16, "stopped", **common)
    with pytest.raises(_Crash):
        train(cfg)
    monkeypatch.setattr(sinks.JsonlSink, "log", real_log)
    assert [p.name for p in checkpoint.list_checkpoints(cfg.output_dir)] == ["checkpoint-2", "checkpoint-4"]
    assert _rows(tmp_path / "stopped")[-1]["step"] == 5  # a row past the checkpoint, to be dropped on resume

    resumed = train(_cfg(tmp_path, dropout_model_dir, pairs16, "stopped", resume_from_checkpoint=True, **common))
    assert resumed.history[0]["step"] == 5
    assert_same_rows(_rows(tmp_path / "whole"), _rows(tmp_path / "stopped"))
    for name, t in load_file(str(tmp_path / "whole" / "model.safetensors")).items():
        assert torch.allclose(t, load_file(str(tmp_path / "stopped" / "model.safetensors"))[name], atol=1e-6)


def test_resume_without_rng_would_differ(dropout_model_dir, pairs16, tmp_path, monkeypatch):
    """The resume test above is sharp: with the RNG not restored, the resumed metrics differ."""
    common = dict(max_steps=4, save_steps=2)
    train(_cfg(tmp_path, dropout_model_dir, pairs16, "whole", **common))
    ckpt = tmp_path / "partial"
    ckpt.mkdir()
    import shutil

    shutil.copytree(tmp_path / "whole" / "checkpoint-2", ckpt / "checkpoint-2")
    monkeypatch.setattr(torch, "set_rng_state", lambda state: None)
    train(_cfg(tmp_path, dropout_model_dir, pairs16, "partial", resume_from_checkpoint=True, **common))
    a, b = _rows(tmp_path / "whole")[2:], _rows(tmp_path / "partial")
    assert [r["step"] for r in b] == [3, 4]
    assert any(abs(x["loss"] - y["loss"]) > 1e-6 for x, y in zip(a, b))


@pytest.mark.slow
def test_resume_after_sigkill(dropout_model_dir, pairs16, tmp_path):
    """A real `dpokit train` killed with SIGKILL once its first checkpoint exists, then resumed."""
    common = dict(max_steps=24, save_steps=2, save_total_limit=None)
    train(_cfg(tmp_path, dropout_model_dir, pairs16, "whole", **common))
    cfg = _cfg(tmp_path, dropout_model_dir, pairs16, "killed", **common)
    cfg.save(tmp_path / "killed.yaml")
    cmd = [sys.executable, "-m", "dpokit.cli", "train", str(tmp_path / "killed.yaml")]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # as in this process (conftest), so sums round alike
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    deadline = time.time() + 120
    while not checkpoint.list_checkpoints(cfg.output_dir) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = checkpoint.list_checkpoints(cfg.output_dir)
    assert done and not (tmp_path / "killed" / "model.safetensors").exists(), "killed before the end"
    result = subprocess.run(cmd + ["resume_from_checkpoint=true"], capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stderr[-2000:]
    assert_same_rows(_rows(tmp_path / "whole"), _rows(tmp_path / "killed"))


# ---------------------------------------------------------------- batches and schedule


def _first_update(tmp_path, model_dir, pairs_file, name, **kw):
    """Weights after one step, the gradient that step used, and the logged row."""
    loop = Loop(_cfg(tmp_path, model_dir, pairs_file, name, max_steps=1, learning_rate=1e-4, **kw))
    grads, step = {}, loop.optimizer.optimizer.step

    def record_then_step(*a, **k):
        grads.update({n: p.grad.clone() for n, p in loop.model.named_parameters()})
        return step(*a, **k)

    loop.optimizer.optimizer.step = record_then_step
    row = loop.run().history[0]
    return load_file(str(tmp_path / name / "model.safetensors")), grads, row


@pytest.mark.filterwarnings("ignore:Seems like `optimizer.step\\(\\)` has been overridden")
@pytest.mark.parametrize("split", [dict(per_device_train_batch_size=4, gradient_accumulation_steps=2),
                                   dict(per_device_train_batch_size=3, gradient_accumulation_steps=3)])
def test_gradient_accumulation_matches_one_big_batch(tiny_model_dir, pairs_file, tmp_path, split):
    """8 pairs as 4 × 2 or as 3 + 3 + 2 micro-batches: the same step as one batch of 8."""
    before = load_file(str(tiny_model_dir / "model.safetensors"))
    one, g_one, row_one = _first_update(tmp_path, tiny_model_dir, pairs_file, "one", per_device_train_batch_size=8)
    acc, g_acc, row_acc = _first_update(tmp_path, tiny_model_dir, pairs_file, "acc", **split)
    assert max((one[k] - before[k]).abs().max().item() for k in one) > 5e-5  # lr 1e-4: Adam moved every weight
    for k in one:
        assert torch.allclose(one[k], acc[k], atol=1e-6, rtol=0), k
    for k in g_one:
        assert torch.allclose(g_one[k], g_acc[k], atol=1e-7, rtol=1e-5), k
    for k in ("loss", "grad_norm", "rewards/margins", "logps/chosen"):
        assert row_one[k] == pytest.approx(row_acc[k], abs=1e-6)


def _hf_linear(step0, base, warmup, total):
    if step0 < warmup:
        return base * step0 / warmup
    return base * max(0.0, (total - step0) / max(1, total - warmup))


@pytest.mark.parametrize("kind", ["linear", "cosine"])
def test_warmup_and_schedule_as_logged(tiny_model_dir, pairs16, tmp_path, kind):
    result = train(_cfg(tmp_path, tiny_model_dir, pairs16, max_steps=8, warmup_steps=3, lr_scheduler_type=kind,
                        learning_rate=1e-3))
    lrs = [r["learning_rate"] for r in result.history if "learning_rate" in r]
    assert len(lrs) == 8
    for i, lr in enumerate(lrs):  # the rate step i+1 used; warmup starts at 0 as in transformers
        if kind == "linear":
            want = _hf_linear(i, 1e-3, 3, 8)
        else:
            want = 1e-3 * i / 3 if i < 3 else 1e-3 * 0.5 * (1 + math.cos(math.pi * (i - 3) / 5))
        assert lr == pytest.approx(want, abs=1e-12)
    epochs = [r["epoch"] for r in result.history]
    assert epochs[:4] == [0.25, 0.5, 0.75, 1.0] and epochs[4] == 1.25  # 16 pairs, 4 per step


def test_metrics_rows_have_trl_keys(tiny_model_dir, pairs_file, tmp_path):
    result = train(_cfg(tmp_path, tiny_model_dir, pairs_file, max_steps=2, logging_steps=2))
    rows = _rows(tmp_path / "run")
    assert rows == result.history and [r["step"] for r in rows] == [2]
    assert list(rows[0]) == ["step", "loss", "rewards/chosen", "rewards/rejected", "rewards/accuracies",
                             "rewards/margins", "logps/chosen", "logps/rejected", "logits/chosen", "logits/rejected",
                             "grad_norm", "learning_rate", "epoch"]


def test_eval_steps_write_eval_rows(tiny_model_dir, pairs_file, tmp_path):
    result = train(_cfg(tmp_path, tiny_model_dir, pairs_file, max_steps=4, eval_steps=2, eval_data=str(pairs_file),
                        per_device_eval_batch_size=3))
    evals = [r for r in _rows(tmp_path / "run") if "eval_loss" in r]
    assert [r["step"] for r in evals] == [2, 4]
    assert all(k.startswith("eval_") for r in evals for k in r if k != "step")
    # 8 pairs in batches of 3: every pair counts once, so accuracy is a multiple of 1/8
    assert all(abs(r["eval_rewards/accuracies"] * 8 - round(r["eval_rewards/accuracies"] * 8)) < 1e-9 for r in evals)
    # at step 2 the policy has moved: its eval rewards are no longer zero
    assert abs(evals[0]["eval_rewards/margins"]) > 0
    assert result.history[-1] == evals[-1]


# ---------------------------------------------------------------- reference options


def _mean_logps(model_dir, loop, examples):
    """Mean chosen log-prob of `examples` under the model at `model_dir`, scored independently."""
    from dpokit.families.causal_lm import load_model

    model = load_model(str(model_dir), loop.cfg).eval()
    with torch.no_grad():
        batch = loop._collate(examples)
        return loop.family.scorer(model, loop.cfg)(batch).chosen.mean().item()


def test_runs_of_other_precisions_in_one_process(tiny_model_dir, pairs16, tmp_path):
    # accelerate keeps its state process-wide; a bf16 run must neither block a later fp32 run nor leak into it.
    before = train(_cfg(tmp_path, tiny_model_dir, pairs16, "fp32-a", max_steps=2, bf16=False)).history
    bf16 = Loop(_cfg(tmp_path, tiny_model_dir, pairs16, "bf16", max_steps=1, bf16=True))
    assert bf16.acc.mixed_precision == "bf16"
    after = Loop(_cfg(tmp_path, tiny_model_dir, pairs16, "fp32-b", max_steps=2, bf16=False))
    assert after.acc.mixed_precision == "no"
    assert_same_rows(before, after.run().history)


def test_separate_ref_model(tiny_model_dir, tiny_ref_dir, pairs_file, tmp_path):
    cfg = _cfg(tmp_path, tiny_model_dir, pairs_file, max_steps=1, per_device_train_batch_size=8,
               ref_model=str(tiny_ref_dir), learning_rate=0.0)
    loop = Loop(cfg)
    row = loop.run().history[0]
    ref = _mean_logps(tiny_ref_dir, loop, loop.train_examples)
    assert row["rewards/chosen"] == pytest.approx(cfg.beta * (row["logps/chosen"] - ref), abs=1e-4)
    assert abs(row["rewards/chosen"]) > 1e-3  # a different model: the rewards are not zero at step 1


def test_reference_free(tiny_model_dir, pairs_file, tmp_path):
    cfg = _cfg(tmp_path, tiny_model_dir, pairs_file, max_steps=1, per_device_train_batch_size=8,
               reference_free=True)
    loop = Loop(cfg)
    assert loop.reference.reference_free and loop.ref_train is None
    row = loop.run().history[0]
    assert row["rewards/chosen"] == pytest.approx(cfg.beta * row["logps/chosen"], rel=1e-6)


def test_frozen_copy_gives_the_cached_losses(tiny_model_dir, pairs16, tmp_path):
    cached = train(_cfg(tmp_path, tiny_model_dir, pairs16, "cached", max_steps=5, learning_rate=5e-3))
    live = train(_cfg(tmp_path, tiny_model_dir, pairs16, "live", max_steps=5, learning_rate=5e-3,
                      precompute_ref_log_probs=False))
    assert len(list((tmp_path / "cache").rglob("*.safetensors"))) == 1  # written by the cached run alone
    assert_same_rows(cached.history, live.history, tol=1e-5)
    assert cached.history[-1]["rewards/margins"] != 0


# ---------------------------------------------------------------- LoRA


def test_lora_reference_is_the_base_with_adapters_off(tiny_model_dir, pairs_file, tmp_path, monkeypatch):
    def no_copies(*a, **k):
        raise AssertionError("the LoRA reference must not copy the model")

    monkeypatch.setattr("dpokit.reference.copy", types.SimpleNamespace(deepcopy=no_copies))
    cfg = _cfg(tmp_path, tiny_model_dir, pairs_file, max_steps=6, learning_rate=2e-2, precompute_ref_log_probs=False,
               lora={"r": 4, "lora_alpha": 8}, per_device_train_batch_size=8)
    loop = Loop(cfg)
    assert loop.reference.adapters_off and loop.reference.scorer.model is loop.model
    n_params = sum(p.numel() for p in loop.model.parameters())
    base_params = sum(p.numel() for n, p in loop.model.named_parameters() if "lora_" not in n)
    assert n_params < 1.5 * base_params  # one set of base weights, plus adapters
    loop.run()
    # after training the reference still scores exactly the base model
    batch = loop._batch(loop.train_examples, [0, 1, 2], None)
    ref_c, _ = loop.reference.scores(batch)
    base = _mean_logps(tiny_model_dir, loop, [loop.train_examples[i] for i in (0, 1, 2)])
    assert ref_c.mean().item() == pytest.approx(base, abs=1e-4)
    with torch.no_grad():
        loop.scorer.eval()
        assert abs(loop.scorer(batch).chosen.mean().item() - base) > 1e-3  # while the policy has moved
    out = tmp_path / "run"
    assert (out / "adapter_config.json").exists() and (out / "adapter_model.safetensors").exists()
    assert not (out / "model.safetensors").exists()
    # transformers loads the adapter folder (base from adapter_config.json) as the trained policy
    from transformers import AutoModelForCausalLM

    from dpokit.families.causal_lm import CausalLMScorer

    loaded = AutoModelForCausalLM.from_pretrained(out).eval()
    with torch.no_grad():
        assert torch.allclose(CausalLMScorer(loaded)(batch).chosen, loop.scorer(batch).chosen, atol=1e-4)


def test_lora_merged_save_loads_and_differs_from_base(tiny_model_dir, pairs_file, tmp_path):
    from transformers import AutoModelForCausalLM

    train(_cfg(tmp_path, tiny_model_dir, pairs_file, max_steps=4, learning_rate=2e-2, lora={"r": 4, "lora_alpha": 8},
               merge_lora=True))
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "run")
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    assert not any("lora" in n for n, _ in merged.named_parameters())
    diffs = [(merged.state_dict()[k] - v).abs().max().item() for k, v in base.state_dict().items()]
    assert max(diffs) > 1e-4


# ---------------------------------------------------------------- the trained model


def test_training_prefers_chosen_and_saves_a_loadable_model(tiny_model_dir, pairs_file, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    result = train(_cfg(tmp_path, tiny_model_dir, pairs_file, max_steps=30, learning_rate=1e-2,
                        per_device_train_batch_size=8, eval_data=str(pairs_file)))
    rows = [r for r in result.history if "loss" in r]
    first, last = rows[0], rows[-1]
    assert first["rewards/accuracies"] <= 0.5 and last["rewards/accuracies"] == 1.0
    assert last["loss"] < first["loss"] - 0.2
    assert result.history[-1]["eval_rewards/accuracies"] == 1.0

    out = tmp_path / "run"
    model = AutoModelForCausalLM.from_pretrained(out)
    tok = AutoTokenizer.from_pretrained(out)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    # the saved model prefers the chosen reply more than the starting model does
    from dpokit.families import get_family
    from dpokit.families.causal_lm import CausalLMScorer

    family, cfg = get_family("causal_lm"), load_config(None, model=str(out))
    batch = family.collate(family.examples(str(pairs_file), tok, cfg), cfg, tok)
    with torch.no_grad():
        after, before = CausalLMScorer(model.eval())(batch), CausalLMScorer(base.eval())(batch)
    assert ((after.chosen - after.rejected) - (before.chosen - before.rejected)).mean() > 1.0
    assert not any((out / name).exists() for name in os.listdir(out) if name.startswith("checkpoint-"))
