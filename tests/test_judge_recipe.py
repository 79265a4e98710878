"""The judge (RLAIF) recipe: k sampled replies per prompt, scored by a judge, best vs worst."""

import json
import math
from collections import Counter

import pytest

from dpokit.cli import main
from dpokit.data import load_pairs
from dpokit.judges import CallableJudge
from dpokit.recipes.common import write_jsonl
from dpokit.recipes.judge import judge_pairs, load_policy, pairs_from_scores

PROMPTS = ["What is 2+2?", "Name a color.", "Say hello politely.", [{"role": "user", "content": "Is water wet?"}],
           "Count to three.", "Give me a fruit."]


def vowel_share(prompt, response):
    return sum(c in "aeiou" for c in response) / max(len(response), 1)


def _sample(index, prompt, response, score, ended=True):
    return {"index": index, "prompt": prompt, "response": response, "score": score, "ended": ended}


def test_pairs_from_scores_best_against_worst(tmp_path):
    chat = [{"role": "user", "content": "hi"}]
    samples = [
        *[_sample(0, "p0", t, s) for t, s in (("b", 0.2), ("best", 0.9), ("c", 0.5), ("worst", 0.1))],
        *[_sample(1, "p1", t, 0.5) for t in ("x", "y", "z")],  # a tie is no preference
        _sample(2, "p2", "   ", 5.0), _sample(2, "p2", "unscored", math.nan),  # neither may take part
        _sample(2, "p2", "good", 0.7), _sample(2, "p2", "bad", -0.3),
        _sample(3, "p3", "close", 0.4), _sample(3, "p3", "closer", 0.1),  # gap 0.3: below min_gap 0.5
        _sample(4, chat, "hello", 1.0), _sample(4, chat, "go", 0.0),
        _sample(5, "p5", "same", 1.0), _sample(5, "p5", " same ", 0.0),  # the same text twice teaches nothing
    ]
    built = pairs_from_scores(samples, min_gap=0.5, margin_scale=2.0)
    got = {json.dumps(r["prompt"]): (r["chosen"], r["rejected"], r["margin"]) for r in built.rows}
    assert got == {'"p0"': ("best", "worst", pytest.approx(1.6)), '"p2"': ("good", "bad", pytest.approx(2.0)),
                   json.dumps(chat): ([{"role": "assistant", "content": "hello"}],
                                      [{"role": "assistant", "content": "go"}], pytest.approx(2.0))}
    assert built.counts == Counter(prompts=6, samples=17, pairs=3, no_pair=3, blank_replies=1, unscored_replies=1)
    assert built.score_mean == pytest.approx(sum(s["score"] for s in samples if not math.isnan(s["score"])) / 16)
    write_jsonl(built.rows, tmp_path / "pairs.jsonl")
    assert [p.chosen for p in load_pairs(tmp_path / "pairs.jsonl")][0] == "best"

    # A reply cut off at max_new_tokens loses the penalty before the choice.
    cut = [_sample(0, "p", "long and unfinished", 1.0, ended=False), _sample(0, "p", "short.", 0.8)]
    assert pairs_from_scores(cut).rows[0]["chosen"] == "long and unfinished"
    row = pairs_from_scores(cut, missing_eos_penalty=0.5).rows[0]
    assert (row["chosen"], row["rejected"], row["score_rejected"]) == ("short.", "long and unfinished", 0.5)


def test_judge_pairs_samples_k_and_keeps_gaps_of_at_least_min_gap(tiny_model_dir):
    model, tokenizer = load_policy(str(tiny_model_dir))
    calls = Counter()

    def judged(prompt, response):
        calls[json.dumps(prompt)] += 1
        return vowel_share(prompt, response)

    k = 3
    kwargs = dict(max_new_tokens=8, temperature=1.0, seed=3, progress=False)
    everything = judge_pairs(model, tokenizer, PROMPTS, CallableJudge(judged), k, 0.0, **kwargs)
    assert calls == Counter({json.dumps(p): k for p in PROMPTS})  # k replies per prompt, each judged once
    assert len({s["response"] for s in everything.samples}) > len(PROMPTS)  # sampled, not greedy
    ranges = {}
    for i in range(len(PROMPTS)):
        scores = [s["score"] for s in everything.samples if s["index"] == i and s["response"].strip()]
        ranges[i] = max(scores) - min(scores)
    min_gap = sorted(ranges.values())[len(ranges) // 2]  # about half the prompts clear it
    filtered = judge_pairs(model, tokenizer, PROMPTS, CallableJudge(vowel_share), k, min_gap, **kwargs)
    assert filtered.samples == everything.samples  # the same seed draws the same replies
    assert len(filtered.rows) == sum(r >= min_gap and r > 0 for r in ranges.values())
    assert 0 < len(filtered.rows) < len(PROMPTS)
    for row in filtered.rows:
        group = [s for s in everything.samples if s["prompt"] == row["prompt"]]
        assert row["score_chosen"] == max(s["score"] for s in group if s["response"].strip())
        assert row["score_chosen"] >= row["score_rejected"] + min_gap
        assert vowel_share(None, row["chosen"] if isinstance(row["chosen"], str) else row["chosen"][0]["content"]) \
            == row["score_chosen"]


def test_cli_data_build_judge(tiny_model_dir, tmp_path, monkeypatch, capsys):
    (tmp_path / "recipe_judge_fns.py").write_text("def vowels(prompt, response):\n"
                                           "    return sum(c in 'aeiou' for c in response) / max(len(response), 1)\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in PROMPTS))
    out = tmp_path / "pairs.jsonl"
    spec = "{type: callable, function: 'recipe_judge_fns:vowels'}"
    args = ["data", "build", "judge", str(prompts), str(out), "--model", str(tiny_model_dir), "--judge", spec,
            "--max-new-tokens", "8"]
    assert main(args + ["--k", "4", "--min-gap", "0.01", "--margin-scale", "3"]) == 0
    rows = [json.loads(ln) for ln in out.read_text().splitlines()]
    printed = capsys.readouterr().out
    assert f"wrote {len(rows)} rows" in printed and "samples: 24" in printed and "mean judge score" in printed
    assert rows and all(r["score_chosen"] - r["score_rejected"] >= 0.01 for r in rows)
    assert all(r["margin"] == pytest.approx(3 * (r["score_chosen"] - r["score_rejected"])) for r in rows)
    assert len(load_pairs(out)) == len(rows)

    assert main(args + ["--k", "1"]) == 2
    assert "k (replies per prompt) must be >= 2" in capsys.readouterr().err
    assert main(args[:-4] + ["--judge", "{type: oracle}"]) == 2
    assert "unknown judge type 'oracle'" in capsys.readouterr().err
