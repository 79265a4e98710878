"""Two processes on CPU (gloo), launched the documented ways: `accelerate launch` with the configs
in configs/accelerate (DDP and FSDP2) and `torchrun`. With the same global batch (4 pairs per
process × 2 against 8 in one process) the runs log the same metrics as one process, and a
two-process run killed after a checkpoint and resumed ends where an uninterrupted one does.
"""

import importlib.util
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from dpokit import checkpoint
from dpokit.config import load_config
from dpokit.tiny import build_llama
from dpokit.train import train

from conftest import ROWS

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
pytestmark = pytest.mark.skipif(not shutil.which("torchrun", path=str(BIN)), reason="needs torchrun")


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _command(how: str, config: Path, *overrides: str) -> list[str]:
    script = ["-m", "dpokit.cli", "train", str(config), *overrides]
    if how == "torchrun":
        return [str(BIN / "torchrun"), "--nproc_per_node", "2", "--master_port", str(_port()), *script]
    return [str(BIN / "accelerate"), "launch", "--config_file", str(REPO / "configs" / "accelerate" / f"{how}.yaml"),
            "--num_processes", "2", "--main_process_port", str(_port()), *script]


ENV = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}


def _launch(how: str, config: Path, *overrides: str) -> None:
    result = subprocess.run(_command(how, config, *overrides), capture_output=True, text=True, timeout=400, env=ENV)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]


def _rows(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line]


def _assert_same(a: list[dict], b: list[dict], tol: float) -> None:
    assert [r["step"] for r in a] == [r["step"] for r in b] and len(a) >= 5
    for ra, rb in zip(a, b):
        assert ra.keys() == rb.keys()
        for k in ra:
            assert ra[k] == pytest.approx(rb[k], rel=tol, abs=tol), (ra["step"], k, ra[k], rb[k])


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tokenizer):
    """A tiny model with no dropout (so any split of a batch gives the same numbers), 24 pairs, a config."""
    root = tmp_path_factory.mktemp("distributed")
    build_llama(tokenizer, hidden_size=32, num_layers=2, num_heads=4, seed=0).save_pretrained(root / "model")
    tokenizer.save_pretrained(root / "model")
    (root / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in ROWS * 3))
    config = root / "config.yaml"
    load_config(None, model=str(root / "model"), train_data=str(root / "pairs.jsonl"), eval_data=str(root / "pairs.jsonl"),
                eval_steps=3, max_steps=6, per_device_train_batch_size=4, per_device_eval_batch_size=4,
                learning_rate=2e-3, warmup_steps=1, logging_steps=1, save_steps=2, save_total_limit=None,
                disable_tqdm=True, ref_cache_dir=str(root / "cache"), report_to=["jsonl"]).save(config)
    return root, config


def _one_process(config: Path, **overrides) -> None:
    """A one-process run with the global batch of two processes with 4 pairs each."""
    overrides = dict(per_device_train_batch_size=8, per_device_eval_batch_size=8, **overrides)
    if torch.cuda.is_available():  # the launched runs stay on CPU (ENV hides GPUs); so must this one
        args = [f"{k}={v}" for k, v in overrides.items()]
        subprocess.run([sys.executable, "-m", "dpokit.cli", "train", str(config), *args], env=ENV, check=True,
                       capture_output=True)
    else:
        torch.set_num_threads(1)
        train(load_config(config, **overrides))


@pytest.fixture(scope="module")
def one_process(setup):
    root, config = setup
    _one_process(config, output_dir=str(root / "one"))
    return _rows(root / "one")


@pytest.fixture(scope="module")
def ddp(setup):
    root, config = setup
    _launch("ddp", config, f"output_dir={root / 'ddp'}")
    return _rows(root / "ddp")


def test_ddp_matches_one_process(setup, one_process, ddp):
    _assert_same(one_process, ddp, 1e-5)
    assert any("eval_loss" in r for r in ddp) and [r for r in ddp if "loss" in r][-1]["rewards/margins"] > 0
    root, _ = setup
    assert [p.name for p in checkpoint.list_checkpoints(root / "ddp")] == ["checkpoint-2", "checkpoint-4"]
    rng = load_file(str(root / "ddp" / "checkpoint-4" / "rng.safetensors"))
    assert rng["cpu"].shape[0] == 2 and not torch.equal(rng["cpu"][0], rng["cpu"][1])  # each rank's own stream


