"""`dpokit experiment vlm --task grocery`: the vlm experiment's second task, on real photos (grocery-64).

The protocol and decision rule were committed to docs/experiments.md before the first run; `PROTOCOL` below is that
text, verbatim. The model, its warm-up and DPO/preferred-FT loop, the sampler, the goal and the verdict are
experiments/vlm.py's; this module holds what is the task's own: reading the photos and class table, the readable
class names, the warm-up rows, the POVID-style pairs (another product's description as the rejected reply, half a
near miss), the hallucination scorer and the questions outside the pairs.
"""

from __future__ import annotations

import csv
import random
import re
import time
from dataclasses import dataclass
from pathlib import Path

from ..errors import DpokitError
from . import finish, say
from .vlm import (DESCRIBE, IMAGE, MODEL, ROWS, answer_questions, build, describe_images, goal_sentence,
                  log_phrase, measure_arms, methods_phrase, model_phrase, train_arms, verdict_line)

PROTOCOL = """\
## Vision-language DPO: fewer hallucinated products (grocery photos)

The vlm experiment's second task (`dpokit experiment vlm --task grocery`): the same question as on easy-vqa, on
real photos. The protocol and the decision rule below were committed before the first run.

- **Data**: GroceryStoreDataset (Klasson et al. 2019, MIT) as `../shared/data/grocery-64` holds it, read in place
  (`--data DIR` for another copy): smartphone photos of fruit, vegetables and packaged products on shop shelves,
  64×64 RGB; the upstream splits, 2,640 train and 2,485 test images (`val` is not used), 81 fine classes in 43 coarse
  ones, each coarse class under one top level (Fruit, Vegetables or Packages, from the class table's paths). The
  upstream product texts (`descriptions.jsonl`) are not used: their first sentences name the product in ways the
  class names do not (and some are 500 characters), which would leave the scorer guessing.
- **Readable names**: a fine class's name with hyphens as spaces, followed by its coarse name in lower case when the
  fine name does not already contain it ("Golden-Delicious" in Apple → "Golden Delicious apple", "Anjou" in Pear →
  "Anjou pear", "Oatly-Oat-Milk" in Oat-Milk → "Oatly Oat Milk"); a coarse class's name in lower case ("oat milk");
  the top levels as "fruit", "vegetable" and "packaged product".
- **Model**: the easy-vqa task's small LLaVA built from scratch (64-px images, 8-px patches, 64 image tokens, a
  2-layer CLIP-like tower of width 64, a 2-layer Llama of width 128), its BPE tokenizer (600 tokens) trained on this
  task's questions, answers and descriptions.
- **Warm-up** (the "warmed-up model"): dpokit's `sft` on three rows per train image: "What is this product?" → its
  readable fine name; "Is this a fruit, a vegetable or a packaged product?" → its top level; "Describe the image." →
  "a <fine name>, a kind of <coarse name>." (this template, not the product text); a fixed budget of 8 epochs, set
  before the runs. The run counts only if the warm-up hallucinates in at least 10% of the test descriptions.
- **Pairs** (POVID-style): for 2,000 train images (seeded draw), prompt "Describe the image." with the image;
  chosen = its true description; rejected = the description of another product: exactly half a near miss (another
  fine class of the same coarse class; for the 31 fine classes alone in their coarse class, another fine class of
  the same top level), half any of the 80 other fine classes, seeded.
- **Methods** from the warm-up, same pairs, steps, batch and learning rate as on easy-vqa: DPO (`sigmoid`, the
  warm-up as the reference, full fine-tuning, vision tower trained) and preferred-FT (`sft` on the chosen
  descriptions).
- **Measures** on the 2,485 test images, greedy decoding: **hallucination rate** = the share of descriptions that
  name a fine class or a coarse class the image is not (class names found as whole words, longest fine names first,
  then coarse names in the words left); beside it the share that names a wrong coarse class (a wrong kind, not just
  a wrong variety) and the share that names the true product and nothing false. **Accuracy** on the questions
  outside the pairs — the pairs only ask for a description — : "What is this product?" and the top-level question
  on every test image (4,970 questions, exact match of the readable name, case and punctuation aside), also
  reported per question.
- **Decision rule** (the easy-vqa task's goal, unchanged): DPO meets it when its hallucination rate is at most half
  the warm-up's and its question accuracy is within 2 points of the warm-up's; preferred-FT is measured the same
  way beside it. If the goal is missed: one round of diagnosis and one fix a practitioner would try, reported
  beside the first result.
"""

