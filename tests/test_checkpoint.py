"""Checkpoints: round trip, atomic writes, pruning, and stopping on a non-finite loss."""

import json
import sys

import pytest
import torch

from dpokit import checkpoint
from dpokit.cli import main
from dpokit.config import load_config
from dpokit.errors import DpokitError
from dpokit.tiny import build_llama
from dpokit.train import Loop, train


def _cfg(tmp_path, model_dir, pairs_file, name="run", **kw):
    base = dict(model=str(model_dir), train_data=str(pairs_file), output_dir=str(tmp_path / name), max_steps=4,
                per_device_train_batch_size=4, learning_rate=1e-3, logging_steps=1, save_steps=2, disable_tqdm=True,
                ref_cache_dir=str(tmp_path / "cache"), save_total_limit=None)
    base.update(kw)
    return load_config(None, **base)


def _model_and_optimizer(tokenizer, seed=0, tie=False):
    model = build_llama(tokenizer, hidden_size=16, num_layers=1, num_heads=2, seed=seed, tie_word_embeddings=tie)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1 + s))
    ids = torch.randint(0, len(tokenizer), (2, 6), generator=torch.Generator().manual_seed(seed))
    model(input_ids=ids, labels=ids).loss.backward()
    opt.step()
    sched.step()
    return model, opt, sched


@pytest.mark.parametrize("tie", [False, True])
def test_round_trip(tokenizer, tmp_path, tie):
    model, opt, sched = _model_and_optimizer(tokenizer, seed=0, tie=tie)
    torch.manual_seed(123)
    folder = checkpoint.save(tmp_path / "checkpoint-1", model, opt, sched, {"global_step": 1}, keep=None)
    expected_rng = torch.rand(3)

    other, opt2, sched2 = _model_and_optimizer(tokenizer, seed=1, tie=tie)
    assert not torch.equal(other.lm_head.weight, model.lm_head.weight)
    state = checkpoint.load(folder, other, opt2, sched2)
    assert state == {"global_step": 1}
    assert torch.equal(torch.rand(3), expected_rng)
    for (n, a), (_, b) in zip(model.state_dict().items(), other.state_dict().items()):
        assert torch.equal(a, b), n
    assert other.lm_head.weight.data_ptr() == other.model.embed_tokens.weight.data_ptr() if tie else True
    s1, s2 = opt.state_dict(), opt2.state_dict()
    assert s1["param_groups"][0]["lr"] == s2["param_groups"][0]["lr"]
    for k in s1["state"]:
        for key in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(s1["state"][k][key], s2["state"][k][key])
    assert sched2.state_dict() == sched.state_dict()
    names = sorted(p.name for p in folder.iterdir())
    assert all(n.endswith((".safetensors", ".json")) for n in names)  # no pickles


def test_checkpoint_of_another_model_is_refused(tokenizer, tmp_path):
    model, opt, sched = _model_and_optimizer(tokenizer)
    folder = checkpoint.save(tmp_path / "checkpoint-1", model, opt, sched, {"global_step": 1}, keep=None)
    from peft import LoraConfig, get_peft_model

    lora = get_peft_model(build_llama(tokenizer, hidden_size=16, num_layers=1, num_heads=2),
                          LoraConfig(r=2, target_modules="all-linear"))
    opt2 = torch.optim.AdamW([p for p in lora.parameters() if p.requires_grad])
    with pytest.raises(DpokitError, match="does not match the model"):
        checkpoint.load(folder, lora, opt2, torch.optim.lr_scheduler.LambdaLR(opt2, lambda s: 1.0))


def test_checkpoint_of_another_size_is_refused(tokenizer, tmp_path):
    model, opt, sched = _model_and_optimizer(tokenizer)
    folder = checkpoint.save(tmp_path / "checkpoint-1", model, opt, sched, {"global_step": 1}, keep=None)
    bigger = build_llama(tokenizer, hidden_size=32, num_layers=1, num_heads=2)
    opt2 = torch.optim.AdamW(bigger.parameters())
    with pytest.raises(DpokitError, match="does not match the model"):
        checkpoint.load(folder, bigger, opt2, torch.optim.lr_scheduler.LambdaLR(opt2, lambda s: 1.0))


class _Rank:
    """Enough of an Accelerator for checkpoint.load: which rank this is."""

    def __init__(self, index, world):
        self.process_index, self.num_processes, self.is_main_process = index, world, index == 0


def test_each_rank_gets_its_own_rng_state(tokenizer, tmp_path):
    model, opt, sched = _model_and_optimizer(tokenizer)
    folder = checkpoint.save(tmp_path / "checkpoint-1", model, opt, sched, {"global_step": 1}, keep=None)
    states = [torch.manual_seed(s).get_state() for s in (11, 22)]  # as two ranks would have them
    from safetensors.torch import save_file

    save_file({"cpu": torch.stack(states)}, str(folder / "rng.safetensors"))
    for rank in (0, 1):
        checkpoint.load(folder, model, opt, sched, _Rank(rank, 2))
        assert torch.equal(torch.get_rng_state(), states[rank])


