"""The one training loop, shared by every model family and objective.

config → family (model, processor, encoded examples) → reference log-probs (cached) →
AdamW steps on the objective → metrics, periodic eval, atomic checkpoints, final save.
Runs on accelerate, so the same loop serves CPU, one GPU, and DDP/FSDP/DeepSpeed under
`accelerate launch` or `torchrun`. Each optimizer step sees a global batch of
`per_device_train_batch_size × processes × gradient_accumulation_steps` pairs, taken in an
order fixed by (seed, epoch) and split across ranks, so a resumed run replays exactly the
batches it had left, and one process with a batch of 8 sees the pairs two processes with
4 each see. The loss is the mean over every pair of the global batch, whatever the split.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from . import checkpoint
from .config import TrainConfig
from .errors import DpokitError
from .families import get_family
from .families.base import data_kind, draw_seeds
from .io import save_tensors
from .objectives import ObjectiveConfig, check_data, check_likelihood, check_losses, logit_metrics, objective
from .reference import build_reference, cache_path, check_sync, loss_inputs, sync_reference
from .sinks import make_sinks

log = logging.getLogger("dpokit")

REFERENCE_FILE = "reference.safetensors"  # TR-DPO: the moving reference, in each checkpoint

# Row order in metrics.jsonl: TRL's names, then anything an objective adds.
KEY_ORDER = ["loss", "rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen",
             "logps/rejected", "logits/chosen", "logits/rejected", "grad_norm"]


@dataclass
class TrainResult:
    output_dir: Path
    global_step: int
    history: list[dict] = field(default_factory=list)  # every row logged by this run, as in metrics.jsonl


def _flag(name: str) -> bool:
    return os.environ.get(name, "false").lower() == "true"


def _accelerator(cfg: TrainConfig):
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, PartialState
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin, InitProcessGroupKwargs

    cuda = torch.cuda.is_available()
    bf16 = (cuda and torch.cuda.is_bf16_supported()) if cfg.bf16 is None else cfg.bf16
    deepspeed = _flag("ACCELERATE_USE_DEEPSPEED")
    several = int(os.environ.get("WORLD_SIZE", "1")) > 1
    # Several processes on a machine without CUDA (torchrun, `accelerate launch --multi_gpu`): accelerate joins
    # them over gloo only when told `cpu` (DeepSpeed instead wants gloo named, and `cpu` off).
    cpu = not cuda and several and not deepspeed
    handlers = [InitProcessGroupKwargs(backend="gloo")] if deepspeed and not cuda else []
    fsdp_plugin = None
    if cpu and _flag("ACCELERATE_USE_FSDP"):
        try:
            fsdp_plugin = FullyShardedDataParallelPlugin()
        except RuntimeError:
            raise DpokitError("FSDP on CPU needs fsdp_version: 2 (accelerate's FSDP1 wants a GPU)") from None
    precision = "bf16" if bf16 else "no"
    state = AcceleratorState._shared_state
    if state and not several and not deepspeed and state.get("_mixed_precision") != precision:
        # A second run in one process (a notebook, a sweep) with another precision: accelerate keeps its state
        # process-wide and refuses the change with a traceback; one process has nothing else to keep in it.
        AcceleratorState._reset_state()
    acc = Accelerator(
        cpu=cpu, mixed_precision=precision, fsdp_plugin=fsdp_plugin, kwargs_handlers=handlers,
        # DeepSpeed steps its own engine at the accumulation boundary; it must know the count.
        gradient_accumulation_steps=cfg.gradient_accumulation_steps if deepspeed else 1,
    )
    if fsdp_plugin is not None and acc.distributed_type == DistributedType.MULTI_CPU:
        # accelerate runs CPU processes as plain DDP even when FSDP is asked for; torch's FSDP2 works over gloo.
        # Both shared states hold the type (AcceleratorState copies PartialState's whenever it is built).
        PartialState._shared_state["distributed_type"] = DistributedType.FSDP
        AcceleratorState._shared_state.update(distributed_type=DistributedType.FSDP, fsdp_plugin=fsdp_plugin)
    if acc.distributed_type == DistributedType.DEEPSPEED:
        if cfg.save_steps or cfg.resume_from_checkpoint:
            raise DpokitError(
                "checkpoints under DeepSpeed are not supported (its own format is pickled, and dpokit writes "
                "safetensors only): set save_steps=0, or use FSDP (configs/accelerate/fsdp.yaml) for resumable "
                "sharded runs")
        ds = acc.state.deepspeed_plugin.deepspeed_config
        # DeepSpeed checks micro-batch × accumulation × processes against its batch size; dpokit has no dataloader
        # for accelerate to read the micro-batch from.
        if not isinstance(ds.get("train_micro_batch_size_per_gpu"), int):
            ds["train_micro_batch_size_per_gpu"] = cfg.per_device_train_batch_size
        if ds.get("gradient_clipping") in (None, "auto"):
            ds["gradient_clipping"] = cfg.max_grad_norm
    return acc


class _Means:
    """Running sums and counts of per-example metrics, summed over ranks when read.

    Sums are float64 and restored exactly from a checkpoint, so a resumed run logs the
    numbers an uninterrupted one would.
    """

    def __init__(self, device, saved: dict[str, list[float]] | None = None):
        self.device = device
        self.sums = {k: torch.tensor(v, dtype=torch.float64, device=device) for k, v in (saved or {}).items()}

    def add(self, name: str, values: torch.Tensor | tuple[torch.Tensor, torch.Tensor], counted: bool = True) -> None:
        """`values` per example, or (values, weights) for a weighted mean (logits/* weigh by tokens)."""
        values, weights = values if isinstance(values, tuple) else (values, None)
        values = values.detach().reshape(-1).to(self.device, torch.float64)
        weights = torch.ones_like(values) if weights is None else weights.detach().reshape(-1).to(values)
        entry = torch.stack([(values * weights).sum(), weights.sum()])
        entry = entry if counted else torch.zeros_like(entry)  # a rank with no pair this round still adds the key
        self.sums[name] = self.sums[name] + entry if name in self.sums else entry

    def totals(self, acc) -> dict[str, list[float]]:
        """Sums and counts over all ranks (collective: every rank calls it, with the same keys)."""
        if not self.sums:
            return {}
        keys = sorted(self.sums)
        stacked = torch.stack([self.sums[k] for k in keys])
        if acc.num_processes > 1:
            stacked = acc.reduce(stacked, reduction="sum")
        return dict(zip(keys, stacked.cpu().tolist()))

    def means(self, acc) -> dict[str, float]:
        totals = self.totals(acc)
        order = [k for k in KEY_ORDER if k in totals] + sorted(set(totals) - set(KEY_ORDER))
        return {k: totals[k][0] / totals[k][1] for k in order if totals[k][1] > 0}


class Loop:
    def __init__(self, cfg: TrainConfig, family=None):
        from accelerate.utils import set_seed

        check_losses(cfg.loss_types, cfg.loss_weights, cfg.label_smoothing)
        self.cfg = cfg
        self.acc = _accelerator(cfg)
        self.deepspeed = self.acc.distributed_type.value == "DEEPSPEED"
        set_seed(cfg.seed)  # the same on every rank: LoRA and any fresh weights start identical
        self.family = family or get_family(cfg.family)
        self.out = Path(cfg.output_dir)
        check_likelihood(cfg.loss_types, self.family.name, self.family.likelihood_for(cfg))
        self.model, self.processor = self.family.load_policy(cfg)
        self.train_examples = self.family.examples(cfg.train_data, self.processor, cfg)
        if not len(self.train_examples):
            raise DpokitError(f"{cfg.train_data}: no training pairs")
        self.eval_examples = self.family.examples(cfg.eval_data, self.processor, cfg) if cfg.eval_data else []
        for examples in (e for e in (self.train_examples, self.eval_examples) if len(e)):  # pairs, groups, unpaired
            check_data(cfg.loss_types, data_kind(examples), cfg.rpo_alpha, cfg.per_device_train_batch_size)
        self.resume_dir = self._find_resume()
        self.obj_cfg = ObjectiveConfig.from_config(cfg)
        # The reference is chosen (and its cache key read) while the policy still holds its starting weights,
        # unsharded; the policy's own log-probs are scored after `prepare`, through the wrapped model.
        # A stochastic family's reference is scored on each batch's own draw, never cached.
        cached = cfg.precompute_ref_log_probs and not self.family.stochastic
        self.reference = build_reference(cfg, self.family, self.model, self.acc.device, cached)
        own_weights = not self.reference.reference_free and self.reference.model is self.model
        if not self.reference.reference_free and not own_weights:
            self.reference.scorer.to(self.acc.device)  # a separate model or a frozen copy
        if cfg.sync_ref_model:
            self._check_sync()
        ref_keys = {}
        if not self.reference.reference_free and cached:
            ref_keys = {"train": cache_path(cfg, self.family, self.reference, self.train_examples)}
            if len(self.eval_examples):
                ref_keys["eval"] = cache_path(cfg, self.family, self.reference, self.eval_examples)

        set_seed(cfg.seed, device_specific=True)  # from here each rank draws its own dropout masks
        scorer = self.family.scorer(self.model, cfg)
        # FSDP wraps each block the model names as unsplittable; the scorer is the root it sees.
        scorer._no_split_modules = getattr(self.model, "_no_split_modules", None)
        params = [p for p in self.model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=cfg.learning_rate, betas=(cfg.adam_beta1, cfg.adam_beta2),
                                      eps=cfg.adam_epsilon, weight_decay=cfg.weight_decay)
        n, per_step = len(self.train_examples), self.global_micro_batch * cfg.gradient_accumulation_steps
        self.steps_per_epoch = math.ceil(n / per_step)
        self.total_steps = cfg.max_steps if cfg.max_steps > 0 else math.ceil(self.steps_per_epoch * cfg.num_train_epochs)
        from transformers import get_scheduler

        warmup = cfg.warmup_steps or math.ceil(cfg.warmup_ratio * self.total_steps)
        self.scheduler = get_scheduler(cfg.lr_scheduler_type, optimizer, warmup, self.total_steps)
        self.scorer, self.optimizer = self.acc.prepare(scorer, optimizer)
        if own_weights:
            # The policy's own weights (its starting point, or its base with adapters off): score through the
            # prepared scorer, which under FSDP is the only one holding whole parameters during forward.
            self.reference.scorer = self.scorer

        self.ref_train = self.ref_eval = None
        if ref_keys:
            self.ref_train = self._precompute(self.train_examples, ref_keys["train"], "train")
            if len(self.eval_examples):
                self.ref_eval = self._precompute(self.eval_examples, ref_keys["eval"], "eval")
            self.reference = None  # nothing of a separate reference stays in memory

    # ------------------------------------------------------------ setup

    @property
    def global_micro_batch(self) -> int:
        return self.cfg.per_device_train_batch_size * self.acc.num_processes

    def _find_resume(self) -> Path | None:
        r = self.cfg.resume_from_checkpoint
        if r is False or r is None:
            return None
        if isinstance(r, str) and r.lower() not in ("true", "latest"):
            path = Path(r)
            if not (path / "trainer_state.json").exists():
                raise DpokitError(f"{path}: not a complete dpokit checkpoint")
            return path
        found = checkpoint.list_checkpoints(self.out)
        if not found:
            log.info("resume_from_checkpoint: no checkpoint in %s, starting fresh", self.out)
        return found[-1] if found else None

    def _check_sync(self) -> None:
        """TR-DPO mixes the policy into a reference held in memory: one it can write to."""
        if self.reference.reference_free:
            raise DpokitError("sync_ref_model needs a reference model, and every loss here is reference-free")
        if self.cfg.lora is not None:
            raise DpokitError("sync_ref_model is not supported with lora (the reference is the base model with the "
                              "adapters off, which cannot move toward the policy); train without lora or set "
                              "sync_ref_model: false")
        if self.deepspeed:
            raise DpokitError("sync_ref_model is not supported under DeepSpeed; use DDP or FSDP")
        check_sync(self.reference.model, self.model)

    def _sync_reference(self) -> None:
        sync_reference(self.reference.model, self.model, self.cfg.ref_model_mixup_alpha)

    def _reference_state(self) -> dict | None:
        """What a checkpoint must hold of the reference: its weights, when TR-DPO moves them."""
        if not self.cfg.sync_ref_model:
            return None
        return {REFERENCE_FILE: {k: v.detach().cpu() for k, v in self.reference.model.state_dict().items()}}

    def _load_reference(self, folder: Path) -> None:
        from safetensors.torch import load_file

        path = folder / REFERENCE_FILE
        if not path.exists():
            raise DpokitError(f"{folder}: no {REFERENCE_FILE} (the checkpoint was written without sync_ref_model), "
                              "so the moved reference cannot be restored")
        self.reference.model.load_state_dict(load_file(str(path)))

    def _collate(self, examples, draws: list[int] | None = None):
        if not self.family.stochastic:
            return self.family.collate(examples, self.cfg, self.processor)
        return self.family.collate(examples, self.cfg, self.processor, draws=draws)

    def _rank_slices(self, n: int, bs: int, order: list[int] | None = None):
        """Per round: this rank's indices and whether they count. Every rank runs the same number of
        rounds (FSDP forwards are collective); a rank left without pairs scores one and discards it."""
        world, rank = self.acc.num_processes, self.acc.process_index
        for start in range(0, n, bs * world):
            chunk = list(range(start, min(n, start + bs * world)))
            chunk = [order[i] for i in chunk] if order is not None else chunk
            mine = chunk[rank * bs:(rank + 1) * bs]
            yield (mine, True) if mine else (chunk[:1], False)

    def _precompute(self, examples, path: Path, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """Reference log-probs for every example: from the disk cache, or each rank scores its share
        of the batches, the shares are summed across ranks and rank 0 writes the cache."""
        from safetensors.torch import load_file

        acc = self.acc
        found = torch.tensor(float(path.exists()), device=acc.device)
        if acc.num_processes > 1:
            found = acc.reduce(found, reduction="sum") / acc.num_processes
        if found.item() == 1.0:
            log.info("reference log-probs for %s: cache hit %s", name, path.name)
            cached = load_file(str(path))
            return cached["chosen"], cached["rejected"]
        n = len(examples)
        # Column 0 the chosen, then the rejected: one column for pairs, K for S-DPO groups (K the largest group;
        # zeros past a smaller group's own), stored as [n] and [n, K].
        K = max(ex.n_rejected for ex in examples) if data_kind(examples) == "groups" else None
        out = torch.zeros(n, 1 + (K or 1), device=acc.device)
        rounds = self._rank_slices(n, self.cfg.per_device_eval_batch_size)
        quiet = self.cfg.disable_tqdm or not acc.is_main_process
        for indices, counted in tqdm(list(rounds), desc=f"reference log-probs ({name})", disable=quiet):
            batch = self._batch(examples, indices, None)
            c, r = self.reference.scores(batch)
            if counted:
                r = r.reshape(len(indices), -1)
                out[indices, 0], out[indices, 1:1 + r.shape[1]] = c, r
        if acc.num_processes > 1:
            out = acc.reduce(out, reduction="sum")  # each entry is set on exactly one rank, zero elsewhere
        out = out.cpu()
        chosen, rejected = out[:, 0].contiguous(), out[:, 1:].contiguous()
        rejected = rejected if K else rejected[:, 0].contiguous()
        if acc.is_main_process:  # written atomically: a reader never sees half a cache file
            save_tensors(path, {"chosen": chosen, "rejected": rejected})
        return chosen, rejected

    # ------------------------------------------------------------ one batch

    def _batch(self, examples, indices, ref, stream: int = 0):
        batch = self._collate([examples[i] for i in indices], draw_seeds(self.cfg.seed, stream, indices))
        batch = {k: v.to(self.acc.device) for k, v in batch.items()}
        if ref is not None:
            idx = torch.tensor(indices)
            rejected = ref[1][idx]
            if rejected.dim() == 2:  # S-DPO groups: as many columns as this batch's largest group
                rejected = rejected[:, :batch["rejected_mask"].shape[1]]
            batch["ref_chosen"], batch["ref_rejected"] = ref[0][idx].to(self.acc.device), rejected.to(self.acc.device)
        return batch

    def _loss(self, batch):
        scores = self.scorer(batch)
        if "ref_chosen" in batch:  # from the cache
            ref = batch["ref_chosen"], batch["ref_rejected"]
        else:
            ref = None if self.cfg.reference_free else self.reference.scores(batch)
        t = loss_inputs(scores, ref, batch)
        loss, metrics = objective(t, batch["weight"], self.cfg.loss_types, self.cfg.loss_weights, self.obj_cfg)
        metrics.update(logit_metrics(t, scores.chosen_logits, scores.rejected_logits))
        with torch.no_grad():
            metrics.update(self.family.metrics(t))
        return loss, metrics

    # ------------------------------------------------------------ the loop

    def _order(self, epoch: int) -> list[int]:
        g = torch.Generator().manual_seed(self.cfg.seed * 1000003 + epoch)
        return torch.randperm(len(self.train_examples), generator=g).tolist()

    def evaluate(self) -> dict[str, float]:
        if not len(self.eval_examples):
            return {}
        self.scorer.eval()
        means = _Means(self.acc.device)
        with torch.no_grad():
            for indices, counted in self._rank_slices(len(self.eval_examples), self.cfg.per_device_eval_batch_size):
                _, metrics = self._loss(self._batch(self.eval_examples, indices, self.ref_eval))
                for k, v in metrics.items():
                    means.add(k, v, counted)
            row = means.means(self.acc)
            if "list_metrics" in self.family.capabilities:  # of all the lists at once: every rank the same
                model = self.acc.unwrap_model(self.scorer).model
                row.update(self.family.list_metrics(model, self.processor, self.eval_examples, self.cfg))
        self.scorer.train()
        return {f"eval_{k}": v for k, v in row.items()}

    def _step(self, order: list[int], pos: int, means: _Means, step: int, epoch: int) -> int:
        """One optimizer step over the pairs order[pos:pos + global batch]; returns the new position."""
        cfg, acc = self.cfg, self.acc
        rank, world, bs = acc.process_index, acc.num_processes, cfg.per_device_train_batch_size
        G = bs * world
        end = min(len(order), pos + G * cfg.gradient_accumulation_steps)
        starts = list(range(pos, end, G))
        losses, finite = [], torch.ones((), dtype=torch.bool, device=acc.device)
        for k, s in enumerate(starts):
            indices = order[s:min(s + G, end)][rank * bs:(rank + 1) * bs]
            # Gradients are averaged over ranks; scaling each rank's mean by its share of the pairs makes the
            # result the mean over every pair of the step, however they fall across ranks and micro-batches.
            scale = world * len(indices) / (end - pos)
            counted = bool(indices)
            if not counted:  # a short last batch can leave a rank empty; it still joins the all-reduce
                indices, scale = order[s:s + 1], 0.0
            batch = self._batch(self.train_examples, indices, self.ref_train, stream=epoch + 1)
            last = k == len(starts) - 1
            if self.deepspeed:
                acc.gradient_state._set_sync_gradients(last)  # its engine steps itself on the last micro-batch
            with acc.no_sync(self.scorer) if not last and world > 1 else contextlib.nullcontext():
                loss, metrics = self._loss(batch)
                if self.deepspeed:
                    scale *= acc.gradient_accumulation_steps  # its engine divides by the count itself
                acc.backward(loss * scale)
            losses.append(loss.detach())
            finite &= torch.isfinite(loss.detach()) | (not counted)
            for name, v in metrics.items():
                means.add(name, v, counted)
        max_norm = cfg.max_grad_norm if cfg.max_grad_norm and cfg.max_grad_norm > 0 else float("inf")
        grad_norm = acc.clip_grad_norm_(self.scorer.parameters(), max_norm)
        if hasattr(grad_norm, "full_tensor"):  # FSDP2 returns a replicated DTensor
            grad_norm = grad_norm.full_tensor()
        grad_norm = torch.as_tensor(grad_norm if grad_norm is not None else float("nan"), dtype=torch.float64,
                                    device=acc.device).reshape(())
        bad = (~finite).float()
        if world > 1:
            bad = acc.reduce(bad, reduction="sum")
        if bad.item() > 0 or not torch.isfinite(grad_norm).item():
            self._stop_non_finite(step + 1, losses, grad_norm)
        means.add("grad_norm", grad_norm, counted=acc.is_main_process)  # the same on every rank: count it once
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return end

    def _stop_non_finite(self, step: int, losses: list[torch.Tensor], grad_norm: torch.Tensor):
        bad = [v.item() for v in losses if not torch.isfinite(v).item()]
        if bad:
            what = f"the loss became {bad[0]}"
        elif not torch.isfinite(grad_norm).item():
            what = f"the gradient norm became {grad_norm.item()}"
        else:
            what = "the loss became non-finite on another process"
        last = checkpoint.list_checkpoints(self.out)
        raise DpokitError(
            f"{what} at step {step}; stopped before updating the weights. The last good checkpoint is "
            f"{last[-1] if last else 'none (no checkpoint was written yet)'}; try a lower learning_rate")

    def run(self) -> TrainResult:
        cfg, acc = self.cfg, self.acc
        if acc.is_main_process:
            self.out.mkdir(parents=True, exist_ok=True)
            cfg.save(self.out / "config.yaml")
        state = {"global_step": 0, "epoch": 0, "pos": 0, "window": {}}
        if self.resume_dir is not None:
            state = checkpoint.load(self.resume_dir, self.scorer, self.optimizer, self.scheduler, acc)
            if cfg.sync_ref_model:
                self._load_reference(self.resume_dir)
            log.info("resumed from %s at step %d", self.resume_dir, state["global_step"])
        sinks = make_sinks(cfg.report_to, self.out, cfg.to_dict(), state["global_step"] if self.resume_dir else None) \
            if acc.is_main_process else []
        history: list[dict] = []
        # The window of metrics since the last log was saved summed over ranks: rank 0 carries it.
        means = _Means(acc.device, state["window"] if acc.is_main_process else None)
        step, epoch, pos = state["global_step"], state["epoch"], state["pos"]
        n = len(self.train_examples)
        bar = tqdm(total=self.total_steps, initial=step, desc="dpo", disable=cfg.disable_tqdm or not acc.is_main_process)
        if cfg.eval_on_start and step == 0:
            self._log_eval(0, sinks, history)
        self.scorer.train()
        while step < self.total_steps:
            order = self._order(epoch)
            while pos < n and step < self.total_steps:
                lr = self.scheduler.get_last_lr()[0]  # the rate this step uses (what transformers' Trainer logs)
                pos = self._step(order, pos, means, step, epoch)
                step += 1
                bar.update(1)
                if cfg.sync_ref_model and step % cfg.ref_model_sync_steps == 0:
                    self._sync_reference()
                if step % cfg.logging_steps == 0 or step == self.total_steps:
                    row = {**means.means(acc), "learning_rate": lr, "epoch": round(epoch + pos / n, 4)}
                    means = _Means(acc.device)
                    history.append({"step": step, **row})
                    for s in sinks:
                        s.log(step, row)
                    accuracy = {"acc": f"{row['rewards/accuracies']:.2f}"} if "rewards/accuracies" in row else {}
                    bar.set_postfix(loss=f"{row['loss']:.4f}", **accuracy)  # unpaired data has no accuracy
                if cfg.eval_steps and step % cfg.eval_steps == 0 and step < self.total_steps:
                    self._log_eval(step, sinks, history)
                if cfg.save_steps and step % cfg.save_steps == 0 and step < self.total_steps:
                    epoch_next, pos_next = (epoch + 1, 0) if pos >= n else (epoch, pos)
                    checkpoint.save(self.out / f"checkpoint-{step}", self.scorer, self.optimizer, self.scheduler,
                                    {"global_step": step, "epoch": epoch_next, "pos": pos_next,
                                     "window": means.totals(acc)},
                                    cfg.save_total_limit, acc, extra=self._reference_state())
            if pos >= n:
                epoch, pos = epoch + 1, 0
        bar.close()
        self._log_eval(step, sinks, history)
        for s in sinks:
            s.close()
        self._save_final()
        return TrainResult(self.out, step, history)

    def _log_eval(self, step: int, sinks, history) -> None:
        row = self.evaluate()
        if row:
            history.append({"step": step, **row})
            for s in sinks:
                s.log(step, row)

    def _save_final(self) -> None:
        """The model in its library's format. Sharded runs gather the trained weights to rank 0, which loads
        them into a fresh copy of the policy and saves that."""
        acc = self.acc
        sharded = acc.distributed_type.value in ("FSDP", "DEEPSPEED")
        trained = None
        if sharded and acc.distributed_type.value == "FSDP":
            trained, _ = checkpoint.gather_state(self.scorer)
        elif sharded:
            trained = acc.get_state_dict(self.scorer)
        acc.wait_for_everyone()
        if acc.is_main_process:
            if trained is None:
                model = acc.unwrap_model(self.scorer).model
            else:
                if self.deepspeed:  # training is over: rank 0 builds the policy alone, not partitioned (collective)
                    from transformers.integrations.deepspeed import unset_hf_deepspeed_config

                    unset_hf_deepspeed_config()
                model, _ = self.family.load_policy(self.cfg)
                prefix = "model."  # the scorer holds the model as `.model`
                weights = {k[len(prefix):]: v for k, v in trained.items() if k.startswith(prefix)}
                result = model.load_state_dict(weights, strict=False)
                if result.unexpected_keys:
                    raise RuntimeError(f"gathered weights do not fit the policy: {result.unexpected_keys[:3]}")
            self.family.save(model, self.processor, str(self.out), merge_lora=self.cfg.merge_lora)
            from .report import write_report
            write_report(self.out)
        acc.wait_for_everyone()


def train(cfg: TrainConfig, family=None) -> TrainResult:
    """Train with `cfg`; returns where the model went and every logged row."""
    return Loop(cfg, family).run()
