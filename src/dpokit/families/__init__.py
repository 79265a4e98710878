"""Model families: `family: <name>` in the config picks one. Shared code imports only this package's
top level (`get_family`) and `families.base` (the contract), never a family's own module."""

from ..errors import DpokitError
from .base import Example, Family, Scorer, Scores, data_kind
from .causal_lm import CausalLMFamily
from .diffusion import DiffusionFamily
from .policy import PolicyFamily
from .recommender import RecommenderFamily
from .vlm import VLMFamily

FAMILIES = {"causal_lm": CausalLMFamily, "diffusion": DiffusionFamily, "policy": PolicyFamily,
            "recommender": RecommenderFamily, "vlm": VLMFamily}


def register_family(family: type[Family]) -> type[Family]:
    """Make a `Family` subclass known under its `name` (`family: <name>` in a config); usable as a decorator.
    Families outside dpokit register this way before `load_config` or `train` runs."""
    if not family.name:
        raise ValueError(f"{family.__name__} has no name")
    FAMILIES[family.name] = family
    return family


def get_family(name: str) -> Family:
    if name not in FAMILIES:
        raise DpokitError(f"unknown model family {name!r}; known: {', '.join(sorted(FAMILIES))}")
    return FAMILIES[name]()


__all__ = ["Example", "Family", "Scorer", "Scores", "data_kind", "FAMILIES", "get_family", "register_family"]
