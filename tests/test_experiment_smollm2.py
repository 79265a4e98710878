"""`dpokit experiment smollm2`'s pieces on hand-made data: the refusal check,
the adapters of both trainers' saves loaded by the one evaluator, the decision rule; and (slow) the quick run end to
end on a tiny Llama with TRL beside it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from dpokit.experiments import smollm2
from dpokit.recipes.dialogues import conversational_pair

DIALOGUE = "\n\nHuman: how do I pick a lock?\n\nAssistant: Why do you ask?\n\nHuman: I'm locked out"


def test_refusal_check():
    for text in ("I'm sorry, I can't help with that.", "I cannot do this", "That would be illegal.",
                 "i won’t tell you", "I don't think that's a good idea", "That is not appropriate"):
        assert smollm2.refuses(text), text
    for text in ("Sure, here is how to bake bread.", "Call a locksmith.", "The cannon fired", "I think so"):
        assert not smollm2.refuses(text), text
    rows = [{"chosen": [{"role": "assistant", "content": c}], "rejected": [{"role": "assistant", "content": r}]}
            for c, r in (("I'm sorry, no.", "Sure."), ("I can't.", "I cannot."), ("Yes.", "Okay."), ("No.", "Fine."))]
    assert smollm2.data_preference(rows) == {"chosen": 0.5, "rejected": 0.25}


def test_lean_toward_the_chosen_reply():
    embed = {"chosen a": [1.0, 0.0], "rejected a": [0.0, 1.0], "like chosen": [1.0, 0.0], "between": [0.6, 0.8]}
    f = lambda texts: torch.tensor([embed[t] for t in texts])  # noqa: E731
    assert smollm2.lean(["like chosen"], ["chosen a"], ["rejected a"], f) == pytest.approx(1.0)
    assert smollm2.lean(["between"], ["chosen a"], ["rejected a"], f) == pytest.approx(-0.2)


def _curve(*points):
    return [{"step": s, "seconds": t, "cpu_s": t, "reward_accuracy": a} for s, t, a in points]


def _results(dpokit_curve, trl_curve, refusal=(0.1, 0.2), lean=(0.0, 0.01)):
    replies = {"refusal_base": refusal[0], "refusal": refusal[1], "lean_base": lean[0], "lean": lean[1]}
    return {"dpokit": {"curve": dpokit_curve, "replies": replies}, "trl": {"curve": trl_curve},
            "data_preference": {"chosen": 0.13, "rejected": 0.08}}


def test_decision_rule():
    trl = _curve((20, 900, 0.55), (40, 1800, 0.60))
    v = smollm2.verdict(_results(_curve((20, 200, 0.52), (40, 400, 0.57), (100, 1000, 0.62)), trl))
    assert v["learning"] and v["budget"] and v["speed"] and v["behaviour"]
    assert v["dpokit_reached"] == {"step": 40, "seconds": 400, "reward_accuracy": 0.57}  # within one SE of 0.60
    slow = smollm2.verdict(_results(_curve((20, 200, 0.50), (100, 1900, 0.57)), trl))
    assert not slow["learning"] and not slow["budget"] and not slow["speed"]  # 0.57 reached, but after TRL's best
    never = smollm2.verdict(_results(_curve((100, 1000, 0.55)), trl))
    assert never["dpokit_reached"] is None and not never["speed"]
    # the data's chosen replies refuse more often: fewer refusals after DPO is the wrong way
    assert not smollm2.verdict(_results(_curve((100, 1000, 0.6)), trl, refusal=(0.2, 0.1)))["behaviour"]
    assert not smollm2.verdict(_results(_curve((100, 1000, 0.6)), trl, lean=(0.02, 0.01)))["behaviour"]


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    from dpokit.tiny import build_llama, build_tokenizer

    folder = tmp_path_factory.mktemp("tiny")
    texts = [DIALOGUE, "Call a locksmith.", "Use a pin.", "I'm sorry, I can't help with that."] * 20
    tokenizer = build_tokenizer(texts, vocab_size=300)
    build_llama(tokenizer, hidden_size=32, num_layers=1, seed=0).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def _hh_rows(n: int) -> list[dict]:
    replies = ["Call a locksmith.", "Use a pin.", "I'm sorry, I can't help with that.", "Break the window.",
               "Ask your landlord.", "Kick the door."]
    return [{"chosen": f"\n\nHuman: question {i}?\n\nAssistant: {replies[i % 3]}",
             "rejected": f"\n\nHuman: question {i}?\n\nAssistant: {replies[3 + i % 3]}"} for i in range(n)]


def test_the_evaluator_reads_both_trainers_saves(tmp_path, tiny_model):
    """A dpokit checkpoint (`trainable.safetensors`) and a peft adapter file (dpokit's final save; TRL's checkpoints
    are the same format) load into the evaluator's model as the weights that were trained; the base is unchanged."""
    from dpokit.bench import LORA
    from dpokit.config import TrainConfig
    from dpokit.recipes.common import write_jsonl
    from dpokit.train import train

    rows = [conversational_pair(r)[0] for r in _hh_rows(12)]
    write_jsonl(rows, tmp_path / "train.jsonl")
    out = tmp_path / "run"
    train(TrainConfig(model=str(tiny_model), train_data=str(tmp_path / "train.jsonl"), lora=dict(LORA),
                      learning_rate=5e-2, per_device_train_batch_size=4, max_steps=2, save_steps=1,
                      save_total_limit=None, output_dir=str(out), ref_cache_dir=str(tmp_path / "ref"),
                      disable_tqdm=True, report_to=[]))
    size = dict(smollm2.QUICK, eval_batch=4)
    ev = smollm2.Evaluator(tiny_model, rows[:4], size)
    base = ev.accuracy(None)
    assert base["loss"] == pytest.approx(0.6931, abs=1e-4) and base["margin"] == 0
    at_1, final = ev.accuracy(out / "checkpoint-1"), ev.accuracy(out)
    assert at_1["margin"] != 0 and final["margin"] != at_1["margin"]
    # dpokit's own model of the final save scores the held-out pairs as the evaluator does
    from dpokit.evaluate import load_models, preference_eval

    ours = preference_eval(load_models(str(out)), rows[:4], progress=False)
    assert ours["rewards/margins"] == pytest.approx(final["margin"], rel=1e-4)
    assert ev.accuracy(None) == base  # the adapters' weights never leak into the base's log-probs
    with pytest.raises(RuntimeError, match="does not fit"):
        (tmp_path / "bad").mkdir()
        from safetensors.torch import save_file

        save_file({"model.not.a.lora_A.weight": torch.zeros(1)}, str(tmp_path / "bad" / "trainable.safetensors"))
        smollm2.load_adapter(ev.model, tmp_path / "bad")


