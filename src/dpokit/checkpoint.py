"""Training checkpoints: written atomically, safetensors and JSON only (no pickles).

A checkpoint is a folder `checkpoint-<step>` holding the trainable parameters, the optimizer
and scheduler state, every rank's RNG state and the loop's position. Parameters and
optimizer state are saved whole (gathered from FSDP shards through torch's
`distributed.checkpoint.state_dict` API, keyed by parameter name), so a checkpoint does not
depend on how the run was sharded. Every rank takes part in gathering; rank 0 alone writes,
under a temporary name, and renames the folder into place only when it is complete: a crash
mid-write leaves nothing that resume would pick up. `trainer_state.json` is written last and
marks a checkpoint as complete.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from .errors import DpokitError

log = logging.getLogger("dpokit")
PATTERN = re.compile(r"^checkpoint-(\d+)$")


def gather_state(model: nn.Module, optimizer=None) -> tuple[dict, dict | None]:
    """The trainable parameters, whole (gathered from FSDP shards, on CPU), and the optimizer state keyed by
    parameter name. Collective: every rank calls it; with several processes only rank 0 gets the tensors."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, get_optimizer_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=True)
    weights = get_model_state_dict(model, options=options)
    opt_state = get_optimizer_state_dict(model, _optimizer(optimizer), options=options) if optimizer else None
    return weights, opt_state


def _set_state(model: nn.Module, optimizer, weights: dict, opt_state: dict) -> None:
    """Load whole tensors into every rank's (possibly sharded) model and optimizer."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict, set_optimizer_state_dict

    options = StateDictOptions(full_state_dict=True, strict=False)
    result = set_model_state_dict(model, weights, options=options)
    trainable = {_fqn(n) for n, p in model.named_parameters() if p.requires_grad}
    missing = [n for n in result.missing_keys if n in trainable]
    if result.unexpected_keys or missing:
        what = f"unexpected {result.unexpected_keys[0]}" if result.unexpected_keys else f"missing {missing[0]}"
        raise DpokitError(f"checkpoint does not match the model ({what})")
    set_optimizer_state_dict(model, _optimizer(optimizer), opt_state, options=options)


def _optimizer(optimizer):
    return getattr(optimizer, "optimizer", optimizer)  # accelerate's wrapper → the torch optimizer


def _unshare(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """safetensors refuses tensors that share memory (tied weights): give repeats their own copy."""
    seen, out = set(), {}
    for name, t in tensors.items():
        t = t.detach().contiguous()
        key = (t.untyped_storage().data_ptr(), t.storage_offset())
        out[name] = t.clone() if key in seen and t.numel() else t
        seen.add(key)
    return out


def _fqn(name: str) -> str:
    """A parameter's name without DDP/FSDP wrapper prefixes, as the state_dict API spells it."""
    name = re.sub(r"(^|\.)(_fsdp_wrapped_module|_checkpoint_wrapped_module)\.", r"\1", name)
    return name[len("module."):] if name.startswith("module.") else name


def _flatten_optimizer(state: dict) -> tuple[dict[str, torch.Tensor], dict]:
    tensors, scalars = {}, {}
    for name, per_param in state["state"].items():
        for key, value in per_param.items():
            if torch.is_tensor(value):
                tensors[f"{name}/{key}"] = value.detach().cpu().contiguous()
            else:
                scalars[f"{name}/{key}"] = value
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def _unflatten_optimizer(tensors: dict[str, torch.Tensor], meta: dict) -> dict:
    state: dict[str, dict] = {}
    for flat, value in list(tensors.items()) + list(meta["scalars"].items()):
        name, key = flat.rsplit("/", 1)
        state.setdefault(name, {})[key] = value
    return {"state": state, "param_groups": meta["param_groups"]}


def _rng_state(accelerator) -> dict[str, torch.Tensor]:
    """Every rank's RNG state, one row per rank (collective: all ranks call it)."""
    states = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state()
    if accelerator is None or accelerator.num_processes == 1:
        return {k: v[None] for k, v in states.items()}
    return {k: accelerator.gather(v.to(accelerator.device)[None]).cpu() for k, v in states.items()}


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_files(tmp: Path, files: dict[str, object]) -> None:
    """Write a checkpoint's files into `tmp`, in order: dicts of tensors as safetensors, the rest as JSON."""
    for name, content in files.items():
        if name.endswith(".safetensors"):
            save_file(content, str(tmp / name))
        else:
            (tmp / name).write_text(json.dumps(content))
        with open(tmp / name, "rb") as fh:
            os.fsync(fh.fileno())


