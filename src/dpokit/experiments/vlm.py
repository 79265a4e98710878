"""Vision-language DPO against hallucinated attributes on easy-vqa (issue 19's experiment): `dpokit experiment vlm`.

The protocol and decision rule were committed to docs/experiments.md before the first run; `PROTOCOL` below is
that text, verbatim. In short: a small LLaVA built from scratch (bench_vlm's builders: 64-px images, 8-px patches, 64
image tokens), warmed up with dpokit's own `loss_type: sft` on every easy-vqa train question and one description per
image; POVID-style pairs (the true description against one with one attribute made false); DPO and preferred-FT from
the warm-up; hallucination rate of greedy test descriptions and exact-match accuracy on all test questions.
"""

from __future__ import annotations

import json
import random
import re
import time
from pathlib import Path

PROTOCOL = """\
## Vision-language DPO: fewer hallucinated attributes (easy-vqa)

Issue 19's experiment, as POVID / RLAIF-V do it at small scale on CPU (`dpokit experiment vlm`). The protocol and
the decision rule below were committed before the first run.

- **Data**: easy-vqa (MIT; in the `easy-vqa` wheel, read in place): 4,000 train and 1,000 test images of one
  coloured shape (3 shapes, 8 colours) with 38,575 / 9,673 questions (what shape, what colour, yes/no presence).
  Each image's truth (its shape and colour) is read off its own questions. The grocery photos in
  `../shared/data/grocery-64` are not used in this version (a second task for a later version).
- **Model**: a small LLaVA built from scratch (`AutoModelForImageTextToText`): a CLIP-like vision tower on the 64-px
  images with 8-px patches (64 image tokens), a projector and a small Llama, with a BPE tokenizer trained on the
  questions, answers and descriptions. SmolLM2-135M is not used: at its size the warm-up alone would not fit the
  CPU budget.
- **Warm-up** (the "warmed-up model"): supervised on the train images: every easy-vqa question with its answer,
  and "Describe the image." → "a <colour> <shape>." for each image; a fixed budget of one epoch, set before the
  runs. The run counts only if the warm-up hallucinates in at least 10% of the test descriptions (else there is
  nothing to halve).
- **Pairs** (POVID-style): for 2,000 train images, prompt "Describe the image." with the image; chosen = its true
  description; rejected = the same description with one attribute made false (half a wrong colour, half a wrong
  shape, drawn from the other values, seeded).
- **Methods** from the warm-up, same pairs, steps, batch and learning rate: DPO (`sigmoid`, the warm-up as the
  reference, full fine-tuning, vision tower trained) and preferred-FT (`sft` on the chosen descriptions).
- **Measures** on the 1,000 test images, greedy decoding: **hallucination rate** = the share of descriptions that
  name a colour or a shape the image does not show (one of the vocabulary's 8 colours or 3 shapes other than the
  truth); **accuracy** on all 9,673 test questions (exact match of the answer word) — questions the pairs never
  ask; also the share of descriptions naming the true colour and shape.
- **Decision rule** (the issue's goal): DPO meets it when its hallucination rate is at most half the warm-up's and
  its question accuracy is within 2 points of the warm-up's; preferred-FT is measured the same way beside it. If
  the goal is missed: one round of diagnosis and one fix a practitioner would try, reported beside the first result.
"""

from ..config import TrainConfig
from ..families import get_family
from ..recipes.common import write_jsonl
from ..train import train
from . import finish, say, training_log

NAME = "vlm"
COLOURS = ("black", "blue", "brown", "gray", "green", "red", "teal", "yellow")  # easy-vqa's 8 colours
SHAPES = ("circle", "rectangle", "triangle")  # and its 3 shapes
DESCRIBE = "Describe the image."
IMAGE = "<image>"
# Sizes, fixed before the runs. The model: bench_vlm's LLaVA at 64 px with 8-px patches (64 image tokens), a 2-layer
# CLIP tower of width 64 and a 2-layer Llama of width 128. Warm-up: one epoch (the protocol's budget) of `sft`;
# `warmup_rows` None = every row. DPO and preferred-FT: the same pairs, epochs, batch and learning rate.
MODEL = dict(image_size=64, patch_size=8, vision_hidden=64, vision_intermediate=256, vision_layers=2, vision_heads=4,
             hidden_size=128, intermediate_size=344, num_layers=2, num_heads=4, vocab_size=400)
