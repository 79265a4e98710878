"""`dpokit data ...`: build pairs from raw data, check a data file, score prompt-injection attacks.

    dpokit data build votes|ratings|rankings|dialogues|injection|hierarchy IN OUT [options]
    dpokit data build judge PROMPTS OUT --model M --judge SPEC [--k 4] [--min-gap G]
    dpokit data build rollouts ENV_ID OUT.jsonl|OUT.npz [--policy P] [--label smoothness|return|mod:fn]
    dpokit data build minari DATASET OUT.jsonl|OUT.npz [--episodes N] [--label smoothness|return|mod:fn]
    dpokit data build interactions LOG OUT.jsonl [--negatives rating|skipped|sampled] [--k K] [--split ...]
    dpokit data validate FILE [--model M] [--family NAME] [--max-length N] [--max-prompt-length N] [--json]
    dpokit data asr MODEL EVAL_FILE [--max-new-tokens N] [--match contains|startswith]

`dpokit data build RECIPE --help` describes the input each recipe reads.
"""

from __future__ import annotations

import argparse
import json

from ..errors import DpokitError
from . import dialogues, hierarchy, injection, interactions, judge, minari_data, ratings, rankings, rollouts, votes

RECIPES = {m.NAME: m for m in (votes, ratings, rankings, dialogues, injection, hierarchy, judge, rollouts,
                               minari_data, interactions)}


def register(subparsers) -> None:
    """Add the `data` command to the dpokit parser; the chosen action lands in `args.data_run`."""
    data = subparsers.add_parser("data", help="build preference pairs from raw data; validate a data file")
    sub = data.add_subparsers(dest="data_command", required=True)
    build = sub.add_parser("build", help="raw rows → standard JSONL pairs (prompt, chosen, rejected[, margin])")
    recipes = build.add_subparsers(dest="recipe", required=True)
    for name, module in RECIPES.items():
        p = recipes.add_parser(name, help=module.HELP, description=module.__doc__,
                               formatter_class=argparse.RawDescriptionHelpFormatter)
        # A recipe may read something other than rows (INPUT_HELP) and write its own format (`write`).
        p.add_argument("input", help=getattr(module, "INPUT_HELP", "JSONL, JSON, Parquet, CSV or a saved datasets folder"))
        p.add_argument("output", help=getattr(module, "OUTPUT_HELP", "the JSONL file to write"))
        module.add_arguments(p)
        p.set_defaults(data_run=_build)
    p = sub.add_parser("validate", help="counts, lengths, duplicates and every row problem the loader would raise")
    p.add_argument("file")
    p.add_argument("--model", help="a model or tokenizer path: adds token lengths and truncation counts")
    p.add_argument("--max-length", type=int, default=1024)
    p.add_argument("--max-prompt-length", type=int, default=512)
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.add_argument("--family", default="causal_lm",
                   help="whose rows these are (default causal_lm); another family's rows go through its own loader "
                        "(e.g. vlm, with --model for its processor)")
    p.set_defaults(data_run=_validate)
    p = sub.add_parser("asr", help="attack success rate of a model on held-out injected prompts "
                                   "(from `data build injection --eval`)")
    p.add_argument("model")
    p.add_argument("file")
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--match", choices=("contains", "startswith"), default="contains")
    p.set_defaults(data_run=_asr)


def run(args) -> None:
    args.data_run(args)


def _build(args) -> None:
    from .common import write_jsonl

    recipe = RECIPES[args.recipe]
    built = recipe.build(args)
    n = recipe.write(built, args.output) if hasattr(recipe, "write") else write_jsonl(built.rows, args.output, args.input)
    print(f"wrote {n} rows to {args.output} ({built.summary()})")


def _validate(args) -> None:
    from ..config import TrainConfig
    from ..families import get_family
    from .validate import format_report, validate, validate_with

    family = get_family(args.family)
    if args.family != "causal_lm":
        if not args.model:
            raise DpokitError(f"`dpokit data validate --family {args.family}` needs --model: the family's rows are "
                              "checked by encoding them with the model's processor")
        processor = family.load_processor(args.model, TrainConfig(model=args.model, family=args.family))
        checks = [family.row_check(args.file, processor, TrainConfig(family=args.family, max_length=m,
                                                                     max_prompt_length=mp))
                  for m, mp in ((args.max_length, args.max_prompt_length), (None, None))]
        report = validate_with(args.file, *checks)
    else:
        tokenizer = family.load_processor(args.model, TrainConfig()) if args.model else None
        report = validate(args.file, tokenizer, args.max_length, args.max_prompt_length)
    print(report.to_json() if args.json else format_report(report, args.max_length, args.max_prompt_length))
    if report.bad_rows:
        raise DpokitError(f"{args.file}: {report.bad_rows} of {report.rows} rows have problems")


def _asr(args) -> None:
    from ..data import read_rows
    from .injection import attack_success_rate, hf_generator

    items = [row for _, row in read_rows(args.file)]
    for k, row in enumerate(items, start=1):
        if "prompt" not in row or "target" not in row:
            raise DpokitError(f"{args.file}, row {k}: an attack prompt needs 'prompt' and 'target' "
                              "(write them with `dpokit data build injection --eval`)")
    result = attack_success_rate(hf_generator(args.model, args.max_new_tokens), items, args.match)
    print(json.dumps(result))