NAME = "vlm-grocery"
READING = "<!-- vlm-grocery:reading -->"  # docs text after this marker is hand-written and survives a rerun
DEFAULT_DATA = Path("..") / "shared" / "data" / "grocery-64"  # from the repo root, as /work/shared/README.md says
FILES = ("train.npz", "test.npz", "classes.csv")
PRODUCT = "What is this product?"
TOP_LEVEL = "Is this a fruit, a vegetable or a packaged product?"
TOP_LEVELS = {"Fruit": "fruit", "Vegetables": "vegetable", "Packages": "packaged product"}
# Sizes, fixed before the runs: the easy-vqa task's model with room in the tokenizer for the product names; a warm-up
# of 8 epochs over the 7,920 rows (3 per train image) at the easy-vqa task's batch and rate; DPO and preferred-FT as
# there. Replies get room for the longest name ("God Morgon Orange Red Grapefruit Juice").
FULL = dict(model=dict(MODEL, vocab_size=600), warmup_rows=None, warmup_epochs=8, warmup_lr=1e-3, warmup_batch=32,
            pairs=2000, epochs=2, batch_size=16, learning_rate=1e-4, beta=0.1, rpo_alpha=None, test_images=None,
            describe_tokens=32, answer_tokens=24)
QUICK = dict(FULL, warmup_rows=400, warmup_epochs=1, pairs=32, epochs=1, batch_size=8, test_images=20)
PAIR_SEED = 1


# ---------------------------------------------------------------- classes and names


@dataclass(frozen=True)
class Catalogue:
    """The class table in readable words: per fine class its name, coarse class and top level; per coarse class its
    name."""
    fine: tuple[str, ...]
    coarse_of: tuple[int, ...]
    top_of: tuple[str, ...]
    coarse: tuple[str, ...]

    def description(self, f: int) -> str:
        """The warm-up's and the pairs' description of fine class `f` (an article that reads right)."""
        article = "an" if self.fine[f][0].lower() in "aeiou" else "a"
        return f"{article} {self.fine[f]}, a kind of {self.coarse[self.coarse_of[f]]}."


def readable_coarse(coarse_name: str) -> str:
    """"Oat-Milk" → "oat milk"."""
    return coarse_name.replace("-", " ").lower()


def readable_fine(class_name: str, coarse_name: str) -> str:
    """The fine name with hyphens as spaces, plus the coarse name when the fine name does not already say it, so a
    variety reads as the product it is ("Golden-Delicious", Apple → "Golden Delicious apple")."""
    name, coarse = class_name.replace("-", " "), readable_coarse(coarse_name)
    return name if coarse in name.lower() else f"{name} {coarse}"


def read_catalogue(path: Path) -> Catalogue:
    """classes.csv (the upstream table: fine name and id, coarse name and id, iconic image path) as a `Catalogue`;
    the top level is the path's first folder under iconic-images-and-descriptions."""
    rows = sorted((int(r[1]), r[0], int(r[3]), r[2], r[4]) for r in list(csv.reader(path.open(encoding="utf-8")))[1:])
    if [r[0] for r in rows] != list(range(len(rows))):
        raise DpokitError(f"{path}: fine class ids are not 0..{len(rows) - 1}")
    coarse = {c: readable_coarse(name) for _, _, c, name, _ in rows}
    tops = [Path(p).parts[2] for *_, p in rows]
    if set(tops) - set(TOP_LEVELS):
        raise DpokitError(f"{path}: unknown top levels {sorted(set(tops) - set(TOP_LEVELS))}")
    return Catalogue(fine=tuple(readable_fine(n, cn) for _, n, _, cn, _ in rows),
                     coarse_of=tuple(c for _, _, c, _, _ in rows), top_of=tuple(TOP_LEVELS[t] for t in tops),
                     coarse=tuple(coarse[c] for c in range(len(coarse))))


# ---------------------------------------------------------------- data


