"""`dpokit bench --family vlm`: dpokit's vision-language DPO against TRL's `DPOTrainer` on the same LLaVA.

Everything is built on the spot with no downloads and random weights, saved once so both trainers start from the
same files:

- a LLaVA-shaped model (`LlavaForConditionalGeneration`): a CLIP vision tower (224-px images, 16-px patches, so
  196 patches plus the class token; 4 layers, hidden 256) whose 196 patch features a projector maps to 196 image
  tokens of a Llama text model (hidden 256, intermediate 688, 4 layers: the causal-LM bench's), with a byte-level
  BPE tokenizer and a `LlavaProcessor` built offline. Both trainers load it with
  `AutoModelForImageTextToText.from_pretrained` and `AutoProcessor.from_pretrained`;
- easy-vqa-like pairs: a coloured shape (circle, square, triangle) drawn with PIL on a random background, one image
  per pair, a question about it ("<image>What shape is in the image?"), the true answer as chosen and a false one as
  rejected, both ending with EOS. Written once as JSON Lines (TRL's standard vision layout: `prompt`, `chosen`,
  `rejected` strings and `images`, a list of absolute PNG paths); dpokit reads the file itself, TRL through
  `datasets.load_dataset("json")` with the `images` column cast to `datasets.Image` (decoded on access, as any
  image dataset on the Hub is).

What each side runs (the same pairs, batch size, max_length, learning rate, fp32 on the CPU or bf16 mixed
precision on a GPU, one epoch):

- dpokit: `family: vlm` through its public training path (`dpokit.train.Loop`) with its defaults: each pair's
  prompt and its image encoded once (prefix sharing), padding-free blocks, the reference's log-probs computed once
  before training and cached (the cache starts empty in every run, so the reference pass is timed).
  Full fine-tuning (`full_finetune: true`) by default, or with `--lora` LoRA adapters on the language model;
- TRL 1.16: `DPOTrainer` with `DPOConfig`'s defaults but for what both share; the run prints what those defaults are
  (gradient checkpointing on, rows padded to the longest of the batch, no padding-free, the reference a second copy
  of the model loaded from the same folder and run at every step since `precompute_ref_log_probs` is refused with
  images; with `--lora` the base with the adapters off). Its vision collator repeats each prompt and its images for
  the chosen and the rejected reply, so the vision tower sees each image twice per step for the policy and twice
  for the reference. With `--lora`, `peft_config` is the same LoRA (r 16, alpha 32, every linear layer of the
  language model, none of the tower).

The vision tower trains in both (TRL's full fine-tuning trains every weight) unless `--vlm-vision-tower frozen`;
with `--lora` it is frozen in both unless `--vlm-vision-tower trained` (then trained in full beside the adapters,
peft's `modules_to_save`, in both).

As in the causal-LM bench, each run is a fresh subprocess (its peak RSS is its own, `ru_maxrss`), the two trainers
alternate, and the timed part is one epoch from a cold start: for dpokit the reading and encoding of the rows and
images, the reference pass and the training epoch (with its final save); for TRL `trainer.train()`, whose collator
reads, processes and tokenizes every batch. Loading the model ("setup") is timed apart; process CPU seconds are
reported beside wall time.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .bench import LORA as _TEXT_LORA

# The goal `dpokit bench --family vlm` checks: dpokit's pairs/s over TRL's, at a peak RSS no higher.
GOAL_RATIO = 3.0
# The causal-LM bench's adapters; the vlm family picks the language model's layers itself (lora_targets).
LORA = {k: v for k, v in _TEXT_LORA.items() if k != "target_modules"}


@dataclass
class VLMSettings:
    pairs: int = 256
    batch_size: int = 8
    max_length: int | None = 512
    learning_rate: float = 5e-4
    image_size: int = 224
    patch_size: int = 16
    vision_hidden: int = 256
    vision_intermediate: int = 1024
    vision_layers: int = 4
    vision_heads: int = 4
    hidden_size: int = 256  # the text model: the causal-LM bench's tiny Llama
    intermediate_size: int = 688
    num_layers: int = 4
    num_heads: int = 4
    vocab_size: int = 1000
    lora: bool = False
    vision_tower: str = "trained"  # trained | frozen, in both trainers
    seed: int = 0
    threads: int | None = None
    device: str = "cpu"
    dpokit_overrides: dict = field(default_factory=dict)
    trl_overrides: dict = field(default_factory=dict)


# ---------------------------------------------------------------- data: easy-vqa-like shapes

COLORS = {"red": (220, 30, 30), "green": (30, 170, 50), "blue": (30, 60, 220), "yellow": (230, 210, 20),
          "purple": (140, 40, 170), "orange": (245, 140, 20), "teal": (20, 160, 160), "brown": (130, 80, 30)}
SHAPES = ("circle", "square", "triangle")


def draw_shape(rng: random.Random, size: int):
    """A PIL image: one shape of one colour on a light, noisy background; returns (image, shape, colour)."""
    from PIL import Image, ImageDraw

    bg = tuple(rng.randint(200, 255) for _ in range(3))
    image = Image.new("RGB", (size, size), bg)
    draw = ImageDraw.Draw(image)
    shape, color = rng.choice(SHAPES), rng.choice(sorted(COLORS))
    r = rng.uniform(0.2, 0.4) * size
    cx, cy = rng.uniform(r, size - r), rng.uniform(r, size - r)
    fill = COLORS[color]
    if shape == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
    elif shape == "square":
        draw.rectangle([cx - r, cy - r, cx + r, cy + r], fill=fill)
    else:
        draw.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=fill)
    for _ in range(size // 4):  # a few specks, so that the PNGs are not trivially compressible
        x, y = rng.randrange(size), rng.randrange(size)
        draw.point((x, y), fill=tuple(rng.randint(150, 255) for _ in range(3)))
    return image, shape, color


def question(rng: random.Random, shape: str, color: str) -> tuple[str, str, str]:
    """(question, true answer, false answer) about the image."""
    kind = rng.randrange(4)
    if kind == 0:
        wrong = rng.choice([s for s in SHAPES if s != shape])
        return "What shape is in the image?", f"It is a {shape}.", f"It is a {wrong}."
    if kind == 1:
        wrong = rng.choice([c for c in sorted(COLORS) if c != color])
        return "What color is the shape?", f"The shape is {color}.", f"The shape is {wrong}."
    if kind == 2:
        other = rng.choice(SHAPES)
        yes = other == shape
        return f"Is there a {other} in the image?", "Yes." if yes else "No.", "No." if yes else "Yes."
    wrong_color = rng.choice([c for c in sorted(COLORS) if c != color])
    return "Describe the image.", f"A {color} {shape} on a plain background.", \
        f"A {wrong_color} {shape} next to a {rng.choice(SHAPES)}."


def corpus() -> list[str]:
    """Every text the data can hold, for the tokenizer."""
    texts = ["What shape is in the image?", "What color is the shape?", "Describe the image.", "Yes.", "No.",
             "on a plain background.", "next to a"]
    texts += [f"Is there a {s} in the image? It is a {s}." for s in SHAPES]
    texts += [f"The shape is {c}. A {c} {s}." for c in COLORS for s in SHAPES]
    return texts


def write_pairs(folder: Path, n: int, image_size: int, eos: str, seed: int) -> Path:
    """`n` pairs as JSON Lines at `folder/pairs.jsonl`, each with its own PNG under `folder/images` (absolute paths:
    dpokit reads them relative to the data file, `datasets` relative to the working directory)."""
    rng = random.Random(seed)
    images = folder / "images"
    images.mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(n):
        image, shape, color = draw_shape(rng, image_size)
        path = (images / f"{i}.png").resolve()
        image.save(path)
        q, chosen, rejected = question(rng, shape, color)
        rows.append({"prompt": "<image>" + q, "chosen": f" {chosen}{eos}", "rejected": f" {rejected}{eos}",
                     "images": [str(path)]})
    out = folder / "pairs.jsonl"
    out.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return out


# ---------------------------------------------------------------- the model


def build_processor(s: VLMSettings):
    from transformers import CLIPImageProcessor, LlavaProcessor

    from .families import get_family
    from .tiny import build_tokenizer

    tok = build_tokenizer(corpus() * 3, vocab_size=s.vocab_size, extra_special_tokens=["<image>"])
    images = CLIPImageProcessor(size={"shortest_edge": s.image_size},
                                crop_size={"height": s.image_size, "width": s.image_size})
    return LlavaProcessor(image_processor=images, tokenizer=tok, patch_size=s.patch_size,
                          vision_feature_select_strategy="default", num_additional_image_tokens=1,
                          chat_template=get_family("vlm").chat_template("<image>"))


def llava_config(s: VLMSettings, tokenizer):
    from transformers import LlavaConfig

    return LlavaConfig(
        vision_config=dict(model_type="clip_vision_model", hidden_size=s.vision_hidden,
                           intermediate_size=s.vision_intermediate, num_hidden_layers=s.vision_layers,
                           num_attention_heads=s.vision_heads, image_size=s.image_size, patch_size=s.patch_size),
        text_config=dict(model_type="llama", vocab_size=len(tokenizer), hidden_size=s.hidden_size,
                         intermediate_size=s.intermediate_size, num_hidden_layers=s.num_layers,
                         num_attention_heads=s.num_heads, num_key_value_heads=s.num_heads,
                         max_position_embeddings=2048, pad_token_id=tokenizer.pad_token_id,
                         eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.bos_token_id),
        image_token_id=tokenizer.convert_tokens_to_ids("<image>"), vision_feature_layer=-1,
        vision_feature_select_strategy="default", num_additional_image_tokens=1,
    )


def image_tokens(config) -> int:
    """Image tokens per image of a LLaVA config: its patches, plus the class token unless the "default" feature
    strategy drops it."""
    v = config.vision_config
    n = (v.image_size // v.patch_size) ** 2 + getattr(config, "num_additional_image_tokens", 1)
    return n - (1 if config.vision_feature_select_strategy == "default" else 0)


def build_model(path: Path, s: VLMSettings):
    """The LLaVA and its processor saved at `path`; returns (processor, config, parameter counts)."""
    import torch
    from transformers import LlavaForConditionalGeneration

    processor = build_processor(s)
    config = llava_config(s, processor.tokenizer)
    torch.manual_seed(s.seed)
    model = LlavaForConditionalGeneration(config)
    model.save_pretrained(path)
    processor.save_pretrained(path)
    counts = {"vision": _count(model.model.vision_tower), "projector": _count(model.model.multi_modal_projector),
              "text": _count(model.model.language_model) - _count(model.model.language_model.embed_tokens)
              + _count(model.lm_head)}  # the embedding table is a look-up, no FLOPs
    return processor, config, counts


def _count(module) -> int:
    return sum(p.numel() for p in module.parameters())


def prepare(workdir: Path, s: VLMSettings) -> dict:
    """Model, processor, images and pairs written under `workdir`; returns what they are (token lengths measured
    with the processor, the image tokens included in the prompt's)."""
    processor, config, counts = build_model(workdir / "model", s)
    vision, projector, text = counts["vision"], counts["projector"], counts["text"]
    data = write_pairs(workdir, s.pairs, s.image_size, processor.tokenizer.eos_token, s.seed)
    lens = measure(data, processor)
    n_img = image_tokens(config)
    too_long = [i for i, (p, c, r) in enumerate(lens) if s.max_length and p + max(c, r) > s.max_length]
    if too_long:
        from .errors import DpokitError
        raise DpokitError(f"--max-length {s.max_length}: {len(too_long)} pairs do not fit (the prompt holds "
                          f"{n_img} image tokens); raise --max-length or lower --vlm-image-size")
    n = len(lens)
    text_tokens = sum(p + c + r for p, c, r in lens)  # distinct tokens, as dpokit lays them out
    # Forward FLOPs ≈ 2 x parameters x tokens (attention left out): the vision tower's share of one policy forward
    # over the pair as dpokit lays it out (the image once, its tokens and both replies once).
    tower_tokens = (s.image_size // s.patch_size) ** 2 + 1
    vision_flops = (vision * tower_tokens + projector * n_img) * n
    share = vision_flops / (vision_flops + text * text_tokens)
    return {"pairs": n, "image_size": s.image_size, "image_tokens": n_img, "vision_params": vision,
            "projector_params": projector, "text_params": text, "mean_prompt": sum(x[0] for x in lens) / n,
            "mean_chosen": sum(x[1] for x in lens) / n, "mean_rejected": sum(x[2] for x in lens) / n,
            "distinct_tokens": text_tokens, "vision_flop_share": share}


def measure(data: Path, processor) -> list[tuple[int, int, int]]:
    """(prompt, chosen, rejected) token counts of every row, the prompt's image tokens included."""
    from PIL import Image

    out = []
    for line in data.read_text().splitlines():
        row = json.loads(line)
        images = [Image.open(p).convert("RGB") for p in row["images"]]
        p = len(processor(text=row["prompt"], images=images, add_special_tokens=False)["input_ids"][0])
        c, r = (len(processor.tokenizer(row[k], add_special_tokens=False)["input_ids"]) for k in ("chosen", "rejected"))
        out.append((p, c, r))
    return out


# ---------------------------------------------------------------- the two workers (each in its own process)


def dpokit_config(workdir: Path, s: VLMSettings, run_dir: Path, **extra):
    from .config import load_config

    values = dict(
        family="vlm", model=str(workdir / "model"), train_data=str(workdir / "pairs.jsonl"),
        per_device_train_batch_size=s.batch_size, max_length=s.max_length, max_prompt_length=None,
        learning_rate=s.learning_rate, num_train_epochs=1, dtype="float32", bf16=s.device == "cuda", seed=s.seed,
        output_dir=str(run_dir / "out"), ref_cache_dir=str(run_dir / "cache"), disable_tqdm=True,
        logging_steps=10, save_steps=0, report_to=[], train_vision_tower=s.vision_tower == "trained",
        **({"lora": dict(LORA)} if s.lora else {"full_finetune": True}))
    values.update(s.dpokit_overrides)
    values.update(extra)
    return load_config(None, **values)


def _work_dpokit(workdir: Path, s: VLMSettings) -> dict:
    import importlib

    from .bench import _sync
    from .families import FAMILIES

    train_mod = importlib.import_module("dpokit.train")  # the module, not the `train` function dpokit exports
    run_dir = Path(tempfile.mkdtemp(dir=workdir))
    cfg = dpokit_config(workdir, s, run_dir)
    timed = {"encode": [0.0, 0.0], "ref": [0.0, 0.0]}

    def timing(fn, key):
        def wrapped(*a, **k):
            t, c = time.perf_counter(), time.process_time()
            out = fn(*a, **k)
            _sync()
            timed[key][0] += time.perf_counter() - t
            timed[key][1] += time.process_time() - c
            return out
        return wrapped

    family_cls = FAMILIES["vlm"]  # through the registry: shared code never imports a family's internals
    family_cls.examples = timing(family_cls.examples, "encode")  # rows read, images decoded and processed
    train_mod.Loop._precompute = timing(train_mod.Loop._precompute, "ref")
    t0 = time.perf_counter()
    loop = train_mod.Loop(cfg)
    t1, c1 = time.perf_counter(), time.process_time()
    result = loop.run()
    _sync()
    t2, c2 = time.perf_counter(), time.process_time()
    # The encoding and the reference pass happen inside Loop(): they are moved from setup into the timed part.
    pre_s = timed["encode"][0] + timed["ref"][0]
    losses = [row["loss"] for row in result.history if "loss" in row]
    trainable = sum(p.numel() for p in loop.model.parameters() if p.requires_grad)
    return {"setup_s": t1 - t0 - pre_s, "encode_s": timed["encode"][0], "ref_s": timed["ref"][0],
            "seconds": pre_s + t2 - t1, "wall_s": t2 - t0,
            "train_cpu_s": timed["encode"][1] + timed["ref"][1] + c2 - c1,
            "steps": result.global_step, "mean_loss": sum(losses) / len(losses) if losses else None,
            "trainable": trainable,
            "defaults": {"share_prompt": cfg.share_prompt, "padding_free": cfg.padding_free,
                         "gradient_checkpointing": False,
                         "reference": "cached log-probs, computed once before training"}}


def trl_peft_config(model, s: VLMSettings):
    """dpokit's LoRA for TRL: the same adapters on the language model's linear layers, the vision side trained in
    full beside them (`modules_to_save`) or frozen."""
    from peft import LoraConfig

    from .families import get_family

    vlm = get_family("vlm")
    extra = {"modules_to_save": list(vlm.vision_modules(model))} if s.vision_tower == "trained" else {}
    return LoraConfig(task_type="CAUSAL_LM", target_modules=vlm.lora_targets(model), **LORA, **extra)


def _work_trl(workdir: Path, s: VLMSettings) -> dict:
    import datasets
    from transformers import AutoModelForImageTextToText, AutoProcessor
    from trl import DPOConfig, DPOTrainer

    from .bench import _sync
    from .families import get_family

    run_dir = Path(tempfile.mkdtemp(dir=workdir))
    t0 = time.perf_counter()
    model = AutoModelForImageTextToText.from_pretrained(workdir / "model", dtype="float32")
    processor = AutoProcessor.from_pretrained(workdir / "model")
    dataset = datasets.load_dataset("json", data_files=str(workdir / "pairs.jsonl"), split="train",
                                    cache_dir=str(run_dir / "hf"))
    dataset = dataset.cast_column("images", datasets.Sequence(datasets.Image()))
    args = DPOConfig(
        output_dir=str(run_dir / "out"), per_device_train_batch_size=s.batch_size, max_length=s.max_length,
        learning_rate=s.learning_rate, num_train_epochs=1, bf16=s.device == "cuda", fp16=False,
        use_cpu=s.device == "cpu", seed=s.seed, report_to="none", save_strategy="no", logging_steps=10,
        disable_tqdm=True, dataloader_num_workers=0, **s.trl_overrides,
    )
    peft = None
    if s.lora:
        peft = trl_peft_config(model, s)
    elif s.vision_tower == "frozen":
        for module in get_family("vlm").vision_modules(model).values():
            module.requires_grad_(False)
    trainer = DPOTrainer(model=model, args=args, train_dataset=dataset, processing_class=processor, peft_config=peft)
    t1, c1 = time.perf_counter(), time.process_time()
    trainer.train()
    _sync()
    t2, c2 = time.perf_counter(), time.process_time()
    # TRL's last log entry holds the epoch's mean loss (train_loss); the periodic ones only every logging_steps
    final = [row["train_loss"] for row in trainer.state.log_history if "train_loss" in row]
    trainable = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
    reference = ("the base with the adapters off" if trainer.ref_model is None and s.lora
                 else "a second copy of the model, run at every step" if trainer.ref_model is not None
                 else "none held (precomputed)")
    return {"setup_s": t1 - t0, "encode_s": None, "ref_s": None, "seconds": t2 - t1, "wall_s": t2 - t0,
            "train_cpu_s": c2 - c1, "steps": trainer.state.global_step, "mean_loss": final[-1] if final else None,
            "trainable": trainable,
            "defaults": {"gradient_checkpointing": args.gradient_checkpointing, "padding_free": args.padding_free,
                         "pad_to_multiple_of": args.pad_to_multiple_of,
                         "precompute_ref_log_probs": args.precompute_ref_log_probs, "reference": reference}}


def worker(kind: str, workdir: str, settings: dict) -> None:
    import warnings

    from .bench import report_run

    warnings.filterwarnings("ignore")  # transformers' torchvision notice, once per run
    s = VLMSettings(**settings)
    report_run(_work_dpokit if kind == "dpokit" else _work_trl, s.threads, Path(workdir), s)


# ---------------------------------------------------------------- the comparison

KINDS = ("trl", "dpokit")


def summarize(runs: list[dict], pairs: int) -> dict:
    secs = [r["seconds"] for r in runs]
    med = statistics.median(secs)

    def median(key):
        values = [r[key] for r in runs if r.get(key) is not None]
        return statistics.median(values) if values else None

    return {
        "seconds": med, "min_s": min(secs), "max_s": max(secs),
        "pairs_per_s": pairs / med, "pairs_per_s_min": pairs / max(secs), "pairs_per_s_max": pairs / min(secs),
        "cpu_s": median("train_cpu_s"), "peak_rss_mb": max(r["peak_rss_mb"] for r in runs),
        "gpu_peak_mb": max(r.get("gpu_peak_mb", 0.0) for r in runs) or None,
        "setup_s": median("setup_s"), "encode_s": median("encode_s"), "ref_s": median("ref_s"),
        "mean_loss": median("mean_loss"), "steps": runs[0]["steps"], "trainable": runs[0]["trainable"],
        "defaults": runs[0]["defaults"], "runs": runs,
    }


def describe(info: dict, s: VLMSettings) -> str:
    mode = "LoRA r 16 on the language model" if s.lora else "full fine-tuning"
    return (f"LLaVA, random weights: CLIP tower {info['vision_params'] / 1e6:.2f}M ({s.vision_layers} layers, hidden "
            f"{s.vision_hidden}, {s.image_size} px, patch {s.patch_size}), projector "
            f"{info['projector_params'] / 1e6:.2f}M, Llama {info['text_params'] / 1e6:.2f}M; {info['image_tokens']} "
            f"image tokens per image, tower {100 * info['vision_flop_share']:.0f}% of a policy forward's FLOPs; "
            f"{info['pairs']} synthetic shape pairs, one image each, mean prompt {info['mean_prompt']:.0f} (image "
            f"included) / chosen {info['mean_chosen']:.1f} / rejected {info['mean_rejected']:.1f} tokens; "
            f"batch {s.batch_size}, max_length {s.max_length}, lr {s.learning_rate}, {mode}, vision tower "
            f"{s.vision_tower}, {'bf16 mixed precision on the GPU' if s.device == 'cuda' else 'fp32'}, one epoch")


def compare(s: VLMSettings, repeats: int, say=print) -> dict:
    """Both trainers `repeats` times each, alternating which goes first; the median of each."""
    from .bench import _load, spawn_worker

    with tempfile.TemporaryDirectory(prefix="dpokit-bench-vlm-") as tmp:
        work = Path(tmp)
        info = prepare(work, s)
        say(describe(info, s))
        runs: dict[str, list] = {k: [] for k in KINDS}
        for i in range(repeats):
            for kind in (("dpokit", "trl") if i % 2 == 0 else ("trl", "dpokit")):
                r = spawn_worker("dpokit.bench_vlm", kind, work, s.device, asdict(s))
                r["load"] = _load()
                runs[kind].append(r)
                pre = (f", of which encoding {r['encode_s']:.1f} s and reference {r['ref_s']:.1f} s"
                       if r["ref_s"] is not None else "")
                gpu = f", peak GPU memory {r['gpu_peak_mb']:.0f} MB" if r.get("gpu_peak_mb") else ""
                say(f"  run {i + 1}/{repeats} {kind:6s} {r['seconds']:7.1f} s{pre} ({info['pairs'] / r['seconds']:.2f} "
                    f"pairs/s, {r['train_cpu_s']:.0f} CPU s, peak RSS {r['peak_rss_mb']:.0f} MB{gpu}; "
                    f"load {r['load']})")
        out = {"info": info, "settings": asdict(s), **{k: summarize(v, info["pairs"]) for k, v in runs.items()}}
        out["ratio"] = out["dpokit"]["pairs_per_s"] / out["trl"]["pairs_per_s"]
        out["memory_ratio"] = out["dpokit"]["peak_rss_mb"] / out["trl"]["peak_rss_mb"]
        out["goal_met"] = out["ratio"] >= GOAL_RATIO and out["memory_ratio"] <= 1.0
        return out


def _defaults(d: dict) -> str:
    return ", ".join(f"{k} {v}" for k, v in d.items())


def format_table(result: dict) -> str:
    gpu = result["trl"].get("gpu_peak_mb") is not None
    lines = ["| trainer | pairs/s median (min - max) | seconds | CPU seconds | peak RSS | "
             + ("peak GPU memory | " if gpu else "") + "steps | mean loss |",
             "|---|---|---|---|---|---|---|" + "---|" * gpu]
    for kind in KINDS:
        r = result[kind]
        loss = f"{r['mean_loss']:.4f}" if r["mean_loss"] is not None else "-"
        lines.append(f"| {kind} | {r['pairs_per_s']:.2f} ({r['pairs_per_s_min']:.2f} - {r['pairs_per_s_max']:.2f}) | "
                     f"{r['seconds']:.1f} | {r['cpu_s']:.1f} | {r['peak_rss_mb']:.0f} MB | "
                     + (f"{r['gpu_peak_mb']:.0f} MB | " if gpu else "") + f"{r['steps']} | {loss} |")
    d, t = result["dpokit"], result["trl"]
    lines.append(f"\ndpokit: encoding {d['encode_s']:.1f} s and reference {d['ref_s']:.1f} s of its {d['seconds']:.1f} "
                 f"s; {d['trainable'] / 1e6:.2f}M trainable; {_defaults(d['defaults'])}")
    lines.append(f"TRL (DPOConfig defaults): {_defaults(t['defaults'])}; {t['trainable'] / 1e6:.2f}M trainable; "
                 "each image through the vision tower twice per step for the policy and twice for the reference")
    verdict = "met" if result["goal_met"] else "missed"
    lines.append(f"dpokit / TRL: {result['ratio']:.2f}x pairs/s ({t['cpu_s'] / d['cpu_s']:.2f}x less CPU time); "
                 f"peak RSS {d['peak_rss_mb']:.0f} MB vs {t['peak_rss_mb']:.0f} MB ({result['memory_ratio']:.2f}x); "
                 f"goal (>= {GOAL_RATIO:g}x pairs/s, peak memory no higher) {verdict}")
    return "\n".join(lines)


def settings_from_args(args, device: str) -> VLMSettings:
    from .bench import _overrides

    tower = args.vlm_vision_tower or ("frozen" if args.lora else "trained")
    return VLMSettings(pairs=args.pairs, batch_size=args.batch_size, max_length=args.max_length,
                       learning_rate=args.learning_rate, image_size=args.vlm_image_size,
                       patch_size=args.vlm_patch_size, vision_layers=args.vlm_vision_layers, lora=args.lora,
                       vision_tower=tower, threads=args.threads, device=device,
                       dpokit_overrides=_overrides(args.dpokit_set), trl_overrides=_overrides(args.trl_set))


def run_bench(args, device: str) -> None:
    import torch

    from .bench import _load
    from .errors import DpokitError

    text_only = [flag for flag, value in (("--data", args.data), ("--synthetic", args.synthetic),
                                          ("--prompt-lengths", args.prompt_lengths), ("--model", args.model),
                                          ("--shape", args.shape != "tiny")) if value]
    if text_only:
        raise DpokitError(f"{', '.join(text_only)}: for the causal_lm bench only (--family vlm builds its own LLaVA "
                          "and image pairs)")
    s = settings_from_args(args, device)
    if s.pairs < 1 or s.batch_size < 1 or s.vision_layers < 1:
        raise DpokitError("--pairs, --batch-size and --vlm-vision-layers must be >= 1")
    if s.patch_size < 1 or s.image_size < s.patch_size or s.image_size % s.patch_size:
        raise DpokitError(f"--vlm-image-size {s.image_size} must be a multiple of --vlm-patch-size {s.patch_size}")
    if args.threads:
        torch.set_num_threads(args.threads)
    where = torch.cuda.get_device_name() if device == "cuda" else f"{os.cpu_count()} CPUs"
    import trl

    print(f"torch {torch.__version__}, TRL {trl.__version__}, {where}, torch threads {torch.get_num_threads()}, "
          f"load average {_load()}", flush=True)
    result = compare(s, args.repeats, say=lambda m: print(m, flush=True))
    print(format_table(result))
    print(f"load average after: {_load()}")
    if args.json:
        Path(args.json).write_text(json.dumps({"main": result}, indent=1, default=str))


def add_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("--family vlm (also reads --pairs, --batch-size, --max-length, --learning-rate, "
                             "--repeats, --threads, --lora, --dpokit-set, --trl-set, --json)")
    g.add_argument("--vlm-image-size", type=int, default=224,
                   help="image side in pixels (default 224: 196 image tokens with 16-px patches)")
    g.add_argument("--vlm-patch-size", type=int, default=16, help="the CLIP tower's patch size (default 16)")
    g.add_argument("--vlm-vision-layers", type=int, default=4, help="the CLIP tower's layers (default 4)")
    g.add_argument("--vlm-vision-tower", choices=("trained", "frozen"), default=None,
                   help="train the vision tower and projector in both trainers, or freeze them (default: trained "
                        "with full fine-tuning, as TRL trains every weight; frozen with --lora)")


__all__ = ["VLMSettings", "prepare", "write_pairs", "build_model", "build_processor", "llava_config", "image_tokens",
           "compare", "format_table", "run_bench", "add_arguments"]
