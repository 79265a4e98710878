"""The frontier experiment's RLHF arm (frontier_rlhf): its protocol text, the reward-hacking detector, the CPU-seconds
accounting and the decision rule on hand-made points, the docs section, and a quick end-to-end run (slow)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from dpokit.experiments import frontier_rlhf as fx
from dpokit.experiments.frontier import Run

DOCS = Path(__file__).resolve().parents[1] / "docs" / "experiments.md"


def test_protocol_is_the_committed_docs_text():
    text = DOCS.read_text(encoding="utf-8")
    block = text.split("<!-- frontier-rlhf:begin -->\n", 1)[1].split("<!-- frontier-rlhf:end -->", 1)[0]
    assert block.startswith(fx.PROTOCOL)
    rest = block[len(fx.PROTOCOL):]
    assert rest.strip() == "" or rest.startswith("\n\n### Results\n")  # results only below the protocol


def _p(step, reward, learned, run="rlhf-b0.04"):
    return {"run": run, "step": step, "reward": reward, "learned_reward": learned, "kl": step / 100}


SFT = {"reward": 0.0, "learned_reward": 1.0, "reward_sd": 0.5, "learned_reward_sd": 2.0}


def test_hacking_is_learned_up_while_true_down_between_consecutive_checkpoints():
    pts = [_p(20, 0.3, 2.0), _p(10, 0.2, 1.5), _p(30, 0.1, 2.5), _p(40, 0.0, 2.4), _p(50, -0.1, 2.6)]
    events = fx.hacking_events(pts)
    assert [(e["from_step"], e["to_step"]) for e in events] == [(20, 30), (40, 50)]  # 30→40: both fall
    assert events[0]["learned_change"] == pytest.approx(0.5) and events[0]["true_change"] == pytest.approx(-0.2)
    # the SFT model is the run's step 0: the first checkpoint is compared with it too
    assert fx.hacking_events([_p(10, -0.1, 1.5)], SFT)[0]["from_step"] == 0
    assert fx.hacking_events([_p(10, 0.1, 1.5)], SFT) == []
    assert fx.hacking_events([_p(10, -0.1, 0.5)], SFT) == []  # both fell: not hacking


def test_standardised_gap_is_in_sft_sd_units():
    (g,) = fx.standardised_gaps([_p(10, 0.25, 3.0)], SFT)
    assert g["learned_z"] == pytest.approx(1.0) and g["true_z"] == pytest.approx(0.5)
    assert g["gap"] == pytest.approx(0.5)


def test_cpu_seconds_are_linear_within_a_run_plus_the_offset():
    pts = [{"step": s} for s in (10, 60, 120)]
    out = fx.add_cpu(pts, train_cpu_s=240.0, steps=120, offset=30.0)
    assert [p["cpu_s"] for p in out] == pytest.approx([50.0, 150.0, 270.0])
    assert "cpu_s" not in pts[0]  # the input is left as it was


def _dpo_point(step, kl, reward, beta=0.5, replicate=0, labels="clean", method="DPO"):
    return {"method": method, "loss_type": "sft" if method == "preferred-FT" else "sigmoid", "beta": beta,
            "learning_rate": 1e-4, "label_smoothing": 0.0, "labels": labels, "replicate": replicate, "step": step,
            "kl": kl, "reward": reward, "malformed": 0.0}


def test_dpo_cpu_points_add_the_reference_pass_to_each_runs_share():
    points = [_dpo_point(0, 0.0, 0.0, method="SFT"), _dpo_point(10, 0.1, 0.2), _dpo_point(120, 1.0, 0.8),
              _dpo_point(60, 0.5, 0.5, beta=1.0), _dpo_point(60, 0.5, 0.9, labels="noisy"),
              _dpo_point(60, 0.5, 0.9, method="preferred-FT")]
    slug = lambda beta, labels="clean": Run("DPO", "sigmoid", beta, 1e-4, labels=labels).slug  # noqa: E731
    timings = {slug(0.5): {"setup_cpu_s": 4.0, "train_cpu_s": 120.0, "steps": 120, "labels": "clean",
                           "reference_pass": True},
               slug(1.0): {"setup_cpu_s": 0.5, "train_cpu_s": 60.0, "steps": 120, "labels": "clean",
                           "reference_pass": False},
               slug(0.5, "noisy"): {"setup_cpu_s": 3.0, "train_cpu_s": 1.0, "steps": 120, "labels": "noisy",
                                    "reference_pass": True}}
    out, ref = fx.dpo_cpu_points(points, timings)
    assert ref == 4.0  # the clean run that computed the reference cache; later runs read it
    assert [(p["step"], p["cpu_s"]) for p in out] == [(10, pytest.approx(14.0)), (120, pytest.approx(124.0)),
                                                      (60, pytest.approx(34.0))]  # only clean-label DPO


def _rl(step, kl, reward, cpu, run="rlhf-b0.04"):
    return {"run": run, "step": step, "kl": kl, "reward": reward, "cpu_s": cpu, "learned_reward": 0.0}


FRONTIER = [_dpo_point(0, 0.0, 0.0, method="SFT"), _dpo_point(10, 0.2, 0.4), _dpo_point(20, 1.0, 0.8),
            _dpo_point(30, 2.0, 0.7), _dpo_point(10, 0.1, 0.9, method="preferred-FT")]


def test_hull_check_uses_the_concave_hull_within_the_dpo_kl_range():
    # the hull: 0 at KL 0, 0.4 at 0.2, 0.8 at 1.0 (between them linear: 0.6 at 0.6), 0.8 on to KL 2
    below = fx.hull_check(FRONTIER, [_rl(10, 0.6, 0.61, 1), _rl(20, 0.6, 0.59, 2), _rl(30, 3.0, 0.95, 3),
                                     _rl(40, 0.05, 0.9, 4)])
    assert below["kl_range"] == [0.2, 2.0]
    assert below["compared"] == 2 and below["outside_range"] == 2  # KL 3.0 and KL 0.05 are not compared
    assert below["below_hull"] == 1 and not below["holds"]
    assert below["worst"]["margin"] == pytest.approx(-0.01) and below["worst"]["hull"] == pytest.approx(0.6)
    above = fx.hull_check(FRONTIER, [_rl(10, 0.6, 0.6, 1), _rl(20, 1.5, 0.8, 2)])
    assert above["holds"] and above["below_hull"] == 0 and above["worst"]["margin"] == pytest.approx(0.0)


def test_cpu_rule_first_dpo_checkpoint_at_rlhfs_best_against_the_rlhf_checkpoint_that_had_it():
    rlhf = [_rl(10, 0.5, 0.5, 100.0), _rl(20, 0.8, 0.7, 200.0), _rl(30, 0.9, 0.7, 300.0), _rl(40, 1.0, 0.6, 400.0)]
    dpo = [{"run": "a", "step": 10, "kl": 0.1, "reward": 0.65, "cpu_s": 20.0},
           {"run": "a", "step": 20, "kl": 0.3, "reward": 0.72, "cpu_s": 90.0},
           {"run": "b", "step": 10, "kl": 0.2, "reward": 0.71, "cpu_s": 35.0}]
    r = fx.cpu_check(dpo, rlhf)
    assert r["rlhf_best"]["cpu_s"] == 200.0  # the first RLHF checkpoint that had the best reward
    assert r["dpo_first"]["run"] == "b" and r["ratio"] == pytest.approx(35 / 200)
    assert r["holds"] and r["stretch"]
    r = fx.cpu_check([{**dpo[1]}], rlhf)  # 90 / 200: holds, not the stretch aim
    assert r["ratio"] == pytest.approx(0.45) and r["holds"] and not r["stretch"]
    r = fx.cpu_check([{**dpo[1], "cpu_s": 110.0}], rlhf)
    assert not r["holds"]
    r = fx.cpu_check([{**dpo[0]}], rlhf)  # no DPO checkpoint that high
    assert r["dpo_first"] is None and r["ratio"] is None and not r["holds"]


def _results():
    slug = Run("DPO", "sigmoid", 0.5, 1e-4).slug
    points = FRONTIER
    rlhf_points = [{**_rl(s, kl, r, 0), "arm": "RLHF", "beta": 0.04, "malformed": 0.0, "reward_sd": 0.5,
                    "learned_reward_sd": 1.0} for s, kl, r in ((10, 0.3, 0.3), (20, 0.8, 0.5))]
    oracle = [{**_rl(s, kl, r, 0, "oracle-b0.04"), "arm": "oracle", "beta": 0.04, "malformed": 0.0}
              for s, kl, r in ((10, 0.3, 0.4), (20, 0.8, 0.9))]
    arm_points = fx.add_cpu(rlhf_points, 100.0, 20, 10.0) + fx.add_cpu(oracle, 90.0, 20)
    runs = [{"run": "rlhf-b0.04", "beta": 0.04, "steps": 20, "train_cpu_s": 100.0, "arm": "RLHF",
             "offset_cpu_s": 10.0},
            {"run": "oracle-b0.04", "beta": 0.04, "steps": 20, "train_cpu_s": 90.0, "arm": "oracle",
             "offset_cpu_s": 0.0}]
    results = {"task": "line", "points": points, "sft_reward": 0.0, "cpu_s": 60.0, "machine": "2 CPU cores",
               "run_cpu_s": {slug: {"setup_cpu_s": 2.0, "train_cpu_s": 30.0, "steps": 30, "labels": "clean",
                                    "reference_pass": True}}}
    arm = {"settings": dict(fx.FULL), "reward_model": {"epochs": 3, "train_pairs": 90, "heldout_pairs": 10,
                                                         "heldout_accuracy": 0.8, "heldout_true_accuracy": 1.0,
                                                         "train_accuracy": 0.9, "steps": 9, "cpu_s": 10.0},
           "sft": {"run": "SFT", "step": 0, "reward": 0.0, "learned_reward": 0.0, "reward_sd": 0.5,
                   "learned_reward_sd": 1.0},
           "runs": runs, "points": arm_points, "prompts": 12, "command": "dpokit experiment frontier --rlhf",
           "wall_s": 60.0, "cpu_s": 50.0}
    arm["summary"] = fx.summarize(results, arm)
    results["rlhf"] = arm
    return results


def test_summary_verdict_section_and_plot(tmp_path):
    results = _results()
    s = results["rlhf"]["summary"]
    # RLHF's best is +0.5 at step 20: 10 + 100 = 110 CPU s; DPO first reaches it at step 10 (+0.4 < 0.5, so
    # step 20, +0.8): 2 + 30·20/30 = 22 CPU s
    assert s["cpu"]["ratio"] == pytest.approx(22 / 110) and s["verdict"]["cpu_half"]
    assert s["verdict"]["hull"] and s["verdict"]["claim_holds"]  # (0.3, +0.3) and (0.8, +0.5) are under the hull
    assert s["runs"]["oracle-b0.04"]["hacking"] == []  # its learned reward is unrecorded here: 0 throughout
    docs = tmp_path / "experiments.md"
    docs.write_text("# Experiments\n\n<!-- frontier-rlhf:begin -->\n" + fx.PROTOCOL + "\n<!-- frontier-rlhf:end -->\n")
    fx.write_outputs(results, tmp_path / "out", tmp_path)
    text = docs.read_text()
    assert text.count(fx.PROTOCOL) == 1 and "### Results" in text and "0.20×" in text
    # hand-written text after the reading marker survives a rerun
    docs.write_text(text.replace(fx.READING, fx.READING + "\nMy reading.\n"))
    fx.write_outputs(results, tmp_path / "out", tmp_path)
    assert "My reading." in docs.read_text() and docs.read_text().count("### Results") == 1
    svg = (tmp_path / "frontier-rlhf.svg").read_text()
    assert svg.startswith("<svg")
    assert svg.count('class="point"') == 3 + 2 + 2  # DPO 3, RLHF 2, oracle 2 (the runs' starts unmarked)
    assert json.loads((tmp_path / "out" / "frontier.json").read_text())["rlhf"]["summary"]["verdict"]["claim_holds"]


def test_learned_reward_scores_the_reply_with_eos_as_it_was_trained():
    import torch

    class Tok:
        eos_token = "<eos>"

        def __call__(self, texts, **kw):
            self.seen = texts
            return {"input_ids": torch.zeros(len(texts), 3, dtype=torch.long),
                    "attention_mask": torch.ones(len(texts), 3, dtype=torch.long)}

    class Model(torch.nn.Module):
        def forward(self, input_ids, attention_mask):
            return type("O", (), {"logits": torch.arange(len(input_ids), dtype=torch.float).unsqueeze(1)})

    tok = Tok()
    learned = fx.LearnedReward(Model(), tok, batch_size=2)
    assert learned(prompts=["a", "b", "c"], completions=[" x.", " y.", " z."]) == [0.0, 1.0, 0.0]
    assert tok.seen == ["c z.<eos>"]  # batched: the last batch holds the third reply
    assert fx.pair_accuracy(lambda ps, rs: [len(r) for r in rs],
                            [{"prompt": "", "chosen": "aa", "rejected": "a"},
                             {"prompt": "", "chosen": "a", "rejected": "a"}]) == 0.5  # a tie counts as wrong


def test_split_pairs_is_seeded_and_disjoint():
    rows = [{"i": i} for i in range(50)]
    train, held = fx.split_pairs(rows, 0.1, seed=3)
    assert len(held) == 5 and len(train) == 45 and {r["i"] for r in train}.isdisjoint(r["i"] for r in held)
    assert fx.split_pairs(rows, 0.1, seed=3)[1] == held and fx.split_pairs(rows, 0.1, seed=4)[1] != held


def test_rlhf_flag_is_frontiers_own():
    from dpokit.errors import DpokitError
    from dpokit.cli import build_parser

    parser = build_parser()
    assert parser.parse_args(["experiment", "frontier", "--rlhf"]).rlhf
    assert not parser.parse_args(["experiment", "frontier"]).rlhf
    with pytest.raises(DpokitError, match="belongs to `experiment frontier`"):
        parser.parse_args(["experiment", "secalign", "--rlhf"])


@pytest.mark.slow
def test_quick_rlhf_run_end_to_end(tmp_path):
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "experiments.md").write_text(DOCS.read_text(encoding="utf-8"), encoding="utf-8")
    before = (docs / "experiments.md").read_text().split("<!-- frontier:begin -->")[1].split("<!-- frontier:end -->")[0]
    cli = [sys.executable, "-c", "from dpokit.cli import main; raise SystemExit(main())"]
    subprocess.run(cli + ["experiment", "frontier", "--quick", "--rlhf", "--out", str(tmp_path / "out"),
                          "--docs", str(docs)], check=True, cwd=tmp_path)
    r = json.loads((tmp_path / "out" / "frontier.json").read_text())
    arm = r["rlhf"]
    assert 0.0 <= arm["reward_model"]["heldout_accuracy"] <= 1.0
    assert arm["reward_model"]["heldout_true_accuracy"] == 1.0  # the labels are the true reward's
    kinds = {p["arm"] for p in arm["points"]}
    assert kinds == {"RLHF", "oracle"}
    for p in arm["points"]:
        assert {"kl", "reward", "cpu_s", "learned_reward"} <= set(p) and p["cpu_s"] > 0
    assert set(arm["summary"]["verdict"]) == {"hull", "cpu_half", "cpu_fifth", "claim_holds"}
    assert r["run_cpu_s"] and all(t["train_cpu_s"] > 0 for t in r["run_cpu_s"].values())
    text = (docs / "experiments.md").read_text()
    assert text.split("<!-- frontier:begin -->")[1].split("<!-- frontier:end -->")[0] == before  # left as it was
    assert fx.PROTOCOL + "\n\n### Results" in text and (docs / "frontier-rlhf.svg").exists()


@pytest.mark.slow
def test_quick_rlhf_run_on_the_vader_task_writes_its_own_section(tmp_path):
    from dpokit.experiments import frontier as fr

    words = ["good", "great", "happy", "lovely", "bad", "awful", "sad", "terrible", "table", "river", "green", "quiet"]
    rows = [{"chosen": f"\n\nHuman: tell me about the {words[(i * 7 + 2) % 12]} {i}\n\nAssistant: it is "
                       f"{words[i % 12]} and {words[(i * 5 + 1) % 12]}.", "rejected": "x"} for i in range(40)]
    data = tmp_path / "hh.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "experiments.md").write_text("# Experiments\n")
    results = fr.run_frontier(out=tmp_path / "fr", quick=True, docs_dir=docs, task="vader", data=data, rlhf=True)
    arm = results["rlhf"]
    assert {p["arm"] for p in arm["points"]} == {"RLHF", "oracle"} and "verdict" in arm["summary"]
    text = (docs / "experiments.md").read_text()
    assert "<!-- frontier-rlhf-vader:begin -->" in text and fx.PROTOCOL not in text
    assert (docs / "frontier-rlhf-vader.svg").exists() and "<!-- frontier-vader:begin -->" not in text
