"""The family contract, kept true by two non-text families (tests/contract_families.py): a categorical
bandit policy (deterministic, exact log-probabilities) and a denoiser scored on one draw of timestep and
noise per pair (stochastic, a surrogate likelihood). Both go through train, eval, checkpoint and resume, the
reference cache (used for the deterministic one, never for the stochastic one) and the final save; two
processes under torchrun log what one process logs. The import rules of docs/architecture.md are checked
on the source tree.
"""

import ast
import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import contract_families as cf
from dpokit.cli import main
from dpokit.config import load_config
from dpokit.errors import DpokitError
from dpokit.families import get_family
from dpokit.families.base import draw_seeds
from dpokit.train import Loop, train

REPO = Path(__file__).resolve().parents[1]
SRC = REPO / "src" / "dpokit"
BIN = Path(sys.executable).parent
FAMILIES = {"test_bandit": cf.bandit_rows, "test_denoiser": cf.denoiser_rows}


def _cfg(tmp_path: Path, family: str, **overrides):
    data = cf.write_rows(FAMILIES[family](24), tmp_path / f"{family}.jsonl")
    held_out = cf.write_rows(FAMILIES[family](8, seed=1), tmp_path / f"{family}-eval.jsonl")
    settings = dict(family=family, train_data=str(data), eval_data=str(held_out), output_dir=str(tmp_path / "run"),
                    learning_rate=0.05, beta=0.5, per_device_train_batch_size=4, per_device_eval_batch_size=4,
                    max_steps=6, logging_steps=1, save_steps=0, disable_tqdm=True, report_to=["jsonl"],
                    ref_cache_dir=str(tmp_path / "cache"), seed=3)
    return load_config(None, **{**settings, **overrides})


