"""Rows → validated preference pairs.

Three layouts, as TRL users have them:
- standard: `prompt`, `chosen`, `rejected` strings;
- conversational: the same keys holding lists of `{role, content}` messages;
- implicit prompt: only `chosen` and `rejected`, each a whole dialogue; the prompt is the
  shared dialogue up to the last assistant turn (Anthropic HH style strings, or message lists).
Optional per-row `weight` (scales the pair's loss) and `margin` (the chosen must win by it).

Two more shapes, for objectives that are not pairwise:
- S-DPO groups: `rejected` a *list* of replies (strings or message lists), one chosen against
  several rejected (the `rankings` recipe's `sdpo` mode writes them);
- unpaired (KTO, TRL's unpaired preference format): `prompt`, `completion` and `label`
  (true: desirable, false: undesirable); optional `weight`.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import Any

ASSISTANT_MARKER = "\n\nAssistant:"


class RowProblem(ValueError):
    """What is wrong with one row; the caller adds file and row number."""


class Untyped(str):
    """Text from a source with no types (a CSV cell): it may stand for a number or true/false, which the
    validators read from it. A JSON string stays a string: "2" there is not a number."""


def _typed(value: Any, kind: str) -> Any:
    """An untyped cell read as a number or a bool when it spells one (else left for the error message); an
    empty one is "not given"."""
    if not isinstance(value, Untyped):
        return value
    text = value.strip()
    if not text:
        return None
    if kind == "bool":
        return {"true": True, "false": False, "1": True, "0": False}.get(text.lower(), str(value))
    try:
        return float(text)
    except ValueError:
        return str(value)


class _Prompted:
    """What the row kinds share: a prompt that is a string, or a message list (conversational)."""

    prompt: str | list[dict]

    @property
    def conversational(self) -> bool:
        return isinstance(self.prompt, list)


@dataclass
class Pair(_Prompted):
    prompt: str | list[dict]
    chosen: str | list[dict]
    rejected: str | list[dict]
    weight: float = 1.0
    margin: float = 0.0


@dataclass
class Group(_Prompted):
    """One chosen reply against several rejected ones (S-DPO)."""

    prompt: str | list[dict]
    chosen: str | list[dict]
    rejected: list  # of replies, each a string or a message list
    weight: float = 1.0
    margin: float = 0.0


@dataclass
class Unpaired(_Prompted):
    """One completion labelled desirable or not (KTO)."""

    prompt: str | list[dict]
    completion: str | list[dict]
    label: bool
    weight: float = 1.0


def _is_messages(value: Any) -> bool:
    return isinstance(value, list) and all(isinstance(m, dict) for m in value)


TEXT_ONLY = "a text-only model cannot read them; use family: vlm with an image-text-to-text model"


def _image_part(message: dict) -> bool:
    """Whether a message's content is a list of parts with an image among them (TRL's vision layout)."""
    content = message.get("content")
    return isinstance(content, list) and any(isinstance(p, dict) and p.get("type") in ("image", "image_url")
                                             for p in content)


def refuse_images(row: dict) -> None:
    """A row of TRL's vision layout is not text: its `images`/`image` field, or an image part in a message, is a
    RowProblem for the text readers (the vlm family reads such rows with its own code, not this)."""
    for key in ("images", "image"):
        value = row.get(key)
        if value is not None and not (isinstance(value, (list, tuple)) and not value):
            raise RowProblem(f"field {key!r} holds images: {TEXT_ONLY}")
    for key in ("prompt", "chosen", "rejected", "completion", "response"):
        value = row.get(key)
        replies = value if _is_reply_list(value) and not _is_messages(value) else [value]  # S-DPO: several
        for reply in replies:
            if _is_messages(reply):
                i = next((i for i, m in enumerate(reply) if _image_part(m)), None)
                if i is not None:
                    raise RowProblem(f"field {key!r} holds images (message {i} has an image part): {TEXT_ONLY}")


def text_field(row: dict, *keys: str, where: str = "") -> str | list[dict]:
    """A row's prompt or reply field: a non-empty string, or a non-empty list of {role, content} messages.

    Every reader of rows (training's loader, `data validate`, the data recipes, `dpokit score`) checks its text
    fields here, so a bad row is described in the same words wherever it is read. With several `keys`, the first
    one the row has is read (`"completion", "response"`); `where` prefixes the problem (a recipe's "response 2: ").
    """
    key = next((k for k in keys if row.get(k) is not None), None)
    if key is None:
        raise RowProblem(f"{where}missing field {' or '.join(repr(k) for k in keys)}")
    value, label = row[key], f"{where}field {key!r}"
    if isinstance(value, str):
        if not value.strip():
            raise RowProblem(f"{label} is empty")
        return value
    if _is_messages(value):
        if not value:
            raise RowProblem(f"{label} is an empty message list")
        for i, m in enumerate(value):
            if _image_part(m):
                raise RowProblem(f"{label} holds images (message {i} has an image part): {TEXT_ONLY}")
            if not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
                raise RowProblem(f"{label}: message {i} needs string 'role' and 'content', got {_short(m)}")
        return value
    raise RowProblem(f"{label} must be a string or a list of {{role, content}} messages, "
                     f"got {type(value).__name__} {_short(value)}")


def field_text(value: Any) -> str:
    """All the text a field holds, joined by spaces: a string, a message list's contents, or an S-DPO list of
    replies. For training a tokenizer on a data file (`dpokit tiny-model`); it checks nothing."""
    if isinstance(value, str):
        return value
    if isinstance(value, dict):
        return str(value.get("content", ""))
    return " ".join(field_text(v) for v in value) if isinstance(value, list) else ""


def _number(row: dict, key: str, default: float) -> float:
    value = _typed(row.get(key), "number")
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
        raise RowProblem(f"field {key!r} must be a finite number, got {_short(value)}")
    return float(value)


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def split_implicit_prompt(chosen: str | list[dict], rejected: str | list[dict]) -> tuple[Any, Any, Any]:
    """Split two whole dialogues into (shared prompt, chosen reply, rejected reply).

    The prompt is each dialogue up to its last assistant turn, and the two must agree on it.
    Strings are cut after the last "\n\nAssistant:" (so the replies keep their leading space,
    as in Anthropic HH); message lists before the last assistant message, which must be the
    dialogue's final message.
    """
    if isinstance(chosen, list) and isinstance(rejected, list):
        (cp, c), (rp, r) = _last_assistant_message(chosen, "chosen"), _last_assistant_message(rejected, "rejected")
        if cp != rp:
            raise RowProblem("chosen and rejected differ before their last assistant message, so they share no prompt")
        return cp, c, r
    if isinstance(chosen, str) and isinstance(rejected, str):
        (cp, c), (rp, r) = _last_assistant_turn(chosen, "chosen"), _last_assistant_turn(rejected, "rejected")
        if cp != rp:
            raise RowProblem("chosen and rejected differ before their last assistant turn, so they share no prompt")
        return cp, c, r
    raise RowProblem("chosen and rejected must both be strings or both be message lists")


def _last_assistant_turn(dialogue: str, key: str) -> tuple[str, str]:
    cut = dialogue.rfind(ASSISTANT_MARKER)
    if cut < 0:
        raise RowProblem(f"no prompt: the row has no 'prompt' field and {key} has no {ASSISTANT_MARKER!r} turn "
                         "to split an implicit prompt at")
    cut += len(ASSISTANT_MARKER)
    return dialogue[:cut], dialogue[cut:]


def _last_assistant_message(dialogue: list[dict], key: str) -> tuple[list[dict], list[dict]]:
    roles = [m["role"] for m in dialogue]
    if "assistant" not in roles:
        raise RowProblem(f"no prompt: the row has no 'prompt' field and {key} has no assistant message "
                         "to split an implicit prompt at")
    if roles[-1] != "assistant":
        raise RowProblem(f"{key} ends with a {roles[-1]!r} message; an implicit-prompt dialogue ends with the "
                         "assistant's reply")
    if len(dialogue) == 1:
        raise RowProblem(f"no prompt: {key} holds only the assistant's reply and the row has no 'prompt' field")
    return dialogue[:-1], dialogue[-1:]


def _blank(reply: str | list[dict]) -> bool:
    if isinstance(reply, str):
        return not reply.strip()
    return all(not m["content"].strip() for m in reply)


def row_to_pair(row: dict) -> Pair:
    refuse_images(row)
    chosen, rejected = text_field(row, "chosen"), text_field(row, "rejected")
    if "prompt" in row and row["prompt"] is not None:
        prompt = text_field(row, "prompt")
    else:
        prompt, chosen, rejected = split_implicit_prompt(chosen, rejected)
    kinds = {isinstance(x, list) for x in (prompt, chosen, rejected)}
    if len(kinds) != 1:
        raise RowProblem("prompt, chosen and rejected must all be strings or all be message lists")
    for key, reply in (("chosen", chosen), ("rejected", rejected)):
        if _blank(reply):
            raise RowProblem(f"the {key} reply is empty")
    if chosen == rejected:
        raise RowProblem("chosen and rejected are identical")
    return Pair(prompt, chosen, rejected, weight=_weight(row), margin=_number(row, "margin", 0.0))


def _weight(row: dict) -> float:
    weight = _number(row, "weight", 1.0)
    if weight < 0:
        raise RowProblem(f"field 'weight' must be >= 0, got {weight}")
    return weight


def is_unpaired_row(row: dict) -> bool:
    return "completion" in row or "label" in row


def _is_reply_list(value: Any) -> bool:
    """A list of replies (S-DPO), not one conversational reply (a list of messages)."""
    return isinstance(value, list) and bool(value) and all(isinstance(v, (str, list)) for v in value)


def row_to_group(row: dict) -> Group:
    refuse_images(row)
    chosen = text_field(row, "chosen")
    rejected = [text_field({f"rejected[{k}]": r}, f"rejected[{k}]") for k, r in enumerate(row["rejected"])]
    if "prompt" in row and row["prompt"] is not None:
        prompt = text_field(row, "prompt")
    else:
        splits = [split_implicit_prompt(chosen, r) for r in rejected]  # each must agree with chosen on the prompt
        prompt, chosen, rejected = splits[0][0], splits[0][1], [r for _, _, r in splits]
    if len({isinstance(x, list) for x in (prompt, chosen, *rejected)}) != 1:
        raise RowProblem("prompt, chosen and every rejected reply must all be strings or all be message lists")
    if _blank(chosen):
        raise RowProblem("the chosen reply is empty")
    for k, reply in enumerate(rejected):
        if _blank(reply):
            raise RowProblem(f"rejected reply {k} is empty")
        if reply == chosen:
            raise RowProblem(f"chosen and rejected reply {k} are identical")
    return Group(prompt, chosen, rejected, weight=_weight(row), margin=_number(row, "margin", 0.0))


def row_to_unpaired(row: dict) -> Unpaired:
    refuse_images(row)
    if "chosen" in row or "rejected" in row:
        raise RowProblem("a row is either a pair (chosen, rejected) or unpaired (completion, label), not both")
    if row.get("prompt") is None:
        raise RowProblem("missing field 'prompt' (an unpaired row needs prompt, completion and label)")
    prompt, completion = text_field(row, "prompt"), text_field(row, "completion")
    if isinstance(prompt, list) != isinstance(completion, list):
        raise RowProblem("prompt and completion must both be strings or both be message lists")
    if _blank(completion):
        raise RowProblem("the completion is empty")
    label = _typed(row.get("label"), "bool")
    if not isinstance(label, bool):
        raise RowProblem(f"field 'label' must be true (desirable) or false (undesirable), got {_short(label)}")
    if _typed(row.get("margin"), "number") is not None:
        raise RowProblem("field 'margin' has no meaning for an unpaired row")
    return Unpaired(prompt, completion, label, weight=_weight(row))


def row_to_item(row: dict) -> Pair | Group | Unpaired:
    """Any training row: a pair, an S-DPO group (a list in `rejected`) or an unpaired completion."""
    if is_unpaired_row(row):
        return row_to_unpaired(row)
    if _is_reply_list(row.get("rejected")):
        return row_to_group(row)
    return row_to_pair(row)
