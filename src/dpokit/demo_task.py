"""A controlled preference task with a ground-truth reward: say something positive about a thing.

A prompt asks for a positive line about a subject and starts it, "Say something positive
about the river. The river is"; a response finishes the line with adjectives, " bright, tall
and grim." Each adjective is positive, negative or neutral (fixed word lists). The ground-truth
reward of a well-formed response is (positive − negative adjectives) / adjectives, in [-1, 1];
anything else (unknown words, broken list, text after the full stop) scores -1, so degenerate
text never pays. It plays the part of the DPO paper's controlled sentiment generation (prompt =
the start of an IMDb review, reward from a sentiment classifier) with the classifier replaced
by an exact rule, so rewards, preference labels and KL are all measured exactly.

The warm-up corpus gives every response one tone — positive, negative or neutral, drawn
uniformly whatever the prompt asks — so a model trained on it speaks the task's language and
keeps a tone through a line, but ignores the instruction (mean reward 0). The preference can
only be learnt from comparisons.

Pieces another experiment can reuse: `prompts()` / `split_prompts()`, `reward(prompt,
response)`, `sft_rows()` for a warm-up, `sample()` to draw scored responses from a model, and
`make_pairs()` to turn samples into preference rows labelled by the reward.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass

from .families import get_family

POSITIVE = ("bright", "calm", "kind", "lovely", "warm", "gentle", "cheerful", "graceful", "splendid", "pleasant",
            "joyful", "charming")
NEGATIVE = ("dull", "cold", "cruel", "ugly", "gloomy", "harsh", "bitter", "dreary", "awful", "nasty", "grim", "sour")
NEUTRAL = ("tall", "round", "wooden", "square", "blue", "old", "large", "small", "green", "heavy", "narrow", "striped")
TONES = (POSITIVE, NEGATIVE, NEUTRAL)
ADJECTIVES = POSITIVE + NEGATIVE + NEUTRAL
SUBJECTS = (
    "river", "house", "garden", "city", "forest", "road", "cat", "dog", "horse", "bridge", "tower", "market",
    "lake", "ship", "train", "castle", "village", "mountain", "meadow", "window", "kitchen", "school", "library",
    "teacher", "painter", "song", "story", "letter", "morning", "evening", "winter", "summer", "harbor", "island",
    "desert", "valley", "station", "museum", "theater", "bakery", "orchard", "cottage", "lantern", "violin",
    "blanket", "carpet", "mirror", "clock",
)
# A prompt ends where the line starts, "... The river is", as the DPO paper's prompts are the
# start of a review: the model continues the line and the ground truth reads the continuation.
TEMPLATES = (
    "Write a positive line about the {subject}. The {subject} is",
    "Describe the {subject} in a positive way. The {subject} is",
    "Say something positive about the {subject}. The {subject} is",
)
N_ADJECTIVES = 3
_LIST = re.compile(r" ((?:[a-z]+, )*[a-z]+ and )?([a-z]+)\.")


def prompts(subjects=SUBJECTS) -> list[str]:
    return [t.format(subject=s) for s in subjects for t in TEMPLATES]


def split_prompts(seed: int = 0, heldout_fraction: float = 0.25) -> tuple[list[str], list[str]]:
    """(train, held-out) prompts, split by subject: held-out prompts name subjects no training prompt names."""
    subjects = list(SUBJECTS)
    random.Random(seed).shuffle(subjects)
    n = round(len(subjects) * heldout_fraction)
    return prompts(subjects[n:]), prompts(subjects[:n])


def describe(adjectives: list[str]) -> str:
    """The response: the prompt's line continued with a list of adjectives, " a, b and c."."""
    *first, last = adjectives
    return f" {', '.join(first)} and {last}." if first else f" {last}."


def adjectives_of(response: str) -> list[str] | None:
    """The adjectives of a well-formed response (" a, b and c." with known adjectives), else None."""
    m = _LIST.fullmatch(response.rstrip())
    if m is None:
        return None
    words = [w for w in (m.group(1) or "").replace(",", " ").split() if w != "and"] + [m.group(2)]
    return words if all(w in ADJECTIVES for w in words) else None


def reward(prompt: str, response: str) -> float:
    """Ground truth in [-1, 1]: (positive − negative adjectives) / adjectives; -1 for anything not well formed.
    This rule does not read the prompt; the signature is the general one, reward(x, y)."""
    adjectives = adjectives_of(response)
    if adjectives is None:
        return -1.0
    return (sum(w in POSITIVE for w in adjectives) - sum(w in NEGATIVE for w in adjectives)) / len(adjectives)


def sft_rows(prompt_list: list[str], n: int, seed: int = 0, coherence: float = 1.0) -> list[dict]:
    """Warm-up data: `n` (prompt, completion) rows carrying no preference.

    Each row draws a tone uniformly (positive, negative, neutral) and three distinct adjectives, each
    from that tone's list with probability `coherence`, else from all adjectives."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        p = rng.choice(prompt_list)
        tone = rng.choice(TONES)
        adjectives: list[str] = []
        while len(adjectives) < N_ADJECTIVES:
            word = rng.choice(tone if rng.random() < coherence else ADJECTIVES)
            if word not in adjectives:
                adjectives.append(word)
        rows.append({"prompt": p, "completion": describe(adjectives)})
    return rows


def corpus() -> list[str]:
    """Texts to train the task's tokenizer on: every prompt, and every adjective in a response."""
    return prompts() + [describe([a, a, a]) for a in ADJECTIVES]


@dataclass
class Sample:
    prompt: str
    response: str  # decoded text, without the end-of-sequence token
    prompt_ids: list[int]
    response_ids: list[int]  # as sampled, up to and including EOS when the model ended the response
    reward: float


def sample(model, tokenizer, prompt_list: list[str], n: int, max_new_tokens: int = 16, temperature: float = 1.0,
           batch_size: int = 512, reward_fn=reward) -> list[Sample]:
    """`n` responses per prompt from the full distribution (no top-k or top-p), scored with `reward_fn`.

    Prompts are generated in groups of equal token length, so no padding enters a prompt. Seed torch
    before calling for reproducible draws."""
    drawn = get_family("causal_lm").sample(model, tokenizer, prompt_list, num_generations=n,
                                           max_new_tokens=max_new_tokens, temperature=temperature,
                                           batch_size=batch_size, group_by_length=True)
    return [Sample(c.prompt, c.text, c.prompt_ids, c.completion_ids, reward_fn(c.prompt, c.text)) for c in drawn]


def make_pairs(samples: list[Sample], min_gap: float = 1e-6) -> list[dict]:
    """Preference rows from samples, as in the DPO paper: consecutive responses to the same prompt are
    paired and the one with the higher reward is chosen.

    Pairs whose rewards differ by less than `min_gap` (ties) are dropped, as are empty or identical
    responses. Rows carry the two rewards as `score_chosen` / `score_rejected`."""
    by_prompt: dict[str, list[Sample]] = {}
    for s in samples:
        if s.response.strip():
            by_prompt.setdefault(s.prompt, []).append(s)
    rows = []
    for prompt, group in by_prompt.items():
        for a, b in zip(group[0::2], group[1::2]):
            if abs(a.reward - b.reward) < min_gap or a.response == b.response:
                continue
            win, lose = (a, b) if a.reward > b.reward else (b, a)
            rows.append({"prompt": prompt, "chosen": win.response, "rejected": lose.response,
                         "score_chosen": win.reward, "score_rejected": lose.reward})
    return rows
