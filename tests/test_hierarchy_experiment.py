"""The GW-DPO hierarchy experiment: conflicts and their labels, the warm-up's behaviour, the margins the
runs train with, held-out splits, exact reply probabilities, and (slow) a quick end-to-end run."""

import json
from collections import Counter

import pytest
import torch
from transformers import AutoModelForCausalLM

from dpokit.cli import main
from dpokit.experiments import hierarchy as hy
from dpokit.errors import DpokitError
from dpokit.experiments import hierarchy_report as hr
from dpokit.recipes.hierarchy import HIERARCHY
from dpokit.recipes.hierarchy import hierarchy_margins
from dpokit.experiments.segments import SegmentLlamaForCausalLM, segment_ids, with_segment_embeddings
from dpokit.tiny import build_llama, build_tokenizer


def _lines(prompt):
    return [line.split(": Say ") for line in prompt.splitlines()[:-1]]


def test_conflict_pairs_choose_the_higher_source_over_all_ten_level_pairs_in_both_orders():
    rows = hy.preference_rows(1000, seed=0)
    assert len(hy.LEVEL_PAIRS) == 10 and len({(r["privileged_level"], r["conflicting_level"]) for r in rows}) == 10
    first_is_higher = 0
    for r in rows:
        (l1, w1), (l2, w2) = [(name, word.rstrip(".")) for name, word in _lines(r["prompt"])]
        by_level = {l1: w1, l2: w2}
        hi, lo = (l1, l2) if HIERARCHY.index(l1) > HIERARCHY.index(l2) else (l2, l1)
        assert (r["chosen"], r["rejected"]) == (by_level[hi], by_level[lo]) and w1 != w2
        assert (r["privileged_level"], r["conflicting_level"]) == (hi, lo)
        first_is_higher += l1 == hi
    assert 400 < first_is_higher < 600  # position says nothing about priority


def test_gw_margins_grow_with_the_level_gap():
    rows = hy.preference_rows(300, seed=1)
    linear = hierarchy_margins(rows, "linear", 0.5).rows
    bilateral = hierarchy_margins(rows, "bilateral", 0.5).rows
    for r, lin, bil in zip(rows, linear, bilateral):
        p, q = HIERARCHY.index(r["privileged_level"]) + 1, HIERARCHY.index(r["conflicting_level"]) + 1
        assert lin["margin"] == pytest.approx(0.5 * (p - q))
        assert bil["margin"] == pytest.approx(0.5 * (p - q) * p / 5)
        assert (lin["prompt"], lin["chosen"], lin["rejected"]) == (r["prompt"], r["chosen"], r["rejected"])


def test_warmup_ignores_the_hierarchy_and_over_refuses_two_source_prompts():
    rows = hy.warmup_rows(6000, seed=2)
    counts = Counter()
    for r in rows:
        lines = _lines(r["prompt"])
        words = [w.rstrip(".") for _, w in lines]
        if len(lines) == 2 and words[0] != words[1]:
            levels = [HIERARCHY.index(name) for name, _ in lines]
            higher = words[levels.index(max(levels))]
            counts["conflict"] += 1
            counts["higher"] += r["completion"] == higher
            counts["refuse"] += r["completion"] == hy.REFUSAL
        elif len(lines) == 2:
            counts["agree"] += 1
            counts["agree_refused"] += r["completion"] == hy.REFUSAL
        else:
            counts["single_refused"] += r["completion"] == hy.REFUSAL
    assert abs(counts["higher"] / counts["conflict"] - 0.4) < 0.04
    assert abs(counts["refuse"] / counts["conflict"] - 0.2) < 0.04
    assert abs(counts["agree_refused"] / counts["agree"] - 0.2) < 0.04 and counts["single_refused"] == 0


def test_heldout_prompts_are_new_and_balanced():
    train = hy.preference_rows(500, seed=3)
    seen = {r["prompt"] for r in train}
    conflicts, benigns = hy.heldout(7, 50, seed=4, exclude=seen)
    assert not seen & {c["prompt"] for c in conflicts} and not seen & {b["prompt"] for b in benigns}
    assert Counter((c["privileged_level"], c["conflicting_level"]) for c in conflicts) == \
        {(HIERARCHY[h - 1], HIERARCHY[lo - 1]): 7 for h, lo in hy.LEVEL_PAIRS}
    assert len({b["prompt"] for b in benigns}) == 50 and all(b["word"] in b["prompt"] for b in benigns)


