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
    result = train(cfg)
    print(f"trained {result.global_step} steps; model and metrics in {result.output_dir}")


def _demo(args) -> None:
    from .demo import run_demo

    run_demo(output_dir=args.output_dir, seed=args.seed, quick=args.quick)


def _tiny_model(args) -> None:
    from .data import read_rows
    from .tiny import build_llama, build_tokenizer

    texts = []
    for _, row in read_rows(args.data):
        texts += [v if isinstance(v, str) else " ".join(m.get("content", "") for m in v)
                  for k, v in row.items() if k in ("prompt", "chosen", "rejected") and isinstance(v, (str, list))]
    tokenizer = build_tokenizer(texts, vocab_size=args.vocab_size)
    model = build_llama(tokenizer, hidden_size=args.hidden_size, num_layers=args.layers,
                        intermediate_size=args.intermediate_size, num_heads=args.heads)
    model.save_pretrained(args.output_dir)
    tokenizer.save_pretrained(args.output_dir)
    n = sum(p.numel() for p in model.parameters())
    print(f"wrote a {n / 1e6:.1f}M-parameter Llama (random weights) and a {len(tokenizer)}-token BPE tokenizer "
          f"to {args.output_dir}")


COMMANDS = {"train": _train, "demo": _demo, "tiny-model": _tiny_model}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dpokit", description="Direct Preference Optimization and its family.")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("train", help="train with a YAML config; key=value pairs override it")
    p.add_argument("config")
    p.add_argument("overrides", nargs="*", metavar="key=value")
    p = sub.add_parser("demo", help="a controlled task with a known preference: warm-up, then DPO, before/after")
    p.add_argument("--output-dir", default="runs/demo")
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
    return parser


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=os.environ.get("DPOKIT_LOG", "INFO"), format="%(levelname)s %(name)s: %(message)s")
    for noisy in ("httpx", "urllib3", "accelerate", "transformers", "datasets"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    args = build_parser().parse_args(argv)
    try:
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
