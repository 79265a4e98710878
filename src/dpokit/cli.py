"""`dpokit` command line. A user error prints one line and exits 2; no traceback."""

from __future__ import annotations

import argparse
import logging
import os
import sys

from .errors import DpokitError


def _train(args) -> None:
    from .config import load_config
    from .train import train

    cfg = load_config(args.config, args.overrides)
    if cfg.online:
        from .online import run_online

        online = run_online(cfg)
        print(f"online DPO: {len(online.rounds) - 1} rounds; final policy in {online.policy}; "
              f"per-round log in {online.output_dir / 'online.jsonl'}")
        return
    result = train(cfg)
    print(f"trained {result.global_step} steps; model and metrics in {result.output_dir}")
    from .report_samples import write_sample_grids

    grids = write_sample_grids(result.output_dir, cfg)  # after training, never inside the loop
    if grids:
        print(f"sample grids of the base and the trained model: {', '.join(map(str, grids))}")


def _demo(args) -> None:
    import json

    from .io import write_text

    if args.task == "diffusion":
        from .experiments import diffusion

        results = diffusion.run(args.output_dir or "runs/demo-diffusion", seed=args.seed,
                                size=diffusion.QUICK if args.quick else diffusion.DEMO,
                                command="dpokit demo diffusion" + (" --quick" if args.quick else ""))
    elif args.task == "policy":
        from .experiments import policy

        results = policy.run(args.output_dir or "runs/demo-policy", seed=args.seed,
                             size=policy.QUICK if args.quick else policy.DEMO,
                             command="dpokit demo policy" + (" --quick" if args.quick else ""))
    elif args.task == "recommender":
        from .experiments import recommender

        results = recommender.run(args.output_dir or "runs/demo-recommender", seed=args.seed,
                                  size=recommender.QUICK if args.quick else recommender.DEMO,
                                  command="dpokit demo recommender" + (" --quick" if args.quick else ""))
    else:
        from .demo import run_demo

        results = run_demo(output_dir=args.output_dir or "runs/demo", seed=args.seed, quick=args.quick)
    if args.json:
        write_text(args.json, json.dumps(results, indent=2, default=str) + "\n")


def _tiny_model(args) -> None:
    from .data import read_rows
    from .data.formats import field_text
    from .tiny import build_llama, build_tokenizer

    texts = [field_text(v) for _, row in read_rows(args.data) for k, v in row.items()
             if k in ("prompt", "chosen", "rejected", "completion")]
    tokenizer = build_tokenizer(texts, vocab_size=args.vocab_size)
    model = build_llama(tokenizer, hidden_size=args.hidden_size, num_layers=args.layers,
                        intermediate_size=args.intermediate_size, num_heads=args.heads)
    model.save_pretrained(args.output_dir)
    tokenizer.save_pretrained(args.output_dir)
    n = sum(p.numel() for p in model.parameters())
    print(f"wrote a {n / 1e6:.1f}M-parameter Llama (random weights) and a {len(tokenizer)}-token BPE tokenizer "
          f"to {args.output_dir}")


def _eval(args) -> None:
    import json

    from .evaluate import format_results, run_eval

    result = run_eval(args.model, args.data, args.prompts, ref_model=args.ref_model, beta=args.beta,
                      batch_size=args.batch_size, judge=args.judge, num_prompts=args.num_prompts,
                      max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                      seed=args.seed, embeddings=not args.no_embeddings, samples_out=args.samples_out,
                      overrides=args.set or [])
    print(json.dumps(result, indent=2) if args.json else format_results(result))


def _score(args) -> None:
    import json

    from .evaluate import load_models, score_responses
    from .io import write_text

    models = load_models(args.model, args.ref_model, args.beta, args.set or [])
    rows = score_responses(models, args.data, args.batch_size)
    if args.output:
        write_text(args.output, "".join(json.dumps(r) + "\n" for r in rows))
    if args.json:
        print(json.dumps({"model": str(args.model), "reference": models.reference_name, "beta": models.cfg.beta,
                          "rows": rows}, indent=2))
        return
    for r in rows:
        print(f"row {r['row']}\t{r['reward']:.6g}")
    print(f"mean reward {sum(r['reward'] for r in rows) / len(rows):.6g} over {len(rows)} rows "
          f"(beta={models.cfg.beta}, reference: {models.reference_name})")