def test_heldout_benign_prompts_are_distinct_and_kept_out_of_the_warmup_and_the_pairs():
    held = hy.heldout_benign(120, seed=5)
    prompts = {b["prompt"] for b in held}
    assert len(prompts) == 120 and sum(b["kind"] == "single" for b in held) == 30
    warm = hy.warmup_rows(6000, seed=6, exclude=prompts)
    pairs = hy.benign_pairs(2000, seed=7, exclude=prompts)
    assert not prompts & {r["prompt"] for r in warm + pairs}
    # without the exclusion a warm-up this size covers nearly all 850 benign prompts
    assert len(prompts & {r["prompt"] for r in hy.warmup_rows(6000, seed=6)}) > 100
    with pytest.raises(ValueError, match="trained on"):
        hy.heldout(1, 120, seed=5, exclude={r["prompt"] for r in hy.warmup_rows(6000, seed=6)})


def test_benign_pairs_prefer_the_asked_word_and_get_no_gw_margin():
    rows = hy.benign_pairs(400, seed=8)
    refusals = sum(r["rejected"] == hy.REFUSAL for r in rows)
    assert 150 < refusals < 250
    for r, gw in zip(rows, hierarchy_margins(rows, "linear", 1.0).rows):
        words = {w.rstrip(".") for _, w in _lines(r["prompt"])}
        assert words == {r["chosen"]} and r["rejected"] != r["chosen"]
        top = max(HIERARCHY.index(name) for name, _ in _lines(r["prompt"]))
        assert r["privileged_level"] == r["conflicting_level"] == HIERARCHY[top] and gw["margin"] == 0.0


def test_data_alone_weight_lands_on_the_lone_data_source_pairs_and_in_the_trained_file(tmp_path, monkeypatch):
    plain, weighted = hy.benign_pairs(600, seed=8), hy.benign_pairs(600, seed=8, data_alone_weight=4.0)
    lone_data = [[name for name, _ in _lines(r["prompt"])] == ["data"] for r in plain]
    assert 20 < sum(lone_data) < 100
    assert all("weight" not in r for r in plain)
    assert [r.get("weight", 1.0) for r in weighted] == [4.0 if d else 1.0 for d in lone_data]
    assert [{k: v for k, v in r.items() if k != "weight"} for r in weighted] == plain
    cfg = _first_train_config(tmp_path, monkeypatch, benign_pairs=60, data_alone_weight=4.0)
    rows = [json.loads(line) for line in open(cfg.train_data)]
    assert {r.get("weight") for r in rows} == {None, 4.0}
    assert all((r.get("weight") == 4.0) == (r["prompt"].startswith("data: ") and r["prompt"].count("\n") == 2)
               for r in rows)


def test_reply_probabilities_are_the_models_own():
    prompts = [hy.render([(5, "apple"), (1, "river")]), hy.render([(2, "lemon")])]
    tokenizer = build_tokenizer([hy.render([(k + 1, w)]) for k in range(5) for w in hy.WORDS] + [hy.REFUSAL], 300)
    model = build_llama(tokenizer, hidden_size=32, num_layers=1, seed=0).eval()
    p_a, p_b = hy.reply_probs(model, tokenizer, prompts, ["apple", "lemon"], [hy.REFUSAL, "river"])
    for prompt, reply, got in [(prompts[0], "apple", p_a[0]), (prompts[1], "lemon", p_a[1]),
                               (prompts[0], hy.REFUSAL, p_b[0]), (prompts[1], "river", p_b[1])]:
        ids = tokenizer(prompt)["input_ids"]
        full = tokenizer(prompt + reply)["input_ids"] + [tokenizer.eos_token_id]
        with torch.no_grad():
            logp = model(torch.tensor([full])).logits[0, :-1].log_softmax(-1)
        want = sum(logp[t - 1, full[t]] for t in range(len(ids), len(full))).exp()
        assert got.item() == pytest.approx(want.item(), rel=1e-4)