FULL = dict(model=MODEL, warmup_rows=None, warmup_lr=1e-3, warmup_batch=32, pairs=2000, epochs=2, batch_size=16,
            learning_rate=1e-4, beta=0.1, rpo_alpha=None, test_images=None, test_questions=None)
QUICK = dict(FULL, warmup_rows=400, pairs=32, epochs=1, batch_size=8, test_images=20, test_questions=60)
GOAL = {"hallucination_ratio": 0.5, "accuracy_drop": 0.02, "warmup_hallucination_min": 0.10}
READING = "<!-- vlm:reading -->"  # docs text after this marker is hand-written and survives a rerun
PAIR_SEED = 1


# ---------------------------------------------------------------- data


def data_dir() -> Path:
    """easy-vqa's data folder inside the installed wheel (read in place)."""
    try:
        import easy_vqa
    except ImportError:
        from ..errors import DpokitError
        raise DpokitError("`dpokit experiment vlm` needs the easy-vqa wheel: pip install easy-vqa") from None
    return Path(easy_vqa.__file__).parent / "data"


def load_split(split: str, root: Path | None = None) -> tuple[list, dict]:
    """(questions as [question, answer, image_id], {image_id: absolute PNG path}) of `split`."""
    root = Path(root or data_dir()) / split
    questions = json.loads((root / "questions.json").read_text())
    images = {int(p.stem): str(p.resolve()) for p in (root / "images").glob("*.png")}
    return questions, images


def _words(text: str) -> list[str]:
    return re.findall(r"[a-z]+", text.lower())


def truth(questions: list) -> dict[int, tuple[str, str]]:
    """Each image's (colour, shape), read off its own questions: a colour or shape answer; the colour or shape a
    question names beside a shape or colour answer ("what is the blue shape?" → rectangle); a yes/no question about
    one attribute, "not"/"no" flipping it; by elimination, the one value of a kind that no question rules out. A
    contradiction raises; an image whose questions do not settle both is left out."""
    found: dict[int, dict[str, str]] = {}
    absent: dict[int, set] = {}

    def put(i: int, kind: str, value: str):
        old = found.setdefault(i, {}).setdefault(kind, value)
        if old != value:
            raise ValueError(f"image {i}: its questions say both {old} and {value}")

    for q, a, i in questions:
        words = _words(q)
        named = {("colour" if w in COLOURS else "shape"): w for w in words if w in COLOURS or w in SHAPES}
        if a in COLOURS or a in SHAPES:
            put(i, "colour" if a in COLOURS else "shape", a)
            for kind, value in named.items():  # the other attribute the question names is the image's
                put(i, kind, value)
        elif a in ("yes", "no") and len(named) == 1:
            negated = "not" in words or "no" in words
            kind, value = next(iter(named.items()))
            if (a == "yes") != negated:
                put(i, kind, value)
            else:
                absent.setdefault(i, set()).add(value)
    for i, gone in absent.items():
        for kind, values in (("colour", COLOURS), ("shape", SHAPES)):
            left = [v for v in values if v not in gone]
            if len(left) == 1:
                put(i, kind, left[0])
            elif not left or found.get(i, {}).get(kind, left[0]) not in left:
                raise ValueError(f"image {i}: its questions rule out every {kind} or the one they name")
    return {i: (v["colour"], v["shape"]) for i, v in found.items() if "colour" in v and "shape" in v}


def description(colour: str, shape: str) -> str:
    return f"a {colour} {shape}."


def named(text: str) -> tuple[set, set]:
    """The colours and shapes of the vocabulary a text names."""
    words = set(_words(text))
    return words & set(COLOURS), words & set(SHAPES)


def hallucinates(text: str, colour: str, shape: str) -> bool:
    """Whether a description names a colour or a shape the image does not show."""
    colours, shapes = named(text)
    return bool(colours - {colour} or shapes - {shape})


def correct(text: str, colour: str, shape: str) -> bool:
    """Whether a description names the true colour and the true shape (and nothing false)."""
    colours, shapes = named(text)
    return colours == {colour} and shapes == {shape}


def rejected_description(colour: str, shape: str, which: str, rng: random.Random) -> str:
    """The true description with one attribute (`which`: colour or shape) made false, drawn from the other values."""
    if which == "colour":
        return description(rng.choice([c for c in COLOURS if c != colour]), shape)
    return description(colour, rng.choice([s for s in SHAPES if s != shape]))


