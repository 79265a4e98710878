"""The model-family contract: everything shared code may know about a kind of model.

A family turns rows into validated examples, examples into batches, and a batch into
per-example scores (`Scores`) for the policy and, through the same scorer, the reference.
The loop, the reference cache, the objectives and evaluation read only what this module
names: the `Example` protocol, the batch keys in `BATCH_KEYS`, `Scores`, and the attributes
and methods of `Family`. A new kind of model (diffusion, control policy, recommender,
vision-language) is one module under `dpokit/families/` that subclasses `Family`; see
docs/architecture.md ("The family contract").
"""

from __future__ import annotations

import dataclasses
import hashlib
from dataclasses import dataclass
from typing import Any, Callable, ContextManager, Protocol, Sequence

import torch
from torch import nn

from ..errors import DpokitError

# What kind of number a family's score is. A loss that needs a true probability (ORPO's log(1 − p),
# SimPO's per-unit average) refuses the others, in one line (objectives.check_likelihood).
LIKELIHOODS = {
    "exact": "an exact log-probability (a sum of log-probabilities of discrete units)",
    "density": "a log-density (continuous outputs: not bounded above by 0)",
    "surrogate": "a surrogate of the log-likelihood (e.g. the diffusion ELBO term)",
}

# Optional capabilities, and who needs them.
CAPABILITIES = {
    "sample": "sample outputs for prompts (sample eval, online DPO, the judge recipe)",
    "load_trained": "load a trained model back for eval and score",
    "list_metrics": "measure the ranked lists it recommends for the eval contexts (ranking quality, collapse guards)",
}

# Batch keys the loop reads; everything else in a batch is the family's own.
BATCH_KEYS = {
    "weight": "[B] float, the example's weight",
    "margin": "[B] float, the chosen output must win by this much (ODPO)",
    "label": "[B] bool, unpaired data only: whether the output is desirable",
    "rejected_mask": "[B, K] bool, S-DPO groups only: which of the K rejected slots hold an output",
}


class Example(Protocol):
    """What shared code may read from an example, and nothing else. The rest (token ids, pixels,
    actions, item ids) is the family's own."""

    weight: float
    margin: float
    label: bool | None  # unpaired (KTO) data: desirable or not; None for pairs and groups

    @property
    def is_group(self) -> bool:
        """An S-DPO group: several rejected outputs, scored as [B, K]."""

    @property
    def n_rejected(self) -> int:
        """How many rejected outputs the example holds (1 for a pair and for an unpaired item's mismatch)."""


def data_kind(examples: Sequence[Example]) -> str:
    """"pairs", "groups" (several rejected per prompt) or "unpaired" (labelled outputs)."""
    if len(examples) and examples[0].label is not None:
        return "unpaired"
    return "groups" if any(ex.is_group for ex in examples) else "pairs"


@dataclass
class Scores:
    """A scorer's output for a batch: per-example log-likelihood terms, each of shape [B]; the rejected ones
    are [B, K] for S-DPO groups. For a stochastic family they are one draw's (e.g. the negative denoising
    error at one timestep and noise)."""

    chosen: torch.Tensor  # log p(y_w | x), summed over the output's units
    rejected: torch.Tensor  # log p(y_l | x)
    chosen_len: torch.Tensor  # units the sums run over (tokens, actions, 1 for a single score, ...)
    rejected_len: torch.Tensor
    chosen_logits: torch.Tensor | None = None  # mean logit, for TRL's logits/* metrics; detached; optional
    rejected_logits: torch.Tensor | None = None


class Scorer(nn.Module):
    """batch → Scores. The loop trains this module (DDP/FSDP wrap it whole), scores the reference through
    it, and reads `.model`: the family's model, whose parameters are trained, switched to adapters off and
    saved."""

    model: nn.Module

    def forward(self, batch: dict[str, torch.Tensor]) -> Scores:  # pragma: no cover - the contract
        raise NotImplementedError


