"""A world model (user simulator) learnt from interaction logs, as AMRS (Chan et al. 2026, arXiv 2605.28810).

Not a model family: it is not a policy trained on preference pairs but a model of the user, p(outcome | the user's
past events, the next item), that other code consults — to label preference pairs for a recommender (the
`recommender` family's JSON Lines rows) and to evaluate a recommender offline in simulated rollouts. It uses the
recommender family only through its public `sample` (a policy is any callable histories → top-k lists):

- model.py: `WorldModel`, a causal transformer over (item, outcomes) events with a `rating` (MSE) and/or an
  `engaged` (BCE) head for the next item;
- fit.py: logs (through `dpokit.recipes.interactions.read_log`, or events in memory) → per-user sequences,
  leave-last-out, Adam; `fidelity` on the held-out events; the folder format (config.json, model.safetensors,
  items.json);
- metrics.py: RMSE/MAE, log-loss, AUC, expected calibration error (Naeini et al. 2015);
- utility.py: `Utility` (weights over predicted outcomes) and `label_pairs`;
- rollout.py: `evaluate_policy` (rollouts), `greedy_policy` (the argmax-utility baseline that collapses onto a few
  items) and `random_policy`.
"""

from .fit import (FitConfig, LogEvent, fidelity, fit_world_model, load_world_model, read_events, save_world_model,
                  split_leave_last_out, user_sequences)
from .metrics import auc, expected_calibration_error, log_loss, mae, rmse
from .model import OUTCOMES, WorldModel
from .rollout import evaluate_policy, greedy_policy, random_policy
from .utility import Utility, label_pairs

__all__ = ["FitConfig", "LogEvent", "OUTCOMES", "Utility", "WorldModel", "auc", "evaluate_policy",
           "expected_calibration_error", "fidelity", "fit_world_model", "greedy_policy", "label_pairs",
           "load_world_model",
           "log_loss", "mae", "random_policy", "read_events", "rmse", "save_world_model", "split_leave_last_out",
           "user_sequences"]
