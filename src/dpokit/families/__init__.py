from ..errors import DpokitError
from .base import LogpTerms, ModelFamily
from .causal_lm import CausalLMFamily

FAMILIES = {"causal_lm": CausalLMFamily}


def get_family(name: str) -> ModelFamily:
    if name not in FAMILIES:
        raise DpokitError(f"unknown model family {name!r}; known: {', '.join(sorted(FAMILIES))}")
    return FAMILIES[name]()


__all__ = ["LogpTerms", "ModelFamily", "CausalLMFamily", "FAMILIES", "get_family"]
