"""Tokenizers and small models built on the spot, for the demo, benchmarks and tests.

Nothing here is downloaded: a byte-level BPE tokenizer is trained on given texts with the
`tokenizers` library and a Llama-shaped model is built from a config with random weights.
"""

from __future__ import annotations

from typing import Iterable

CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def build_tokenizer(texts: Iterable[str], vocab_size: int = 1000, extra_special_tokens: Iterable[str] = ()):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<eos>", "<bos>", "<|end|>", "<|user|>", "<|assistant|>", "<|system|>"]
    specials += [t for t in extra_special_tokens if t not in specials]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(list(texts), trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", pad_token="<pad>", bos_token="<bos>")
    fast.chat_template = CHAT_TEMPLATE
    return fast


def build_llama(tokenizer, hidden_size: int = 64, num_layers: int = 2, num_heads: int = 4,
                intermediate_size: int | None = None, max_position_embeddings: int = 2048, seed: int = 0,
                attn_implementation: str = "sdpa", tie_word_embeddings: bool = False,
                num_kv_heads: int | None = None, vocab_size: int | None = None):
    """A randomly initialised Llama; `vocab_size` (at least the tokenizer's) gives a real model's LM-head cost."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=max(vocab_size or 0, len(tokenizer)), hidden_size=hidden_size,
        intermediate_size=intermediate_size or 4 * hidden_size, num_hidden_layers=num_layers,
        num_attention_heads=num_heads, num_key_value_heads=num_kv_heads or num_heads,
        max_position_embeddings=max_position_embeddings, pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.bos_token_id,
        tie_word_embeddings=tie_word_embeddings, attn_implementation=attn_implementation,
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(config)


class single_thread:
    """Run a block with one torch thread, restoring the count after.

    A model this small gains nothing from intra-op threads, and on shared cores extra threads
    spin against each other (about ten times slower, measured on 2 busy cores).
    """

    def __enter__(self):
        import torch

        self.threads = torch.get_num_threads()
        torch.set_num_threads(1)

    def __exit__(self, *exc):
        import torch

        torch.set_num_threads(self.threads)
        return False
