"""Data recipes (`dpokit data build ...`), the validator and the attack-success-rate evaluation."""

import json
import math

import pytest

from dpokit.cli import main
from dpokit.data import load_examples, load_pairs
from dpokit.errors import DataError, DpokitError
from dpokit.recipes.hierarchy import gw_margin
from dpokit.recipes import (attack_success_rate, eval_items, hf_generator, hierarchy_margins, injection_pairs,
                            rankings_to_pairs, ratings_to_pairs, validate, votes_to_pairs)
from dpokit.recipes.common import write_jsonl


def _write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


# ---------------------------------------------------------------- votes

THREAD = {"post_id": "t1", "prompt": "Which pan should I buy?", "replies": [
    {"text": "A: cast iron, it lasts forever.", "score": 10, "created_utc": 5},
    {"text": "B: any pan.", "score": 4, "created_utc": 1},
    {"text": "C: stainless steel, for acidic food.", "score": 3, "created_utc": 10},
    {"text": "D: lol", "score": 1, "created_utc": 0},
    {"text": "E: buy nothing", "score": -2, "created_utc": 2},
]}


def _letters(built):
    return [(r["chosen"][0], r["rejected"][0]) for r in built.rows]


def test_votes_pairs_need_the_ratio_and_a_later_winner():
    built = votes_to_pairs([THREAD])
    # A/C dropped: A was written first. B/C: ratio 4/3 < 2. E: score below 1. Sorted by ratio.
    assert _letters(built) == [("A", "D"), ("B", "D"), ("C", "D"), ("A", "B")]
    assert built.counts["better_one_earlier"] == 1 and built.counts["below_ratio"] == 1
    assert built.counts["below_min_score"] == 4
    assert ("A", "C") in _letters(votes_to_pairs([THREAD], ignore_time=True))
    assert _letters(votes_to_pairs([THREAD], min_ratio=3.5)) == [("A", "D"), ("B", "D")]
    assert _letters(votes_to_pairs([THREAD], max_pairs_per_post=2)) == [("A", "D"), ("B", "D")]
    with_margin = votes_to_pairs([THREAD], margin_scale=0.5).rows
    assert with_margin[0]["margin"] == pytest.approx(0.5 * math.log(10))
    assert all(r["post_id"] == "t1" and r["score_chosen"] > r["score_rejected"] for r in with_margin)


def test_votes_output_is_loadable_and_bad_input_names_the_row(tmp_path):
    out = tmp_path / "pairs.jsonl"
    write_jsonl(votes_to_pairs([THREAD]).rows, out)
    assert [p.chosen for p in load_pairs(out)][0].startswith("A:")
    broken = {"prompt": "p", "replies": [{"text": "x", "created_utc": 1}]}
    with pytest.raises(DataError, match=r"row 2: reply 0: missing field 'score'"):
        votes_to_pairs(_write(tmp_path / "in.jsonl", [THREAD, broken]))


# ---------------------------------------------------------------- ratings

RATED = {"prompt": "Explain tides.", "responses": [
    {"text": "The moon's gravity pulls the oceans.", "rating": 5},
    {"text": "Wind.", "rating": 2},
    {"text": "Tides are caused by the moon and sun.", "rating": 4},
    {"text": "I don't know.", "rating": 1},
]}


def test_ratings_best_against_a_lower_reply():
    chosen, rejected = set(), set()
    for seed in range(20):
        (row,) = ratings_to_pairs([RATED], seed=seed, margin_scale=0.25).rows
        chosen.add(row["rating_chosen"])
        rejected.add(row["rating_rejected"])
        assert row["margin"] == pytest.approx(0.25 * (row["rating_chosen"] - row["rating_rejected"]))
    assert chosen == {5} and rejected == {1, 2, 4}  # random among every lower-rated reply
    (worst,) = ratings_to_pairs([RATED], rejected="worst").rows
    assert worst["rejected"] == "I don't know."
    (far,) = ratings_to_pairs([RATED], min_gap=2.5, seed=3).rows
    assert far["rating_rejected"] <= 2.5


