"""Instructional Segment Embeddings (dpokit.experiments.segments): segments read off delimiter tokens, a zero
table changes nothing, a segment's vector reaches exactly the tokens of that segment, and the model survives
dpokit's row layouts, a KV cache, and a save/load through dpokit's loader once the module is imported."""

import json
import math
import random

import pytest
import torch

from dpokit.config import TrainConfig
from dpokit.data import Example
from dpokit.families.causal_lm import CausalLMFamily, CausalLMScorer, collate
# importing the experiment module registers the ISE classes with transformers' Auto classes, which the tests
# that load a saved segment model through dpokit (and train one with dpokit.train) rely on
from dpokit.experiments.segments import SegmentLlamaForCausalLM, segment_ids, with_segment_embeddings
from dpokit.tiny import build_llama
from dpokit.train import train

from test_train import _cfg


def _ids(tokenizer, *names):
    return [tokenizer.convert_tokens_to_ids(n) for n in names]


@pytest.fixture
def delimiters(tokenizer):
    """segment 0: the reply (opened by <|assistant|>, and the default), 1: system, 2: user."""
    reply, system, user = _ids(tokenizer, "<|assistant|>", "<|system|>", "<|user|>")
    return [[reply], [system], [user]]


@pytest.fixture
def ise_model(tokenizer, delimiters):
    model = with_segment_embeddings(build_llama(tokenizer, seed=3), delimiters).eval()
    with torch.no_grad():
        model.model.embed_tokens.segments.weight.normal_(0, 0.5, generator=torch.Generator().manual_seed(0))
    return model


def _words(rng, tokenizer, k):
    return [rng.randrange(7, len(tokenizer)) for _ in range(k)]  # past the special tokens


def _prompt(rng, tokenizer, delimiters):
    (reply,), (system,), (user,) = delimiters
    return [system] + _words(rng, tokenizer, rng.randint(1, 6)) + [user] + _words(rng, tokenizer, rng.randint(1, 6)) \
        + [reply]


def test_a_token_belongs_to_the_segment_its_last_delimiter_opened():
    table = torch.full((20,), -1)
    table[10], table[11], table[12] = 0, 1, 2  # token 10 opens segment 0, 11 opens 1, 12 opens 2
    # two packed sequences in one row; the leading tokens have seen no delimiter yet
    row = torch.tensor([[5, 11, 5, 5, 12, 5, 10, 5, 11, 5, 10, 5]])
    assert segment_ids(row, table, default_segment=0).tolist() == [[0, 1, 1, 1, 2, 2, 0, 0, 1, 1, 0, 0]]
    assert segment_ids(row, table, default_segment=2)[0, 0].item() == 2


def test_a_zero_table_is_the_plain_model_and_a_segment_vector_reaches_only_its_segment(tokenizer, delimiters):
    plain = build_llama(tokenizer, seed=3).eval()
    ise = with_segment_embeddings(plain, delimiters).eval()
    prompt = _prompt(random.Random(0), tokenizer, delimiters)
    x = torch.tensor([prompt])
    assert torch.equal(ise(x).logits, plain(x).logits)
    user_at = prompt.index(delimiters[2][0])
    with torch.no_grad():
        ise.model.embed_tokens.segments.weight[2].normal_()  # the user segment only
    moved = (ise(x).logits - plain(x).logits).abs().amax(-1)[0]
    assert torch.all(moved[:user_at] == 0) and torch.all(moved[user_at:] > 0)  # causal: nothing before it moves