def find_data(path: str | Path | None) -> Path:
    """The grocery-64 folder (`path`, or ../shared/data/grocery-64 from the working dir or the checkout), checked for
    its files before anything runs: a missing or incomplete folder is one DpokitError line."""
    checkout = Path(__file__).resolve().parents[3] / DEFAULT_DATA
    candidates = [Path(path)] if path else [Path.cwd() / DEFAULT_DATA, checkout]
    for root in candidates:
        missing = [f for f in FILES if not (root / f).is_file()]
        if not missing:
            return root.resolve()
    where = str(candidates[0]) if path else f"{DEFAULT_DATA} (from here or the checkout)"
    raise DpokitError(f"{where}: not a grocery-64 folder (needs {', '.join(FILES)}); pass --data DIR")


def load_split(root: Path, split: str) -> tuple:
    """(images uint8 [N,64,64,3], fine labels) of `split`; an unreadable or malformed file is one DpokitError line."""
    import numpy as np

    try:
        with np.load(root / f"{split}.npz") as d:
            images, fine = d["images"], d["fine_label"].astype(int)
    except Exception as e:  # a truncated zip, a missing member, not an npz at all: one line, not a traceback
        raise DpokitError(f"{root / split}.npz: cannot read images and fine_label ({e})") from None
    if images.ndim != 4 or images.shape[-1] != 3 or len(images) != len(fine):
        raise DpokitError(f"{root / split}.npz: images {images.shape} and {len(fine)} labels do not match")
    return images, fine


def write_images(images, folder: Path) -> dict[int, str]:
    """Each image as a PNG under `folder` (the run's own copy: the family reads images from paths), kept across
    reruns; {index: absolute path}."""
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    paths = {}
    for i, pixels in enumerate(images):
        p = folder / f"{i:05d}.png"
        if not p.exists():
            Image.fromarray(pixels).save(p)
        paths[i] = str(p.resolve())
    return paths


# ---------------------------------------------------------------- rows


def questions(labels, cat: Catalogue, ids) -> list[list]:
    """The questions outside the pairs, as [question, answer, image id]: the product and the top level of each
    image."""
    rows = []
    for i in ids:
        f = int(labels[i])
        rows += [[PRODUCT, cat.fine[f], i], [TOP_LEVEL, cat.top_of[f], i]]
    return rows


def near_misses(cat: Catalogue, f: int) -> list[int]:
    """The fine classes a near-miss rejected description is drawn from: the other varieties of `f`'s coarse class,
    or, when it has none, the other products of its top level (or, in a table where it is alone there too, any other
    product: a rejected reply must always name another product)."""
    others = [g for g in range(len(cat.fine)) if g != f]
    return ([g for g in others if cat.coarse_of[g] == cat.coarse_of[f]]
            or [g for g in others if cat.top_of[g] == cat.top_of[f]] or others)


def rejected_class(cat: Catalogue, f: int, near: bool, rng: random.Random) -> int:
    """Another product for `f`'s rejected description: a near miss, or any of the other fine classes."""
    return rng.choice(near_misses(cat, f) if near else [g for g in range(len(cat.fine)) if g != f])


