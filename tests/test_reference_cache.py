"""Reference log-probs: computed once, cached on disk under a fingerprint of everything they depend on,
reused across runs, recomputed when any input changes, and the reference gone before training."""

import gc
import json
import weakref

import pytest
import torch

from dpokit.config import load_config
from dpokit.families.causal_lm import CausalLMFamily, CausalLMScorer
from dpokit.tiny import build_tokenizer
from dpokit.train import Loop

from conftest import ROWS, _corpus


def _cfg(tmp_path, model_dir, pairs_file, **kw):
    base = dict(model=str(model_dir), train_data=str(pairs_file), output_dir=str(tmp_path / "run"), max_steps=1,
                per_device_train_batch_size=4, learning_rate=1e-3, save_steps=0, disable_tqdm=True,
                ref_cache_dir=str(tmp_path / "cache"), report_to=[], max_prompt_length=None)
    base.update(kw)
    return load_config(None, **base)


class CountingFamily(CausalLMFamily):
    """Counts reference forward passes and keeps weak references to every reference model it loads."""

    def __init__(self):
        self.ref_forwards = 0
        self.loaded: list[weakref.ref] = []

    def load_model(self, path, cfg):
        model = super().load_model(path, cfg)
        self.loaded.append(weakref.ref(model))
        return model

    def scorer(self, model, cfg):
        scorer = super().scorer(model, cfg)
        family = self

        class Counting(CausalLMScorer):
            def forward(self, batch):
                if not torch.is_grad_enabled():
                    family.ref_forwards += 1
                return super().forward(batch)

        counting = Counting(scorer.model, scorer.chunk_size)
        return counting


def _precompute(cfg) -> tuple[CountingFamily, Loop]:
    family = CountingFamily()
    return family, Loop(cfg, family)


def _cache_files(tmp_path):
    return sorted(p.name for p in (tmp_path / "cache").rglob("*.safetensors"))


def test_second_run_hits_the_cache(tiny_model_dir, tiny_ref_dir, pairs_file, tmp_path):
    cfg = _cfg(tmp_path, tiny_model_dir, pairs_file, ref_model=str(tiny_ref_dir))
    first, loop1 = _precompute(cfg)
    assert first.ref_forwards == 1 and len(_cache_files(tmp_path)) == 1  # 8 pairs, one eval batch of 8
    second, loop2 = _precompute(cfg)
    assert second.ref_forwards == 0
    assert torch.equal(loop1.ref_train[0], loop2.ref_train[0]) and torch.equal(loop1.ref_train[1], loop2.ref_train[1])


@pytest.mark.parametrize("change", ["weights", "data", "truncation", "tokenizer", "config"])
def test_a_changed_input_is_a_miss(change, tiny_model_dir, tiny_ref_dir, pairs_file, tmp_path, tokenizer):
    base = dict(ref_model=str(tiny_ref_dir))
    _, loop = _precompute(_cfg(tmp_path, tiny_model_dir, pairs_file, **base))
    before = loop.ref_train
    kw = dict(base)
    if change == "weights":
        kw["ref_model"] = str(tiny_model_dir)  # another model of the same shape
    elif change == "data":
        other = tmp_path / "other.jsonl"
        rows = [dict(r) for r in ROWS]
        rows[3]["chosen"] = " Paris, of course."
        other.write_text("".join(json.dumps(r) + "\n" for r in rows))
        kw["train_data"] = str(other)
    elif change == "truncation":
        kw["max_prompt_length"] = 3  # prompts cut from the left
    elif change in ("tokenizer", "config"):
        # the same weights in a new folder, with another tokenizer or one config value changed
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(tiny_ref_dir)
        tok = tokenizer
        if change == "tokenizer":
            tok = build_tokenizer(_corpus(), vocab_size=300)  # fewer merges: other ids, same vocab size
            tok.add_tokens([f"<extra{i}>" for i in range(len(tokenizer) - len(tok))])
            assert len(tok) == len(tokenizer)
        else:
            model.config.rms_norm_eps = 1e-2
        path = tmp_path / f"ref-{change}"
        model.save_pretrained(path)
        tok.save_pretrained(path)
        kw["ref_model"] = str(path)
        if change == "tokenizer":
            kw["model"] = str(path)  # the policy's tokenizer encodes the data
    family, loop = _precompute(_cfg(tmp_path, tiny_model_dir, pairs_file, **kw))
    assert family.ref_forwards > 0, "a changed input must not hit the old cache"
    assert len(_cache_files(tmp_path)) == 2
    if change != "data" and change != "tokenizer":
        assert not torch.equal(before[0], loop.ref_train[0])


def test_unchanged_weights_in_a_new_folder_still_hit(tiny_model_dir, tiny_ref_dir, pairs_file, tmp_path):
    from transformers import AutoModelForCausalLM

    _precompute(_cfg(tmp_path, tiny_model_dir, pairs_file, ref_model=str(tiny_ref_dir)))
    copy = tmp_path / "copy"
    AutoModelForCausalLM.from_pretrained(tiny_ref_dir).save_pretrained(copy)
    family, _ = _precompute(_cfg(tmp_path, tiny_model_dir, pairs_file, ref_model=str(copy), output_dir=str(tmp_path / "b")))
    assert family.ref_forwards == 0  # the key is what the weights are, not where they live


def test_speed_switches_share_one_cache_entry(tiny_model_dir, tiny_ref_dir, pairs_file, tmp_path):
    # The layouts are exact, so they compute the same log-probs and need no entry of their own.
    _precompute(_cfg(tmp_path, tiny_model_dir, pairs_file, ref_model=str(tiny_ref_dir)))
    family, _ = _precompute(_cfg(tmp_path, tiny_model_dir, pairs_file, ref_model=str(tiny_ref_dir),
                                 share_prompt=False, padding_free=False, logits_chunk_size=3))
    assert family.ref_forwards == 0


def test_reference_model_is_gone_before_training(tiny_model_dir, tiny_ref_dir, pairs_file, tmp_path):
    family, loop = _precompute(_cfg(tmp_path, tiny_model_dir, pairs_file, ref_model=str(tiny_ref_dir), max_steps=2))
    assert loop.reference is None and loop.ref_train is not None
    gc.collect()
    assert len(family.loaded) == 1 and family.loaded[0]() is None  # nothing holds the reference model any more
    loop.run()


def test_precompute_off_keeps_the_reference_and_writes_no_cache(tiny_model_dir, tiny_ref_dir, pairs_file, tmp_path):
    family, loop = _precompute(_cfg(tmp_path, tiny_model_dir, pairs_file, ref_model=str(tiny_ref_dir),
                                    precompute_ref_log_probs=False))
    assert loop.ref_train is None and family.loaded[0]() is not None
    loop.run()
    assert family.ref_forwards == 1  # scored live, with the one micro-batch of the one step
    assert _cache_files(tmp_path) == []


def test_policy_as_reference_scores_its_starting_weights(tiny_model_dir, pairs_file, tmp_path):
    # No separate reference: the cache holds the policy's own log-probs before any step, so a second run
    # with the same starting weights hits it.
    family, loop = _precompute(_cfg(tmp_path, tiny_model_dir, pairs_file))
    assert family.ref_forwards > 0 and family.loaded == []  # no second model was loaded
    again, _ = _precompute(_cfg(tmp_path, tiny_model_dir, pairs_file, output_dir=str(tmp_path / "b")))
    assert again.ref_forwards == 0
