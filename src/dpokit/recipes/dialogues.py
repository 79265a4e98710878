"""Dialogues → conversational pairs: Anthropic HH-style rows, whose `chosen` and `rejected` are whole
dialogues ("\\n\\nHuman: …\\n\\nAssistant: …"), as TRL's conversational prompt/chosen/rejected, so that a chat
model trains on its own chat template rather than on the raw "Human:/Assistant:" text.

Input: one row per pair, `{"chosen": "\\n\\nHuman: …\\n\\nAssistant: …", "rejected": "…"}` (other fields are
copied). Each dialogue is split at its turn markers into messages (Human → user, Assistant → assistant); the
prompt is every turn before the last assistant turn, chosen and rejected are the two last turns. A row is left
out, and counted by reason, when a dialogue does not start with a human turn and alternate, when the two
dialogues differ before their last turn (real HH has a few), or when a last turn is not the assistant's, is
empty, or is the same in both.
"""

from __future__ import annotations

import re
from typing import Any

from .common import Built, raw_rows

NAME = "dialogues"
HELP = "HH-style dialogue pairs ('\\n\\nHuman: ... \\n\\nAssistant: ...') → conversational rows for chat templates"
TURN = re.compile(r"\n\n(Human|Assistant):")


def dialogue_messages(dialogue: str) -> list[dict] | None:
    """A dialogue as {role, content} messages, or None when it does not start with a human turn and alternate."""
    parts = TURN.split(dialogue)
    if parts[0].strip() or len(parts) < 3:
        return None
    messages = []
    for speaker, text in zip(parts[1::2], parts[2::2]):
        role = "user" if speaker == "Human" else "assistant"
        if messages and messages[-1]["role"] == role:
            return None
        messages.append({"role": role, "content": text.strip()})
    return messages if messages[0]["role"] == "user" else None


def conversational_pair(row: Any) -> tuple[dict | None, str]:
    """(the row as a conversational pair, "pairs") or (None, why it is left out)."""
    if not isinstance(row, dict) or not isinstance(row.get("chosen"), str) or not isinstance(row.get("rejected"), str):
        return None, "not_dialogue_strings"
    chosen, rejected = dialogue_messages(row["chosen"]), dialogue_messages(row["rejected"])
    if not chosen or not rejected:
        return None, "turns_do_not_alternate"
    if chosen[:-1] != rejected[:-1]:
        return None, "prompts_differ"
    a, b = chosen[-1], rejected[-1]
    if a["role"] != "assistant" or b["role"] != "assistant":
        return None, "last_turn_not_assistant"
    if not a["content"] or not b["content"]:
        return None, "empty_reply"
    if a["content"] == b["content"]:
        return None, "same_reply"
    extra = {k: v for k, v in row.items() if k not in ("chosen", "rejected", "prompt")}
    return {"prompt": chosen[:-1], "chosen": [a], "rejected": [b], **extra}, "pairs"


def dialogues_to_pairs(source: Any) -> Built:
    out = Built()
    for _, _, row in raw_rows(source):
        pair, outcome = conversational_pair(row)
        out.counts[outcome] += 1
        if pair is not None:
            out.rows.append(pair)
    return out


def add_arguments(p) -> None:
    pass


def build(args) -> Built:
    return dialogues_to_pairs(args.input)
