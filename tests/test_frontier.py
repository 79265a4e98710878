"""The reward-vs-KL frontier experiment: label flipping, the reading of the points, the plot and the docs
section (frontier_report), and a quick end-to-end run on the controlled task."""

import json
import math
import xml.etree.ElementTree as ET

import pytest

from dpokit.experiments import frontier as fr
from dpokit.experiments import frontier_report as rp


def _rows(n):
    return [{"prompt": f"p{i}", "chosen": f"good {i}", "rejected": f"bad {i}", "score_chosen": 1.0,
             "score_rejected": -1.0} for i in range(n)]


def test_flip_labels_swaps_exactly_the_seeded_fraction():
    rows = _rows(50)
    noisy, flipped = fr.flip_labels(rows, 0.2, seed=3)
    assert len(flipped) == 10 and flipped == sorted(set(flipped))
    for i, (a, b) in enumerate(zip(rows, noisy)):
        if i in flipped:
            assert (b["chosen"], b["rejected"]) == (a["rejected"], a["chosen"])
            assert (b["score_chosen"], b["score_rejected"]) == (-1.0, 1.0)
        else:
            assert b == a
    assert rows[flipped[0]]["chosen"].startswith("good")  # the input is left as it was
    assert fr.flip_labels(rows, 0.2, seed=3)[1] == flipped
    assert fr.flip_labels(rows, 0.2, seed=4)[1] != flipped


def _point(method, labels, step, kl, reward, beta=0.5, replicate=0):
    return {"method": method, "labels": labels, "step": step, "kl": kl, "reward": reward, "malformed": 0.0,
            "beta": beta, "learning_rate": 1e-4, "label_smoothing": 0.0, "loss_type": "sigmoid",
            "replicate": replicate}


def test_summary_envelope_dominance_and_kept_gain():
    pts = [_point("SFT", "clean", 0, 0.0, 0.0), _point("SFT", "noisy", 0, 0.0, 0.0),
           _point("preferred-FT", "clean", 20, 0.2, 0.3), _point("preferred-FT", "clean", 40, 0.4, 0.5),
           _point("DPO", "clean", 20, 0.3, 0.6), _point("DPO", "clean", 40, 5.0, -0.5),
           _point("cDPO", "clean", 20, 0.1, 0.35), _point("cDPO", "clean", 40, 0.8, 0.8),
           _point("DPO", "noisy", 20, 0.2, 0.2), _point("DPO", "noisy", 40, 0.5, 0.4),
           _point("cDPO", "noisy", 20, 0.1, 0.3), _point("cDPO", "noisy", 40, 0.7, 0.78)]
    # a second replicate of the noisy comparison; its clean DPO run would top the sweep's envelope if counted
    pts += [_point("DPO", "clean", 20, 0.3, 0.9, replicate=1), _point("DPO", "clean", 40, 0.6, 0.7, replicate=1),
            _point("DPO", "noisy", 20, 0.2, 0.5, replicate=1), _point("DPO", "noisy", 40, 0.5, 0.6, replicate=1)]
    s = rp.summarize({"sft_reward": 0.0, "noisy_beta": 0.5, "replicates": 2, "points": pts})
    env = s["envelope"]
    assert env["DPO"]["0.25"] == 0.0  # only the SFT model is that close
    assert env["DPO"]["0.5"] == 0.6 and env["DPO"]["2.0"] == 0.6  # the degenerate point never counts as best
    assert env["DPO family"]["1.0"] == 0.8
    # preferred-FT at KL 0.2 (0.3) beats DPO's envelope there (0.0); at KL 0.4 (0.5) DPO's 0.6 wins
    assert s["dominance"]["DPO"]["beaten"] == 1 and s["dominance"]["DPO"]["min_diff"] == pytest.approx(-0.3)
    assert s["dominance"]["DPO family"]["beaten"] == 2  # cDPO's 0.35 at KL 0.1 covers the first point
    dpo, cdpo = s["noisy"]["DPO"], s["noisy"]["cDPO"]
    assert cdpo["replicates"] == 1 and cdpo["kept_best"] == pytest.approx(0.78 / 0.8)
    # DPO, means over the replicates: clean best gains 0.6 and 0.9, noisy best 0.4 and 0.6
    assert dpo["replicates"] == 2 and dpo["kept_best"] == pytest.approx(1.0 / 1.5)
    assert dpo["kept_best_range"] == pytest.approx([0.4 / 0.6, 0.6 / 0.9])
    # matched steps: the noisy runs read where the clean twins peaked (steps 20 and 20): 0.2 and 0.5
    assert dpo["matched_gain_noisy"] == pytest.approx(0.35) and dpo["kept_matched"] == pytest.approx(0.7 / 1.5)
    assert dpo["last_gain_clean"] == pytest.approx((-0.5 + 0.7) / 2)


