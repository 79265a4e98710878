"""Shared fixtures: a tokenizer trained on the spot and tiny Llama models saved to disk."""

import json

import pytest
import torch

from dpokit.tiny import build_llama, build_tokenizer

torch.set_num_threads(1)

ROWS = [
    {"prompt": "What is 2+2?", "chosen": " It is 4.", "rejected": " It is 5, I think."},
    {"prompt": "Name a color.", "chosen": " Blue is one.", "rejected": " Seven."},
    {"prompt": "Say hello politely.", "chosen": " Hello, nice to meet you.", "rejected": " Go away."},
    {"prompt": "What is the capital of France?", "chosen": " Paris.", "rejected": " London, surely."},
    {"prompt": "Is water wet?", "chosen": " Yes, by most definitions.", "rejected": " No."},
    {"prompt": "Count to three.", "chosen": " One, two, three.", "rejected": " One, three, two."},
    {"prompt": "Give me a fruit.", "chosen": " An apple.", "rejected": " A chair."},
    {"prompt": "How are you?", "chosen": " Fine, thanks for asking.", "rejected": " Why do you care?"},
]

# For the TRL comparisons: (question, chosen reply, rejected reply), the replies differing from their first
# character, since TRL takes the longest common character prefix of an implicit-prompt pair as the prompt.
QA = [
    ("What is 2+2?", "It is 4.", "Five, I think."),
    ("Name a color.", "Blue is one.", "Seven."),
    ("Say hello politely.", "Hello, nice to meet you.", "Go away."),
    ("What is the capital of France?", "Paris.", "London, surely."),
    ("Is water wet?", "Yes, by most definitions.", "No."),
    ("Count to three.", "One, two, three.", "Three, two, one."),
    ("Give me a fruit.", "An apple.", "Chair."),
    ("How are you?", "Fine, thanks for asking.", "Why do you care?"),
]

def _corpus():
    texts = []
    for r in ROWS:
        texts += [r["prompt"] + r["chosen"], r["prompt"] + r["rejected"]]
    texts += ["\n\nHuman: hello there\n\nAssistant: hi, how can I help?", "user assistant system end"]
    return texts * 5


@pytest.fixture(scope="session")
def tokenizer():
    return build_tokenizer(_corpus(), vocab_size=400)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, tokenizer):
    """A tiny Llama policy saved in Hugging Face format."""
    path = tmp_path_factory.mktemp("tiny_model")
    build_llama(tokenizer, hidden_size=32, num_layers=2, num_heads=4, seed=0).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_ref_dir(tmp_path_factory, tokenizer):
    """A *different* tiny Llama (other seed), for tests that need a separate reference."""
    path = tmp_path_factory.mktemp("tiny_ref")
    build_llama(tokenizer, hidden_size=32, num_layers=2, num_heads=4, seed=1).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture
def pairs_file(tmp_path):
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    return path


@pytest.fixture
def cache_dir(tmp_path, monkeypatch):
    """Reference caches go to the test's own folder."""
    monkeypatch.setenv("DPOKIT_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"
