"""The CUDA path: SDPA block attention and the chunked head on the GPU, and the loop's bf16 default.

Skipped where torch sees no CUDA device (CI has none); run on a GPU machine with
`python -m pytest tests/test_gpu.py`. Every check compares against the plain computation on the
same device, so a wrong mask or a dtype slip shows as a difference, not as a crash.
"""

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from dpokit.families.causal_lm import CausalLMScorer, collate
from dpokit.train import Loop, train

from test_packing import LAYOUTS, _examples
from test_train import _cfg

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def _scores(model, examples, pad, layout, chunk=1024):
    share, free = LAYOUTS[layout]
    batch = collate(examples, pad, share, free, 2048, "sdpa")
    return CausalLMScorer(model, chunk)({k: v.cuda() for k, v in batch.items()})


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-4), (torch.bfloat16, 0.25)])
def test_block_attention_on_cuda_gives_the_plain_log_probs(tiny_model_dir, tokenizer, dtype, tol):
    # bf16 sums of ~10 token log-probs differ by rounding alone; a leak across blocks moves them by whole nats.
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, attn_implementation="sdpa", dtype=dtype).cuda()
    examples = _examples(tokenizer, seed=3)
    with torch.no_grad():
        plain = _scores(model, examples, tokenizer.pad_token_id, "plain")
        for layout in ("shared+packed", "unshared+packed", "shared+padded"):
            t = _scores(model, examples, tokenizer.pad_token_id, layout)
            assert (t.chosen.float() - plain.chosen.float()).abs().max() < tol, layout
            assert (t.rejected.float() - plain.rejected.float()).abs().max() < tol, layout


def test_chunked_head_on_cuda_matches_unchunked_gradients(tiny_model_dir, tokenizer):
    examples = _examples(tokenizer, n=8, seed=7)
    grads = {}
    for chunk in (0, 7):
        model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, attn_implementation="sdpa").cuda()
        t = _scores(model, examples, tokenizer.pad_token_id, "shared+packed", chunk=chunk)
        (t.chosen - 0.3 * t.rejected).sum().backward()
        grads[chunk] = torch.cat([p.grad.flatten() for p in model.parameters()])
    assert (grads[0] - grads[7]).abs().max() < 1e-4 * grads[0].abs().max()


# the loop's settings for a tiny run that learns the 8 pairs (test_train's config, bf16 left to its default)
LEARN = dict(max_steps=30, per_device_train_batch_size=8, learning_rate=1e-2)


def test_loop_defaults_to_bf16_autocast_with_fp32_weights(tiny_model_dir, pairs_file, tmp_path):
    loop = Loop(_cfg(tmp_path, tiny_model_dir, pairs_file, "probe", **LEARN))
    assert loop.acc.device.type == "cuda" and loop.acc.mixed_precision == "bf16"
    assert {p.dtype for p in loop.model.parameters()} == {torch.float32}  # master weights stay fp32

    result = train(_cfg(tmp_path, tiny_model_dir, pairs_file, "run", **LEARN))
    rows = [r for r in result.history if "loss" in r]
    assert rows[0]["rewards/accuracies"] <= 0.5 and rows[-1]["rewards/accuracies"] == 1.0
    assert rows[-1]["loss"] < rows[0]["loss"] - 0.2
    saved = load_file(str(tmp_path / "run" / "model.safetensors"))
    assert {t.dtype for t in saved.values()} == {torch.float32}


def test_cached_reference_matches_the_first_step(tiny_model_dir, pairs_file, tmp_path):
    # At the first step the policy is the reference, so its rewards are 0 only if the cached reference pass ran
    # with the training forward's precision and kernels (an fp32 reference against a bf16 policy is ~0.1 off).
    first = train(_cfg(tmp_path, tiny_model_dir, pairs_file, "run", max_steps=1, per_device_train_batch_size=8,
                       beta=1.0)).history[0]
    assert abs(first["rewards/chosen"]) < 0.02 and abs(first["rewards/rejected"]) < 0.02