def test_a_preferred_ft_point_with_a_negative_kl_estimate_is_compared_at_kl_0():
    """A sample KL estimate below 0 (noise near the SFT model) is compared with the SFT model's point, not left
    without a frontier to compare with (which crashed the vader task's summary)."""
    pts = [_point("SFT", "clean", 0, 0.0, 0.1), _point("preferred-FT", "clean", 10, -0.02, 0.05),
           _point("DPO", "clean", 10, 0.3, 0.6)]
    s = rp.summarize({"sft_reward": 0.1, "noisy_beta": 0.5, "replicates": 0, "points": pts})
    assert s["dominance"]["DPO"]["pft_points"] == 1 and s["dominance"]["DPO"]["beaten"] == 1
    assert s["dominance"]["DPO"]["min_diff"] == pytest.approx(0.1 - 0.05)


def test_optimal_frontier_matches_the_closed_form_tilt():
    # rewards -1, 0, 1 equally likely under the SFT model: π_t = (e^-t, 1, e^t) / Z
    curve = fr.optimal_frontier([-1.0, 0.0, 1.0] * 10, inverse_betas=[0.0, 0.5, 2.0, 30.0])
    for q in curve:
        t = q["inverse_beta"]
        w = [math.exp(-t), 1.0, math.exp(t)]
        p = [x / sum(w) for x in w]
        assert q["reward"] == pytest.approx(p[2] - p[0])
        assert q["kl"] == pytest.approx(sum(x * math.log(3 * x) for x in p), abs=1e-9)
    assert curve[0]["kl"] == pytest.approx(0.0) and curve[-1]["kl"] == pytest.approx(math.log(3), abs=1e-6)


def test_plot_is_svg_with_one_marker_per_point_and_far_points_hollow():
    pts = [_point("SFT", "clean", 0, 0.0, 0.0), _point("DPO", "clean", 20, 0.3, 0.6),
           _point("DPO", "clean", 40, 30.0, -0.9), _point("preferred-FT", "clean", 20, 0.2, 0.3),
           _point("SFT", "noisy", 0, 0.0, 0.0), _point("cDPO", "noisy", 20, 0.5, 0.5)]
    svg = rp.plot_svg(pts, kl_max=3.0)
    root = ET.fromstring(svg)
    ns = "{http://www.w3.org/2000/svg}"
    titles = [g.find(f"{ns}title").text for g in root.iter(f"{ns}g")]
    # 4 trained points + 2 SFT rings, then a legend entry for each method shown (no IPO, no robust DPO)
    assert len(titles) == 4 + 2 + 4
    assert [t for t in titles[-4:]] == ["SFT", "preferred-FT", "DPO", "cDPO"]
    far = next(g for g in root.iter(f"{ns}g") if "KL 30.000" in g.find(f"{ns}title").text)
    shape = list(far)[1]
    assert shape.get("fill") == "#fff" and shape.get("stroke") == rp.COLORS["DPO"]
    xs = [float(list(g)[1].get("cx")) for g in root.iter(f"{ns}g") if list(g)[1].get("cx")]
    assert max(xs) <= rp.LEFT + 2 * rp.PW + rp.GAP  # clipped to the panel, not drawn off the page
    # the y axis covers the rewards shown, within [-1, 1]
    ticks = [float(t.text) for t in root.iter(f"{ns}text") if t.text and t.get("text-anchor") == "end"]
    assert -1 <= min(ticks) <= -0.9 and 0.5 <= max(ticks) < 1  # not the fixed [-1, 1] when nothing reaches 1
    clean_only = ET.fromstring(rp.plot_svg([p for p in pts if p["labels"] == "clean"], kl_max=3.0))
    panels = [t.text for t in clean_only.iter(f"{ns}text") if t.get("font-weight") == "bold"]
    assert panels == ["clean labels"]


