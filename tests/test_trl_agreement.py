"""dpokit's first training step agrees with TRL's `DPOTrainer` on the same model, reference and data.

Both trainers see one batch holding the whole tiny data set (so example order cannot matter
for the batch means), a policy and a *different* reference model, fp32, no dropout. The
first logged step is computed before any weight update, so `logps/*`, `rewards/*`, the
loss and the gradient norm must agree to float32 accuracy. TRL 1.16 is the peer.

Implicit-prompt strings: TRL takes the longest common *character* prefix of chosen and
rejected as the prompt (less a trailing space); dpokit cuts after the last "\n\nAssistant:".
The two agree when the replies differ from their first character, so every pair below
does (" It is 4." against " Five, I think.", not " It is 5.").
"""

from __future__ import annotations

import json

import datasets
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, GraniteConfig, GraniteForCausalLM
from trl import DPOConfig, DPOTrainer  # a test extra, imported plainly: a missing TRL is a failure, not a skip

import dpokit

from conftest import QA

BETA = 2.0  # large enough that z = beta·(margin of log-ratios) is of order 1, so every loss feels it
HISTORY = [("hello there", "hi, how can I help?")]  # an earlier exchange, in every other dialogue


def _turns(i: int, question: str) -> list[tuple[str, str]]:
    """(role, text) turns up to the reply; odd rows carry an earlier exchange, so the prompt has
    an assistant turn of its own and only the *last* one may start the reply."""
    earlier = [t for user, assistant in HISTORY for t in (("user", user), ("assistant", assistant))]
    return (earlier if i % 2 else []) + [("user", question)]


def _hh(turns: list[tuple[str, str]]) -> str:
    return "".join(f"\n\n{'Human' if role == 'user' else 'Assistant'}: {text}" for role, text in turns)


def _messages(turns: list[tuple[str, str]]) -> list[dict]:
    return [{"role": role, "content": text} for role, text in turns]


def make_rows(layout: str) -> list[dict]:
    rows = []
    for i, (q, good, bad) in enumerate(QA):
        turns = _turns(i, q)
        if layout == "standard":
            rows.append({"prompt": q, "chosen": " " + good, "rejected": " " + bad})
        elif layout == "conversational":
            rows.append({"prompt": _messages(turns), "chosen": _messages([("assistant", good)]),
                         "rejected": _messages([("assistant", bad)])})
        elif layout == "implicit":  # Anthropic HH strings
            prompt = _hh(turns) + "\n\nAssistant:"
            rows.append({"chosen": f"{prompt} {good}", "rejected": f"{prompt} {bad}"})
        elif layout == "implicit_conversational":
            rows.append({"chosen": _messages(turns + [("assistant", good)]),
                         "rejected": _messages(turns + [("assistant", bad)])})
    return rows


LAYOUTS = ["standard", "conversational", "implicit", "implicit_conversational"]
LOSSES = {  # id: (loss_type, label_smoothing)
    "sigmoid": ("sigmoid", 0.0),
    "ipo": ("ipo", 0.0),
    "robust": ("robust", 0.1),
    "hinge": ("hinge", 0.0),
}
SPEED = {  # id: (share_prompt, padding_free)
    "shared+packed": (True, True),
    "plain": (False, False),
}


def trl_first_step(rows, policy_dir, ref_dir, loss_type, label_smoothing, out) -> dict:
    trainer = DPOTrainer(
        model=AutoModelForCausalLM.from_pretrained(policy_dir),
        ref_model=AutoModelForCausalLM.from_pretrained(ref_dir),
        args=DPOConfig(
            output_dir=str(out), beta=BETA, loss_type=loss_type, label_smoothing=label_smoothing,
            per_device_train_batch_size=len(rows), max_length=None, max_steps=1, logging_steps=1,
            learning_rate=1e-6, report_to=[], use_cpu=True, bf16=False, gradient_checkpointing=False,
            save_strategy="no", disable_tqdm=True, seed=0,
        ),
        train_dataset=datasets.Dataset.from_list(rows),
        processing_class=AutoTokenizer.from_pretrained(policy_dir),
    )
    trainer.train()
    return trainer.state.log_history[0]


def dpokit_first_step(rows, policy_dir, ref_dir, loss_type, label_smoothing, speed, tmp) -> dict:
    data = tmp / "pairs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    share_prompt, padding_free = SPEED[speed]
    result = dpokit.train(dpokit.TrainConfig(
        model=str(policy_dir), ref_model=str(ref_dir), train_data=str(data), output_dir=str(tmp / "out"),
        ref_cache_dir=str(tmp / "cache"), beta=BETA, loss_type=loss_type, label_smoothing=label_smoothing,
        per_device_train_batch_size=len(rows), max_length=None, max_prompt_length=None, max_steps=1,
        logging_steps=1, learning_rate=1e-6, report_to=[], bf16=False, disable_tqdm=True, save_steps=0,
        share_prompt=share_prompt, padding_free=padding_free,
    ))
    return result.history[0]


