"""dpokit: Direct Preference Optimization and its family, for any model that assigns likelihoods."""

from .config import TrainConfig, load_config
from .errors import DataError, DpokitError
from .objectives import LOSSES, ObjectiveConfig, LossInputs, objective, register
from .train import TrainResult, train

__version__ = "0.1.0"
__all__ = ["TrainConfig", "load_config", "train", "TrainResult", "DpokitError", "DataError", "LOSSES",
           "ObjectiveConfig", "LossInputs", "objective", "register"]