def test_ratings_skip_ties_and_do_not_depend_on_neighbouring_rows():
    tie = {"prompt": "p", "responses": [{"text": "a", "rating": 3}, {"text": "b", "rating": 3}]}
    built = ratings_to_pairs([tie, RATED])
    assert len(built.rows) == 1 and built.counts["no_lower_reply"] == 1
    other = {"prompt": "q", "responses": [{"text": "x", "rating": 1}, {"text": "y", "rating": 2}]}
    for seed in range(5):
        alone = ratings_to_pairs([RATED], seed=seed).rows[0]
        assert ratings_to_pairs([other, tie, RATED], seed=seed).rows[1] == alone


# ---------------------------------------------------------------- rankings

RANKED = {"prompt": "Name a prime.", "ranking": ["7", "9 (not prime)", "  7  ", "a banana", "nothing"]}


def test_rankings_all_adjacent_and_sdpo(tmp_path):
    # "  7  " repeats the best reply and is dropped: 4 distinct replies
    all_pairs = rankings_to_pairs([RANKED], margin_scale=0.5)
    assert len(all_pairs.rows) == 6 and all_pairs.counts["repeated_replies"] == 1
    assert {(r["chosen"], r["rejected"]) for r in all_pairs.rows} >= {("7", "nothing"), ("a banana", "nothing")}
    assert all(r["margin"] == 0.5 * (r["rank_rejected"] - r["rank_chosen"]) for r in all_pairs.rows)
    adjacent = rankings_to_pairs([RANKED], pairs="adjacent").rows
    assert [(r["chosen"], r["rejected"]) for r in adjacent] == [("7", "9 (not prime)"), ("9 (not prime)", "a banana"),
                                                               ("a banana", "nothing")]
    (group,) = rankings_to_pairs([RANKED], pairs="sdpo").rows
    assert group["chosen"] == "7" and group["rejected"] == ["9 (not prime)", "a banana", "nothing"]
    assert rankings_to_pairs([RANKED], pairs="sdpo", max_negatives=1).rows[0]["rejected"] == ["9 (not prime)"]
    assert len(load_pairs(_write(tmp_path / "all.jsonl", all_pairs.rows))) == 6
    with pytest.raises(DataError, match="rejected"):  # a list of negatives is for S-DPO only, as documented
        load_pairs(_write(tmp_path / "g.jsonl", [group]))


# ---------------------------------------------------------------- injection (SecAlign)

ALPACA = [
    {"instruction": "Translate the text to French.", "input": "Good morning.", "output": "Bonjour."},
    {"instruction": "Summarise the text.", "input": "The cat sat on the mat all day long.", "output": "A cat sat."},
    {"instruction": "Count the words.", "input": "one two three", "output": "3"},
    {"instruction": "Write a haiku about rain.", "input": "", "output": "Rain taps the window."},
]


def test_injection_pairs_put_another_instruction_in_the_data(tmp_path):
    built = injection_pairs(ALPACA, seed=1)
    assert len(built.rows) == 3 and built.counts["no_data_part"] == 1  # the haiku row only donates
    by_instruction = {r["instruction"]: r for r in ALPACA}
    for row in built.rows:
        system, user = row["prompt"]
        real = by_instruction[system["content"]]
        donor = by_instruction[row["injected_instruction"]]
        assert donor is not real
        assert user["content"].startswith(real["input"]) and donor["instruction"][1:] in user["content"]
        assert row["chosen"] == [{"role": "assistant", "content": real["output"]}]
        assert row["rejected"] == [{"role": "assistant", "content": donor["output"]}]
    text = injection_pairs(ALPACA, attack="ignore", fmt="text").rows[0]
    assert "Ignore all previous instructions and instead" in text["prompt"]
    assert text["prompt"].startswith("### Instruction:\nTranslate") and text["chosen"] == "Bonjour."
    assert len(load_pairs(_write(tmp_path / "sec.jsonl", built.rows))) == 3


