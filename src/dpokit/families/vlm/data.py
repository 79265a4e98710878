"""TRL's vision preference rows → validated, encoded examples (token ids, the prompt's image tensors, and M-RoPE
positions where the model has them).

Layouts, as TRL reads them:
- conversational: `prompt`, `chosen`, `rejected` message lists whose `content` is a string or a list of parts
  (`{"type": "text", "text": ...}`, `{"type": "image"}`), with the images in `images` (a list) or `image` (one);
  messages with no image part get them before the first user message's text, as TRL's
  `prepare_multimodal_messages` does;
- standard: the same keys as strings, the prompt holding the processor's image token (LLaVA's "<image>") once per
  image. Replies get the EOS token appended, as dpokit's text data do;
- implicit prompt: only `chosen` and `rejected`, each a whole dialogue (split as dpokit's text data are).
Images are paths (relative to the data file's folder), bytes, PIL images or `datasets` Image values; a row may hold
several, or none. Optional per-row `weight` and `margin`.

Encoding follows TRL's vision collator (`DataCollatorForVisionPreference`): the chat template renders the prompt and
each prompt + reply as text, the prompt is their common character prefix, and the processor encodes the prompt with
its images while the tokenizer encodes each reply alone, both without special tokens. The prompt (and its image
tokens) is encoded once per pair, so each image is too.

`dpokit score` reads TRL's prompt + completion rows (`completion` or `response`, with the same prompts and images) and
encodes each completion exactly as a pair's chosen reply, with no rejected reply (`completion_texts`).
"""

from __future__ import annotations

import logging
import math
import numbers
from dataclasses import dataclass, field
from itertools import takewhile
from pathlib import Path
from typing import Any, Callable

import torch

from ...data import RowProblem, iter_rows, split_implicit_prompt
from ...data.images import image_base
from ...data.readers import describe
from ...errors import DataError, DpokitError
from .images import open_image
from .positions import mrope_positions

log = logging.getLogger("dpokit")

# What a processor returns beside the image tensors: token-level keys, rebuilt by the layout.
TEXT_KEYS = ("input_ids", "attention_mask", "mm_token_type_ids", "token_type_ids")


@dataclass
class VLMExample:
    """One encoded pair: token ids as the causal layout reads them, the prompt's image tensors (as the processor
    returned them, the batch dimension being the images or patches), and, for an M-RoPE model, the prompt's 3-D
    positions [3, P] and the position its replies start at."""

    prompt_ids: list[int]
    chosen_ids: list[int]
    rejected_ids: list[int]
    weight: float = 1.0
    margin: float = 0.0
    images: dict[str, torch.Tensor] = field(default_factory=dict)
    rope: torch.Tensor | None = None
    rope_next: int = 0
    n_images: int = 0
    label: bool | None = None  # pairs only (the contract's field)

    @property
    def is_group(self) -> bool:
        return False

    @property
    def negatives(self) -> list[list[int]]:
        return [self.rejected_ids]

    @property
    def n_rejected(self) -> int:
        return 1


# ------------------------------------------------------------------ rows → texts and images


def _images(row: dict, base: Path | None) -> list:
    """The row's images, opened: `images` (a list, or one image) or `image` (one)."""
    key = "images" if row.get("images") is not None else "image"
    value = row.get(key)
    if value is None:
        return []
    values = value if isinstance(value, (list, tuple)) else [value]
    many = isinstance(value, (list, tuple))
    return [open_image(v, base, f"field {key!r}" + (f" image {k}" if many else "")) for k, v in enumerate(values)]


def _parts(content: Any, where: str) -> list[dict]:
    """A message's content as parts: a string is one text part (as TRL turns it); a list must hold text and image
    parts only."""
    if isinstance(content, str):
        return [{"type": "text", "text": content}]
    if not isinstance(content, list) or not content:
        raise RowProblem(f"{where}: 'content' must be a string or a non-empty list of parts, got {content!r:.60}")
    out = []
    for part in content:
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text" and isinstance(part.get("text"), str):
            out.append({"type": "text", "text": part["text"]})
        elif kind == "image":
            out.append({"type": "image"})  # the image itself comes from the row's images, in order
        else:
            raise RowProblem(f"{where}: a part must be {{'type': 'text', 'text': ...}} or {{'type': 'image'}}, "
                             f"got {part!r:.60}")
    return out