def pair_rows(truths: dict, images: dict, n: int, seed: int) -> list[dict]:
    """POVID-style pairs for `n` train images (seeded draw): chosen the true description, rejected one attribute made
    false, exactly half (rounded) colour and half shape."""
    rng = random.Random(seed)
    ids = rng.sample(sorted(truths), n)
    kinds = ["colour"] * (n // 2) + ["shape"] * (n - n // 2)
    rng.shuffle(kinds)
    rows = []
    for i, which in zip(ids, kinds):
        colour, shape = truths[i]
        rows.append({"prompt": IMAGE + DESCRIBE, "chosen": " " + description(colour, shape),
                     "rejected": " " + rejected_description(colour, shape, which, rng), "images": [images[i]]})
    return rows


def _other_answer(answer: str, rng: random.Random) -> str:
    for group in (("yes", "no"), COLOURS, SHAPES):
        if answer in group:
            return rng.choice([a for a in group if a != answer])
    return "no" if answer != "no" else "yes"


def warmup_rows(questions: list, truths: dict, images: dict, limit: int | None, seed: int) -> list[dict]:
    """Every train question with its answer and one description per image, as `sft` rows (chosen the target;
    rejected another answer of the same kind, which `sft` ignores but a pair row must hold), shuffled."""
    rng = random.Random(seed)
    rows = [{"prompt": IMAGE + q, "chosen": " " + a, "rejected": " " + _other_answer(a, rng), "images": [images[i]]}
            for q, a, i in questions]
    for i, (colour, shape) in sorted(truths.items()):
        rows.append({"prompt": IMAGE + DESCRIBE, "chosen": " " + description(colour, shape),
                     "rejected": " " + rejected_description(colour, shape, "colour", rng), "images": [images[i]]})
    rng.shuffle(rows)
    return rows[:limit] if limit else rows


def corpus(questions: list) -> list[str]:
    texts = sorted({q for q, _, _ in questions}) + [DESCRIBE] + list(COLOURS) + list(SHAPES) + ["yes", "no"]
    texts += [description(c, s) for c in COLOURS for s in SHAPES]
    return texts * 3


# ---------------------------------------------------------------- model


def build(path: Path, texts: list[str], model: dict, seed: int) -> None:
    """A LLaVA with random weights and its processor at `path`: bench_vlm's config at this experiment's sizes and
    a BPE tokenizer trained on `texts` (the task's questions, answers and descriptions: its `corpus`)."""
    import torch
    from transformers import CLIPImageProcessor, LlavaForConditionalGeneration, LlavaProcessor

    from ..bench_vlm import VLMSettings, llava_config
    from ..tiny import build_tokenizer

    s = VLMSettings(**model, seed=seed)
    tok = build_tokenizer(texts, vocab_size=s.vocab_size, extra_special_tokens=[IMAGE])
    images = CLIPImageProcessor(size={"shortest_edge": s.image_size},
                                crop_size={"height": s.image_size, "width": s.image_size})
    processor = LlavaProcessor(image_processor=images, tokenizer=tok, patch_size=s.patch_size,
                               vision_feature_select_strategy="default", num_additional_image_tokens=1,
                               chat_template=get_family("vlm").chat_template(IMAGE))
    torch.manual_seed(seed)
    LlavaForConditionalGeneration(llava_config(s, tok)).save_pretrained(path)
    processor.save_pretrained(path)


def tune(model_dir: str, rows: list[dict], out: Path, loss_type: str, lr: float, batch: int, epochs: int,
         beta: float, seed: int, scheduler: str = "constant", rpo_alpha: float | None = None):
    """`sft` or DPO through dpokit's loop, full fine-tuning with the vision tower trained; the train result."""
    data = out.parent / f"{out.name}.jsonl"
    write_jsonl(rows, data)
    cfg = TrainConfig(model=model_dir, family="vlm", train_data=str(data), output_dir=str(out), loss_type=loss_type,
                      beta=beta, rpo_alpha=rpo_alpha, learning_rate=lr, lr_scheduler_type=scheduler,
                      num_train_epochs=epochs,
                      per_device_train_batch_size=batch, max_length=None, max_prompt_length=None, dtype="float32",
                      logging_steps=20, save_steps=10 ** 6, seed=seed, disable_tqdm=True, report_to=[],
                      ref_cache_dir=str(out.parent / "cache"),
                      family_config={"full_finetune": True, "train_vision_tower": True})
    return train(cfg)


# ---------------------------------------------------------------- measures


def describe_images(model, processor, ids: list[int], images: dict, max_new_tokens: int = 10) -> list[str]:
    """Greedy descriptions through the family's sampler (`max_new_tokens`: room for the task's longest
    description)."""
    prompts = [{"prompt": IMAGE + DESCRIBE, "images": [images[i]]} for i in ids]
    done = get_family("vlm").sample(model, processor, prompts, temperature=0, max_new_tokens=max_new_tokens)
    return [c.text for c in done]


def answer_questions(model, processor, questions: list, images: dict, batch: int = 64,
                     max_new_tokens: int = 4) -> list[str]:
    """Greedy answers, batched: prompts of the same token length go together, so no padding is needed and each
    reply is what the sampler would give alone."""
    import torch
    from PIL import Image

    tok = processor.tokenizer
    groups: dict[int, list[int]] = {}
    for k, (q, _, _) in enumerate(questions):
        groups.setdefault(len(tok(IMAGE + q, add_special_tokens=False)["input_ids"]), []).append(k)
    out = [""] * len(questions)
    cache: dict[int, object] = {}
    model.eval()
    with torch.no_grad():
        for ks in groups.values():
            for start in range(0, len(ks), batch):
                part = ks[start:start + batch]
                pics = []
                for k in part:
                    i = questions[k][2]
                    if i not in cache:
                        cache[i] = Image.open(images[i]).convert("RGB")
                    pics.append([cache[i]])
                inputs = processor(text=[IMAGE + questions[k][0] for k in part], images=pics,
                                   add_special_tokens=False, return_tensors="pt")
                seqs = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False,
                                      pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
                width = inputs["input_ids"].shape[1]
                for k, row in zip(part, seqs[:, width:].tolist()):
                    end = row.index(tok.eos_token_id) if tok.eos_token_id in row else len(row)
                    out[k] = tok.decode(row[:end], skip_special_tokens=True)
    return out


def first_word(text: str) -> str:
    words = _words(text)
    return words[0] if words else ""


def evaluate(model_dir: str, test_q: list, test_truth: dict, images: dict, ids: list[int]) -> dict:
    family = get_family("vlm")
    model, processor = family.load_trained(model_dir)
    t = time.time()
    texts = describe_images(model, processor, ids, images)
    t_desc = time.time() - t
    answers = answer_questions(model, processor, test_q, images)
    hall = [hallucinates(x, *test_truth[i]) for x, i in zip(texts, ids)]
    right = [correct(x, *test_truth[i]) for x, i in zip(texts, ids)]
    acc = [first_word(a) == ans for a, (_, ans, _) in zip(answers, test_q)]
    kinds = {"colour": lambda a: a in COLOURS, "shape": lambda a: a in SHAPES, "yes/no": lambda a: a in ("yes", "no")}
    by_kind = {name: sum(ok for ok, (_, a, _) in zip(acc, test_q) if f(a)) / max(1, sum(f(a) for _, a, _ in test_q))
               for name, f in kinds.items()}
    examples = {}
    for x in texts:
        examples[x] = examples.get(x, 0) + 1
    return {"hallucination_rate": sum(hall) / len(hall), "correct_rate": sum(right) / len(right),
            "accuracy": sum(acc) / len(acc), "accuracy_by_kind": by_kind,
            "colour_hallucination": sum(bool(named(x)[0] - {test_truth[i][0]}) for x, i in zip(texts, ids)) / len(ids),
            "shape_hallucination": sum(bool(named(x)[1] - {test_truth[i][1]}) for x, i in zip(texts, ids)) / len(ids),
            "descriptions": len(texts), "questions": len(test_q), "describe_s": round(t_desc, 1),
            "top_descriptions": sorted(examples.items(), key=lambda kv: -kv[1])[:5]}


def verdict(warm: dict, dpo: dict) -> dict:
    """The decision rule applied to the measured figures."""
    checks = {"warmup_hallucinates_at_least_10pct": warm["hallucination_rate"] >= GOAL["warmup_hallucination_min"],
              "hallucination_halved":
                  dpo["hallucination_rate"] <= GOAL["hallucination_ratio"] * warm["hallucination_rate"],
              "accuracy_within_2_points": dpo["accuracy"] >= warm["accuracy"] - GOAL["accuracy_drop"]}
    return {**checks, "met": all(checks.values())}


# ---------------------------------------------------------------- the run


def train_arms(fresh: Path, rows: list[dict], pairs: list[dict], out: Path, size: dict, seed: int, t0: float,
               warmup_epochs: int = 1) -> tuple[dict, dict, float]:
    """The warm-up (`sft` from `fresh` on `rows`), then preferred-FT and DPO from it on `pairs` with the same steps,
    batch and learning rate: (model folder by arm, training log by arm, the warm-up's minutes)."""
    t = time.time()
    warm = tune(str(fresh), rows, out / "warmup", "sft", size["warmup_lr"], size["warmup_batch"], warmup_epochs, 0.1,
                seed, scheduler="cosine")
    warm_min = (time.time() - t) / 60
    say(t0, f"warm-up: {len(rows)} rows, {warm.global_step} steps in {warm_min:.1f} min")
    models, logs = {"warmup": str(warm.output_dir)}, {"warmup": training_log(warm)}
    for key, loss in (("sft", "sft"), ("dpo", "sigmoid")):
        r = tune(models["warmup"], pairs, out / key, loss, size["learning_rate"], size["batch_size"], size["epochs"],
                 size["beta"], seed, rpo_alpha=size.get("rpo_alpha") if key == "dpo" else None)
        models[key], logs[key] = str(r.output_dir), training_log(r)
        say(t0, f"{key}: {r.global_step} steps")
    return models, logs, warm_min


def measure_arms(results: dict, models: dict, measure, t0: float) -> None:
    """Each arm's figures (`measure(model folder)`) into `results`, then the decision rule on them."""
    for key, path in models.items():
        results[key] = measure(path)
        say(t0, f"{key}: " + ", ".join(f"{k} {v:.4g}" for k, v in results[key].items() if isinstance(v, float)))
    results["verdict"] = verdict(results["warmup"], results["dpo"])


def run(out_dir: str | Path = "runs/vlm", size: dict | None = None, seed: int = 0, docs_dir: str | Path | None = None,
        command: str = "dpokit experiment vlm") -> dict:
    """The protocol; writes vlm.json (and the docs section) and returns the results."""
    size = dict(size or FULL)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    train_q, train_img = load_split("train")
    test_q, test_img = load_split("test")
    train_truth, test_truth = truth(train_q), truth(test_q)
    say(t0, f"easy-vqa: {len(train_q)} train / {len(test_q)} test questions; truth read for {len(train_truth)} / "
             f"{len(test_truth)} of {len(train_img)} / {len(test_img)} images")
    test_ids = sorted(test_truth)[:size["test_images"]] if size["test_images"] else sorted(test_truth)
    if size["test_questions"]:
        test_q = random.Random(seed).sample(test_q, size["test_questions"])

    fresh = out / "fresh"
    build(fresh, corpus(train_q), size["model"], seed)
    rows = warmup_rows(train_q, train_truth, train_img, size["warmup_rows"], seed)
    pairs = pair_rows(train_truth, train_img, size["pairs"], PAIR_SEED + 10 * seed)
    models, logs, warm_min = train_arms(fresh, rows, pairs, out, size, seed, t0)
    results = {"command": command, "seed": seed, "size": size, "pairs": len(pairs), "warmup_rows": len(rows),
               "warmup_minutes": round(warm_min, 1), "logs": logs}
    measure_arms(results, models, lambda path: evaluate(path, test_q, test_truth, test_img, test_ids), t0)
    results["minutes"] = round((time.time() - t0) / 60, 1)
    finish(results, out, NAME, format_table(results), docs_dir, markdown_section(results), keep=READING)
    return results


ROWS = (("warmup", "warm-up"), ("sft", "preferred-FT"), ("dpo", "DPO"))


def format_table(results: dict) -> str:
    lines = [f"{'model':<14}{'halluc.':>9}{'colour':>8}{'shape':>8}{'true desc':>11}{'QA acc':>9}"
             f"{'yes/no':>8}{'colour':>8}{'shape':>8}"]
    for key, label in ROWS:
        r = results[key]
        k = r["accuracy_by_kind"]
        lines.append(f"{label:<14}{r['hallucination_rate']:>9.1%}{r['colour_hallucination']:>8.1%}"
                     f"{r['shape_hallucination']:>8.1%}{r['correct_rate']:>11.1%}{r['accuracy']:>9.2%}"
                     f"{k['yes/no']:>8.1%}{k['colour']:>8.1%}{k['shape']:>8.1%}")
    lines.append(verdict_line(results["verdict"]))
    return "\n".join(lines)


def log_phrase(log: dict) -> str:
    """A `training_log`'s steps and first → last loss, margins and accuracies, as the docs' run description says
    them (shared by both vlm tasks' sections)."""
    first, last = log.get("first", {}), log.get("last", {})
    parts = [f"{log['steps']} steps"]
    for name in ("loss", "rewards/margins", "rewards/accuracies"):
        if name in first and name in last:
            parts.append(f"{name} {first[name]:.3f} → {last[name]:.3f}")
    return ", ".join(parts)


def rpo_phrase(size: dict) -> str:
    """The words the docs add to DPO's description when `--rpo-alpha` was given."""
    return f", plus {size['rpo_alpha']:g} × the chosen replies' NLL (RPO)" if size.get("rpo_alpha") else ""


def model_phrase(m: dict) -> str:
    """The model's sizes as the docs' run description says them."""
    return (f"Model: CLIP tower {m['vision_layers']}\nlayers × {m['vision_hidden']} on {m['image_size']}-px images "
            f"with {m['patch_size']}-px patches, a Llama of\n{m['num_layers']} layers × {m['hidden_size']}, a "
            f"{m['vocab_size']}-token BPE tokenizer.")


def methods_phrase(results: dict) -> str:
    """DPO's and preferred-FT's settings and training logs as the docs' run description says them."""
    s, logs = results["size"], results["logs"]
    return (f"{results['pairs']} pairs; DPO\n(β = {s['beta']:g}{rpo_phrase(s)}) and preferred-FT {s['epochs']} "
            f"epochs at batch {s['batch_size']}, learning rate\n{s['learning_rate']:g} (constant), full "
            f"fine-tuning, vision tower trained. DPO: {log_phrase(logs['dpo'])}. Preferred-FT:\n"
            f"{log_phrase(logs['sft'])}.")


def goal_sentence(results: dict) -> str:
    """The decision rule read off the figures, one sentence: the same goal for every vlm task."""
    v, w, d = results["verdict"], results["warmup"], results["dpo"]
    ratio = d["hallucination_rate"] / w["hallucination_rate"] if w["hallucination_rate"] else float("nan")
    return (f"DPO's hallucination rate is {ratio:.2f}× the warm-up's (goal ≤ {GOAL['hallucination_ratio']:g}×), "
            "its "
            f"question accuracy {100 * (d['accuracy'] - w['accuracy']):+.2f} points (goal ≥ "
            f"{-100 * GOAL['accuracy_drop']:g}); the warm-up hallucinates in {w['hallucination_rate']:.1%} of the "
            f"test descriptions (the run counts at ≥ {GOAL['warmup_hallucination_min']:.0%}): "
            f"**goal {'met' if v['met'] else 'missed'}**"
            + ("" if v["met"] else " (" + ", ".join(k for k, ok in v.items() if not ok and k != "met") + ")") + ".")


def verdict_line(verdict: dict) -> str:
    """The printed table's last line."""
    return "goal met" if verdict["met"] else "goal missed: " + ", ".join(k for k, ok in verdict.items() if not ok)


def markdown_section(results: dict) -> str:
    s = results["size"]
    table = ["| model | hallucination rate | wrong colour | wrong shape | true colour and shape | question accuracy | "
             "yes/no | colour | shape |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for key, label in ROWS:
        r = results[key]
        k = r["accuracy_by_kind"]
        table.append(f"| {label} | {r['hallucination_rate']:.1%} | {r['colour_hallucination']:.1%} | "
                     f"{r['shape_hallucination']:.1%} | {r['correct_rate']:.1%} | {r['accuracy']:.2%} | "
                     f"{k['yes/no']:.1%} | {k['colour']:.1%} | {k['shape']:.1%} |")
    w = results["warmup"]
    return f"""<!-- vlm:begin -->
{PROTOCOL}
### Results

Rerun: `{results['command']}` ({results['minutes']} min on this machine). {model_phrase(s['model'])} Warm-up: `sft` on
{results['warmup_rows']} rows (questions and descriptions), one epoch at batch {s['warmup_batch']}, learning rate
{s['warmup_lr']:g} (cosine), {results['warmup_minutes']} min ({log_phrase(results['logs']['warmup'])}). \
{methods_phrase(results)} Measured on {w['descriptions']} test descriptions and {w['questions']} test questions, greedy.

{chr(10).join(table)}

{goal_sentence(results)}

{READING}
(The reading of these figures is written by hand after the runs; a rerun keeps it.)
<!-- vlm:end -->
"""
