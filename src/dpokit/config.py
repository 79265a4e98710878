"""Training configuration.

Keys follow TRL's `DPOConfig` where TRL has the concept, so a TRL config moves over by
copying its keys. dpokit's own keys (model, data, reference handling, speed switches) are
grouped at the end.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .errors import DpokitError


@dataclass
class TrainConfig:
    # --- objective (TRL names) ---
    beta: float = 0.1
    loss_type: str | list[str] = "sigmoid"
    loss_weights: list[float] | None = None
    label_smoothing: float = 0.0
    reference_free: bool = False  # set automatically when every loss is reference-free (simpo, orpo, sft)
    simpo_gamma: float = 0.5  # SimPO target reward margin (TRL CPOConfig name)
    rpo_alpha: float | None = None  # RPO: adds rpo_alpha x NLL of the chosen reply (TRL's former DPOConfig name)
    desirable_weight: float = 1.0  # KTO: weight of desirable completions' losses (TRL KTOConfig name)
    undesirable_weight: float = 1.0  # KTO: weight of undesirable completions' losses
    # CPL (Hejna et al. 2024; no TRL counterpart): conservative bias λ in (0, 1] on the rejected segment's
    # score, logits = beta * (S_chosen - cpl_lambda * S_rejected) (the authors' `contrastive_bias`; 1: unbiased).
    # CPL's temperature alpha is `beta`, its BC weight `bc_coeff` is `rpo_alpha`.
    cpl_lambda: float = 1.0
    # TR-DPO: every ref_model_sync_steps optimizer steps, ref <- alpha * policy + (1 - alpha) * ref (TRL names)
    sync_ref_model: bool = False
    ref_model_mixup_alpha: float = 0.6
    ref_model_sync_steps: int = 512
    # --- optimisation (TRL / transformers names) ---
    learning_rate: float = 1e-6
    lr_scheduler_type: str = "linear"
    warmup_ratio: float = 0.0
    warmup_steps: int = 0
    weight_decay: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_epsilon: float = 1e-8
    max_grad_norm: float = 1.0
    per_device_train_batch_size: int = 8
    per_device_eval_batch_size: int = 8
    gradient_accumulation_steps: int = 1
    num_train_epochs: float = 1.0
    max_steps: int = -1
    seed: int = 42
    bf16: bool | None = None  # None: bf16 autocast on CUDA when the GPU supports it, fp32 elsewhere
    # --- data (TRL names) ---
    max_length: int | None = 1024
    max_prompt_length: int | None = 512
    # --- logging and checkpoints (TRL names) ---
    output_dir: str = "runs/dpo"
    logging_steps: int = 10
    eval_steps: int | None = None
    eval_on_start: bool = False  # one eval before the first step (transformers' name): the curves' starting point
    save_steps: int = 500
    save_total_limit: int | None = 2
    resume_from_checkpoint: bool | str = False
    report_to: list[str] = field(default_factory=lambda: ["jsonl"])
    disable_tqdm: bool = False
    precompute_ref_log_probs: bool = True  # reference log-probs computed once, cached on disk
    # --- online DPO sampling (TRL OnlineDPOConfig names; num_generations from GRPOConfig) ---
    num_generations: int = 4  # replies sampled per prompt; the judge's best vs worst makes the pair
    max_new_tokens: int = 64
    temperature: float = 0.9
    top_p: float = 1.0
    missing_eos_penalty: float | None = None  # subtracted from the judge's score of a reply with no EOS
    # --- dpokit: model and data ---
    model: str = ""
    ref_model: str | None = None  # None: a frozen copy of `model` (or the base weights, with LoRA)
    train_data: str = ""
    eval_data: str | None = None
    family: str = "causal_lm"
    family_config: dict[str, Any] = field(default_factory=dict)  # the family's own keys (flat in the YAML)
    lora: dict[str, Any] | None = None  # peft LoraConfig keys, e.g. {r: 16, lora_alpha: 32}
    merge_lora: bool = False
    dtype: str = "auto"  # auto | float32 | bfloat16 | float16: weights as loaded
    attn_implementation: str = "sdpa"
    trust_remote_code: bool = False
    on_bad_row: str = "error"  # error: stop at the first bad row; skip: drop it, count and warn
    # --- dpokit: speed switches (each exact; off gives the plain padded computation) ---
    share_prompt: bool = True  # prompt computed once per pair: [prompt | chosen | rejected]
    padding_free: bool = True  # pairs packed into rows with no pad tokens
    pack_tokens: int = 2048  # at most this many tokens in one packed row
    logits_chunk_size: int = 1024  # LM-head log-probs this many tokens at a time
    ref_cache_dir: str | None = None  # default: ~/.cache/dpokit/ref-logps
    # --- dpokit: online / iterative DPO (dpokit.online) ---
    online: bool = False  # each round: sample from the policy, judge, train on the new pairs
    online_rounds: int = 3
    online_prompts: str | None = None  # prompts to sample for (default: the prompts of train_data)
    online_min_gap: float = 0.0  # keep a pair when best - worst judge score >= this (ties never)
    judge: dict[str, Any] | str | None = None  # a dpokit.judges.load_judge spec, e.g. {type: reward_model, model: rm}

    def __post_init__(self):
        if isinstance(self.loss_type, str) and "," in self.loss_type:
            self.loss_type = [s.strip() for s in self.loss_type.split(",")]
        if isinstance(self.report_to, str):
            self.report_to = [s.strip() for s in self.report_to.split(",") if s.strip()]
        from .objectives import is_reference_free

        if is_reference_free(self.loss_types):
            self.reference_free = True  # no reference model is loaded or scored
        if self.sync_ref_model:
            # The reference moves during training, so its log-probs cannot be computed once (TRL refuses the
            # combination; dpokit's default is precompute on, so it is turned off rather than refused).
            self.precompute_ref_log_probs = False
            if not 0 <= self.ref_model_mixup_alpha <= 1:
                raise DpokitError(f"ref_model_mixup_alpha must lie in [0, 1], got {self.ref_model_mixup_alpha}")
            if self.ref_model_sync_steps < 1:
                raise DpokitError(f"ref_model_sync_steps must be >= 1, got {self.ref_model_sync_steps}")
        if self.on_bad_row not in ("error", "skip"):
            raise DpokitError(f"on_bad_row must be 'error' or 'skip', got {self.on_bad_row!r}")
        if self.beta <= 0:
            raise DpokitError(f"beta must be > 0, got {self.beta}")
        from .objectives import ObjectiveConfig

        ObjectiveConfig.from_config(self)  # the objective's own range checks (rpo_alpha, cpl_lambda, ...)
        for name in ("per_device_train_batch_size", "gradient_accumulation_steps", "logging_steps"):
            if getattr(self, name) < 1:
                raise DpokitError(f"{name} must be >= 1, got {getattr(self, name)}")
        self.family_config = _check_family_keys(self.family, self.family_config)

    @property
    def loss_types(self) -> list[str]:
        return [self.loss_type] if isinstance(self.loss_type, str) else list(self.loss_type)

    def to_dict(self) -> dict[str, Any]:
        """Every key, the family's own flat beside the shared ones (as a config file holds them)."""
        values = dataclasses.asdict(self)
        own = values.pop("family_config")
        return {**values, **own}

    def save(self, path: str | Path) -> None:
        Path(path).write_text(yaml.safe_dump(self.to_dict(), sort_keys=False))