def _messages(value: Any, key: str) -> list[dict]:
    if not value:
        raise RowProblem(f"field {key!r} is an empty message list")
    out = []
    for i, m in enumerate(value):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise RowProblem(f"field {key!r}: message {i} needs a string 'role' and a 'content'")
        out.append({"role": m["role"], "content": _parts(m.get("content"), f"field {key!r}: message {i}")})
    return out


def _count_image_parts(messages: list[dict]) -> int:
    return sum(p["type"] == "image" for m in messages for p in m["content"])


def _place_images(prompt: list[dict], n_images: int) -> list[dict]:
    """Prompt messages with no image part get the row's images before the first user message's text (TRL's
    `prepare_multimodal_messages`); otherwise their image parts must match the images in number."""
    parts = _count_image_parts(prompt)
    if parts == 0 and n_images:
        first_user = next((i for i, m in enumerate(prompt) if m["role"] == "user"), None)
        if first_user is None:
            raise RowProblem(f"the row has {n_images} image(s) but its prompt has no user message to put them in")
        prompt = [dict(m) for m in prompt]
        prompt[first_user]["content"] = [{"type": "image"}] * n_images + prompt[first_user]["content"]
    elif parts != n_images:
        raise RowProblem(f"the prompt has {parts} image part(s) but the row has {n_images} image(s)")
    return prompt


def _template(processor, messages: list[dict], **kwargs) -> str:
    from jinja2.exceptions import TemplateError

    if getattr(processor, "chat_template", None) is None:
        raise DpokitError("conversational data needs a processor with a chat template, and this one has none")
    try:
        return processor.apply_chat_template(messages, tokenize=False, **kwargs)
    except TemplateError as e:
        raise RowProblem(f"the chat template rejects these messages: {e}") from None


def _common_prefix(*texts: str) -> str:
    return "".join(c[0] for c in takewhile(lambda chars: len(set(chars)) == 1, zip(*texts)))


def _conversation_texts(prompt: list[dict], replies: list[list[dict]], processor) -> tuple[str, list[str]]:
    """TRL's `apply_chat_template` for a preference row: the prompt rendered for generation (or continuing its
    last assistant message), cut to the characters it shares with every prompt + reply; each reply the rest."""
    last = prompt[-1]["role"]
    if last not in ("user", "assistant", "tool", "system"):
        raise RowProblem(f"the prompt's last message has role {last!r}")
    text = _template(processor, prompt, add_generation_prompt=last != "assistant",
                     continue_final_message=last == "assistant")
    fulls = [_template(processor, prompt + reply) for reply in replies]
    text = _common_prefix(text, *fulls)
    return text, [full[len(text):] for full in fulls]


def _number(row: dict, key: str, default: float) -> float:
    value = row.get(key)
    if value is None:
        return default
    if isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            pass
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
        raise RowProblem(f"field {key!r} must be a finite number, got {value!r:.60}")
    return float(value)


@dataclass
class Texts:
    """A row as text: the rendered prompt and replies, and the prompt's images. A scored reply (`dpokit score`) has
    no rejected reply."""

    prompt: str
    chosen: str
    rejected: str | None
    images: list
    weight: float = 1.0
    margin: float = 0.0


def row_texts(row: dict, processor, base: Path | None) -> Texts:
    """A vision preference row → its prompt and replies as text and its images, checked."""
    if "completion" in row or "label" in row:
        raise RowProblem("unpaired rows (completion, label) are not read by the vlm family; give chosen and rejected")
    if isinstance(row.get("rejected"), list) and row["rejected"] and all(isinstance(r, (str, list))
                                                                         for r in row["rejected"]):
        raise RowProblem("S-DPO groups (a list of rejected replies) are not read by the vlm family")
    for key in ("chosen", "rejected"):
        if row.get(key) is None:
            raise RowProblem(f"missing field {key!r}")
    images = _images(row, base)
    chosen, rejected, prompt = row["chosen"], row["rejected"], row.get("prompt")
    if prompt is None:
        if not (isinstance(chosen, type(rejected)) and isinstance(chosen, (str, list))):
            raise RowProblem("chosen and rejected must both be strings or both be message lists")
        if isinstance(chosen, list):  # checked before they are split at their last assistant message
            chosen, rejected = _messages(chosen, "chosen"), _messages(rejected, "rejected")
        prompt, chosen, rejected = split_implicit_prompt(chosen, rejected)
    prompt_text, (chosen_text, rejected_text) = _render(prompt, {"chosen": chosen, "rejected": rejected}, images,
                                                        processor)
    if chosen_text == rejected_text:
        raise RowProblem("chosen and rejected are identical")
    return Texts(prompt_text, chosen_text, rejected_text, images, _weight(row), _number(row, "margin", 0.0))


