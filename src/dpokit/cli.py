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


COMMANDS = {"train": _train, "demo": _demo}


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