def test_one_process_resumes_a_two_process_checkpoint(setup, ddp):
    """Checkpoints hold whole tensors and the position in pairs: one process with 8 pairs per step picks up
    where two with 4 each left off."""
    root, config = setup
    out = root / "regrouped"
    out.mkdir()
    shutil.copytree(root / "ddp" / "checkpoint-4", out / "checkpoint-4")
    shutil.copy(root / "ddp" / "metrics.jsonl", out / "metrics.jsonl")
    _one_process(config, output_dir=str(out), resume_from_checkpoint=True)
    _assert_same(ddp, _rows(out), 1e-5)


def test_fsdp_matches_one_process(setup, one_process):
    root, config = setup
    _launch("fsdp", config, f"output_dir={root / 'fsdp'}")
    _assert_same(one_process, _rows(root / "fsdp"), 1e-5)
    # the final save is whole weights, loadable as usual and equal to the one-process result
    one = load_file(str(root / "one" / "model.safetensors"))
    sharded = load_file(str(root / "fsdp" / "model.safetensors"))
    assert one.keys() == sharded.keys()
    assert max((one[k] - sharded[k]).abs().max().item() for k in one) < 1e-5
    # a checkpoint holds whole tensors too, so it loads into a one-process run
    weights = load_file(str(root / "fsdp" / "checkpoint-4" / "trainable.safetensors"))
    assert weights["model.lm_head.weight"].shape == one["lm_head.weight"].shape


def _kill_after_first_checkpoint(config: Path, out: Path, *overrides: str) -> None:
    proc = subprocess.Popen(_command("torchrun", config, f"output_dir={out}", *overrides), env=ENV,
                            start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while not checkpoint.list_checkpoints(out) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    os.killpg(proc.pid, signal.SIGKILL)  # torchrun and both workers
    proc.wait()
    assert checkpoint.list_checkpoints(out) and not (out / "model.safetensors").exists(), "not killed mid-run"


def test_two_processes_killed_and_resumed(setup, ddp):
    """torchrun, killed with SIGKILL once its first checkpoint exists, then resumed: the metrics of the
    uninterrupted two-process run."""
    root, config = setup
    _kill_after_first_checkpoint(config, root / "killed")
    _launch("torchrun", config, f"output_dir={root / 'killed'}", "resume_from_checkpoint=true")
    _assert_same(ddp, _rows(root / "killed"), 1e-6)


@pytest.mark.slow
def test_two_processes_with_dropout_killed_and_resumed(setup, tokenizer):
    """With dropout each rank draws its own masks: the resumed run matches only if every rank's RNG is restored."""
    root, config = setup
    model = build_llama(tokenizer, hidden_size=32, num_layers=2, num_heads=4, seed=0)
    model.config.attention_dropout = 0.2
    model.save_pretrained(root / "dropout_model")
    tokenizer.save_pretrained(root / "dropout_model")
    args = (f"model={root / 'dropout_model'}",)
    _launch("torchrun", config, f"output_dir={root / 'dropout_whole'}", *args)
    _kill_after_first_checkpoint(config, root / "dropout_killed", *args)
    _launch("torchrun", config, f"output_dir={root / 'dropout_killed'}", "resume_from_checkpoint=true", *args)
    _assert_same(_rows(root / "dropout_whole"), _rows(root / "dropout_killed"), 1e-6)


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None, reason="needs deepspeed (pip install deepspeed)")
@pytest.mark.parametrize("stage", [2, 3])
def test_deepspeed_matches_one_process(setup, one_process, stage):
    root, config = setup
    out = root / f"zero{stage}"
    _launch(f"deepspeed-zero{stage}", config, f"output_dir={out}", "save_steps=0")
    _assert_same(one_process, _rows(out), 1e-5)
    one, ds = load_file(str(root / "one" / "model.safetensors")), load_file(str(out / "model.safetensors"))
    assert max((one[k] - ds[k]).abs().max().item() for k in one) < 1e-5