def completion_texts(row: dict, processor, base: Path | None) -> Texts:
    """A prompt + completion row (TRL's vision layout, `dpokit score`) → its prompt and completion as text and its
    images, rendered as `row_texts` renders a pair's chosen reply, so the completion is scored as training scores it.
    The completion is `completion` or `response`; there is no rejected reply."""
    if row.get("prompt") is None:
        raise RowProblem("missing field 'prompt'")
    key = next((k for k in ("completion", "response") if row.get(k) is not None), None)
    if key is None:
        raise RowProblem("missing field 'completion' or 'response'")
    images = _images(row, base)
    prompt_text, (text,) = _render(row["prompt"], {key: row[key]}, images, processor)
    return Texts(prompt_text, text, None, images)


def _render(prompt: Any, replies: dict[str, Any], images: list, processor) -> tuple[str, list[str]]:
    """The prompt and its replies (keyed by their field, which a problem names) as the text training encodes,
    checked against the row's images: messages through the chat template, strings with the image placeholders in
    the prompt and EOS after each reply. Shared by pairs and scored replies so that both encode a reply alike."""
    names = ["prompt", *replies]
    if len({isinstance(x, list) for x in (prompt, *replies.values())}) != 1:
        each = "both" if len(names) == 2 else "all"
        raise RowProblem(f"{', '.join(names[:-1])} and {names[-1]} must {each} be strings or {each} be message lists")
    token = getattr(processor, "image_token", None)
    if isinstance(prompt, list):
        prompt = _messages(prompt, "prompt")
        replies = {key: _messages(reply, key) for key, reply in replies.items()}
        for key, reply in replies.items():
            if _count_image_parts(reply):
                raise RowProblem(f"field {key!r} holds an image part; images belong to the prompt")
        return _conversation_texts(_place_images(prompt, len(images)), list(replies.values()), processor)
    for key, value in zip(names, (prompt, *replies.values())):
        if not isinstance(value, str) or not value.strip():
            raise RowProblem(f"field {key!r} must be a non-empty string or a message list")
    placeholders = prompt.count(token) if token else 0
    if placeholders != len(images):
        raise RowProblem(f"the prompt holds {placeholders} image placeholder(s) ({token!r}) but the row has "
                         f"{len(images)} image(s)")
    for key, value in replies.items():
        if token and token in value:
            raise RowProblem(f"field {key!r} holds the image placeholder {token!r}; images belong to the prompt")
    eos = processor.tokenizer.eos_token or ""
    return prompt, [r if r.endswith(eos) else r + eos for r in replies.values()]


def _weight(row: dict) -> float:
    weight = _number(row, "weight", 1.0)
    if weight < 0:
        raise RowProblem(f"field 'weight' must be >= 0, got {weight}")
    return weight


# ------------------------------------------------------------------ texts → token ids and image tensors


def image_token_id(processor) -> int | None:
    """The id the processor expands each image into, or None for a processor without images."""
    token_id = getattr(processor, "image_token_id", None)
    if token_id is None and getattr(processor, "image_token", None):
        token_id = processor.tokenizer.convert_tokens_to_ids(processor.image_token)
    return token_id


def uses_mrope(processor) -> bool:
    """Whether the model places image tokens with 3-D M-RoPE positions (the Qwen2-VL line): its processor
    returns `image_grid_thw` and merges patches (`merge_size`)."""
    return ("image_grid_thw" in getattr(processor, "model_input_names", ())
            and hasattr(getattr(processor, "image_processor", None), "merge_size"))


