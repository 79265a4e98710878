"""The frontier experiment's second task: HH prompts, VADER sentiment as the ground-truth reward.

The DPO paper's IMDb task asks for positive text; this is the same on open dialogue: the last human
turn of each Anthropic-HH-style row is a prompt, a tiny Llama SFT'd on the rows' chosen replies is the
SFT model, and the reward of a reply is VADER's compound sentiment score (Hutto & Gilbert 2014, the
`vadersentiment` package), in [-1, 1]. Unlike the line task, replies are long and open, so most of
what an SFT model samples has nothing to do with the reward. `dpokit experiment frontier --task vader
--data FILE` runs it; FILE is a preference file with `chosen` dialogues (or `prompt` + `chosen`).
"""

from __future__ import annotations

import random
from pathlib import Path

import torch

from ..data.formats import ASSISTANT_MARKER
from ..data.readers import iter_rows
from ..demo import warm_up
from ..errors import DpokitError
from ..tiny import build_llama, build_tokenizer
from .frontier import Run, Setup

HUMAN_MARKER = "\n\nHuman:"
MAX_PROMPT_CHARS = 300  # the last human turn; longer ones are left out, as the model sees 96 tokens
REPLY_WORDS = 40  # the SFT targets: each chosen reply's first words

# DPO at two β, IPO, cDPO and preferred-FT at two learning rates; no noisy-label part (the line task has it)
_RUNS = (Run("DPO", "sigmoid", 0.5, 1e-4), Run("DPO", "sigmoid", 2.0, 1e-4), Run("IPO", "ipo", 1.0, 1e-4),
         Run("cDPO", "sigmoid", 0.5, 1e-4, 0.2), Run("preferred-FT", "sft", 0.1, 1e-4),
         Run("preferred-FT", "sft", 0.1, 3e-4))
FULL = dict(demo=dict(hidden=128, layers=2, sft_steps=500, sft_lr=3e-3, samples_per_prompt=4, heldout=150,
                      new_tokens=24),
            eval_samples=8, max_steps=120, eval_every=10, noisy_beta=0.5, replicates=0, runs=_RUNS)
QUICK = dict(demo=dict(hidden=32, layers=1, sft_steps=40, sft_lr=3e-3, samples_per_prompt=4, heldout=8,
                       new_tokens=8),
             eval_samples=2, max_steps=10, eval_every=5, noisy_beta=0.5, replicates=0,
             runs=(Run("DPO", "sigmoid", 0.5, 1e-3), Run("preferred-FT", "sft", 0.1, 1e-3)))


def vader_reward():
    """(prompt, reply) -> VADER's compound score of the reply."""
    try:
        from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer
    except ImportError as e:
        raise DpokitError("the vader task needs the vadersentiment package: pip install 'dpokit[eval]'") from e
    analyzer = SentimentIntensityAnalyzer()
    return lambda prompt, reply: analyzer.polarity_scores(reply)["compound"]


def dialogue_rows(path) -> list[tuple[str, str]]:
    """(prompt, reply) from each row: the last human turn as "\\n\\nHuman: …\\n\\nAssistant:" and the chosen
    reply. Rows that cannot be read or split, or with an empty reply or a long last turn, are left out."""
    if not path or not Path(path).exists():
        raise DpokitError(f"the vader task reads HH-style preference rows; no such file: {path!r} (--data FILE)")
    out = []
    for _, row in iter_rows(str(path)):
        if not isinstance(row, dict) or not isinstance(row.get("chosen"), str):
            continue
        text = row.get("prompt", "") + row["chosen"] if isinstance(row.get("prompt"), str) else row["chosen"]
        cut = text.rfind(ASSISTANT_MARKER)
        if cut < 0:
            continue
        start = text.rfind(HUMAN_MARKER, 0, cut)
        prompt = text[max(start, 0):cut] + ASSISTANT_MARKER
        reply = text[cut + len(ASSISTANT_MARKER):]
        if reply.strip() and len(prompt) <= MAX_PROMPT_CHARS:
            out.append((prompt, reply))
    return out


def setup(out: Path, size: dict, seed: int, data) -> Setup:
    sizes = size["demo"]
    rows = dialogue_rows(data)
    if len(rows) < 2 * sizes["heldout"]:
        raise DpokitError(f"{data}: {len(rows)} usable dialogues; the vader task needs at least "
                          f"{2 * sizes['heldout']}")
    random.Random(seed).shuffle(rows)
    torch.manual_seed(seed)
    tokenizer = build_tokenizer([p + r for p, r in rows], vocab_size=2000)
    sft = build_llama(tokenizer, hidden_size=sizes["hidden"], num_layers=sizes["layers"], seed=seed)
    targets = [{"prompt": p, "completion": " ".join(r.split()[:REPLY_WORDS])} for p, r in rows]
    warm_up(sft, tokenizer, targets, sizes["sft_steps"], sizes["sft_lr"], seed=seed)
    held = [p for p, _ in rows[:sizes["heldout"]]]
    description = (f"the last human turn of {len(rows)} dialogues in `{data}` is a prompt ({sizes['heldout']} held "
                   "out), VADER's compound sentiment of the reply is the true reward (in [-1, 1]; the DPO paper's "
                   "IMDb task asks for positive text too), replies are sampled up to "
                   f"{sizes['new_tokens']} tokens, and a {sizes['hidden']}-wide, {sizes['layers']}-layer Llama "
                   f"SFT'd from scratch on the first {REPLY_WORDS} words of the chosen replies "
                   f"(`dpokit.demo.warm_up`, {sizes['sft_steps']} steps) is the SFT model. Here most of what a "
                   "reply says has nothing to do with its reward, unlike the line task.")
    return Setup("vader", sft, tokenizer, out / "sft", [p for p, _ in rows[sizes["heldout"]:]], held,
                 vader_reward(), sizes["new_tokens"], None, max_length=128, max_prompt_length=96,
                 description=description)