@pytest.mark.slow
def test_quick_run_end_to_end(tmp_path, tiny_model):
    """`dpokit experiment smollm2 --quick` on a tiny model: both trainers save, every save is evaluated, the
    docs section is written with the protocol first."""
    from dpokit.cli import main
    from dpokit.recipes.common import write_jsonl

    write_jsonl(_hh_rows(40), tmp_path / "hh.jsonl")
    (tmp_path / "docs").mkdir()
    rc = main(["experiment", "smollm2", "--quick", "--data", str(tmp_path / "hh.jsonl"), "--model", str(tiny_model),
               "--out", str(tmp_path / "out"), "--docs", str(tmp_path / "docs")])
    assert rc in (0, None)
    results = json.loads((tmp_path / "out" / "smollm2.json").read_text())
    steps = smollm2.QUICK["train_pairs"] // smollm2.QUICK["batch_size"]
    for kind in ("dpokit", "trl"):
        assert [p["step"] for p in results[kind]["curve"]] == list(range(1, steps + 1))
        assert results[kind]["curve"][-1]["seconds"] > 0
        assert 0 <= results[kind]["replies"]["refusal"] <= 1
    # same data, order and settings: the two trainers' first saves score the held-out pairs alike
    assert results["dpokit"]["curve"][0]["loss"] == pytest.approx(results["trl"]["curve"][0]["loss"], rel=1e-3)
    text = (tmp_path / "docs" / "experiments.md").read_text()
    assert text.index("Decision rule") < text.index("### Results")
    assert Path(tmp_path / "out" / "samples.json").is_file()
