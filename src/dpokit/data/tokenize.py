"""Validated pairs, S-DPO groups and unpaired completions → token ids, with the truncation rules.

The completion starts where tokenize(prompt) and tokenize(prompt + completion) diverge,
as TRL does, so a token merging across the boundary never misaligns the two. Text
completions get the EOS token appended; conversational ones end with the chat template's
own end-of-turn. `max_prompt_length` cuts the prompt from the left (the end of the prompt
is what the reply depends on); `max_length` then cuts each completion from the right.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import DpokitError
from .formats import Group, Pair, RowProblem, Unpaired


@dataclass
class Example:
    """One encoded training item.

    A pair has `rejected_ids` a list of ids; an S-DPO group a list of such lists (one per
    rejected reply). An unpaired (KTO) item has `label` set, `chosen_ids` its completion and
    `rejected_ids` another row's completion under this prompt: the mismatched pair whose
    log-ratio estimates KTO's KL reference point.
    """

    prompt_ids: list[int]
    chosen_ids: list[int]
    rejected_ids: list[int] | list[list[int]]
    weight: float = 1.0
    margin: float = 0.0
    label: bool | None = None

    @property
    def is_group(self) -> bool:
        return bool(self.rejected_ids) and isinstance(self.rejected_ids[0], list)

    @property
    def negatives(self) -> list[list[int]]:
        """The rejected replies' ids, one list each (a pair has one)."""
        return self.rejected_ids if self.is_group else [self.rejected_ids]

    @property
    def n_rejected(self) -> int:
        return len(self.negatives)


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


def _encode(item, replies: list, tokenizer) -> tuple[list[int], list[list[int]]]:
    """The prompt's ids and each reply's, cut where tokenize(prompt) and every tokenize(prompt + reply) agree."""
    if item.conversational:
        prompt_ids = _chat_ids(tokenizer, item.prompt, add_generation_prompt=True)
        fulls = [_chat_ids(tokenizer, item.prompt + reply) for reply in replies]
    else:
        eos = tokenizer.eos_token or ""
        prompt_ids = tokenizer(item.prompt)["input_ids"]
        fulls = [tokenizer(item.prompt + (reply if reply.endswith(eos) else reply + eos))["input_ids"]
                 for reply in replies]
    n = min(_common_prefix(prompt_ids, full) for full in fulls)
    prompt_ids, completions = prompt_ids[:n], [full[n:] for full in fulls]
    if not prompt_ids:
        # the last prompt token is what predicts each completion's first token
        raise RowProblem("the prompt has no tokens of its own (it merges with the start of the completion)")
    if not all(completions):
        raise RowProblem("a completion is empty after tokenization")
    return prompt_ids, completions


def _truncate(prompt_ids: list[int], completions: list[list[int]], max_length: int | None,
              max_prompt_length: int | None) -> tuple[list[int], list[list[int]]]:
    if max_prompt_length is not None and len(prompt_ids) > max_prompt_length:
        prompt_ids = prompt_ids[len(prompt_ids) - max_prompt_length:]
    if max_length is not None:
        room = max_length - len(prompt_ids)
        if room < 1:
            raise RowProblem(
                f"the prompt has {len(prompt_ids)} tokens, leaving no room for a completion within "
                f"max_length={max_length} (lower max_prompt_length or raise max_length)"
            )
        completions = [ids[:room] for ids in completions]
    return prompt_ids, completions


def tokenize_pair(pair: Pair, tokenizer, max_length: int | None, max_prompt_length: int | None) -> Example:
    prompt_ids, (chosen_ids, rejected_ids) = _encode(pair, [pair.chosen, pair.rejected], tokenizer)
    if chosen_ids == rejected_ids:
        raise RowProblem("chosen and rejected tokenize identically")
    prompt_ids, (chosen_ids, rejected_ids) = _truncate(prompt_ids, [chosen_ids, rejected_ids], max_length,
                                                       max_prompt_length)
    if chosen_ids == rejected_ids:
        raise RowProblem(f"chosen and rejected are identical once truncated to max_length={max_length}")
    return Example(prompt_ids, chosen_ids, rejected_ids, pair.weight, pair.margin)


def tokenize_group(group: Group, tokenizer, max_length: int | None, max_prompt_length: int | None) -> Example:
    def distinct(completions: list[list[int]], when: str) -> None:
        for k, ids in enumerate(completions[1:]):
            if ids == completions[0]:
                raise RowProblem(f"chosen and rejected reply {k} are identical {when}")

    prompt_ids, completions = _encode(group, [group.chosen, *group.rejected], tokenizer)
    distinct(completions, "as tokens")
    prompt_ids, completions = _truncate(prompt_ids, completions, max_length, max_prompt_length)
    distinct(completions, f"once truncated to max_length={max_length}")
    return Example(prompt_ids, completions[0], completions[1:], group.weight, group.margin)


def tokenize_unpaired(item: Unpaired, tokenizer, max_length: int | None, max_prompt_length: int | None) -> Example:
    """The completion's ids; `rejected_ids` stays empty until the loader gives it another row's completion."""
    prompt_ids, completions = _encode(item, [item.completion], tokenizer)
    prompt_ids, (completion_ids,) = _truncate(prompt_ids, completions, max_length, max_prompt_length)
    return Example(prompt_ids, completion_ids, [], item.weight, 0.0, label=item.label)


def tokenize_item(item: Pair | Group | Unpaired, tokenizer, max_length: int | None,
                  max_prompt_length: int | None) -> Example:
    encode = {Pair: tokenize_pair, Group: tokenize_group, Unpaired: tokenize_unpaired}[type(item)]
    return encode(item, tokenizer, max_length, max_prompt_length)
