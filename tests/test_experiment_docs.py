"""The one writer of experiments' sections in docs/experiments.md: a rerun replaces its own block, keeps a
hand-written reading after its `keep` marker, and leaves every other section and the text between them alone."""

from dpokit.experiments import update_docs, write_docs
from dpokit.experiments import frontier_report as rp

KEEP = "<!-- demo:reading -->"


def _doc(tmp_path, text):
    doc = tmp_path / "experiments.md"
    doc.write_text(text)
    return doc


def test_a_new_section_is_appended_and_a_missing_file_is_started(tmp_path):
    doc = tmp_path / "docs" / "experiments.md"
    update_docs(doc, "demo", "## Demo\n\nfirst\n")
    assert doc.read_text() == "# Experiments\n\n<!-- demo:begin -->\n## Demo\n\nfirst\n<!-- demo:end -->\n"
    update_docs(doc, "other", "## Other")
    assert doc.read_text().endswith("<!-- demo:end -->\n\n<!-- other:begin -->\n## Other\n<!-- other:end -->\n")


def test_the_reading_after_keep_survives_a_rerun_and_other_sections_are_untouched(tmp_path):
    other = "<!-- other:begin -->\n## Other\nits table\n<!-- other:end -->\n\n### Other: reading\nby hand\n"
    doc = _doc(tmp_path, f"# Experiments\n\n<!-- demo:begin -->\n## Demo\nold table\n{KEEP}\n\nDPO wins.\n\n"
                         f"<!-- demo:end -->\n\n{other}")
    update_docs(doc, "demo", f"## Demo\nnew table\n{KEEP}\n", keep=KEEP)
    text = doc.read_text()
    assert f"new table\n{KEEP}\n\nDPO wins.\n\n<!-- demo:end -->" in text and "old table" not in text
    assert text.endswith(other) and text.count("<!-- demo:begin -->") == 1


def test_without_keep_the_whole_block_is_replaced(tmp_path):
    doc = _doc(tmp_path, "# Experiments\n\n<!-- demo:begin -->\n## Demo\nold\n<!-- demo:end -->\nafter\n")
    update_docs(doc, "demo", "## Demo\nnew")
    assert doc.read_text() == "# Experiments\n\n<!-- demo:begin -->\n## Demo\nnew\n<!-- demo:end -->\nafter\n"


def test_a_section_that_carries_its_own_markers_is_not_wrapped_twice(tmp_path):
    doc = _doc(tmp_path, "# Experiments\n")
    update_docs(doc, "demo", "<!-- demo:begin -->\n## Demo\n<!-- demo:end -->\n")
    update_docs(doc, "demo", "<!-- demo:begin -->\n## Demo again\n<!-- demo:end -->\n")
    text = doc.read_text()
    assert text.count("<!-- demo:begin -->") == 1 and text.count("<!-- demo:end -->") == 1 and "again" in text


def test_frontier_keeps_its_reading_through_the_same_writer(tmp_path):
    vader = "<!-- frontier-vader:begin -->\n## VADER\n<!-- frontier-vader:end -->\n"
    doc = _doc(tmp_path, f"# Experiments\n\n{rp.BEGIN}\n## Reward vs KL frontier\nold\n\n{rp.READING}\n\nA reading."
                         f"\n\n{rp.END}\n\n{vader}")
    rp.update_section(doc, f"{rp.BEGIN}\n## Reward vs KL frontier\nnew\n\n{rp.READING}\n\n{rp.END}\n")
    text = doc.read_text()
    assert f"new\n\n{rp.READING}\n\nA reading.\n\n{rp.END}" in text and "old" not in text
    assert text.endswith(vader)


def test_write_docs_records_the_command_and_saves_the_results(tmp_path):
    results = {"command": "dpokit experiment demo --out out", "score": 1}
    write_docs(results, tmp_path, tmp_path / "docs", "demo", "## Demo")
    assert (tmp_path / "demo.json").read_text().count("--docs") == 1
    assert "## Demo" in (tmp_path / "docs" / "experiments.md").read_text()
    assert not list(tmp_path.rglob("*.tmp*"))  # written atomically: no temporary file left behind