@pytest.fixture(scope="module")
def trl_runs(tiny_model_dir, tiny_ref_dir, tmp_path_factory):
    """TRL's first logged step per (layout, loss), computed once for the module."""
    done: dict[tuple[str, str], dict] = {}

    def get(layout: str, loss: str) -> dict:
        if (layout, loss) not in done:
            loss_type, ls = LOSSES[loss]
            out = tmp_path_factory.mktemp(f"trl-{layout}-{loss}")
            done[layout, loss] = trl_first_step(make_rows(layout), tiny_model_dir, tiny_ref_dir, loss_type, ls, out)
        return done[layout, loss]

    return get


def assert_close(ours: dict, theirs: dict, keys):
    for key in keys:
        assert ours[key] == pytest.approx(theirs[key], rel=1e-4, abs=0), f"{key}: dpokit {ours[key]} vs TRL {theirs[key]}"


def assert_rewards_close(ours: dict, theirs: dict):
    # A reward is beta * (policy log-prob - reference log-prob): a small difference of two ~50-nat
    # sums, so float32 cancellation rules out a relative test. The sums differ only by the order
    # of float32 additions (~1e-7 relative), so allow 1e-5 of the sums: tight enough to see a
    # completion attending to the wrong context, which moves the sums by only about 1e-4.
    scale = BETA * 1e-5 * max(abs(theirs["logps/chosen"]), abs(theirs["logps/rejected"]))
    for key in ("rewards/chosen", "rewards/rejected", "rewards/margins"):
        assert ours[key] == pytest.approx(theirs[key], abs=scale), f"{key}: dpokit {ours[key]} vs TRL {theirs[key]}"
    assert ours["rewards/accuracies"] == theirs["rewards/accuracies"]


@pytest.mark.parametrize("speed", list(SPEED))
@pytest.mark.parametrize("loss", list(LOSSES))
@pytest.mark.parametrize("layout", LAYOUTS)
def test_first_step_matches_trl(layout, loss, speed, trl_runs, tiny_model_dir, tiny_ref_dir, tmp_path):
    theirs = trl_runs(layout, loss)
    loss_type, ls = LOSSES[loss]
    ours = dpokit_first_step(make_rows(layout), tiny_model_dir, tiny_ref_dir, loss_type, ls, speed, tmp_path)
    # logits/*: the mean logit over every completion token of the batch (token-weighted, as TRL logs it)
    assert_close(ours, theirs, ("logps/chosen", "logps/rejected", "loss", "grad_norm", "logits/chosen",
                                "logits/rejected"))
    assert_rewards_close(ours, theirs)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_conservative_dpo_matches_its_formula(layout, trl_runs, tiny_model_dir, tiny_ref_dir, tmp_path):
    # dpokit's sigmoid loss with label_smoothing is conservative DPO (cDPO), which TRL 1.16 no longer
    # has (its sigmoid ignores label_smoothing). Check it against the formula on TRL's numbers:
    # -(1-e)·logσ(z) - e·logσ(-z) = -logσ(z) + e·z, since logσ(-z) = logσ(z) - z, so the batch mean is
    # TRL's sigmoid loss + e · mean(z), and mean(z) is TRL's rewards/margins.
    eps = 0.1
    theirs = trl_runs(layout, "sigmoid")
    ours = dpokit_first_step(make_rows(layout), tiny_model_dir, tiny_ref_dir, "sigmoid", eps, "shared+packed", tmp_path)
    assert ours["loss"] == pytest.approx(theirs["loss"] + eps * theirs["rewards/margins"], rel=1e-4, abs=0)
    assert ours["loss"] != pytest.approx(theirs["loss"], rel=1e-3)  # the smoothing did change the loss


@pytest.fixture(scope="module")
def granite_dirs(tokenizer, tmp_path_factory):
    """A tiny Granite policy and reference: Granite divides its logits by `logits_scaling` in the
    LM head, outside the decoder, so a scorer that runs decoder and head itself must apply it too."""
    dirs = []
    for seed in (0, 1):
        config = GraniteConfig(
            vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=4, logits_scaling=0.25, pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.bos_token_id,
        )
        torch.manual_seed(seed)
        path = tmp_path_factory.mktemp(f"granite{seed}")
        GraniteForCausalLM(config).save_pretrained(path)
        tokenizer.save_pretrained(path)
        dirs.append(path)
    return dirs


def test_scaled_logits_model_matches_trl(granite_dirs, tmp_path):
    policy, ref = granite_dirs
    rows = make_rows("standard")
    theirs = trl_first_step(rows, policy, ref, "sigmoid", 0.0, tmp_path / "trl")
    ours = dpokit_first_step(rows, policy, ref, "sigmoid", 0.0, "shared+packed", tmp_path)
    assert_close(ours, theirs, ("logps/chosen", "logps/rejected", "loss", "grad_norm"))
    assert_rewards_close(ours, theirs)