def _rows(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def _train_rows(rows: list[dict]) -> list[dict]:
    return [r for r in rows if "loss" in r]


def _cache_files(tmp_path: Path) -> list[Path]:
    return sorted((tmp_path / "cache").rglob("*.safetensors")) if (tmp_path / "cache").exists() else []


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_trains_evaluates_and_saves(tmp_path, family):
    """DPO moves each family toward its chosen outputs on held-out pairs, and the final save holds the trained
    weights, which load back through the family."""
    result = train(_cfg(tmp_path, family, max_steps=30))
    rows = result.history
    evals = [r for r in rows if "eval_loss" in r]
    assert evals and evals[-1]["eval_rewards/accuracies"] >= 0.75 and evals[-1]["eval_rewards/margins"] > 0
    assert _train_rows(rows)[-1]["loss"] < _train_rows(rows)[0]["loss"]
    fam = get_family(family)
    cfg = _cfg(tmp_path, family)
    start = fam.load_policy(cfg)[0].state_dict()
    saved = fam.load_model(str(result.output_dir), cfg).state_dict()
    assert load_file(str(result.output_dir / "model.safetensors")).keys() == saved.keys()
    assert any(not torch.equal(start[k], saved[k]) for k in saved)  # the trained weights, not the starting ones


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_eval_goes_through_the_family(tmp_path, family, capsys):
    """`dpokit eval RUN --data FILE` scores a trained run of any family and reproduces the loop's own final
    evaluation (the stochastic one on the same draws); sampling prompts from a family that cannot sample is one
    line, exit 2."""
    fam = get_family(family)
    start = tmp_path / "start"  # a saved starting policy: the run's reference, as eval reloads it
    fam.save(fam.load_policy(_cfg(tmp_path, family))[0], None, str(start))
    cfg = _cfg(tmp_path, family, max_steps=10, model=str(start))
    last = [r for r in train(cfg).history if "eval_loss" in r][-1]
    code = main(["eval", str(tmp_path / "run"), "--data", cfg.eval_data, "--json"])
    assert code == 0
    result = json.loads(capsys.readouterr().out)["preference"]
    for key in ("loss", "rewards/accuracies", "rewards/margins", "logps/chosen"):
        assert result[key] == pytest.approx(last[f"eval_{key}"], rel=1e-5, abs=1e-6), key
    prompts = cf.write_rows([{"prompt": "x"}], tmp_path / "prompts.jsonl")
    assert main(["eval", str(tmp_path / "run"), "--prompts", str(prompts)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"family {family!r} cannot" in err[0] and "sample" in err[0]


def test_deterministic_family_uses_the_reference_cache(tmp_path):
    """The bandit's reference scores are computed once and cached; a second run hits the cache and logs the same
    numbers; a change to one action (not a token id in sight) is another cache entry."""
    first = _train_rows(train(_cfg(tmp_path, "test_bandit", output_dir=str(tmp_path / "a"))).history)
    files = _cache_files(tmp_path)
    assert len(files) == 2  # train and eval
    second = _train_rows(train(_cfg(tmp_path, "test_bandit", output_dir=str(tmp_path / "b"))).history)
    assert first == second and _cache_files(tmp_path) == files
    rows = cf.bandit_rows(24)
    rows[5]["rejected"] = next(a for a in range(4) if a not in (rows[5]["chosen"], rows[5]["rejected"]))
    cf.write_rows(rows, tmp_path / "changed.jsonl")
    train(_cfg(tmp_path, "test_bandit", output_dir=str(tmp_path / "c"), train_data=str(tmp_path / "changed.jsonl")))
    assert len(_cache_files(tmp_path)) == 3


def test_stochastic_family_never_caches_and_scores_the_reference_on_the_same_draw(tmp_path):
    """Under the default config (precompute_ref_log_probs on) the denoiser's reference is not cached, and at
    step 1, where the policy is the reference, every reward is exactly 0: the reference saw the policy's draw."""
    cfg = _cfg(tmp_path, "test_denoiser")
    assert cfg.precompute_ref_log_probs
    loop = Loop(cfg)
    assert loop.ref_train is None and loop.reference is not None
    assert isinstance(loop.train_examples, cf.LazyExamples)  # a lazy sequence goes through the loop
    first = _train_rows(loop.run().history)[0]
    assert first["rewards/chosen"] == 0.0 and first["rewards/rejected"] == 0.0 and first["rewards/margins"] == 0.0
    assert first["logps/chosen"] != 0.0  # a real score, not an empty one
    assert _cache_files(tmp_path) == []


def test_the_draw_is_fresh_each_epoch_and_replayed_on_resume(tmp_path):
    """The same pair gets another (t, ε) in the next epoch (the loss differs for the same weights), yet a run
    resumed from a checkpoint logs exactly what the uninterrupted run logged."""
    fam = get_family("test_denoiser")
    cfg = _cfg(tmp_path, "test_denoiser")
    loop = Loop(cfg)
    one = loop.train_examples[:2]
    a = fam.collate(one, cfg, None, draws=draw_seeds(cfg.seed, 1, [0, 1]))
    b = fam.collate(one, cfg, None, draws=draw_seeds(cfg.seed, 2, [0, 1]))
    assert not torch.equal(a["noise"], b["noise"])
    whole = _rows(train(_cfg(tmp_path, "test_denoiser", output_dir=str(tmp_path / "whole"), max_steps=12)).output_dir)
    cut = tmp_path / "cut"
    train(_cfg(tmp_path, "test_denoiser", output_dir=str(cut), max_steps=12, save_steps=5))
    for name in os.listdir(cut):  # keep only the step-5 checkpoint and the metrics logged until then
        if name not in ("checkpoint-5", "metrics.jsonl"):
            shutil.rmtree(cut / name) if (cut / name).is_dir() else (cut / name).unlink()
    kept = [line for line in (cut / "metrics.jsonl").read_text().splitlines() if json.loads(line)["step"] <= 5]
    (cut / "metrics.jsonl").write_text("\n".join(kept) + "\n")
    train(_cfg(tmp_path, "test_denoiser", output_dir=str(cut), max_steps=12, save_steps=5,
               resume_from_checkpoint=True))
    assert _rows(cut) == whole


def test_family_config_keys_are_validated(tmp_path):
    assert _cfg(tmp_path, "test_bandit", n_actions=4).family_config == {"n_actions": 4}
    with pytest.raises(DpokitError, match="unknown config key.*hidden"):
        _cfg(tmp_path, "test_bandit", hidden=8)  # the denoiser's key, not the bandit's
    with pytest.raises(DpokitError, match="n_actions.*expects int"):
        _cfg(tmp_path, "test_bandit", n_actions="four")
    with pytest.raises(DpokitError, match="n_actions must be >= 2"):
        _cfg(tmp_path, "test_bandit", n_actions=1)
    saved = tmp_path / "config.yaml"
    _cfg(tmp_path, "test_bandit", n_actions=4).save(saved)
    assert load_config(saved).family_config == {"n_actions": 4}  # flat in the file, read back


def test_bad_rows_name_file_and_row(tmp_path):
    rows = cf.bandit_rows(4)
    rows[2]["chosen"] = 9
    path = cf.write_rows(rows, tmp_path / "bad.jsonl")
    with pytest.raises(DpokitError, match=r"bad\.jsonl, row 3: an action must be an integer in 0\.\.3"):
        Loop(_cfg(tmp_path, "test_bandit", train_data=str(path)))


def test_losses_that_need_a_probability_refuse_a_surrogate(tmp_path):
    for loss in ("orpo", "simpo"):
        with pytest.raises(DpokitError, match=f"{loss}.*needs an exact log-probability.*test_denoiser.*surrogate"):
            Loop(_cfg(tmp_path, "test_denoiser", loss_type=loss))


def test_missing_capability_is_one_line():
    with pytest.raises(DpokitError, match="online DPO needs a family that can sample outputs.*test_bandit"):
        get_family("test_bandit").require("sample", "online DPO")
    get_family("causal_lm").require("sample", "online DPO")  # the causal LM can


def test_groups_of_rejected_actions_train(tmp_path):
    """S-DPO over several rejected actions per context: [B, K] scores through the same loop."""
    path = cf.write_rows(cf.bandit_rows(24, group=3), tmp_path / "groups.jsonl")
    rows = train(_cfg(tmp_path, "test_bandit", train_data=str(path), eval_data=None, loss_type="sdpo",
                      max_steps=20)).history
    assert _train_rows(rows)[-1]["rewards/accuracies"] > _train_rows(rows)[0]["rewards/accuracies"]


# ---------------------------------------------------------------- two processes


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.skipif(not shutil.which("torchrun", path=str(BIN)), reason="needs torchrun")
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_two_processes_log_what_one_process_logs(tmp_path, family):
    """torchrun with 2 × 2 pairs per step against one process with 4: the same losses and metrics, step by
    step, for the cached deterministic family and for the stochastic one (whose draws follow the pair, not
    the rank)."""
    common = dict(max_steps=6, eval_steps=3)
    config = tmp_path / "config.yaml"
    _cfg(tmp_path, family, per_device_train_batch_size=2, per_device_eval_batch_size=2,
         output_dir=str(tmp_path / "two"), **common).save(config)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    result = subprocess.run([str(BIN / "torchrun"), "--nproc_per_node", "2", "--master_port", str(_port()),
                             str(REPO / "tests" / "contract_train.py"), str(config)],
                            capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    one = train(_cfg(tmp_path, family, output_dir=str(tmp_path / "one"), **common)).history
    two = _rows(tmp_path / "two")
    assert [r["step"] for r in one] == [r["step"] for r in two] and len(one) >= 6
    for a, b in zip(one, two):
        assert a.keys() == b.keys()
        for k in a:
            assert a[k] == pytest.approx(b[k], rel=1e-5, abs=1e-6), (a["step"], k)


# ---------------------------------------------------------------- import rules


def _imports(path: Path) -> list[str]:
    """Absolute names of the dpokit modules a source file imports."""
    # "a.b.mod", or "a.b.__init__" for a package: a level-1 relative import strips the last part either way
    package = ".".join(path.relative_to(SRC.parent).with_suffix("").parts)
    names = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = package.split(".")[:len(package.split(".")) - node.level] if node.level else []
            module = ".".join(base + ([node.module] if node.module else []))
            names += [module] + [f"{module}.{a.name}" for a in node.names]
    return [n for n in names if n.startswith("dpokit")]


def _exported(package_init: Path) -> set[str]:
    """The names a family package's __init__ lists in `__all__`: its public API."""
    for node in ast.walk(ast.parse(package_init.read_text())):
        if isinstance(node, ast.Assign) and any(getattr(x, "id", None) == "__all__" for x in node.targets):
            return {ast.literal_eval(e) for e in node.value.elts}
    return set()


def test_no_family_internals_outside_the_family_and_no_experiments_in_the_core():
    """Shared code reaches a family only through get_family; a family may build on another family's public API
    (the names its package exports, as the vlm family builds on causal_lm's layout), never on its modules."""
    families = [p.name for p in (SRC / "families").iterdir() if p.name not in ("__init__.py", "base.py", "__pycache__")]
    internals = {f"dpokit.families.{Path(name).stem}" for name in families}
    assert "dpokit.families.causal_lm" in internals
    broken = []
    for path in SRC.rglob("*.py"):
        rel = path.relative_to(SRC).as_posix()
        for name in _imports(path):
            owner = next((i for i in internals if name == i or name.startswith(i + ".")), None)
            if not owner or rel.startswith(f"families/{owner.rsplit('.', 1)[1]}/"):
                continue
            public = name == owner or name[len(owner) + 1:] in _exported(SRC / "families" / owner.rsplit(".", 1)[1]
                                                                         / "__init__.py")
            if not (rel.startswith("families/") and public):
                broken.append(f"{rel} imports {name}")
            in_experiments = rel.startswith("experiments/") or rel == "cli.py"
            if name.startswith("dpokit.experiments") and not in_experiments:
                broken.append(f"{rel} imports {name}")
    assert not broken, broken
