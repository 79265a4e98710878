"""Samples of a run on disk: the one path from a run directory to images (`dpokit sample` takes it, and so does
`dpokit train` when the run's family settings name sample prompts), and the grids report.html shows.

A folder of samples holds `<prompt>-<sample>.png`, `grid.png` (rows = prompts, columns = samples) and
`prompts.json` (the rows' prompts, for the report's captions). A run's own folders are
`<output_dir>/samples/base` (the starting model, `model`) and `<output_dir>/samples/trained`; report.py shows every
`samples/*/grid.png` it finds, base first.

A family opts in to grids after training by offering the `sample` and `load_trained` capabilities and naming
`sample_prompts` (and `sample_num`, samples per prompt) among its own config keys; nothing else here is
family-specific. A family whose runs may start without a `model` (a fresh model built from the config) says so
with the contract's `rebuilds_base`: its `load_trained(None, cfg)` is that starting model.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence

from .errors import DpokitError
from .io import write_text

SEED = 0  # `dpokit sample`'s default seed too: the grids after training are what `dpokit sample RUN` redraws
NUM = 4  # samples per prompt, when the family's settings do not say
BASE, TRAINED = "base", "trained"


def samples_dir(run: str | Path, base: bool) -> Path:
    """Where a run's own samples go, so that report.html finds them."""
    return Path(run) / "samples" / (BASE if base else TRAINED)


def sample_run(run: str | Path, cfg, prompts: Sequence, out: str | Path, *, base: bool = False, num: int = NUM,
               seed: int = SEED, needed_by: str = "dpokit sample", **settings: Any) -> list[Path]:
    """Samples of the trained model at `run` (or, `base`, of its starting model `cfg.model`), loaded and drawn
    through the family's `load_trained` and `sample`, written to `out`; the image paths, grid last. Settings
    left None take the family's defaults. Column k of every grid starts from the same noise for a seed, so a
    run's grid and its base's compare sample by sample."""
    import torch

    from .families import get_family
    from .images import write_images

    family = get_family(cfg.family)
    family.require("sample", needed_by)
    family.require("load_trained", needed_by)
    if base and not cfg.model and not family.rebuilds_base:
        raise DpokitError(f"{run}/config.yaml names no starting model ('model') to sample as the base")
    model, processor = family.load_trained((cfg.model or None) if base else str(run), cfg)
    model.to("cuda" if torch.cuda.is_available() else "cpu")
    images = family.sample(model, processor, list(prompts), num_generations=num, seed=seed,
                           **{k: v for k, v in settings.items() if v is not None})
    paths = write_images(images, out)
    write_text(Path(out) / "prompts.json", json.dumps(list(prompts)) + "\n")
    return paths


def grid_prompts(cfg) -> tuple[list, int] | None:
    """(prompts, samples per prompt) the run's family settings name for its grids; None when they name none."""
    from .families import get_family
    from .families.base import config_fields

    family = get_family(cfg.family)
    if "sample_prompts" not in config_fields(family):
        return None
    settings = family.settings(cfg)
    if not settings.sample_prompts:
        return None
    return list(settings.sample_prompts), getattr(settings, "sample_num", NUM)


def write_sample_grids(run_dir: str | Path, cfg) -> list[Path]:
    """After a successful training run: the starting and the trained model's grids on the configured prompts,
    on the same seeds, then report.html again so it shows them. The grids of this process's run, drawn once:
    under several processes only the main one samples. [] when the settings name no prompts."""
    from accelerate import PartialState

    wanted = grid_prompts(cfg)
    if wanted is None or not PartialState().is_main_process:
        return []
    prompts, num = wanted
    grids = [sample_run(run_dir, cfg, prompts, samples_dir(run_dir, base), base=base, num=num,
                        needed_by="sample_prompts (grids in report.html)")[-1] for base in (True, False)]
    from .report import write_report

    write_report(run_dir)
    return grids
