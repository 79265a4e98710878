"""Rows → validated preference pairs.

Three layouts, as TRL users have them:
- standard: `prompt`, `chosen`, `rejected` strings;
- conversational: the same keys holding lists of `{role, content}` messages;
- implicit prompt: only `chosen` and `rejected`, each a whole dialogue; the prompt is the
  shared dialogue up to the last assistant turn (Anthropic HH style strings, or message lists).
Optional per-row `weight` (scales the pair's loss) and `margin` (the chosen must win by it).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

ASSISTANT_MARKER = "\n\nAssistant:"


class RowProblem(ValueError):
    """What is wrong with one row; the caller adds file and row number."""


@dataclass
class Pair:
    prompt: str | list[dict]
    chosen: str | list[dict]
    rejected: str | list[dict]
    weight: float = 1.0
    margin: float = 0.0

    @property
    def conversational(self) -> bool:
        return isinstance(self.prompt, list)


def _is_messages(value: Any) -> bool:
    return isinstance(value, list) and all(isinstance(m, dict) for m in value)


def _check_messages(key: str, value: list) -> None:
    for i, m in enumerate(value):
        if not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise RowProblem(f"field {key!r}: message {i} needs string 'role' and 'content'")


def _field(row: dict, key: str) -> str | list[dict]:
    if key not in row or row[key] is None:
        raise RowProblem(f"missing field {key!r}")
    value = row[key]
    if isinstance(value, str):
        if not value.strip():
            raise RowProblem(f"field {key!r} is empty")
        return value
    if _is_messages(value):
        if not value:
            raise RowProblem(f"field {key!r} is an empty message list")
        _check_messages(key, value)
        return value
    raise RowProblem(f"field {key!r} must be a string or a list of messages, got {type(value).__name__}")


def _number(row: dict, key: str, default: float) -> float:
    value = row.get(key)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise RowProblem(f"field {key!r} must be a finite number, got {value!r}")
    return float(value)


def split_implicit_prompt(chosen: str | list[dict], rejected: str | list[dict]) -> tuple[Any, Any, Any]:
    """Split two whole dialogues into (shared prompt, chosen reply, rejected reply)."""
    if isinstance(chosen, list) and isinstance(rejected, list):
        n = 0
        while n < min(len(chosen), len(rejected)) and chosen[n] == rejected[n]:
            n += 1
        if n == 0:
            raise RowProblem("chosen and rejected share no leading messages, so there is no implicit prompt")
        return chosen[:n], chosen[n:], rejected[n:]
    if isinstance(chosen, str) and isinstance(rejected, str):
        cut = chosen.rfind(ASSISTANT_MARKER)
        if cut < 0:
            raise RowProblem(f"no prompt: chosen has no {ASSISTANT_MARKER.strip()!r} turn and the row has no 'prompt' field")
        cut += len(ASSISTANT_MARKER)
        prompt = chosen[:cut]
        if not rejected.startswith(prompt):
            raise RowProblem("rejected does not continue the chosen dialogue's prompt (the two dialogues differ before the last assistant turn)")
        return prompt, chosen[cut:], rejected[cut:]
    raise RowProblem("chosen and rejected must both be strings or both be message lists")


def row_to_pair(row: dict) -> Pair:
    chosen, rejected = _field(row, "chosen"), _field(row, "rejected")
    if "prompt" in row and row["prompt"] is not None:
        prompt = _field(row, "prompt")
    else:
        prompt, chosen, rejected = split_implicit_prompt(chosen, rejected)
    kinds = {isinstance(x, list) for x in (prompt, chosen, rejected)}
    if len(kinds) != 1:
        raise RowProblem("prompt, chosen and rejected must all be strings or all be message lists")
    if chosen == rejected:
        raise RowProblem("chosen and rejected are identical")
    if (isinstance(chosen, str) and not chosen.strip()) or (isinstance(chosen, list) and not chosen):
        raise RowProblem("chosen reply is empty")
    if (isinstance(rejected, str) and not rejected.strip()) or (isinstance(rejected, list) and not rejected):
        raise RowProblem("rejected reply is empty")
    weight = _number(row, "weight", 1.0)
    if weight < 0:
        raise RowProblem(f"field 'weight' must be >= 0, got {weight}")
    return Pair(prompt, chosen, rejected, weight=weight, margin=_number(row, "margin", 0.0))