def _sample_prompts(values: list[str] | None) -> list:
    """`--prompts` values: a file (JSON Lines, CSV, ...) gives its rows' `prompt`; anything else is a prompt itself.
    None (no --prompts): one unconditional prompt."""
    from pathlib import Path

    from .data import read_rows
    from .errors import DataError

    if not values:
        return [None]
    prompts = []
    for value in values:
        if not Path(value).is_file():
            prompts.append(value)
            continue
        for number, row in read_rows(value):
            if "prompt" not in row:
                raise DataError(value, number, "no 'prompt' field")
            prompts.append(row["prompt"])
    return prompts


def _sample(args) -> None:
    from pathlib import Path

    from .config import load_config
    from .report_samples import sample_run, samples_dir

    run = Path(args.run)
    if not (run / "config.yaml").is_file():
        raise DpokitError(f"{run}: not a dpokit run directory (no config.yaml)")
    cfg = load_config(run / "config.yaml")
    out = Path(args.out) if args.out else samples_dir(run, args.base)
    paths = sample_run(run, cfg, _sample_prompts(args.prompts), out, base=args.base, num=args.num, seed=args.seed,
                       num_inference_steps=args.steps, guidance_scale=args.guidance)
    hint = "" if args.out else f" (dpokit report {run} shows it in report.html)"
    print(f"wrote {len(paths) - 1} images of {'the base model' if args.base else run} and {paths[-1]}{hint}")


def _report(args) -> None:
    from .report import write_report

    print(f"wrote {write_report(args.output_dir)}")


def _data(args) -> None:
    from .recipes.cli import run

    run(args)


def _bench(args) -> None:
    from .bench import run_bench

    run_bench(args)


def _experiment(args) -> None:
    args.experiment_run(args)  # set by the experiment's own subcommand (experiments/cli.py)