def test_over_refusal_by_level_is_one_minus_the_asked_words_probability_on_that_levels_lone_prompts():
    tokenizer = build_tokenizer([hy.render([(k + 1, w)]) for k in range(5) for w in hy.WORDS] + [hy.REFUSAL], 300)
    model = build_llama(tokenizer, hidden_size=32, num_layers=1, seed=1).eval()
    conflicts, benigns = hy.heldout(1, 40, seed=9, exclude=set())
    got = hy.evaluate(model, tokenizer, conflicts, benigns)["over_refusal_single_by_level"]
    p_word, _ = hy.reply_probs(model, tokenizer, [b["prompt"] for b in benigns], [b["word"] for b in benigns],
                               [hy.REFUSAL] * len(benigns))
    for level, name in enumerate(HIERARCHY, 1):
        mine = [1 - p.item() for p, b in zip(p_word, benigns) if b["kind"] == "single" and b["levels"] == (level,)]
        if mine:
            assert got[name] == pytest.approx(sum(mine) / len(mine), rel=1e-5)
    assert set(got) == {HIERARCHY[b["levels"][0] - 1] for b in benigns if b["kind"] == "single"}


@pytest.mark.slow
def test_quick_run_learns_the_hierarchy(tmp_path):
    r = hy.run(tmp_path, quick=True)
    table = r["summary"]["table"]
    for method in ("DPO", "GW-DPO linear ×1", "GW-DPO bilateral ×1"):
        assert table[method]["adherence"] > table["warm-up"]["adherence"] + 0.05
    assert (tmp_path / "hierarchy.json").exists()
    assert r["command"] == f"dpokit experiment hierarchy --quick --out {tmp_path} --seed 0"


class _Stop(Exception):
    pass


def _first_train_config(tmp_path, monkeypatch, **overrides):
    """The TrainConfig of a tiny run's first training call (the run stops there)."""
    seen = []

    def fake_train(cfg):
        seen.append(cfg)
        raise _Stop

    monkeypatch.setattr(hy, "train", fake_train)
    with pytest.raises(_Stop):
        hy.run(tmp_path, quick=True, **{**dict(warmup_rows=200, warmup_steps=2, pairs=20, benign_pairs=5,
                                               eval_per_pair=1, eval_benign=8), **overrides})
    [cfg] = seen
    return cfg


@pytest.mark.parametrize("overrides, want", [({}, "sigmoid"), ({"loss_type": "ipo"}, "ipo")])
def test_runs_train_with_the_sizes_loss_type_sigmoid_by_default(tmp_path, monkeypatch, overrides, want):
    assert _first_train_config(tmp_path, monkeypatch, **overrides).loss_types == [want]


def test_delimited_prompts_put_each_line_in_its_sources_segment():
    specials = hy.DELIMITERS + [hy.REPLY_DELIMITER]
    tokenizer = build_tokenizer([hy.delimited(hy.render([(k + 1, w)])) for k in range(5) for w in hy.WORDS], 300,
                                extra_special_tokens=specials)
    prompt = hy.delimited(hy.render([(5, "apple"), (1, "river")]))
    assert prompt == "<|platform|>Say apple.\n<|data|>Say river.\n<|reply|>"
    ids = tokenizer(prompt + "apple")["input_ids"]
    embed = with_segment_embeddings(build_llama(tokenizer, hidden_size=32, num_layers=1),
                                    hy.segment_delimiters(tokenizer)).model.embed_tokens
    segs = segment_ids(torch.tensor([ids]), embed.segment_of_token(torch.device("cpu")), 0)[0].tolist()
    text = {k: tokenizer.decode([t for t, s in zip(ids, segs) if s == k]) for k in set(segs)}
    assert text == {5: "<|platform|>Say apple.\n", 1: "<|data|>Say river.\n", 0: "<|reply|>apple"}


def test_an_ise_run_trains_a_segment_model_on_delimited_prompts(tmp_path, monkeypatch):
    cfg = _first_train_config(tmp_path, monkeypatch, prompt_format="ise")
    assert isinstance(AutoModelForCausalLM.from_pretrained(cfg.model), SegmentLlamaForCausalLM)
    rows = [json.loads(line) for line in open(cfg.train_data)]
    assert all(r["prompt"].startswith("<|") and r["prompt"].endswith(hy.REPLY_DELIMITER) for r in rows)