def test_the_row_layouts_give_the_log_probs_of_one_sequence_at_a_time(tokenizer, delimiters, ise_model):
    """Packed rows and the shared-prompt layout (rejected after chosen in one row) must give each completion
    the segments it has alone: the reply's, opened by the prompt's last delimiter."""
    rng = random.Random(1)
    examples = [Example(_prompt(rng, tokenizer, delimiters), _words(rng, tokenizer, rng.randint(1, 5)),
                        _words(rng, tokenizer, rng.randint(1, 5))) for _ in range(5)]

    def alone(prompt, completion):
        ids = torch.tensor([prompt + completion])
        logp = ise_model(ids).logits[0, :-1].log_softmax(-1).gather(-1, ids[0, 1:, None])[:, 0]
        return logp[len(prompt) - 1:].sum()

    with torch.no_grad():
        want = torch.stack([alone(e.prompt_ids, e.chosen_ids) for e in examples])
        want_rejected = torch.stack([alone(e.prompt_ids, e.rejected_ids) for e in examples])
        for share, free in ((False, False), (True, False), (True, True)):
            terms = CausalLMScorer(ise_model)(collate(examples, tokenizer.pad_token_id, share, free))
            assert torch.allclose(terms.chosen, want, atol=1e-5), (share, free)
            assert torch.allclose(terms.rejected, want_rejected, atol=1e-5), (share, free)


def test_generation_with_a_kv_cache_gives_new_tokens_the_reply_segment(tokenizer, delimiters, ise_model):
    x = torch.tensor([_prompt(random.Random(2), tokenizer, delimiters)])
    kw = dict(do_sample=False, max_new_tokens=8, pad_token_id=tokenizer.pad_token_id, eos_token_id=None)
    cached = ise_model.generate(x, use_cache=True, **kw)
    assert torch.equal(cached, ise_model.generate(x, use_cache=False, **kw))
    # the same check fails when cached tokens would get another segment than the uncached pass gives them
    ise_model.model.embed_tokens.default_segment = 1
    assert not torch.equal(ise_model.generate(x, use_cache=True, **kw)[:, x.shape[1]:], cached[:, x.shape[1]:])


def test_saved_model_loads_back_through_dpokit_with_its_segments(tmp_path, tokenizer, delimiters, ise_model):
    ise_model.save_pretrained(tmp_path)
    cfg = TrainConfig(model=str(tmp_path), output_dir=str(tmp_path / "out"))
    loaded = CausalLMFamily().load_model(str(tmp_path), cfg)
    assert isinstance(loaded, SegmentLlamaForCausalLM)
    x = torch.tensor([_prompt(random.Random(3), tokenizer, delimiters)])
    assert torch.allclose(loaded(x).logits, ise_model(x).logits, atol=1e-6)


def test_bad_delimiters_are_refused(tokenizer):
    plain = build_llama(tokenizer)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        with_segment_embeddings(plain, [[0], [10 ** 6]])
    with pytest.raises(ValueError, match="default_segment"):
        with_segment_embeddings(plain, [[4], [5]], default_segment=2)


def test_dpokit_trains_the_segment_table_against_a_reference_that_keeps_its_segments(tmp_path, tokenizer, delimiters,
                                                                                     ise_model):
    ise_model.save_pretrained(tmp_path / "model")
    tokenizer.save_pretrained(tmp_path / "model")
    rng = random.Random(4)
    rows = [{"prompt": f"<|system|>Be brief.<|user|>Name a {rng.choice(['fruit', 'tree', 'bird'])}.<|assistant|>",
             "chosen": rng.choice(["apple", "oak", "wren"]), "rejected": rng.choice(["no", "later", "maybe"])}
            for _ in range(16)]
    (tmp_path / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = _cfg(tmp_path, tmp_path / "model", tmp_path / "pairs.jsonl", max_steps=3, learning_rate=1e-2)
    out = train(cfg).output_dir
    first = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[0])
    # the segment table is random, so a reference without it would not score step 1 as the policy does
    assert abs(first["rewards/margins"]) < 1e-6 and abs(first["loss"] - math.log(2)) < 1e-5
    trained = CausalLMFamily().load_model(str(out), cfg)
    before, after = ise_model.model.embed_tokens.segments.weight, trained.model.embed_tokens.segments.weight
    assert isinstance(trained, SegmentLlamaForCausalLM)
    assert all(not torch.equal(before[k], after[k]) for k in range(3))  # every segment occurs, every row learns