def save(folder: Path, model: nn.Module, optimizer, scheduler, loop_state: dict, keep: int | None,
         accelerator=None, extra: dict[str, dict[str, torch.Tensor]] | None = None) -> Path:
    """Write `folder` atomically. With several processes every rank must call this; rank 0 writes.
    `extra`: more tensor files (name → tensors) written inside the same atomic folder."""
    folder = Path(folder)
    weights, opt_state = gather_state(model, optimizer)
    rng = _rng_state(accelerator)
    main = accelerator is None or accelerator.is_main_process
    if main:
        root = folder.parent
        root.mkdir(parents=True, exist_ok=True)
        for stale in root.glob(".checkpoint-*.tmp-*"):  # left by a crash mid-write
            shutil.rmtree(stale, ignore_errors=True)
        tmp = root / f".{folder.name}.tmp-{os.getpid()}"
        tmp.mkdir()
        opt_tensors, opt_meta = _flatten_optimizer(opt_state)
        write_files(tmp, {
            "trainable.safetensors": _unshare(weights),
            "optimizer.safetensors": opt_tensors,
            "optimizer.json": opt_meta,
            "rng.safetensors": rng,
            "scheduler.json": scheduler.state_dict(),
            **{name: _unshare(tensors) for name, tensors in (extra or {}).items()},
            "trainer_state.json": loop_state,  # last: its presence marks a complete checkpoint
        })
        _fsync_dir(tmp)
        old = root / f".{folder.name}.old-{os.getpid()}"
        if folder.exists():  # re-saving a step (resumed from an earlier checkpoint): swap, then delete
            os.replace(folder, old)
        os.replace(tmp, folder)
        _fsync_dir(root)
        shutil.rmtree(old, ignore_errors=True)
        _prune(root, keep)
    if accelerator is not None:
        accelerator.wait_for_everyone()
    return folder


def _prune(root: Path, keep: int | None) -> None:
    if not keep:
        return
    for old in list_checkpoints(root)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)


def list_checkpoints(root: Path) -> list[Path]:
    """Complete checkpoints under `root`, oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := PATTERN.match(p.name)) and
             (p / "trainer_state.json").exists()]
    return [p for _, p in sorted(found)]


def load(folder: Path, model: nn.Module, optimizer, scheduler, accelerator=None) -> dict:
    """Restore a checkpoint into every rank; returns the loop state. All ranks call this."""
    folder = Path(folder)
    try:
        weights = load_file(str(folder / "trainable.safetensors"))
        opt_state = _unflatten_optimizer(load_file(str(folder / "optimizer.safetensors")),
                                         json.loads((folder / "optimizer.json").read_text()))
        rng = load_file(str(folder / "rng.safetensors"))
        sched = json.loads((folder / "scheduler.json").read_text())
        loop_state = json.loads((folder / "trainer_state.json").read_text())
    except (OSError, ValueError) as e:
        raise DpokitError(f"{folder}: cannot read checkpoint ({e})") from None
    try:
        _set_state(model, optimizer, weights, opt_state)
    except DpokitError as e:
        raise DpokitError(f"{folder}: {e}") from None
    except RuntimeError as e:
        if "size mismatch" not in str(e):
            raise
        raise DpokitError(f"{folder}: checkpoint does not match the model ({str(e).splitlines()[-1].strip()})") \
            from None
    scheduler.load_state_dict(sched)
    rank = accelerator.process_index if accelerator is not None else 0
    if rank < rng["cpu"].shape[0]:
        # clone: torch.set_rng_state crashes on a view with a storage offset (any row but the first)
        torch.set_rng_state(rng["cpu"][rank].clone())
        if "cuda" in rng and torch.cuda.is_available():
            torch.cuda.set_rng_state(rng["cuda"][rank].clone())
    else:
        log.warning("%s was written by %d processes; rank %d starts with a fresh RNG state (dropout masks will "
                    "differ from an uninterrupted run)", folder, rng["cpu"].shape[0], rank)
    return loop_state