def test_docs_section_replaces_itself_keeps_other_sections_and_the_reading(tmp_path):
    doc = tmp_path / "experiments.md"
    first = f"{rp.BEGIN}\n## Reward vs KL frontier\nold table\n\n<!-- frontier:reading -->\n\n{rp.END}\n"
    rp.update_section(doc, first)
    text = doc.read_text()
    assert text.startswith("# Experiments") and text.count(rp.BEGIN) == 1
    # someone adds another section and a hand-written reading
    doc.write_text(text.replace("<!-- frontier:reading -->\n", "<!-- frontier:reading -->\nDPO wins.\n")
                   + "\n## Another experiment\nkeep me\n")
    rp.update_section(doc, first.replace("old table", "new table"))
    text = doc.read_text()
    assert "new table" in text and "old table" not in text
    assert "DPO wins." in text and "keep me" in text and text.count(rp.BEGIN) == 1
    assert text.index(rp.END) < text.index("## Another experiment")


def test_quick_run_dpo_raises_the_true_reward(tmp_path):
    results = fr.run_frontier(out=tmp_path / "fr", quick=True, docs_dir=tmp_path / "docs")
    pts = results["points"]
    sft = results["sft_reward"]
    dpo = [p for p in pts if p["method"] == "DPO" and p["labels"] == "clean"]
    assert [p["step"] for p in dpo] == sorted(p["step"] for p in dpo) and len(dpo) >= 2
    assert dpo[-1]["kl"] > 0 and dpo[-1]["reward"] > sft + 0.1
    assert all(p["kl"] > -0.5 for p in pts)  # a KL estimate far below 0 would mean mismatched log-probs
    saved = json.loads((tmp_path / "fr" / "frontier.json").read_text())
    assert saved["points"] == pts and saved["pairs"] == results["pairs"] > 100
    assert saved["flipped"] == round(0.2 * saved["pairs"])
    doc = (tmp_path / "docs" / "experiments.md").read_text()
    assert "## Reward vs KL frontier" in doc and "![reward vs KL](frontier.svg)" in doc
    ET.fromstring((tmp_path / "docs" / "frontier.svg").read_text())


def test_mixture_frontier_is_the_upper_concave_hull():
    pts = [_point("SFT", "clean", 0, 0.0, 0.0), _point("DPO", "clean", 20, 0.5, 0.2),
           _point("DPO", "clean", 40, 1.0, 1.0), _point("IPO", "clean", 20, 0.2, 0.9)]
    # between the SFT model and the point at KL 1, a mixture beats the checkpoint at KL 0.5
    assert rp.mixture_frontier(pts, ["DPO"], 0.5) == pytest.approx(0.5)
    assert rp.envelope(pts, ["DPO"], 0.5) == pytest.approx(0.2)
    assert rp.mixture_frontier(pts, ["DPO"], 0.25) == pytest.approx(0.25)
    assert rp.mixture_frontier(pts, ["DPO"], 3.0) == pytest.approx(1.0)  # past the last point: the best one
    # other methods' points do not count; with IPO's the chord from (0.2, 0.9) to (1, 1) is the hull
    assert rp.mixture_frontier(pts, ["DPO", "IPO"], 0.6) == pytest.approx(0.95)
    assert rp.mixture_frontier(pts, ["DPO"], 0.6, labels="noisy") is None


def test_first_step_alignment_compares_the_right_gradients():
    from dpokit.tiny import build_llama, build_tokenizer

    rows = [{"prompt": f"The {w} is", "chosen": f" {a} and {b}.", "rejected": f" {b} or {a}!"}
            for w, a, b in (("sun", "warm", "bright"), ("sea", "calm", "blue"), ("road", "long", "dry"))]
    tok = build_tokenizer([r["prompt"] + r["chosen"] + r["rejected"] for r in rows], vocab_size=120)
    model = build_llama(tok, hidden_size=16, num_layers=1, seed=0)
    same = fr.first_step_alignment(model, tok, rows + rows)  # the two halves are the same pairs
    assert same["dpo_halves_grad_cosine"] == pytest.approx(1.0, abs=1e-5)
    assert same["dpo_halves_adam_step_cosine"] == pytest.approx(1.0, abs=1e-5)
    swapped = [{**r, "chosen": r["rejected"], "rejected": r["chosen"]} for r in rows]
    opposite = fr.first_step_alignment(model, tok, rows + swapped)  # the second half's labels flipped
    assert opposite["dpo_halves_grad_cosine"] == pytest.approx(-1.0, abs=1e-5)
    # preferred-FT raises the chosen replies only: not DPO's direction, which also lowers the rejected ones
    assert -1.0 < same["grad_cosine"] < 0.999