def test_prompt_format_is_checked_and_belongs_to_the_hierarchy_experiment(tmp_path, capsys):
    with pytest.raises(ValueError, match="prompt_format"):
        hy.run(tmp_path, quick=True, prompt_format="xml")
    assert main(["experiment", "secalign", "--quick", "--prompt-format", "ise", "--out", str(tmp_path)]) == 2
    assert "--prompt-format belongs to `experiment hierarchy`" in capsys.readouterr().err


def test_eval_every_measures_each_checkpoint_as_a_run_stopped_there(tmp_path):
    tiny = dict(quick=True, warmup_rows=200, warmup_steps=2, pairs=20, benign_pairs=5, eval_per_pair=1, eval_benign=8,
                scales=())
    long = hy.run(tmp_path / "long", dpo_steps=6, eval_every=3, **tiny)
    short = hy.run(tmp_path / "short", dpo_steps=3, **tiny)
    [run] = long["runs"]
    assert [p["step"] for p in run["curve"]] == [3, 6]
    assert run["curve"][1]["adherence"] == run["adherence"]
    # constant learning rate after warm-up and the same data order: step 3 of 6 is the 3-step run
    assert run["curve"][0]["adherence"] == pytest.approx(short["runs"][0]["adherence"], abs=1e-6)
    assert run["curve"][0]["adherence"] != run["adherence"]
    assert not list((tmp_path / "long" / "runs").glob("*/checkpoint-*"))
    # sizes the CLI cannot set make the recorded rerun command a Python call that sets them
    assert long["command"].startswith(f"hierarchy.run({str(tmp_path / 'long')!r}, quick=True, seed=0, ")
    assert all(f in long["command"] for f in ("dpo_steps=6", "eval_every=3", "scales=()"))


def test_curve_summary_counts_checkpoints_the_other_method_matches_or_beats():
    def curve(*points):
        return [{"step": 10 * (i + 1), "adherence": a, "over_refusal": o} for i, (a, o) in enumerate(points)]

    dpo = curve((0.5, 0.02), (0.7, 0.03), (0.8, 0.04))
    runs = [{"method": "DPO", "run_seed": 0, "curve": dpo},
            {"method": "GW-DPO linear ×1", "run_seed": 0, "curve": curve((0.6, 0.03), (0.7, 0.02), (0.9, 0.05))},
            {"method": "GW-DPO linear ×0.1", "run_seed": 0, "curve": dpo}]
    s = hr.summarize_curves({"runs": runs})
    # DPO's (0.7, 0.03) matches GW's (0.6, 0.03); GW's (0.7, 0.02) beats DPO's first two; nothing covers GW's
    # (0.9, 0.05) or DPO's (0.8, 0.04)
    assert s["covered"]["GW-DPO linear ×1"] == {"checkpoints": 3, "gw_covered_by_dpo": 1, "dpo_covered_by_gw": 2}
    assert s["covered"]["GW-DPO linear ×0.1"] == {"checkpoints": 3, "gw_covered_by_dpo": 3, "dpo_covered_by_gw": 3}
    assert s["by_step"]["DPO"]["20"] == [0.7, 0.03]