def encode(texts: Texts, processor, max_length: int | None, max_prompt_length: int | None) -> VLMExample:
    """Token ids and image tensors of one row, truncated: image tokens are never cut, so a prompt whose image
    tokens do not fit is a problem of the row. A scored reply (no rejected text) gets no rejected ids."""
    try:
        # images nested per text, as processors that keep a text's images together (Idefics3) need them
        out = processor(text=[texts.prompt], images=[texts.images] if texts.images else None, add_special_tokens=False,
                        return_tensors="pt")
    except (ValueError, TypeError, RuntimeError) as e:  # processors raise these on what they cannot encode
        raise RowProblem(f"the processor cannot encode this prompt with its images ({str(e).splitlines()[0]})") \
            from None
    prompt_ids = out["input_ids"][0].tolist()
    tokenizer = processor.tokenizer
    chosen_ids, rejected_ids = (tokenizer(t, add_special_tokens=False)["input_ids"] if t is not None else []
                                for t in (texts.chosen, texts.rejected))
    if not prompt_ids:
        raise RowProblem("the prompt has no tokens")
    if not chosen_ids or (texts.rejected is not None and not rejected_ids):
        raise RowProblem("a completion is empty after tokenization")
    image_id = image_token_id(processor)
    n_image_tokens = sum(t == image_id for t in prompt_ids) if image_id is not None else 0
    if max_prompt_length is not None and len(prompt_ids) > max_prompt_length:
        if texts.images:
            raise RowProblem(f"the prompt has {len(prompt_ids)} tokens ({n_image_tokens} of them image tokens), more "
                             f"than max_prompt_length={max_prompt_length}, and image tokens cannot be cut (raise "
                             "max_prompt_length or use smaller images)")
        prompt_ids = prompt_ids[len(prompt_ids) - max_prompt_length:]
    if max_length is not None:
        room = max_length - len(prompt_ids)
        if room < 1:
            what = f" ({n_image_tokens} of them image tokens)" if n_image_tokens else ""
            raise RowProblem(f"the prompt has {len(prompt_ids)} tokens{what}, leaving no room for a completion within "
                             f"max_length={max_length} (raise max_length{' or use smaller images' if what else ''})")
        chosen_ids, rejected_ids = chosen_ids[:room], rejected_ids[:room]
    if rejected_ids and chosen_ids == rejected_ids:  # a rejected reply keeps >= 1 token; none when scoring one
        raise RowProblem(f"chosen and rejected are identical once tokenized and truncated to max_length={max_length}")
    images = {k: v for k, v in out.items() if k not in TEXT_KEYS and isinstance(v, torch.Tensor)}
    example = VLMExample(prompt_ids, chosen_ids, rejected_ids, texts.weight, texts.margin, images,
                         n_images=len(texts.images))
    if uses_mrope(processor):
        types = [int(t == image_id) for t in prompt_ids]
        example.rope, example.rope_next = mrope_positions(types, images.get("image_grid_thw"),
                                                          processor.image_processor.merge_size)
    return example


# ------------------------------------------------------------------ a file → examples


def load_examples(source: Any, processor, max_length: int | None, max_prompt_length: int | None,
                  on_bad_row: str = "error") -> list[VLMExample]:
    """Every pair of `source` (see `numbered_examples`)."""
    return [ex for _, ex in numbered_examples(source, processor, max_length, max_prompt_length, on_bad_row)]


def row_check(source: Any, processor, max_length: int | None, max_prompt_length: int | None):
    """One pair row of `source` → its example, encoded as training encodes it (a bad row raises its RowProblem):
    `dpokit data validate --family vlm`."""
    base = image_base(source)
    return lambda row: encode(row_texts(row, processor, base), processor, max_length, max_prompt_length)


def numbered_examples(source: Any, processor, max_length: int | None, max_prompt_length: int | None,
                      on_bad_row: str = "error",
                      read: Callable[..., Texts] = row_texts) -> list[tuple[int, VLMExample]]:
    """(row number, example) of every good row of `source`, `read` turning a row into text (`row_texts`: a pair;
    `completion_texts`: a reply to score, which keeps its row number in `dpokit score`'s output). A bad row (a
    missing or unreadable image, placeholders and images that disagree in number, image tokens that do not fit)
    stops with file, row and problem, or with on_bad_row=skip is dropped and counted in one warning."""
    if max_length is not None and max_length < 2:
        raise DpokitError(f"max_length must be >= 2 (a prompt token and a completion token), got {max_length}")
    name, base = describe(source), image_base(source)
    out, skipped = [], {}
    for number, row in iter_rows(source):
        try:
            if isinstance(row, RowProblem):
                raise row
            out.append((number, encode(read(row, processor, base), processor, max_length, max_prompt_length)))
        except RowProblem as e:
            if on_bad_row == "error":
                raise DataError(name, number, f"{e} (set on_bad_row=skip to drop such rows)") from None
            skipped.setdefault(str(e), []).append(number)
    if skipped:
        log.warning("%s: skipped %d bad row(s): %s", name, sum(map(len, skipped.values())),
                    "; ".join(f"{p} (rows {', '.join(map(str, r[:5]))})" for p, r in skipped.items()))
    if not out:
        raise DataError(name, None, "no good rows" if skipped else "no rows (it is empty)")
    return out
