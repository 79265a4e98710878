"""Sampling completions of prompts from a causal LM: the one text sampler, behind `CausalLMFamily.sample`
(sample-based eval, the judge recipe and online DPO, the demo's task, the experiments' greedy replies)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import torch
from torch import nn
from tqdm.auto import tqdm

from ...errors import DpokitError


@dataclass
class Completion:
    prompt: Any  # as given: text, or a list of {role, content} messages
    prompt_ids: list[int]  # the prompt's tokens as the model read them
    completion_ids: list[int]  # as sampled, up to and including the end token when the model ended the reply
    text: str  # decoded, without the end token
    ended: bool  # the model ended the reply (False: cut off at max_new_tokens)


def prompt_ids(tokenizer, prompt, max_prompt_length: int | None = None) -> list[int]:
    """A prompt's tokens as training encodes them (chat template with the generation prompt for messages),
    the last `max_prompt_length` of them."""
    if isinstance(prompt, str):
        ids = list(tokenizer(prompt)["input_ids"])
    else:
        if tokenizer.chat_template is None:
            raise DpokitError("chat prompts need a tokenizer with a chat template")
        ids = list(tokenizer.apply_chat_template(prompt, tokenize=True, add_generation_prompt=True,
                                                 return_dict=True)["input_ids"])
    return ids[-max_prompt_length:] if max_prompt_length else ids


def stop_ids(model: nn.Module, tokenizer) -> set[int]:
    """The tokens that end a reply: the tokenizer's EOS and whatever the model's generation config adds."""
    ids = {tokenizer.eos_token_id}
    configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids.update(configured if isinstance(configured, list) else [configured])
    return {i for i in ids if i is not None}


def _batches(jobs: list[int], encoded: list[list[int]], batch_size: int, group_by_length: bool) -> list[list[int]]:
    """Which jobs (indices into `jobs`, each naming its prompt) each generate call runs: in order, or, grouping
    by length, one prompt length at a time from the shortest."""
    if group_by_length:
        by_length: dict[int, list[int]] = {}
        for j, i in enumerate(jobs):
            by_length.setdefault(len(encoded[i]), []).append(j)
        groups = [by_length[n] for n in sorted(by_length)]
    else:
        groups = [list(range(len(jobs)))]
    return [g[s:s + batch_size] for g in groups for s in range(0, len(g), batch_size)]


@torch.no_grad()
def sample(model: nn.Module, tokenizer, prompts: Sequence, *, num_generations: int = 1, max_new_tokens: int = 128,
           temperature: float = 1.0, top_p: float = 1.0, seed: int | None = None, batch_size: int = 8,
           max_prompt_length: int | None = None, group_by_length: bool = False, desc: str = "sample",
           progress: bool = False) -> list[Completion]:
    """`num_generations` completions of each prompt (text or a message list), prompt by prompt.

    Sampling draws from the whole distribution as tempered by `temperature` and cut by `top_p` (no top-k
    cut, whatever the model's generation config says); `temperature` 0 is greedy. `batch_size` sequences
    are generated at once, prompts left-padded; with `group_by_length` only prompts of one token length
    share a batch, so none is padded (more, smaller batches). `seed` seeds torch once before the first
    batch, so the same seed, prompts and settings draw the same completions; None leaves the generator as
    the caller set it. The model is sampled in eval mode and left in the mode it was in."""
    if not prompts:
        raise DpokitError("no prompts to sample from")
    encoded = [prompt_ids(tokenizer, p, max_prompt_length) for p in prompts]
    jobs = [i for i in range(len(prompts)) for _ in range(num_generations)]
    stop = stop_ids(model, tokenizer)
    gen = {"max_new_tokens": max_new_tokens, "do_sample": temperature > 0}
    if temperature > 0:
        gen.update(temperature=temperature, top_p=top_p, top_k=0)
    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id
    replies: dict[int, list[int]] = {}
    was_training = model.training
    model.eval()
    if seed is not None:
        torch.manual_seed(seed)
    try:
        for chunk in tqdm(_batches(jobs, encoded, batch_size, group_by_length), desc=desc, disable=not progress):
            rows = [encoded[jobs[j]] for j in chunk]
            width = max(map(len, rows))
            ids = torch.tensor([[pad] * (width - len(p)) + p for p in rows], device=device)
            mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in rows], device=device)
            seqs = model.generate(input_ids=ids, attention_mask=mask, pad_token_id=pad, eos_token_id=sorted(stop),
                                  **gen)
            for j, row in zip(chunk, seqs[:, width:].tolist()):
                end = next((k for k, t in enumerate(row) if t in stop), None)
                replies[j] = row if end is None else row[:end + 1]
    finally:
        model.train(was_training)
    ordered = [replies[j] for j in range(len(jobs))]
    texts = tokenizer.batch_decode([[t for t in r if t not in stop] for r in ordered], skip_special_tokens=True)
    return [Completion(prompts[i], encoded[i], r, text, bool(r) and r[-1] in stop)
            for i, r, text in zip(jobs, ordered, texts)]