COMMANDS = {"train": _train, "demo": _demo, "tiny-model": _tiny_model, "eval": _eval, "score": _score,
            "sample": _sample, "report": _report, "data": _data, "bench": _bench, "experiment": _experiment}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dpokit", description="Direct Preference Optimization and its family.")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("train", help="train with a YAML config; key=value pairs override it")
    p.add_argument("config")
    p.add_argument("overrides", nargs="*", metavar="key=value")
    p = sub.add_parser("demo", help="a controlled task with a known preference: a base model, then DPO, before/after")
    p.add_argument("task", nargs="?", choices=["line", "diffusion", "policy", "recommender"], default="line",
                   help="line (default): a small language model asked for positive lines; diffusion: a digit "
                        "generator trained from scratch on MNIST, then Diffusion-DPO against unwanted digits "
                        "(needs pip install 'dpokit[mnist]'; under 5 minutes on 2 cores); policy: a Reacher-v5 arm "
                        "cloned from a jerky scripted controller, then DPO and CPL for smoothness (needs pip "
                        "install 'dpokit[policy]' and mujoco; under 5 minutes on 2 cores); recommender: a SASRec "
                        "cloned from a known simulator's logs, then DPO, S-DPO and DMPO on pairs a world model "
                        "labels, against the greedy argmax (under a minute on 2 cores)")
    p.add_argument("--output-dir", help="default runs/demo (line), runs/demo-diffusion, runs/demo-policy or "
                                        "runs/demo-recommender")
    p.add_argument("--json", help="also write the results here, e.g. {\"base\": {...}, \"dpo\": {...}} for diffusion")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="a smaller run, for smoke tests")
    p = sub.add_parser("tiny-model", help="a small random-init Llama + BPE tokenizer trained on a data file, "
                                          "for trying dpokit with no downloads")
    p.add_argument("data", help="a preference data file; the tokenizer is trained on its text")
    p.add_argument("output_dir")
    p.add_argument("--vocab-size", type=int, default=8000)
    p.add_argument("--hidden-size", type=int, default=256)
    p.add_argument("--intermediate-size", type=int, default=688)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=4)
    p = sub.add_parser("eval", help="preference accuracy and implicit-reward margin against the reference (--data); "
                                    "samples, judge, KL, diversity and drift on held-out prompts (--prompts)")
    p.add_argument("model", help="a dpokit run dir, a LoRA adapter dir or a model dir")
    p.add_argument("--data", help="preference file (prompt/chosen/rejected rows)")
    p.add_argument("--prompts", help="held-out prompts (rows with 'prompt', or preference rows) for sample-based eval")
    p.add_argument("--judge", help="judge for --prompts: a YAML/JSON file or an inline mapping, e.g. "
                                   "'{type: llm, base_url: \"http://127.0.0.1:8000/v1\", model: judge}'")
    p.add_argument("--num-prompts", type=int, help="use the first N prompts")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=1.0, help="1.0 (default) makes the KL estimate unbiased")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-embeddings", action="store_true", help="skip the embedding-drift metrics")
    p.add_argument("--samples-out", help="write each prompt's two replies, log-probs and scores here (JSON Lines)")
    p = sub.add_parser("score", help="score (prompt, response) rows with the policy's implicit reward "
                                     "beta * log(pi / pi_ref)")
    p.add_argument("model", help="a dpokit run dir, a LoRA adapter dir or a model dir")
    p.add_argument("--data", required=True, help="rows with 'prompt' and 'completion' (or 'response')")
    p.add_argument("--output", help="also write the scored rows here (JSON Lines)")
    for p in (sub.choices["eval"], sub.choices["score"]):
        p.add_argument("--ref-model", help="the reference (default: from the run's config.yaml, or the adapter's base)")
        p.add_argument("--beta", type=float, help="beta of the implicit reward (default: the run's)")
        p.add_argument("--batch-size", type=int)
        p.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a config key, e.g. max_length=512")
        p.add_argument("--json", action="store_true", help="print the result as JSON")
    p = sub.add_parser("sample", help="sample images of prompts from a trained run (or its base model, --base): "
                                      "one PNG per sample and grid.png (rows = prompts, columns = samples)")
    p.add_argument("run", help="a dpokit run dir")
    p.add_argument("--prompts", nargs="+", metavar="FILE_OR_TEXT",
                   help="files of rows with 'prompt' (JSON Lines, CSV, ...) or the prompts themselves: captions, or "
                        "class ids for a class-conditional model; none for an unconditional model")
    p.add_argument("--out", help="folder for <prompt>-<sample>.png, grid.png and prompts.json (default: "
                                 "RUN/samples/trained, or RUN/samples/base with --base, which report.html shows)")
    p.add_argument("--num", type=int, default=4, help="samples per prompt (default 4)")
    p.add_argument("--steps", type=int, help="denoising steps (default: the family's)")
    p.add_argument("--seed", type=int, default=0, help="the same seed gives the same images (default 0, as the "
                                                      "grids drawn after training)")
    p.add_argument("--guidance", type=float, help="classifier-free guidance scale (default: the family's)")
    p.add_argument("--base", action="store_true", help="sample the run's starting model (its config's 'model'), "
                                                       "for before/after")
    p = sub.add_parser("report", help="(re)write report.html in a run's output dir from its metrics.jsonl")
    p.add_argument("output_dir")
    p = sub.add_parser("bench", help="dpokit and TRL's DPOTrainer side by side on the same model and data (CPU fp32 "
                                     "or GPU bf16): pairs/s, tokens/s, peak memory, fraction of the matmul peak")
    from .bench import add_arguments as bench_arguments

    bench_arguments(p)
    from .experiments.cli import add_experiment_commands

    add_experiment_commands(sub)  # dpokit experiment frontier|secalign|hierarchy
    from .recipes.cli import register as register_data

    register_data(sub)  # dpokit data build|validate|asr
    return parser


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=os.environ.get("DPOKIT_LOG", "INFO"), format="%(levelname)s %(name)s: %(message)s")
    for noisy in ("httpx", "urllib3", "accelerate", "transformers", "datasets"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    try:
        args = build_parser().parse_args(argv)  # an experiment refuses another's flag here, as a DpokitError
        COMMANDS[args.command](args)
    except DpokitError as e:
        print(f"dpokit: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("dpokit: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
