"""The speed paths are exact: prefix sharing, padding-free block attention and the chunked LM head
give the log-probs (and gradients) of the plain padded computation."""

import random

import pytest
import torch
from transformers import AutoModelForCausalLM

from dpokit.data import Example
from dpokit.families.causal_lm import attention, scorer
from dpokit.families.causal_lm import CausalLMScorer, collate

LAYOUTS = {  # id: (share_prompt, padding_free)
    "plain": (False, False),
    "shared+padded": (True, False),
    "unshared+packed": (False, True),
    "shared+packed": (True, True),
}


def _examples(tokenizer, n=6, seed=0) -> list[Example]:
    """Pairs of very different lengths, so blocks and rows differ in size and padding is real."""
    rng = random.Random(seed)
    vocab = len(tokenizer)
    ids = lambda k: [rng.randrange(7, vocab) for _ in range(k)]  # noqa: E731  (past the special tokens)
    out = [Example(ids(rng.randint(1, 20)), ids(rng.randint(1, 12)), ids(rng.randint(1, 12))) for _ in range(n)]
    out.append(Example(ids(25), ids(1), ids(15)))  # one-token chosen
    return out


def _model(tiny_model_dir, attn, dtype=torch.float32):
    return AutoModelForCausalLM.from_pretrained(tiny_model_dir, attn_implementation=attn, dtype=dtype)


def _logps(model, examples, pad, layout, attn, chunk=1024):
    share, free = LAYOUTS[layout]
    terms = CausalLMScorer(model, chunk)(collate(examples, pad, share, free, 2048, attn))
    return terms


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_layouts_give_the_plain_log_probs(tiny_model_dir, tokenizer, attn):
    examples = _examples(tokenizer)
    model = _model(tiny_model_dir, attn)
    plain = _logps(model, examples, tokenizer.pad_token_id, "plain", attn)
    for layout in LAYOUTS:
        t = _logps(model, examples, tokenizer.pad_token_id, layout, attn)
        for ours, ref in ((t.chosen, plain.chosen), (t.rejected, plain.rejected)):
            assert torch.allclose(ours, ref, rtol=1e-5, atol=1e-5), (layout, (ours - ref).abs().max())
        assert torch.equal(t.chosen_len, plain.chosen_len) and torch.equal(t.rejected_len, plain.rejected_len)


@pytest.fixture(params=["per-block", "one-call"])
def attention_path(request, monkeypatch):
    """Block attention's two paths: one call per block (the CPU's) and all blocks gathered into one padded
    call (the GPU's), the latter forced here so CI, which has no GPU, checks it too."""
    monkeypatch.setattr(attention, "one_call", lambda query: request.param == "one-call")
    return request.param


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_layouts_agree_to_float64_precision(tiny_model_dir, tokenizer, attn, attention_path):
    # Weights in float64 (RMSNorm still rounds to float32 inside, so not every digit is float64): a leak
    # across blocks or into chosen moves a sum by far more than 1e-8.
    examples = _examples(tokenizer, seed=1)
    model = _model(tiny_model_dir, attn, torch.float64)
    plain = _logps(model, examples, tokenizer.pad_token_id, "plain", attn)
    for layout in ("shared+packed", "unshared+packed", "shared+padded"):
        t = _logps(model, examples, tokenizer.pad_token_id, layout, attn)
        assert (t.chosen - plain.chosen).abs().max() < 1e-8, layout
        assert (t.rejected - plain.rejected).abs().max() < 1e-8, layout


def test_each_pair_scored_alone_equals_its_place_in_a_batch(tiny_model_dir, tokenizer):
    examples = _examples(tokenizer, seed=2)
    model = _model(tiny_model_dir, "sdpa", torch.float64)
    batch = _logps(model, examples, tokenizer.pad_token_id, "shared+packed", "sdpa")
    for i, ex in enumerate(examples):
        alone = _logps(model, [ex], tokenizer.pad_token_id, "plain", "sdpa")
        assert batch.chosen[i].item() == pytest.approx(alone.chosen.item(), abs=1e-8)
        assert batch.rejected[i].item() == pytest.approx(alone.rejected.item(), abs=1e-8)


def test_rejected_really_is_blind_to_chosen(tiny_model_dir, tokenizer):
    # Changing chosen must not move the rejected log-prob: the mask, not luck, keeps them apart.
    ex = _examples(tokenizer, n=1, seed=3)[0]
    other = Example(ex.prompt_ids, [t + 1 for t in ex.chosen_ids], ex.rejected_ids)
    model = _model(tiny_model_dir, "sdpa", torch.float64)
    a = _logps(model, [ex], tokenizer.pad_token_id, "shared+packed", "sdpa")
    b = _logps(model, [other], tokenizer.pad_token_id, "shared+packed", "sdpa")
    assert a.rejected.item() == pytest.approx(b.rejected.item(), abs=1e-12)
    assert a.chosen.item() != pytest.approx(b.chosen.item(), abs=1e-6)


def test_packed_batch_has_no_padding_and_restarting_positions(tokenizer):
    examples = _examples(tokenizer)
    batch = collate(examples, tokenizer.pad_token_id, share_prompt=True, padding_free=True)
    total = sum(len(e.prompt_ids) + len(e.chosen_ids) + len(e.rejected_ids) for e in examples)
    assert batch["input_ids"].shape == (1, total)
    assert (batch["input_ids"] != tokenizer.pad_token_id).all()
    pos = batch["position_ids"][0].tolist()
    start = 0
    for e in examples:
        P, C, R = len(e.prompt_ids), len(e.chosen_ids), len(e.rejected_ids)
        assert pos[start:start + P + C + R] == list(range(P + C)) + list(range(P, P + R))  # rejected continues the prompt
        start += P + C + R