class Family:
    """Base class of every model family: the required methods raise, the rest are defaults a family may
    override. Attributes:

    - `name`: what `family:` in the config says.
    - `likelihood`: a key of `LIKELIHOODS` (the loop reads it through `likelihood_for(cfg)`, which a family whose
      models differ overrides).
    - `stochastic`: the score draws fresh noise per batch. The family draws it in `collate`, so that the
      policy and the reference score the same draw; the loop never caches reference scores for it.
    - `config_class`: a dataclass of the family's own config keys (flat in the YAML beside the shared ones;
      an unknown key is one line, exit 2), read back with `family.settings(cfg)`; None when it has none.
    - `capabilities`: which of `CAPABILITIES` it offers.
    - `rebuilds_base`: a run may start without a `model` (a fresh model built from the config, seeded), and
      `load_trained(None, cfg)` rebuilds that start (so `dpokit sample --base` and the base grids work).
    """

    name: str = ""
    likelihood: str = "exact"
    stochastic: bool = False
    config_class: type | None = None
    capabilities: frozenset[str] = frozenset()
    rebuilds_base: bool = False

    # ------------------------------------------------------------ required

    def load_policy(self, cfg) -> tuple[nn.Module, Any]:
        """The trainable model (plain, or with peft adapters when `cfg.lora` is set) and its processor
        (tokenizer, image processor, item vocabulary, ... or None)."""
        raise NotImplementedError

    def load_model(self, path: str, cfg) -> nn.Module:
        """A frozen model from a path, for a separate reference (`ref_model`)."""
        raise NotImplementedError

    def load_processor(self, path: str, cfg) -> Any:
        """The processor saved at a path (tokenizer, image processor, ...; None when the family has none)."""
        raise NotImplementedError

    def examples(self, source: Any, processor: Any, cfg) -> Sequence[Example]:
        """Rows from a file or dataset → validated examples (DataError naming file, row and problem). Any
        sequence: a lazy one (len and indexing) where the data does not fit in memory."""
        raise NotImplementedError

    def collate(self, examples: list, cfg, processor: Any) -> dict[str, torch.Tensor]:
        """Examples → one batch of tensors, with the `BATCH_KEYS` that apply and anything of the family's."""
        raise NotImplementedError

    def scorer(self, model: nn.Module, cfg) -> Scorer:
        """A `Scorer` around `model`."""
        raise NotImplementedError

    def fingerprint(self, examples: Sequence[Example]) -> str:
        """A digest of everything in the examples that changes a score (token ids, pixels, actions, item ids,
        weights aside), for the reference cache's key. Required of a deterministic family."""
        raise NotImplementedError

    def save(self, model: nn.Module, processor: Any, path: str, merge_lora: bool = False) -> None:
        """The model in its library's own format, safetensors."""
        raise NotImplementedError

    # ------------------------------------------------------------ defaults

    def likelihood_for(self, cfg) -> str:
        """What the score of the model `cfg` names is (a key of `LIKELIHOODS`), checked against the losses before
        the model loads. Default: `likelihood`; a family whose models differ overrides it (the policy family: a
        categorical head's score is "exact", a continuous head's a "density")."""
        return self.likelihood

    def adapters_off(self, model: nn.Module) -> ContextManager:
        """Within this context `model` computes as its base weights (the reference of a LoRA run).
        Default: peft's `disable_adapter`."""
        off = getattr(model, "disable_adapter", None)
        if off is None:
            raise DpokitError(f"family {self.name!r}: the model has no adapters to switch off (lora is not set)")
        return off()

    def metrics(self, inputs) -> dict[str, torch.Tensor]:
        """Per-example metrics of the family's own (each [B], detached), logged beside TRL's names under the names
        its field's tools use; `inputs` is the batch's `LossInputs`. Default: none."""
        return {}

    def settings(self, cfg) -> Any:
        """The family's own config keys as its `config_class` instance (None when it has none)."""
        if self.config_class is None:
            return None
        return self.config_class(**getattr(cfg, "family_config", {}))

    def require(self, capability: str, needed_by: str) -> None:
        """One clear line when a capability is missing."""
        if capability not in CAPABILITIES:
            raise ValueError(f"unknown capability {capability!r}")
        if capability not in self.capabilities:
            raise DpokitError(f"{needed_by} needs a family that can {CAPABILITIES[capability]}; family "
                              f"{self.name!r} cannot")

    # ------------------------------------------------------------ optional capabilities

    def sample(self, model: nn.Module, processor: Any, prompts: Sequence, **settings) -> list:
        """Capability "sample": outputs for each prompt."""
        self.require("sample", "sampling")

    def prompts(self, source: Any, processor: Any, limit: int | None = None) -> list:
        """Capability "sample": held-out prompts from a file, as `sample` takes them (`dpokit eval --prompts`).
        Default: text prompts (a `prompt` field, or the implicit prompt of a preference row)."""
        from ..evaluate import read_prompts

        return read_prompts(source, limit)

    def reply_example(self, completion: Any) -> Example:
        """Capability "sample": one of `sample`'s outputs as an example whose chosen output is the reply and which
        holds no rejected one, for the reply's log-probs (sample eval's KL). Default: a token model's `Completion`."""
        from ..data import Example as TokenExample

        return TokenExample(completion.prompt_ids, completion.completion_ids, [])

    def completions(self, source: Any, processor: Any, cfg) -> list[tuple[int, Example]]:
        """(row number, example) of each prompt + completion row, the completion as the chosen output and no
        rejected one (`dpokit score`). Default: text rows (`evaluate.read_completions`)."""
        from ..evaluate import read_completions

        return read_completions(source, processor, cfg)

    def row_check(self, source: Any, processor: Any, cfg) -> Callable[[dict], Example]:
        """One row of `source` → its example as training encodes it, or a `RowProblem` saying what is wrong with
        it: what `dpokit data validate --family NAME` runs on every row. The causal LM's rows are checked by
        `recipes.validate` itself; a family without its own check says so in one line."""
        raise DpokitError(f"family {self.name!r} has no row check for `dpokit data validate`; `dpokit train` "
                          "names the first bad row (on_bad_row=skip lists them all)")

    def load_trained(self, path: str, cfg=None) -> tuple[nn.Module, Any]:
        """Capability "load_trained": a saved model and its processor, frozen, for eval and score."""
        self.require("load_trained", "loading a trained model")

    def list_metrics(self, model: nn.Module, processor: Any, examples: Sequence[Example], cfg) -> dict[str, float]:
        """Capability "list_metrics": measures of the lists the model recommends for the eval examples' contexts
        as a whole (coverage and the like are not per-example means), logged as eval metrics at every eval."""
        self.require("list_metrics", "list metrics")


def draw_seeds(seed: int, stream: int, indices) -> list[int]:
    """A stochastic family's per-example seeds (`collate(..., draws=...)`): a function of the run's seed, a
    stream and the example's index only, so a pair draws the same noise however a batch is split over
    processes, and a resumed run draws what the first run drew. The loop trains on stream epoch + 1 (fresh
    noise each epoch) and evaluates on stream 0 (the same draws at every evaluation)."""
    return [(seed * 1_000_003 + stream) * 10_000_019 + i for i in indices]


def digest(*parts: bytes) -> str:
    """A short hex digest of byte strings, for fingerprints."""
    h = hashlib.blake2b(digest_size=16)
    for part in parts:
        h.update(len(part).to_bytes(8, "little"))
        h.update(part)
    return h.hexdigest()


def config_fields(family: Family) -> dict[str, dataclasses.Field]:
    """The family's own config keys by name."""
    return {f.name: f for f in dataclasses.fields(family.config_class)} if family.config_class else {}