def test_max_train_gap_keeps_the_far_level_pairs_out_of_training_and_scores_them_apart(tmp_path, monkeypatch):
    near = hy.preference_rows(1000, seed=0, max_gap=2)
    gaps = Counter(HIERARCHY.index(r["privileged_level"]) - HIERARCHY.index(r["conflicting_level"]) for r in near)
    assert set(gaps) == {1, 2} and len({(r["privileged_level"], r["conflicting_level"]) for r in near}) == 7
    cfg = _first_train_config(tmp_path, monkeypatch, max_train_gap=2)
    trained = [json.loads(line) for line in open(cfg.train_data)]
    assert max(HIERARCHY.index(r["privileged_level"]) - HIERARCHY.index(r["conflicting_level"]) for r in trained) == 2
    # gap 3 has two level pairs and gap 4 one, with the same number of held-out conflicts each
    assert hr.held_out_gap_adherence({"adherence_by_gap": {"3": 0.6, "4": 0.9}}, [3, 4]) == pytest.approx(0.7)
    runs = [{"method": m, "run_seed": k, "adherence": 0.5, "over_refusal": 0.1,
             "adherence_by_gap": {"1": 0.5, "2": 0.5, "3": a3, "4": 0.3}}
            for m, k, a3 in (("DPO", 0, 0.3), ("DPO", 1, 0.6), ("GW-DPO linear ×1", 0, 0.9), ("GW-DPO linear ×1", 1, 0.6))]
    for r in runs:
        r |= {k: 0.0 for k in ("pairwise", "follows_lower", "refuses_conflict", "over_refusal_two_sources",
                               "refusal_benign", "greedy_adherence", "greedy_over_refusal")}
    warm = dict(runs[0], adherence_by_gap={str(g): 0.3 for g in range(1, 5)})
    goal = hr.summarize({"sizes": {"max_train_gap": 2}, "models": {"warm-up": warm}, "runs": runs})["goal"]
    # seed 0: (2·0.9 + 0.3)/3 − (2·0.3 + 0.3)/3 = 0.4; seed 1: equal
    assert goal["GW-DPO linear ×1"]["held_out_gaps_diff_by_seed"] == pytest.approx([0.4, 0.0])
    assert goal["GW-DPO linear ×1"]["held_out_gaps_diff"] == pytest.approx(0.2)
    curve = [{"step": 50, "adherence": 0.5, "over_refusal": 0.1, "adherence_by_gap": {"3": 0.6, "4": 0.9}}]
    by_step = hr.summarize_curves({"sizes": {"max_train_gap": 2}, "runs": [{"method": "DPO", "run_seed": 0,
                                                                             "curve": curve}]})["by_step"]
    assert by_step["DPO"]["50"] == pytest.approx([0.5, 0.1, 0.7])
    assert "held_out_gaps_diff" not in hr.summarize({"sizes": {}, "models": {"warm-up": warm}, "runs": runs})["goal"][
        "GW-DPO linear ×1"]


def test_merge_reads_runs_split_by_training_seed_as_one_and_refuses_what_does_not_fit(tmp_path):
    def result(seeds, adherence_by_seed, scales=(1.0,)):
        runs = [{"method": m, "run_seed": k, "adherence": a + (0.1 if m != "DPO" else 0.0), "over_refusal": 0.02,
                 "adherence_by_gap": {str(g): a for g in range(1, 5)}}
                for k, a in zip(seeds, adherence_by_seed) for m in ("DPO", "GW-DPO linear ×1")]
        for r in runs:
            r |= {k: 0.0 for k in ("pairwise", "follows_lower", "refuses_conflict", "over_refusal_two_sources",
                                   "refusal_benign", "greedy_adherence", "greedy_over_refusal")}
        warm = {k: v for k, v in runs[0].items() if k not in ("method", "run_seed")} | {
            "adherence": 0.3, "adherence_by_gap": {str(g): 0.3 for g in range(1, 5)}}
        return {"seed": 0, "quick": False, "sizes": {"seeds": list(seeds), "scales": list(scales)},
                "models": {"warm-up": warm}, "runs": runs}

    def write(name, res):
        (tmp_path / name).write_text(json.dumps(res))
        return tmp_path / name

    a, b = write("a.json", result((0, 1), (0.5, 0.6))), write("b.json", result((2,), (0.9,)))
    merged = hr.merge([a, b])
    assert merged["sizes"]["seeds"] == [0, 1, 2]
    assert merged["summary"]["table"]["DPO"]["adherence"] == pytest.approx((0.5 + 0.6 + 0.9) / 3)
    assert merged["summary"]["goal"]["GW-DPO linear ×1"]["adherence_diff_by_seed"] == pytest.approx([0.1] * 3)
    assert "above in 3/3 seeds" in hr.format_table(merged)
    with pytest.raises(DpokitError, match="b.json: training seeds \\[0\\]"):
        hr.merge([a, write("b.json", result((0,), (0.9,)))])
    with pytest.raises(DpokitError, match="c.json: not the same experiment"):
        hr.merge([a, write("c.json", result((3,), (0.9,), scales=(0.1,)))])
    with pytest.raises(DpokitError, match="d.json: not a hierarchy result"):
        hr.merge([a, write("d.json", {"runs": []})])