def pair_rows(labels, images: dict, cat: Catalogue, n: int, seed: int) -> list[dict]:
    """POVID-style pairs for `n` train images (seeded draw): chosen the true description, rejected another
    product's, exactly half (rounded down) a near miss."""
    rng = random.Random(seed)
    ids = rng.sample(sorted(images), n)
    near = [True] * (n // 2) + [False] * (n - n // 2)
    rng.shuffle(near)
    rows = []
    for i, close in zip(ids, near):
        f = int(labels[i])
        rows.append({"prompt": IMAGE + DESCRIBE, "chosen": " " + cat.description(f),
                     "rejected": " " + cat.description(rejected_class(cat, f, close, rng)), "images": [images[i]]})
    return rows


def warmup_rows(labels, images: dict, cat: Catalogue, limit: int | None, seed: int) -> list[dict]:
    """Three `sft` rows per train image (its product, its top level, its description), shuffled; the rejected reply
    (which `sft` ignores but a pair row must hold) is another product's or another top level."""
    rng = random.Random(seed)
    rows = []
    for i in sorted(images):
        f = int(labels[i])
        g = rejected_class(cat, f, False, rng)
        other_top = rng.choice(sorted(set(TOP_LEVELS.values()) - {cat.top_of[f]}))
        for prompt, chosen, rejected in ((PRODUCT, cat.fine[f], cat.fine[g]), (TOP_LEVEL, cat.top_of[f], other_top),
                                         (DESCRIBE, cat.description(f), cat.description(g))):
            rows.append({"prompt": IMAGE + prompt, "chosen": " " + chosen, "rejected": " " + rejected,
                         "images": [images[i]]})
    rng.shuffle(rows)
    return rows[:limit] if limit else rows


def corpus(cat: Catalogue) -> list[str]:
    """The tokenizer's training texts: the questions and every answer and description the task has."""
    texts = [PRODUCT, TOP_LEVEL, DESCRIBE, *TOP_LEVELS.values(), *cat.fine, *cat.coarse]
    texts += [cat.description(f) for f in range(len(cat.fine))]
    return texts * 3


# ---------------------------------------------------------------- scorers


def _words(text: str) -> list[str]:
    return re.findall(r"[a-z]+", text.lower())


def _find(words: list[str], names: tuple[str, ...], free: list[bool]) -> set[int]:
    """The names (as word sequences) found among the `free` words, longest first at each position; the words a
    found name covers stop being free, so "Bravo Apple Juice" is one product and not also the apple class."""
    seqs = sorted(((tuple(_words(n)), k) for k, n in enumerate(names)), key=lambda s: -len(s[0]))
    found = set()
    for start in range(len(words)):
        for seq, k in seqs:
            end = start + len(seq)
            if tuple(words[start:end]) == seq and all(free[start:end]):
                found.add(k)
                free[start:end] = [False] * len(seq)
                break
    return found


def named(text: str, cat: Catalogue) -> tuple[set, set]:
    """(fine classes, coarse classes) a text names: fine names first, then coarse names in the words left."""
    words = _words(text)
    free = [True] * len(words)
    fine = _find(words, cat.fine, free)
    return fine, _find(words, cat.coarse, free)


def hallucinates(text: str, f: int, cat: Catalogue) -> bool:
    """Whether a description names a fine class or a coarse class the image (of fine class `f`) is not."""
    fine, coarse = named(text, cat)
    return bool(fine - {f} or coarse - {cat.coarse_of[f]})


def wrong_kind(text: str, f: int, cat: Catalogue) -> bool:
    """Whether a description names a product of another coarse class (directly or through a fine name): a wrong
    kind, not only a wrong variety."""
    fine, coarse = named(text, cat)
    return bool(({cat.coarse_of[g] for g in fine} | coarse) - {cat.coarse_of[f]})


def correct(text: str, f: int, cat: Catalogue) -> bool:
    """Whether a description names the true product and nothing false."""
    fine, coarse = named(text, cat)
    return fine == {f} and coarse <= {cat.coarse_of[f]}


def same_answer(reply: str, answer: str) -> bool:
    """Exact match of a reply with a readable name, case and punctuation aside."""
    return _words(reply) == _words(answer)


# ---------------------------------------------------------------- measures and the run


def evaluate(model_dir: str, labels, images: dict, ids: list[int], cat: Catalogue, size: dict) -> dict:
    """Hallucination measures of greedy descriptions of the test images `ids`, and accuracy on their questions."""
    from ..families import get_family

    model, processor = get_family("vlm").load_trained(model_dir)
    t = time.time()
    texts = describe_images(model, processor, ids, images, max_new_tokens=size["describe_tokens"])
    t_desc = time.time() - t
    qa = questions(labels, cat, ids)
    answers = answer_questions(model, processor, qa, images, max_new_tokens=size["answer_tokens"])
    ok = [same_answer(a, ans) for a, (_, ans, _) in zip(answers, qa)]
    by_question = {q: sum(k for k, (qq, _, _) in zip(ok, qa) if qq == q) / max(1, sum(qq == q for qq, _, _ in qa))
                   for q in (PRODUCT, TOP_LEVEL)}
    truth = [int(labels[i]) for i in ids]

    def share(test) -> float:
        return sum(test(x, f, cat) for x, f in zip(texts, truth)) / len(ids)

    examples: dict[str, int] = {}
    for x in texts:
        examples[x] = examples.get(x, 0) + 1
    return {"hallucination_rate": share(hallucinates), "wrong_kind_rate": share(wrong_kind),
            "correct_rate": share(correct), "accuracy": sum(ok) / len(ok),
            "product_accuracy": by_question[PRODUCT], "top_level_accuracy": by_question[TOP_LEVEL],
            "descriptions": len(texts), "questions": len(qa), "describe_s": round(t_desc, 1),
            "top_descriptions": sorted(examples.items(), key=lambda kv: -kv[1])[:5]}


def run(out_dir: str | Path = "runs/vlm-grocery", size: dict | None = None, seed: int = 0,
        data: str | Path | None = None, docs_dir: str | Path | None = None,
        command: str = "dpokit experiment vlm --task grocery") -> dict:
    """The protocol; writes vlm-grocery.json (and the docs section) and returns the results."""
    size = dict(size or FULL)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    root = find_data(data)
    cat = read_catalogue(root / "classes.csv")
    train_x, train_y = load_split(root, "train")
    test_x, test_y = load_split(root, "test")
    train_img = write_images(train_x, out / "images" / "train")
    test_img = write_images(test_x, out / "images" / "test")
    say(t0, f"grocery-64: {len(train_img)} train / {len(test_img)} test images, {len(cat.fine)} fine / "
             f"{len(cat.coarse)} coarse classes")
    test_ids = sorted(test_img)
    if size["test_images"]:
        test_ids = sorted(random.Random(seed).sample(test_ids, size["test_images"]))

    fresh = out / "fresh"
    build(fresh, corpus(cat), size["model"], seed)
    rows = warmup_rows(train_y, train_img, cat, size["warmup_rows"], seed)
    pairs = pair_rows(train_y, train_img, cat, size["pairs"], PAIR_SEED + 10 * seed)
    models, logs, warm_min = train_arms(fresh, rows, pairs, out, size, seed, t0, size["warmup_epochs"])
    results = {"command": command, "seed": seed, "size": size, "data": str(root), "pairs": len(pairs),
               "near_miss_pairs": size["pairs"] // 2, "warmup_rows": len(rows), "warmup_minutes": round(warm_min, 1),
               "logs": logs}
    measure_arms(results, models, lambda path: evaluate(path, test_y, test_img, test_ids, cat, size), t0)
    results["minutes"] = round((time.time() - t0) / 60, 1)
    finish(results, out, NAME, format_table(results), docs_dir, markdown_section(results), keep=READING)
    return results


def format_table(results: dict) -> str:
    lines = [f"{'model':<14}{'halluc.':>9}{'wrong kind':>12}{'true desc':>11}{'QA acc':>9}{'product':>9}"
             f"{'top level':>11}"]
    for key, label in ROWS:
        r = results[key]
        lines.append(f"{label:<14}{r['hallucination_rate']:>9.1%}{r['wrong_kind_rate']:>12.1%}"
                     f"{r['correct_rate']:>11.1%}{r['accuracy']:>9.2%}{r['product_accuracy']:>9.1%}"
                     f"{r['top_level_accuracy']:>11.1%}")
    lines.append(verdict_line(results["verdict"]))
    return "\n".join(lines)


def markdown_section(results: dict) -> str:
    s, w = results["size"], results["warmup"]
    table = ["| model | hallucination rate | wrong kind | true product only | question accuracy | product | "
             "top level |", "|---|---:|---:|---:|---:|---:|---:|"]
    for key, label in ROWS:
        r = results[key]
        table.append(f"| {label} | {r['hallucination_rate']:.1%} | {r['wrong_kind_rate']:.1%} | "
                     f"{r['correct_rate']:.1%} | {r['accuracy']:.2%} | {r['product_accuracy']:.1%} | "
                     f"{r['top_level_accuracy']:.1%} |")
    return f"""<!-- {NAME}:begin -->
{PROTOCOL}
### Results

Rerun: `{results['command']}` ({results['minutes']} min on this machine). {model_phrase(s['model'])} Warm-up: `sft` on
{results['warmup_rows']} rows (product, top level and description of each train image), {s['warmup_epochs']}
epochs at batch {s['warmup_batch']}, learning rate {s['warmup_lr']:g} (cosine), {results['warmup_minutes']} min
({log_phrase(results['logs']['warmup'])}). {methods_phrase(results)} Measured on {w['descriptions']} test
descriptions and {w['questions']} test questions, greedy.

{chr(10).join(table)}

{goal_sentence(results)}

{READING}
(The reading of these figures is written by hand after the runs; a rerun keeps it.)
<!-- {NAME}:end -->
"""