def test_prune_keeps_the_newest(tokenizer, tmp_path):
    model, opt, sched = _model_and_optimizer(tokenizer)
    for step in (2, 4, 6, 8):
        checkpoint.save(tmp_path / f"checkpoint-{step}", model, opt, sched, {"global_step": step}, keep=2)
    assert [p.name for p in checkpoint.list_checkpoints(tmp_path)] == ["checkpoint-6", "checkpoint-8"]


def test_crash_mid_write_leaves_the_previous_checkpoint(tiny_model_dir, pairs_file, tmp_path, monkeypatch, cache_dir):
    real_write = checkpoint.save_file
    calls = {"n": 0}

    def dies_on_the_second_checkpoint(tensors, path, *a, **k):
        if "checkpoint-4" in str(path) and path.endswith("optimizer.safetensors"):
            raise OSError(28, "No space left on device")
        calls["n"] += 1
        return real_write(tensors, path, *a, **k)

    monkeypatch.setattr(checkpoint, "save_file", dies_on_the_second_checkpoint)
    cfg = _cfg(tmp_path, tiny_model_dir, pairs_file, max_steps=6)
    with pytest.raises(OSError, match="No space"):
        train(cfg)
    out = tmp_path / "run"
    assert not (out / "checkpoint-4").exists()
    assert [p.name for p in checkpoint.list_checkpoints(out)] == ["checkpoint-2"]
    assert list(out.glob(".checkpoint-4.tmp-*"))  # the half-written folder, under a name resume ignores

    # resume picks checkpoint-2, loads it whole, clears the leftover and finishes the run
    monkeypatch.setattr(checkpoint, "save_file", real_write)
    result = train(_cfg(tmp_path, tiny_model_dir, pairs_file, max_steps=6, resume_from_checkpoint=True))
    assert result.history[0]["step"] == 3 and result.global_step == 6
    assert not list(out.glob(".checkpoint-*"))
    assert [p.name for p in checkpoint.list_checkpoints(out)] == ["checkpoint-2", "checkpoint-4"]


def test_folder_without_state_file_is_not_a_checkpoint(tmp_path):
    (tmp_path / "checkpoint-5").mkdir()
    (tmp_path / "checkpoint-5" / "trainable.safetensors").write_bytes(b"")
    assert checkpoint.list_checkpoints(tmp_path) == []


# ---------------------------------------------------------------- non-finite loss


@pytest.fixture
def nan_at_step_5(monkeypatch):
    """The objective returns NaN from the fifth micro-batch on, as a diverging run would."""
    train_module = sys.modules["dpokit.train"]  # the module; `dpokit.train` the attribute is the function
    real = train_module.objective
    calls = {"n": 0}

    def objective(*a, **k):
        loss, metrics = real(*a, **k)
        calls["n"] += 1
        return (loss * float("nan") if calls["n"] >= 5 else loss), metrics

    monkeypatch.setattr(train_module, "objective", objective)


def test_nan_loss_stops_and_names_the_last_good_checkpoint(tiny_model_dir, pairs_file, tmp_path, nan_at_step_5):
    cfg = _cfg(tmp_path, tiny_model_dir, pairs_file, max_steps=8)
    with pytest.raises(DpokitError, match=r"loss became nan at step 5.*checkpoint-4") as err:
        train(cfg)
    assert "\n" not in str(err.value)
    out = tmp_path / "run"
    assert [p.name for p in checkpoint.list_checkpoints(out)] == ["checkpoint-2", "checkpoint-4"]
    assert [json.loads(x)["step"] for x in (out / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3, 4]

    # the named checkpoint loads, and its weights are finite
    loop = Loop(_cfg(tmp_path, tiny_model_dir, pairs_file, max_steps=8))
    state = checkpoint.load(out / "checkpoint-4", loop.scorer, loop.optimizer, loop.scheduler)
    assert state["global_step"] == 4
    assert all(torch.isfinite(p).all() for p in loop.model.parameters())


def test_nan_loss_before_any_checkpoint(tiny_model_dir, pairs_file, tmp_path, nan_at_step_5):
    with pytest.raises(DpokitError, match="none"):
        train(_cfg(tmp_path, tiny_model_dir, pairs_file, max_steps=8, save_steps=0))


def test_nan_loss_exits_2_from_the_cli(tiny_model_dir, pairs_file, tmp_path, nan_at_step_5, capsys):
    config = tmp_path / "c.yaml"
    _cfg(tmp_path, tiny_model_dir, pairs_file, max_steps=8).save(config)
    assert main(["train", str(config)]) == 2
    err = capsys.readouterr().err
    line = [x for x in err.splitlines() if x.startswith("dpokit: error:")]
    assert len(line) == 1 and "the loss became nan at step 5" in line[0] and "checkpoint-4" in line[0]
    assert "Traceback" not in err
