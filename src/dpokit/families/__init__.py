"""Model families: `family: <name>` in the config picks one. Shared code imports only this package's
top level (`get_family`) and `families.base` (the contract), never a family's own module."""

from ..errors import DpokitError
from .base import Example, Family, Scorer, Scores, data_kind
from .causal_lm import CausalLMFamily

FAMILIES = {"causal_lm": CausalLMFamily}


def get_family(name: str) -> Family:
    if name not in FAMILIES:
        raise DpokitError(f"unknown model family {name!r}; known: {', '.join(sorted(FAMILIES))}")
    return FAMILIES[name]()


__all__ = ["Example", "Family", "Scorer", "Scores", "data_kind", "FAMILIES", "get_family"]
