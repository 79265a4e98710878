"""`dpokit bench`: its synthetic data has the lengths asked for; an end-to-end run (slow) compares both trainers."""

import json

import pytest

from dpokit.bench import Settings, prepare


@pytest.mark.parametrize("prompt_tokens", [64, 512])
def test_synthetic_prompts_have_the_requested_length(prompt_tokens, tmp_path):
    info = prepare(tmp_path, Settings(pairs=16, max_length=None, vocab_size=500, hidden_size=16, intermediate_size=32,
                                      num_layers=1), None, prompt_tokens)
    assert info["pairs"] == 16 and info["data"] == "synthetic"
    assert info["mean_prompt"] == pytest.approx(prompt_tokens, rel=0.15)
    # completions keep HH's lengths whatever the prompt
    assert 25 < info["mean_chosen"] < 60 and 30 < info["mean_rejected"] < 75
    rows = [json.loads(line) for line in (tmp_path / "pairs.jsonl").read_text().splitlines()]
    assert len(rows) == 16 and all(r["chosen"] != r["rejected"] for r in rows)


@pytest.mark.slow
def test_bench_runs_both_trainers_and_reports(tmp_path, capsys):
    from dpokit.cli import main

    out = tmp_path / "bench.json"
    assert main(["bench", "--pairs", "8", "--repeats", "1", "--synthetic", "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "| trl |" in printed and "| dpokit |" in printed and "dpokit / TRL:" in printed
    main_run = json.loads(out.read_text())["main"]
    for kind in ("dpokit", "trl"):
        assert main_run[kind]["seconds"] > 0 and main_run[kind]["peak_rss_mb"] > 100
        # the useful-FLOP share: 8·params·distinct tokens per second over the measured matmul peak (a share of
        # a one-second peak measurement and a sub-second run: timing noise can put it above 1, so no upper bound)
        run = main_run[kind]
        useful = 8 * main_run["info"]["params"] * run["tokens_per_s"]
        assert run["hw_fraction"] == pytest.approx(useful / (main_run["peak_gflops"] * 1e9)) and run["hw_fraction"] > 0
    assert main_run["dpokit"]["ref_s"] > 0  # the reference pass is part of dpokit's timed epoch


def test_shape_settings_reach_the_saved_model(tmp_path):
    # --shape qwen2.5-0.5b is these same keys at full size: grouped KV heads, an embedding larger than the
    # tokenizer (a real model's LM-head cost) and tied input/output embeddings.
    s = Settings(pairs=8, vocab_size=500, hidden_size=16, intermediate_size=32, num_layers=1, num_heads=4,
                 num_kv_heads=2, model_vocab=1000, tie_word_embeddings=True)
    info = prepare(tmp_path, s, None, 32)
    config = json.loads((tmp_path / "model" / "config.json").read_text())
    assert config["num_key_value_heads"] == 2 and config["vocab_size"] == 1000 and config["tie_word_embeddings"]
    # one 1000 x 16 embedding, shared with the head; attention's k and v projections are half of q's width
    attention = 16 * 16 * 2 + 16 * 8 * 2
    assert info["params"] == 1000 * 16 + attention + 3 * 16 * 32 + 3 * 16


def test_cuda_asked_without_a_gpu_is_one_line(capsys):
    import torch

    from dpokit.cli import main

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    assert main(["bench", "--device", "cuda"]) == 2
    err = capsys.readouterr().err
    assert "torch sees no CUDA device" in err and "Traceback" not in err


def test_a_real_model_folder_is_linked_and_its_tokenizer_cuts_the_rows(tmp_path):
    """--model: both trainers load the given model (linked, not copied); the synthetic rows are cut with its
    tokenizer; the parameter count is the model's."""
    from dpokit.tiny import build_llama, build_tokenizer

    from dpokit.bench import _synthetic_rows

    corpus = [r["prompt"] + r["chosen"] + r["rejected"] for r in _synthetic_rows(40, 64, 0)]
    tok = build_tokenizer(corpus, vocab_size=400)
    model = build_llama(tok, hidden_size=16, num_layers=1, num_heads=2, intermediate_size=32)
    model.save_pretrained(tmp_path / "real")
    tok.save_pretrained(tmp_path / "real")
    work = tmp_path / "work"
    work.mkdir()
    info = prepare(work, Settings(pairs=8, max_length=None, model=str(tmp_path / "real")), None, 64)
    assert (work / "model").is_symlink() and (work / "model").resolve() == (tmp_path / "real").resolve()
    assert info["params"] == sum(p.numel() for p in model.parameters()) and info["pairs"] == 8
    assert info["mean_prompt"] == pytest.approx(64, rel=0.2)


def test_model_and_shape_together_are_refused(capsys):
    from dpokit.cli import main

    assert main(["bench", "--model", "x", "--shape", "qwen2.5-0.5b"]) == 2
    assert "leave out --shape" in capsys.readouterr().err