def _parse_value(text: str) -> Any:
    """A command-line override value, read as YAML so `beta=0.2`, `lora={r: 8}` and `bf16=true` work."""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def load_config(path: str | Path | None, overrides: list[str] = (), **extra: Any) -> TrainConfig:
    """YAML file, then `key=value` overrides, then keyword overrides."""
    values: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        try:
            loaded = yaml.safe_load(p.read_text(encoding="utf-8"))
        except OSError as e:
            raise DpokitError(f"{p}: cannot read config ({e.strerror})") from None
        except UnicodeDecodeError as e:
            raise DpokitError(f"{p}: not UTF-8 text (byte 0x{e.object[e.start]:02x} at offset {e.start})") from None
        except yaml.YAMLError as e:  # its str() spans several lines; the CLI prints one
            mark = getattr(e, "problem_mark", None)
            where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
            raise DpokitError(f"{p}: not valid YAML{where} ({getattr(e, 'problem', None) or e})") from None
        if loaded is not None and not isinstance(loaded, dict):
            raise DpokitError(f"{p}: the config must be a mapping of keys to values")
        values.update(loaded or {})
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise DpokitError(f"override {item!r} is not of the form key=value")
        values[key.strip()] = _parse_value(value)
    values.update(extra)
    for key, why in DROPPED.items():
        if key in values:
            raise DpokitError(f"config key {key!r} is not used by dpokit ({why}); remove it")
    known = {f.name: f for f in dataclasses.fields(TrainConfig) if f.name != "family_config"}
    family_keys = _family_fields(values.get("family", TrainConfig.family))
    unknown = sorted(set(values) - set(known) - set(family_keys))
    if unknown:
        family = values.get("family", TrainConfig.family)
        own = f" (family {family!r} adds: {', '.join(family_keys)})" if family_keys else ""
        raise DpokitError(f"unknown config key(s): {', '.join(unknown)}{own}")
    shared = {k: _check_type(k, v, known[k]) for k, v in values.items() if k in known}
    return TrainConfig(**shared, family_config={k: v for k, v in values.items() if k in family_keys})


# TRL keys with no counterpart here: one line saying why, rather than "unknown".
DROPPED = {"dataset_num_proc": "rows are encoded in one process as they are read; the loop never waits on it"}


def _family_fields(name: str) -> dict[str, dataclasses.Field]:
    from .families import get_family
    from .families.base import config_fields

    return config_fields(get_family(name))


def _check_family_keys(name: str, values: dict[str, Any]) -> dict[str, Any]:
    """The family's own keys, each checked like a shared one; the family's config class validates the rest."""
    fields = _family_fields(name)
    unknown = sorted(set(values) - set(fields))
    if unknown:
        raise DpokitError(f"unknown config key(s) for family {name!r}: {', '.join(unknown)}"
                          + (f" (it has: {', '.join(fields)})" if fields else " (it has none of its own)"))
    checked = {k: _check_type(k, v, fields[k]) for k, v in values.items()}
    if fields:
        from .families import get_family

        get_family(name).config_class(**checked)  # its own checks (ranges, choices) raise DpokitError
    return checked


def _check_type(key: str, value: Any, f: dataclasses.Field) -> Any:
    """The value, checked against the field's default type (YAML 1.1 reads `1e-3` as a string: accept it)."""
    if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
        return value  # a required key: its class checks it
    default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
    if value is None or default is None:
        return value
    wanted = type(default)
    if wanted is float and isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            pass
    ok = isinstance(value, wanted) or (wanted is float and isinstance(value, int) and not isinstance(value, bool))
    if wanted is int and isinstance(value, bool):
        ok = False
    if key in ("loss_type", "resume_from_checkpoint", "report_to") and isinstance(value, (str, list, bool)):
        ok = True
    if not ok:
        raise DpokitError(f"config key {key!r} expects {wanted.__name__}, got {json.dumps(value)}")
    return value