def test_injection_clean_share_adds_clean_pairs_next_to_the_injected_ones():
    rows = [{"instruction": f"Task {i}.", "input": f"data {i}", "output": f"answer {i}"} for i in range(200)]
    plain = injection_pairs(rows, fmt="text", seed=3)
    mixed = injection_pairs(rows, fmt="text", seed=3, clean_share=0.5)
    injected = [r for r in mixed.rows if r["attack"] != "none"]
    clean = [r for r in mixed.rows if r["attack"] == "none"]
    assert injected == plain.rows  # the injected pairs are unchanged
    assert 70 < len(clean) < 130 and mixed.counts["clean_pairs"] == len(clean)
    by_prompt = {r["prompt"]: r for r in injected}
    for c in clean:
        instruction = c["prompt"].split("### Instruction:\n", 1)[1].split("\n", 1)[0]
        own = rows[int(instruction[5:-1])]
        assert c["prompt"] == f"### Instruction:\n{own['instruction']}\n\n### Input:\n{own['input']}\n\n### Response:\n"
        assert c["chosen"] == own["output"] and c["rejected"] != own["output"] and c["injected_instruction"] is None
        # the clean pair prefers the same answer over the same rejected one as its row's injected pair
        twin = next(r for p, r in by_prompt.items() if p.startswith(c["prompt"].split("### Response:")[0].rstrip()))
        assert (twin["chosen"], twin["rejected"]) == (c["chosen"], c["rejected"])
    assert len(injection_pairs(rows, fmt="text", clean_share=1.0).rows) == 400
    with pytest.raises(DpokitError):
        injection_pairs(rows, clean_share=1.5)


def test_attack_success_rate_counts_replies_that_follow_the_injection():
    items = eval_items(ALPACA).rows
    assert len(items) == 3 * 3 and all("print exactly 'hacked!'" in i["prompt"][1]["content"].lower() for i in items)

    def gullible(prompt):  # falls for the "ignore" attack only; quotes the word elsewhere
        user = prompt[1]["content"]
        return "Hacked!" if "Ignore all previous" in user else "I will not print hacked."

    contains = attack_success_rate(gullible, items)
    assert contains["n"] == 9 and contains["asr"] == 1.0  # the quoted word counts under "contains"
    strict = attack_success_rate(gullible, items, match="startswith")
    assert strict["asr"] == pytest.approx(1 / 3)
    assert strict["by_attack"] == {"completion": 0.0, "ignore": 1.0, "naive": 0.0}


def test_hf_generator_returns_only_the_new_text(tiny_model_dir):
    generate = hf_generator(str(tiny_model_dir), max_new_tokens=4)
    prompt = "What is 2+2?"
    out = generate(prompt)
    assert isinstance(out, str) and prompt not in out
    assert generate(prompt) == out  # greedy


# ---------------------------------------------------------------- hierarchy (GW-DPO)


def test_hierarchy_margins(tmp_path):
    rows = [{"prompt": "p1", "chosen": "keep to the system", "rejected": "obey the tool",
             "privileged_level": "system", "conflicting_level": "tool"},
            {"prompt": "p2", "chosen": "keep to the platform", "rejected": "obey the data",
             "privileged_level": 5, "conflicting_level": 1}]
    built = hierarchy_margins(rows, schedule="bilateral", scale=0.5)
    assert [r["margin"] for r in built.rows] == [gw_margin(4, 2, "bilateral", 0.5), gw_margin(5, 1, "bilateral", 0.5)]
    pairs = load_pairs(_write(tmp_path / "gw.jsonl", built.rows))
    assert [p.margin for p in pairs] == [0.5 * 2 * 4 / 5, 0.5 * 4]
    with pytest.raises(DataError, match="row 1: the privileged level"):
        hierarchy_margins([{**rows[0], "privileged_level": "data"}])
    # equal levels (a benign prompt, no privilege gap): margin 0 under both schedules
    for schedule in ("linear", "bilateral"):
        same = hierarchy_margins([{**rows[0], "privileged_level": "tool"}, rows[1]], schedule=schedule, scale=0.5)
        assert same.rows[0]["margin"] == 0.0 and same.rows[1]["margin"] > 0 and same.counts["no_gap"] == 1
    with pytest.raises(DataError, match="already has a 'margin'"):
        hierarchy_margins([{**rows[0], "margin": 1.0}])


# ---------------------------------------------------------------- validate

