"""Data recipes: raw preference signals → standard pair files, and a validator for pair files.

- votes:     threads with scored replies → pairs (SHP rules: score ratio, the better reply not earlier)
- ratings:   prompts with rated replies → best vs a random lower-rated (or the worst) reply
- rankings:  ranked replies → all pairs, adjacent pairs, or S-DPO groups
- injection: (instruction, input, output) rows → SecAlign prompt-injection pairs; attack success rate
- hierarchy: instruction-hierarchy pairs → GW-DPO margins
- rollouts:  a policy rolled out in a gymnasium environment → trajectory-segment pairs (smoothness, return,
             or a function), as JSONL or .npz, for the policy family
- minari:    a local Minari offline-RL dataset (never downloaded) → trajectory-segment pairs, as rollouts
- interactions: user-item logs (CSV/TSV/Parquet, RecBole .inter/.item) → user history, chosen vs rejected
             item(s) (low-rated, skipped or sampled; S-DPO groups), leave-last-out splits, for recommenders
- validate:  every problem the loader would raise, plus counts, lengths and duplicates

Each recipe reads any file the loader reads and writes JSON Lines rows with `prompt`,
`chosen`, `rejected` and, where the recipe gives one, `margin`; extra fields (scores, ids)
ride along and are ignored by training. The input each recipe expects is in its module's
docstring (and `dpokit data build RECIPE --help`).
"""

from .hierarchy import hierarchy_margins
from .injection import attack_success_rate, eval_items, hf_generator, injection_pairs
from .ratings import ratings_to_pairs
from .rankings import rankings_to_pairs
from .rollouts import rollout_pairs
from .validate import Report, validate
from .votes import votes_to_pairs

__all__ = ["votes_to_pairs", "ratings_to_pairs", "rankings_to_pairs", "injection_pairs", "eval_items",
           "attack_success_rate", "hf_generator", "hierarchy_margins", "rollout_pairs", "validate", "Report"]