def test_gradients_match_the_plain_layout(tiny_model_dir, tokenizer, attention_path):
    examples = _examples(tokenizer, seed=4)
    grads = {}
    for layout in ("plain", "shared+packed"):
        model = _model(tiny_model_dir, "sdpa", torch.float64)
        t = _logps(model, examples, tokenizer.pad_token_id, layout, "sdpa")
        (t.chosen - 0.5 * t.rejected).sum().backward()
        grads[layout] = torch.cat([p.grad.flatten() for p in model.parameters()])
    # RMSNorm's float32 rounding and a different order of accumulation (the shared prompt gathers its
    # gradient from both completions at once) leave ~1e-7 of the largest gradient; a wrong mask, 1e-2.
    diff = (grads["plain"] - grads["shared+packed"]).abs().max()
    assert diff < 1e-5 * grads["plain"].abs().max()


def test_model_without_block_attention_uses_one_masked_row(tiny_model_dir, tokenizer, monkeypatch):
    examples = _examples(tokenizer, seed=5)
    model = _model(tiny_model_dir, "sdpa", torch.float64)
    plain = _logps(model, examples, tokenizer.pad_token_id, "plain", "sdpa")
    monkeypatch.setattr(scorer, "use_block_attention", lambda m: False)
    t = _logps(_model(tiny_model_dir, "sdpa", torch.float64), examples, tokenizer.pad_token_id, "shared+packed", "sdpa")
    assert (t.chosen - plain.chosen).abs().max() < 1e-8 and (t.rejected - plain.rejected).abs().max() < 1e-8


def test_block_attention_is_the_models_own_outside_dpokit_batches(tiny_model_dir, tokenizer):
    # Once the scorer switched the model to block attention, plain calls (generation, padded batches) must
    # behave exactly as before.
    model = _model(tiny_model_dir, "sdpa")
    ids = torch.tensor([[5, 9, 12, 30, 41, 7], [8, 8, 20, 0, 0, 0]])
    mask = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 0, 0, 0]])
    before = model(input_ids=ids, attention_mask=mask).logits
    CausalLMScorer(model)(collate(_examples(tokenizer, n=2), tokenizer.pad_token_id))
    assert model.config._attn_implementation == "dpokit_blocks_sdpa"
    after = model(input_ids=ids, attention_mask=mask).logits
    assert torch.equal(before[0], after[0]) and torch.equal(before[1, :3], after[1, :3])


def test_sliding_window_applies_inside_blocks(tokenizer, tmp_path, attention_path):
    from transformers import MistralConfig, MistralForCausalLM

    config = MistralConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, sliding_window=4,
                           pad_token_id=tokenizer.pad_token_id, attn_implementation="sdpa")
    torch.manual_seed(0)
    model = MistralForCausalLM(config).double()
    examples = _examples(tokenizer, seed=6)
    plain = _logps(model, examples, tokenizer.pad_token_id, "plain", "sdpa")
    t = _logps(model, examples, tokenizer.pad_token_id, "shared+packed", "sdpa")
    assert (t.chosen - plain.chosen).abs().max() < 1e-8 and (t.rejected - plain.rejected).abs().max() < 1e-8


# ---------------------------------------------------------------- the chunked LM head


def test_chunked_head_equals_unchunked_values_and_gradients(tiny_model_dir, tokenizer):
    examples = _examples(tokenizer, n=8, seed=7)
    out = {}
    for chunk in (0, 7):  # 0: chunking off
        model = _model(tiny_model_dir, "sdpa", torch.float64)
        t = _logps(model, examples, tokenizer.pad_token_id, "shared+packed", "sdpa", chunk=chunk)
        (t.chosen - 0.3 * t.rejected).sum().backward()
        out[chunk] = (t, torch.cat([p.grad.flatten() for p in model.parameters()]))
        with torch.no_grad():  # chunks without gradients (the reference pass) give the same values
            nograd = _logps(model, examples, tokenizer.pad_token_id, "shared+packed", "sdpa", chunk=chunk)
        assert torch.allclose(nograd.chosen, t.chosen, atol=1e-12)
    (a, ga), (b, gb) = out[0], out[7]
    assert torch.allclose(a.chosen, b.chosen, atol=1e-12) and torch.allclose(a.rejected, b.rejected, atol=1e-12)
    assert torch.allclose(a.chosen_logits, b.chosen_logits, atol=1e-12)
    assert (ga - gb).abs().max() < 1e-6 * ga.abs().max()


def test_chunked_head_never_holds_all_logits(tiny_model_dir, tokenizer):
    # What autograd keeps for backward is what stays in memory until then: with chunks, no logits at all
    # (each chunk is recomputed in backward), without, the whole tokens x vocab matrix.
    examples = _examples(tokenizer, n=8, seed=8)
    batch = collate(examples, tokenizer.pad_token_id)
    n_targets, vocab = batch["target_ids"].numel(), len(tokenizer)
    for size in (10_000, 8):
        model = _model(tiny_model_dir, "sdpa")
        logits_rows = []

        def pack(t):
            if t.dim() >= 1 and t.shape[-1] == vocab:
                logits_rows.append(t.numel() // vocab)
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            CausalLMScorer(model, size)(batch)
        if size > n_targets:
            assert max(logits_rows) == n_targets
        else:
            assert logits_rows == []