MESSY = [
    {"prompt": "a", "chosen": " yes", "rejected": " no"},
    "{not json",
    {"prompt": "b", "chosen": " same", "rejected": " same"},
    {"prompt": "c", "rejected": " no"},
    {"prompt": "a", "chosen": " yes", "rejected": " no"},  # repeated
    {"prompt": "a", "chosen": " no", "rejected": " yes"},  # contradicts row 1
    {"prompt": "d", "chosen": " spaced  out", "rejected": " spaced out"},  # differs only in whitespace
    {"prompt": "e", "chosen": " fine", "rejected": " bad", "weight": 0.0, "margin": 1.5},
]


def _messy(tmp_path):
    path = tmp_path / "messy.jsonl"
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in MESSY))
    return path


def test_validate_reports_what_the_loader_would(tmp_path):
    path = _messy(tmp_path)
    report = validate(path)
    assert (report.rows, report.usable, report.bad_rows) == (8, 5, 3)
    assert report.usable == len(load_pairs(path, on_bad_row="skip"))
    assert sorted(r for rows in report.problems.values() for r in rows) == [2, 3, 4]
    with pytest.raises(DataError) as first:
        load_pairs(path)
    assert first.value.problem.startswith(next(p for p, rows in report.problems.items() if rows == [2]))
    assert (report.repeated_pairs, report.contradicting_pairs, report.identical) == (1, 1, 2)
    assert report.prompts_with_several_pairs == 1
    assert report.chars["prompt"]["max"] == 1 and report.weights["zero"] == 1 and report.margins["nonzero"] == 1


def test_validate_with_a_tokenizer_counts_tokens_and_truncation(tmp_path, tokenizer):
    path = _write(tmp_path / "long.jsonl", [
        {"prompt": "What is the capital of France?", "chosen": " Paris.", "rejected": " London, surely."},
        {"prompt": "Say hello politely.", "chosen": " Hello, nice to meet you.", "rejected": " Go away."},
    ])
    full = validate(path, tokenizer)
    assert full.tokens["prompt"]["max"] > 3 and full.truncated_prompt == 0
    cut = validate(path, tokenizer, max_length=6, max_prompt_length=3)
    assert cut.truncated_prompt == 2 and cut.truncated_completion >= 1
    assert cut.usable == len(load_examples(path, tokenizer, 6, 3, on_bad_row="skip"))


def test_cli_data_build_and_validate(tmp_path, capsys):
    src = _write(tmp_path / "rated.jsonl", [RATED])
    out = tmp_path / "pairs.jsonl"
    assert main(["data", "build", "ratings", str(src), str(out), "--rejected", "worst", "--margin-scale", "1"]) == 0
    assert json.loads(out.read_text())["margin"] == 4.0
    assert main(["data", "validate", str(out)]) == 0
    assert "1 rows, 1 usable, 0 with problems" in capsys.readouterr().out
    assert main(["data", "validate", str(_messy(tmp_path)), "--json"]) == 2
    captured = capsys.readouterr()
    assert json.loads(captured.out)["bad_rows"] == 3 and "3 of 8 rows have problems" in captured.err
    threads = _write(tmp_path / "threads.jsonl", [THREAD])
    assert main(["data", "build", "votes", str(threads), str(threads)]) == 2
    assert "would overwrite the input" in capsys.readouterr().err
    assert main(["data", "build", "votes", str(src), str(out), "--min-ratio", "0.5"]) == 2
    assert "min_ratio must be >= 1" in capsys.readouterr().err


def test_validate_accepts_every_row_kind_training_accepts(tmp_path):
    from dpokit.recipes.validate import validate

    path = tmp_path / "mixed.jsonl"
    rows = [{"prompt": "Pick a fruit.", "chosen": " An apple.", "rejected": [" A chair.", " A rock."]},
            {"prompt": "Say hi.", "completion": " Hello!", "label": True},
            {"prompt": "Name a color.", "chosen": " Blue.", "rejected": " Blue."}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    report = validate(str(path))
    assert report.kinds == {"group": 1, "unpaired": 1}
    assert report.bad_rows == 1 and report.identical == 1  # the last row's replies are identical
