"""Validated pairs → token ids, with the truncation rules.

The completion starts where tokenize(prompt) and tokenize(prompt + completion) diverge,
as TRL does, so a token merging across the boundary never misaligns the two. Text
completions get the EOS token appended; conversational ones end with the chat template's
own end-of-turn. `max_prompt_length` cuts the prompt from the left (the end of the prompt
is what the reply depends on); `max_length` then cuts each completion from the right.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import DpokitError
from .formats import Pair, RowProblem


@dataclass
class Example:
    prompt_ids: list[int]
    chosen_ids: list[int]
    rejected_ids: list[int]
    weight: float = 1.0
    margin: float = 0.0


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def _chat_ids(tokenizer, messages: list[dict], **kwargs) -> list[int]:
    from jinja2.exceptions import TemplateError

    if tokenizer.chat_template is None:
        # the tokenizer, not the row, is at fault: stop even when bad rows are skipped
        raise DpokitError("conversational data (lists of {role, content} messages) needs a tokenizer with a "
                          "chat template, and this one has none")
    try:
        out = tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True, **kwargs)
    except TemplateError as e:  # templates raise on what they do not accept, e.g. roles that do not alternate
        raise RowProblem(f"the chat template rejects these messages: {e}") from None
    return list(out["input_ids"])


def tokenize_pair(pair: Pair, tokenizer, max_length: int | None, max_prompt_length: int | None) -> Example:
    if pair.conversational:
        prompt_ids = _chat_ids(tokenizer, pair.prompt, add_generation_prompt=True)
        full_chosen = _chat_ids(tokenizer, pair.prompt + pair.chosen)
        full_rejected = _chat_ids(tokenizer, pair.prompt + pair.rejected)
    else:
        eos = tokenizer.eos_token or ""
        chosen = pair.chosen if pair.chosen.endswith(eos) else pair.chosen + eos
        rejected = pair.rejected if pair.rejected.endswith(eos) else pair.rejected + eos
        prompt_ids = tokenizer(pair.prompt)["input_ids"]
        full_chosen = tokenizer(pair.prompt + chosen)["input_ids"]
        full_rejected = tokenizer(pair.prompt + rejected)["input_ids"]
    n = min(_common_prefix(prompt_ids, full_chosen), _common_prefix(prompt_ids, full_rejected))
    prompt_ids, chosen_ids, rejected_ids = prompt_ids[:n], full_chosen[n:], full_rejected[n:]
    if not prompt_ids:
        # the last prompt token is what predicts each completion's first token
        raise RowProblem("the prompt has no tokens of its own (it merges with the start of the completion)")
    if not chosen_ids or not rejected_ids:
        raise RowProblem("a completion is empty after tokenization")
    if chosen_ids == rejected_ids:
        raise RowProblem("chosen and rejected tokenize identically")
    if max_prompt_length is not None and len(prompt_ids) > max_prompt_length:
        prompt_ids = prompt_ids[len(prompt_ids) - max_prompt_length:]
    if max_length is not None:
        room = max_length - len(prompt_ids)
        if room < 1:
            raise RowProblem(
                f"the prompt has {len(prompt_ids)} tokens, leaving no room for a completion within "
                f"max_length={max_length} (lower max_prompt_length or raise max_length)"
            )
        chosen_ids, rejected_ids = chosen_ids[:room], rejected_ids[:room]
        if chosen_ids == rejected_ids:
            raise RowProblem(f"chosen and rejected are identical once truncated to max_length={max_length}")
    return Example(prompt_ids, chosen_ids, rejected_ids, pair.weight, pair.margin)
