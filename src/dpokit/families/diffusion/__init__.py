"""Diffusion models for images (Diffusion-DPO, Wallace et al. 2023) on diffusers.

- config.py: the family's own keys (`DiffusionConfig`);
- models.py: loading a pipeline folder (pixel-space UNet2DModel, or Stable Diffusion's layout), LoRA, saving;
- images.py: images from paths, bytes or `datasets` values, checked and resized;
- data.py: rows (prompt/chosen/rejected, Pick-a-Pic's caption/jpg_0/jpg_1/label_0, or unpaired prompt/image/label
  for KTO) → raw pairs;
- encode.py: latents and text embeddings, computed once and cached on disk;
- scorer.py: the per-pair (t, ε) draw and the score −½·mse;
- sampling.py: a trained run loaded back (`load_trained`) and images sampled from it (`sample`).

diffusers is an optional dependency (`pip install dpokit[diffusion]`): the modules that need it import it inside
their functions, so `dpokit.families` imports without it.
"""

from __future__ import annotations

import torch

from ...errors import DpokitError
from ..base import Family, digest
from .config import DiffusionConfig
from .encode import DiffusionExample, encode
from .scorer import DiffusionScorer, noised_batch


def _require_diffusers() -> None:
    try:
        import diffusers  # noqa: F401
    except ImportError:
        raise DpokitError("the diffusion family needs diffusers: pip install 'dpokit[diffusion]'") from None


class DiffusionFamily(Family):
    name = "diffusion"
    likelihood = "surrogate"  # −½·mse at one (t, ε): a term of the ELBO, not a log-likelihood
    stochastic = True
    config_class = DiffusionConfig
    capabilities = frozenset({"sample", "load_trained"})

    def load_policy(self, cfg):
        from .models import apply_lora, load_frozen, load_unet

        _require_diffusers()
        if not cfg.model:
            raise DpokitError("config key 'model' is required (a local diffusers pipeline folder)")
        unet, frozen = load_unet(cfg.model, cfg), load_frozen(cfg.model, cfg)
        self._check_sample_prompts(frozen, cfg)
        if cfg.lora is not None:
            unet = apply_lora(unet, cfg.lora)
        return unet, frozen

    def _check_sample_prompts(self, frozen, cfg) -> None:
        """`sample_prompts` the model cannot take (a caption for a class-conditional UNet, an unknown class id)
        fail here, before training, rather than when the report's grids are drawn after it."""
        from .sampling import conditions

        prompts = self.settings(cfg).sample_prompts
        if prompts is not None:
            try:
                conditions(frozen, prompts)
            except DpokitError as e:
                raise DpokitError(f"sample_prompts: {e}") from None

    def load_model(self, path, cfg):
        from .models import load_unet

        _require_diffusers()
        return load_unet(path, cfg).requires_grad_(False).eval()

    def load_processor(self, path, cfg):
        from .models import load_frozen

        _require_diffusers()
        return load_frozen(path, cfg)

    def adapters_off(self, model):
        """diffusers' own adapters (Stable Diffusion's UNet) switch off with `disable_adapters`; a peft-wrapped
        UNet2DModel with peft's `disable_adapter` (the default)."""
        if hasattr(model, "disable_adapters") and getattr(model, "peft_config", None) and \
                not hasattr(model, "disable_adapter"):
            from .models import diffusers_adapters_off

            return diffusers_adapters_off(model)
        return super().adapters_off(model)

    def examples(self, source, frozen, cfg):
        from .data import ImageSpec, load_pairs

        settings = self.settings(cfg)
        resolution = settings.resolution or frozen.sample_size * frozen.vae_scale
        spec = ImageSpec(frozen.image_channels, resolution, frozen.latent, frozen.num_class_embeds)
        return encode(load_pairs(source, spec), frozen, cfg, settings.encode_batch_size, settings.cache_encodings)

    def collate(self, examples, cfg, frozen, draws):
        """x0 of each pair's two images, noised with the pair's own (t, ε) from the loop's per-example seeds, and
        the conditioning. An unpaired row is scored the same way: its labelled image as the chosen and its
        mismatched image (KTO's KL term) as the rejected, both on the row's one (t, ε), with `label`."""
        x0_w = torch.stack([ex.chosen for ex in examples])
        x0_l = torch.stack([ex.rejected for ex in examples])
        batch = noised_batch(x0_w, x0_l, draws, frozen.scheduler)
        if examples[0].text is not None:
            batch["text"] = torch.stack([ex.text for ex in examples])
        if examples[0].class_id is not None:
            batch["class_labels"] = torch.tensor([ex.class_id for ex in examples])
        batch["weight"] = torch.tensor([ex.weight for ex in examples], dtype=torch.float32)
        batch["margin"] = torch.tensor([ex.margin for ex in examples], dtype=torch.float32)
        if examples[0].label is not None:
            batch["label"] = torch.tensor([bool(ex.label) for ex in examples])
        return batch

    def scorer(self, model, cfg):
        return DiffusionScorer(model)

    def metrics(self, inputs):
        """The Diffusion-DPO script's own metrics, per pair: `implicit_acc` (the policy's denoising error improves
        on the reference's more for the preferred image), `raw_model_loss` and `ref_loss` (½(mse_w + mse_l) of the
        policy and of the reference; their batch means are the script's)."""
        if inputs.kind != "pairs":
            return {}
        return {"implicit_acc": (inputs.chosen_logratios > inputs.rejected_logratios).float(),
                "raw_model_loss": -(inputs.policy_chosen + inputs.policy_rejected).detach(),
                "ref_loss": -(inputs.ref_chosen + inputs.ref_rejected)}

    def fingerprint(self, examples):
        """x0 of both images, the caption embedding and the class id of every pair."""
        parts = []
        for ex in examples:
            parts += [ex.chosen.numpy().tobytes(), ex.rejected.numpy().tobytes(),
                      ex.text.numpy().tobytes() if ex.text is not None else b"",
                      str(ex.class_id).encode()]
        return digest(*parts)

    def save(self, model, frozen, path, merge_lora=False):
        from .models import save

        save(model, frozen, path, merge_lora)

    def load_trained(self, path, cfg=None):
        """The trained UNet at `path` (a pipeline folder, Stable Diffusion LoRA weights or a peft adapter folder on
        the run's starting model), frozen, and the frozen parts; `cfg` defaults to the run's config.yaml."""
        from .sampling import load_trained

        _require_diffusers()
        return load_trained(path, cfg)

    def sample(self, model, frozen, prompts, **settings):
        """PIL images, one list per prompt (a caption, a class id, or None for an unconditional model); see
        sampling.sample for the settings."""
        from .sampling import sample

        _require_diffusers()
        return sample(model, frozen, prompts, **settings)


__all__ = ["DiffusionConfig", "DiffusionExample", "DiffusionFamily", "DiffusionScorer"]
