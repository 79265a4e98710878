"""The one training loop, shared by every model family and objective.

config → family (model, processor, encoded examples) → reference log-probs (cached) →
AdamW steps on the objective → metrics, periodic eval, atomic checkpoints, final save.
Runs on accelerate, so the same loop serves CPU, one GPU, and DDP/FSDP/DeepSpeed under
`accelerate launch`. Each optimizer step sees a global batch of
`per_device_train_batch_size × processes × gradient_accumulation_steps` pairs, in an order
fixed by (seed, epoch), so a resumed run replays exactly the batches it had left.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from . import checkpoint
from .config import TrainConfig
from .errors import DpokitError
from .families import get_family
from .objectives import ObjectiveConfig, Terms, check_losses, objective
from .reference import build_reference, precompute
from .sinks import make_sinks

log = logging.getLogger("dpokit")


@dataclass
class TrainResult:
    output_dir: Path
    global_step: int
    history: list[dict] = field(default_factory=list)  # every logged row, as in metrics.jsonl


def _accelerator(cfg: TrainConfig):
    from accelerate import Accelerator

    cuda_bf16 = torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    bf16 = cuda_bf16 if cfg.bf16 is None else cfg.bf16
    return Accelerator(mixed_precision="bf16" if bf16 else "no")


class Loop:
    def __init__(self, cfg: TrainConfig, family=None):
        check_losses(cfg.loss_types, cfg.loss_weights, cfg.label_smoothing)
        self.cfg = cfg
        self.acc = _accelerator(cfg)
        torch.manual_seed(cfg.seed)
        self.family = family or get_family(cfg.family)
        self.out = Path(cfg.output_dir)
        model, self.processor = self.family.load_policy(cfg)
        self.model = model.to(self.acc.device)
        self.train_examples = self.family.examples(cfg.train_data, self.processor, cfg)
        self.eval_examples = self.family.examples(cfg.eval_data, self.processor, cfg) if cfg.eval_data else []
        self.resume_dir = self._find_resume()
        self.obj_cfg = ObjectiveConfig(beta=cfg.beta, label_smoothing=cfg.label_smoothing)
        self._setup_reference()
        self.scorer = self.family.scorer(self.model, cfg)
        params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(params, lr=cfg.learning_rate, betas=(cfg.adam_beta1, cfg.adam_beta2),
                                           eps=cfg.adam_epsilon, weight_decay=cfg.weight_decay)
        self.micro_per_epoch = math.ceil(len(self.train_examples) / self.global_micro_batch)
        self.steps_per_epoch = math.ceil(self.micro_per_epoch / cfg.gradient_accumulation_steps)
        self.total_steps = cfg.max_steps if cfg.max_steps > 0 else math.ceil(self.steps_per_epoch * cfg.num_train_epochs)
        from transformers import get_scheduler

        warmup = cfg.warmup_steps or math.ceil(cfg.warmup_ratio * self.total_steps)
        self.scheduler = get_scheduler(cfg.lr_scheduler_type, self.optimizer, warmup, self.total_steps)
        self.scorer, self.optimizer = self.acc.prepare(self.scorer, self.optimizer)

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

    def _collate(self, examples):
        return self.family.collate(examples, self.cfg, self.processor)

    def _setup_reference(self) -> None:
        cfg = self.cfg
        fresh = self.resume_dir is None
        if not cfg.reference_free and not cfg.ref_model and cfg.lora is None and cfg.precompute_ref_log_probs and not fresh:
            # The policy has moved since step 0: score with the starting weights, reloaded.
            ref_cfg_model = self.family.load_model(cfg.model, cfg).to(self.acc.device)
            from .reference import Reference
            self.reference = Reference(self.family.scorer(ref_cfg_model, cfg))
        else:
            self.reference = build_reference(cfg, self.family, self.model, self.acc.device)
        self.ref_train = self.ref_eval = None
        if self.reference.free or not cfg.precompute_ref_log_probs:
            return
        quiet = cfg.disable_tqdm or not self.acc.is_main_process
        with self.acc.main_process_first():
            self.ref_train = precompute(cfg, self.reference, self.train_examples, self._collate, self.acc.device,
                                        "train", quiet)
            if self.eval_examples:
                self.ref_eval = precompute(cfg, self.reference, self.eval_examples, self._collate, self.acc.device,
                                           "eval", quiet)
        self.reference = None  # nothing of the reference stays in memory

    # ------------------------------------------------------------ one batch

    def _batch(self, examples, indices, ref):
        batch = {k: v.to(self.acc.device) for k, v in self._collate([examples[i] for i in indices]).items()}
        if ref is not None:
            idx = torch.tensor(indices)
            batch["ref_chosen"], batch["ref_rejected"] = ref[0][idx].to(self.acc.device), ref[1][idx].to(self.acc.device)
        return batch

    def _loss(self, batch):
        terms = self.scorer(batch)
        if "ref_chosen" in batch:
            ref_c, ref_r = batch["ref_chosen"], batch["ref_rejected"]
        elif self.cfg.reference_free:
            ref_c = ref_r = torch.zeros_like(terms.chosen)
        else:
            ref_c, ref_r = self.reference.logps(batch)
        t = Terms(terms.chosen.float(), terms.rejected.float(), ref_c, ref_r, terms.chosen_len, terms.rejected_len,
                  batch["margin"])
        loss, metrics = objective(t, batch["weight"], self.cfg.loss_types, self.cfg.loss_weights, self.obj_cfg)
        metrics["logits/chosen"] = terms.chosen_logits
        metrics["logits/rejected"] = terms.rejected_logits
        return loss, metrics

    # ------------------------------------------------------------ the loop

    def _order(self, epoch: int) -> list[int]:
        g = torch.Generator().manual_seed(self.cfg.seed * 1000003 + epoch)
        return torch.randperm(len(self.train_examples), generator=g).tolist()

    def _gather_mean(self, values: list[torch.Tensor]) -> float:
        local = torch.cat(values).float()
        return self.acc.gather_for_metrics(local).mean().item() if self.acc.num_processes > 1 else local.mean().item()

    def evaluate(self) -> dict[str, float]:
        if not self.eval_examples:
            return {}
        self.scorer.eval()
        n, bs = len(self.eval_examples), self.cfg.per_device_eval_batch_size
        rank, world = self.acc.process_index, self.acc.num_processes
        collected: dict[str, list] = {}
        with torch.no_grad():
            for start in range(0, n, bs * world):
                indices = list(range(start, min(n, start + bs * world)))[rank::world]
                if not indices:
                    continue
                _, metrics = self._loss(self._batch(self.eval_examples, indices, self.ref_eval))
                for k, v in metrics.items():
                    collected.setdefault(k, []).append(v)
        self.scorer.train()
        return {f"eval_{k}": self._gather_mean(v) for k, v in collected.items()}

    def run(self) -> TrainResult:
        cfg, acc = self.cfg, self.acc
        if acc.is_main_process:
            self.out.mkdir(parents=True, exist_ok=True)
            cfg.save(self.out / "config.yaml")
        state = {"global_step": 0, "epoch": 0, "micro": 0, "window": {}}
        if self.resume_dir is not None:
            state = checkpoint.load(self.resume_dir, acc.unwrap_model(self.scorer), self.optimizer, self.scheduler)
            log.info("resumed from %s at step %d", self.resume_dir, state["global_step"])
        sinks = make_sinks(cfg.report_to, self.out, cfg.to_dict(), state["global_step"] if self.resume_dir else None) \
            if acc.is_main_process else []
        history: list[dict] = []
        window: dict[str, list] = {k: [torch.tensor(v)] for k, v in state["window"].items()}
        step, gas = state["global_step"], cfg.gradient_accumulation_steps
        bar = tqdm(total=self.total_steps, initial=step, desc="dpo", disable=cfg.disable_tqdm or not acc.is_main_process)
        self.scorer.train()
        epoch, micro = state["epoch"], state["micro"]
        rank, world, bs = acc.process_index, acc.num_processes, cfg.per_device_train_batch_size
        while step < self.total_steps:
            order = self._order(epoch)
            while micro < self.micro_per_epoch and step < self.total_steps:
                group = range(micro, min(micro + gas, self.micro_per_epoch))
                for k, m in enumerate(group):
                    chunk = order[m * bs * world:(m + 1) * bs * world]
                    indices = chunk[rank * bs:(rank + 1) * bs]
                    share = len(indices) / (len(chunk) / world)  # this rank's part of the global mean
                    if not indices:  # a short last batch can leave a rank empty; it still joins the all-reduce
                        indices, share = chunk[:1], 0.0
                    batch = self._batch(self.train_examples, indices, self.ref_train)
                    sync = k == len(group) - 1
                    with acc.no_sync(self.scorer) if not sync and world > 1 else _null():
                        loss, metrics = self._loss(batch)
                        if not torch.isfinite(loss):
                            last = checkpoint.list_checkpoints(self.out)
                            raise DpokitError(
                                f"the loss became {loss.item()} at step {step + 1}; stopped. The last good checkpoint is "
                                f"{last[-1] if last else 'none (no checkpoint was written yet)'}; try a lower learning_rate")
                        acc.backward(loss * share / len(group))
                    if share:
                        for name, v in metrics.items():
                            window.setdefault(name, []).append(v)
                micro = group[-1] + 1
                grad_norm = acc.clip_grad_norm_(self.scorer.parameters(), cfg.max_grad_norm)
                self.optimizer.step()
                self.scheduler.step()
                self.optimizer.zero_grad(set_to_none=True)
                step += 1
                window.setdefault("grad_norm", []).append(torch.as_tensor(grad_norm, dtype=torch.float32).reshape(1).cpu())
                bar.update(1)
                if step % cfg.logging_steps == 0 or step == self.total_steps:
                    row = {k: self._gather_mean(v) if k != "grad_norm" else torch.cat(v).mean().item()
                           for k, v in window.items()}
                    row["learning_rate"] = self.scheduler.get_last_lr()[0]
                    row["epoch"] = round(epoch + micro / self.micro_per_epoch, 4)
                    window = {}
                    history.append({"step": step, **row})
                    for s in sinks:
                        s.log(step, row)
                    bar.set_postfix(loss=f"{row['loss']:.4f}", acc=f"{row['rewards/accuracies']:.2f}")
                if cfg.eval_steps and step % cfg.eval_steps == 0 and step < self.total_steps:
                    self._log_eval(step, sinks, history)
                if cfg.save_steps and step % cfg.save_steps == 0 and step < self.total_steps:
                    self._save_checkpoint(step, epoch, micro, window)
            if micro >= self.micro_per_epoch:
                epoch, micro = epoch + 1, 0
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

    def _save_checkpoint(self, step: int, epoch: int, micro: int, window: dict) -> None:
        self.acc.wait_for_everyone()
        if self.acc.is_main_process:
            w = {k: torch.cat(v).tolist() for k, v in window.items()}
            checkpoint.save(self.out / f"checkpoint-{step}", self.acc.unwrap_model(self.scorer), self.optimizer,
                            self.scheduler, {"global_step": step, "epoch": epoch, "micro": micro, "window": w},
                            self.cfg.save_total_limit)
        self.acc.wait_for_everyone()

    def _save_final(self) -> None:
        self.acc.wait_for_everyone()
        if self.acc.is_main_process:
            model = self.acc.unwrap_model(self.scorer).model
            self.family.save(model, self.processor, str(self.out), merge_lora=self.cfg.merge_lora)
        self.acc.wait_for_everyone()


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *a):
        return False


def train(cfg: TrainConfig, family=None) -> TrainResult:
    """Train with `cfg`; returns where the model went and every logged row."""
    return Loop(cfg, family).run()
