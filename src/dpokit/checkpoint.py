"""Training checkpoints: written atomically, safetensors and JSON only (no pickles).

A checkpoint is a folder `checkpoint-<step>` holding the trainable parameters, the optimizer
and scheduler state, the RNG state and the loop's position. It is written under a temporary
name and renamed into place only when complete, so a crash mid-write leaves nothing that
resume would pick up.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

PATTERN = re.compile(r"^checkpoint-(\d+)$")


def _flatten_optimizer(state: dict) -> tuple[dict[str, torch.Tensor], dict]:
    tensors, scalars = {}, {}
    for idx, per_param in state["state"].items():
        for key, value in per_param.items():
            if torch.is_tensor(value):
                tensors[f"{idx}.{key}"] = value.detach().cpu().contiguous()
            else:
                scalars[f"{idx}.{key}"] = value
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def _unflatten_optimizer(tensors: dict[str, torch.Tensor], meta: dict) -> dict:
    state: dict[int, dict] = {}
    for flat, value in list(tensors.items()) + list(meta["scalars"].items()):
        idx, key = flat.split(".", 1)
        state.setdefault(int(idx), {})[key] = value
    return {"state": state, "param_groups": meta["param_groups"]}


def trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().cpu().contiguous() for n, p in model.named_parameters() if p.requires_grad}


def save(folder: Path, model: nn.Module, optimizer, scheduler, loop_state: dict, keep: int | None) -> Path:
    folder = Path(folder)
    final = folder.parent / folder.name
    tmp = folder.parent / f".{folder.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file(trainable_state(model), str(tmp / "trainable.safetensors"))
    opt_tensors, opt_meta = _flatten_optimizer(optimizer.state_dict())
    save_file(opt_tensors, str(tmp / "optimizer.safetensors"))
    rng = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng.update({f"cuda{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())})
    save_file(rng, str(tmp / "rng.safetensors"))
    (tmp / "optimizer.json").write_text(json.dumps(opt_meta))
    (tmp / "scheduler.json").write_text(json.dumps(scheduler.state_dict()))
    (tmp / "trainer_state.json").write_text(json.dumps(loop_state))
    for f in tmp.iterdir():
        with open(f, "rb") as fh:
            os.fsync(fh.fileno())
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    _prune(folder.parent, keep)
    return final


def _prune(root: Path, keep: int | None) -> None:
    if not keep:
        return
    for old in list_checkpoints(root)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)


def list_checkpoints(root: Path) -> list[Path]:
    root = Path(root)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := PATTERN.match(p.name)) and
             (p / "trainer_state.json").exists()]
    return [p for _, p in sorted(found)]


def load(folder: Path, model: nn.Module, optimizer, scheduler) -> dict:
    folder = Path(folder)
    weights = load_file(str(folder / "trainable.safetensors"))
    params = dict(model.named_parameters())
    missing = [n for n, p in params.items() if p.requires_grad and n not in weights]
    if missing:
        from .errors import DpokitError
        raise DpokitError(f"{folder}: checkpoint does not match the model (missing {missing[0]})")
    with torch.no_grad():
        for name, value in weights.items():
            params[name].copy_(value)
    opt_state = _unflatten_optimizer(load_file(str(folder / "optimizer.safetensors")),
                                     json.loads((folder / "optimizer.json").read_text()))
    optimizer.load_state_dict(opt_state)
    scheduler.load_state_dict(json.loads((folder / "scheduler.json").read_text()))
    rng = load_file(str(folder / "rng.safetensors"))
    torch.set_rng_state(rng["cpu"])
    if torch.cuda.is_available():
        cuda = [rng[k] for k in sorted(k for k in rng if k.startswith("cuda"))]
        if cuda:
            torch.cuda.set_rng_state_all(cuda)
    return json.loads((folder / "trainer_state.json").read_text())
