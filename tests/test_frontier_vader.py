"""The frontier experiment's HH/VADER task: prompts from dialogues, the sentiment reward, a quick run."""

import json
import xml.etree.ElementTree as ET

import pytest

from dpokit.cli import main
from dpokit.experiments import frontier as fr
from dpokit.experiments import frontier_report as rp
from dpokit.experiments import hh_sentiment as hh

WORDS = ["good", "great", "happy", "lovely", "bad", "awful", "sad", "terrible", "table", "river", "green", "quiet"]


def _dialogues(path, n):
    rows = []
    for i in range(n):
        a, b, c = WORDS[i % 12], WORDS[(i * 5 + 1) % 12], WORDS[(i * 7 + 2) % 12]
        rows.append({"chosen": f"\n\nHuman: tell me about the {c} {i}\n\nAssistant: it is {a} and {b}.",
                     "rejected": f"\n\nHuman: tell me about the {c} {i}\n\nAssistant: no."})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_dialogue_rows_take_the_last_human_turn_and_skip_what_cannot_be_used(tmp_path):
    lines = [
        {"chosen": "\n\nHuman: hi\n\nAssistant: hello\n\nHuman: how are you?\n\nAssistant: fine, thanks",
         "rejected": "x"},
        {"prompt": "\n\nHuman: name a colour\n\nAssistant:", "chosen": " blue", "rejected": " no"},
        {"chosen": "no assistant turn here", "rejected": "x"},
        {"chosen": "\n\nHuman: say nothing\n\nAssistant:   ", "rejected": "x"},
        {"chosen": "\n\nHuman: " + "long " * 100 + "\n\nAssistant: ok", "rejected": "x"},
    ]
    path = tmp_path / "hh.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in lines) + "{broken json\n")
    assert hh.dialogue_rows(path) == [("\n\nHuman: how are you?\n\nAssistant:", " fine, thanks"),
                                      ("\n\nHuman: name a colour\n\nAssistant:", " blue")]


def test_vader_reward_is_the_compound_sentiment_of_the_reply():
    reward = hh.vader_reward()
    assert reward("anything", "what a wonderful, happy day") > 0.5
    assert reward("anything", "an awful, terrible mess") < -0.5
    assert reward("a great prompt", "the table") == 0.0  # the prompt does not count


def test_vader_task_needs_its_data_file(tmp_path, capsys):
    status = main(["experiment", "frontier", "--task", "vader", "--data", str(tmp_path / "none.jsonl"),
                   "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err.strip().splitlines()
    assert status == 2 and len(err) == 1 and "none.jsonl" in err[0] and "--data" in err[0]


def test_quick_vader_run_labels_pairs_by_sentiment_and_writes_its_own_section(tmp_path):
    data = _dialogues(tmp_path / "hh.jsonl", 40)
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "experiments.md").write_text(f"# Experiments\n\n{rp.BEGIN}\nline task\n{rp.END}\n")
    results = fr.run_frontier(out=tmp_path / "fr", quick=True, docs_dir=docs, task="vader", data=data)
    assert results["task"] == "vader" and results["replicates"] == 0
    reward = hh.vader_reward()
    pairs = [json.loads(x) for x in (tmp_path / "fr" / "pairs_clean.jsonl").read_text().splitlines()]
    assert pairs and all(p["score_chosen"] > p["score_rejected"] for p in pairs)
    assert all(p["score_chosen"] == reward(p["prompt"], p["chosen"]) for p in pairs)
    methods = {p["method"] for p in results["points"]}
    assert methods == {"SFT", "DPO", "preferred-FT"} and {p["labels"] for p in results["points"]} == {"clean"}
    assert all(p["malformed"] is None for p in results["points"])
    doc = (docs / "experiments.md").read_text()
    assert "line task" in doc and doc.count("<!-- frontier-vader:begin -->") == 1
    assert "## Reward vs KL frontier: VADER sentiment on HH prompts" in doc and "frontier-vader.svg" in doc
    svg = ET.fromstring((docs / "frontier-vader.svg").read_text())
    titles = [t.text for t in svg.iter("{http://www.w3.org/2000/svg}text") if t.text]
    assert "clean labels" in titles and not any("flipped" in t for t in titles)  # one panel: no noisy runs


@pytest.mark.parametrize("argv", [["frontier", "--data", "x.jsonl"], ["secalign", "--task", "vader"],
                                  ["hierarchy", "--data", "x.jsonl"]])
def test_task_and_data_are_refused_where_they_mean_nothing(tmp_path, capsys, argv):
    status = main(["experiment", *argv, "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err.strip().splitlines()
    assert status == 2 and len(err) == 1 and "--task vader" in err[0]
    assert not (tmp_path / "out").exists()  # refused before anything ran
