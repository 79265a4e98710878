"""Data: every layout through every reader, tokenization rules, and the bad-row policy."""

import copy
import csv
import json
import logging
from pathlib import Path

import datasets
import pytest

from dpokit.data import Pair, iter_rows, load_examples, load_pairs, read_rows, row_to_pair
from dpokit.data.formats import RowProblem, text_field
from dpokit.errors import DataError, DpokitError

HH = Path(__file__).resolve().parents[2] / "shared" / "data" / "hh-harmless" / "pairs.jsonl"


def user(text):
    return {"role": "user", "content": text}


def bot(text):
    return {"role": "assistant", "content": text}


# Each layout: rows as a user has them, and the pairs they must become.
LAYOUTS = {
    "standard": (
        [{"prompt": "What is 2+2?", "chosen": " It is 4.", "rejected": " It is 5.", "weight": 2.0, "margin": 0.5},
         {"prompt": "Name a color.", "chosen": " Blue.", "rejected": " Seven.", "weight": 1.0, "margin": 0.0}],
        [Pair("What is 2+2?", " It is 4.", " It is 5.", 2.0, 0.5), Pair("Name a color.", " Blue.", " Seven.")],
    ),
    "conversational": (
        [{"prompt": [user("Hi")], "chosen": [bot("Hello.")], "rejected": [bot("Go away.")],
          "weight": 0.5, "margin": 1.0},
         {"prompt": [user("A"), bot("B"), user("C")], "chosen": [bot("D")], "rejected": [bot("E")],
          "weight": 1.0, "margin": -1.0}],
        [Pair([user("Hi")], [bot("Hello.")], [bot("Go away.")], 0.5, 1.0),
         Pair([user("A"), bot("B"), user("C")], [bot("D")], [bot("E")], 1.0, -1.0)],
    ),
    "implicit_text": (
        [{"chosen": "\n\nHuman: hi\n\nAssistant: hello there", "rejected": "\n\nHuman: hi\n\nAssistant: go away",
          "weight": 3.0, "margin": 0.0},
         {"chosen": "\n\nHuman: a\n\nAssistant: b\n\nHuman: c\n\nAssistant: good",
          "rejected": "\n\nHuman: a\n\nAssistant: b\n\nHuman: c\n\nAssistant: bad", "weight": 1.0, "margin": 0.0}],
        [Pair("\n\nHuman: hi\n\nAssistant:", " hello there", " go away", 3.0),
         Pair("\n\nHuman: a\n\nAssistant: b\n\nHuman: c\n\nAssistant:", " good", " bad")],
    ),
    "implicit_messages": (
        [{"chosen": [user("Hi"), bot("Hello.")], "rejected": [user("Hi"), bot("Go away.")],
          "weight": 1.0, "margin": 2.0},
         {"chosen": [user("A"), bot("B"), user("C"), bot("good")],
          "rejected": [user("A"), bot("B"), user("C"), bot("bad")], "weight": 1.0, "margin": 0.0}],
        [Pair([user("Hi")], [bot("Hello.")], [bot("Go away.")], 1.0, 2.0),
         Pair([user("A"), bot("B"), user("C")], [bot("good")], [bot("bad")])],
    ),
}


def _csv_cell(value):
    return json.dumps(value) if isinstance(value, list) else value


def write(kind, rows, tmp_path):
    """The same rows as each reader takes them."""
    if kind == "jsonl":
        path = tmp_path / "d.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    elif kind == "json":
        path = tmp_path / "d.json"
        path.write_text(json.dumps(rows, indent=1))
    elif kind == "parquet":
        path = tmp_path / "d.parquet"
        datasets.Dataset.from_list(rows).to_parquet(str(path))
    elif kind == "csv":
        path = tmp_path / "d.csv"
        with path.open("w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(rows[0]))
            w.writeheader()
            w.writerows({k: _csv_cell(v) for k, v in r.items()} for r in rows)
    elif kind == "saved":
        path = tmp_path / "saved"
        datasets.Dataset.from_list(rows).save_to_disk(str(path))
    elif kind == "dataset":
        return datasets.Dataset.from_list(rows)
    elif kind == "list":
        return rows
    return path


READERS = ["jsonl", "json", "parquet", "csv", "saved", "dataset", "list"]


@pytest.mark.parametrize("reader", READERS)
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_every_layout_through_every_reader(layout, reader, tmp_path):
    rows, expected = LAYOUTS[layout]
    assert load_pairs(write(reader, rows, tmp_path)) == expected


def test_weight_and_margin_default_when_absent():
    pair = row_to_pair({"prompt": "p", "chosen": " a", "rejected": " b"})
    assert (pair.weight, pair.margin) == (1.0, 0.0)


# ---------------------------------------------------------------- tokenization


def test_text_completions_end_with_eos_and_decode_back(tokenizer):
    rows = [{"prompt": "What is 2+2?", "chosen": " It is 4.", "rejected": " It is 5, I think."},
            {"prompt": "Name a color.", "chosen": " Blue is one." + tokenizer.eos_token, "rejected": " Seven."}]
    first, second = load_examples(rows, tokenizer, max_length=None, max_prompt_length=None)
    assert tokenizer.decode(first.prompt_ids) == "What is 2+2?"
    assert tokenizer.decode(first.chosen_ids) == " It is 4." + tokenizer.eos_token
    assert tokenizer.decode(first.rejected_ids) == " It is 5, I think." + tokenizer.eos_token
    assert first.chosen_ids[-1] == first.rejected_ids[-1] == tokenizer.eos_token_id
    # an EOS already there is not doubled
    assert second.chosen_ids.count(tokenizer.eos_token_id) == 1
    assert second.chosen_ids[-1] == tokenizer.eos_token_id


def test_conversational_rows_render_with_the_chat_template(tokenizer):
    prompt, chosen, rejected = [user("Hi"), bot("Yo"), user("Name a color.")], [bot("Blue.")], [bot("Seven.")]
    (ex,) = load_examples([{"prompt": prompt, "chosen": chosen, "rejected": rejected}], tokenizer, None, None)
    rendered_prompt = tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
    assert rendered_prompt == "<|user|>Hi<|end|><|assistant|>Yo<|end|><|user|>Name a color.<|end|><|assistant|>"
    assert tokenizer.decode(ex.prompt_ids) == rendered_prompt
    # the completion ends with the template's end-of-turn, not an extra EOS
    assert tokenizer.decode(ex.chosen_ids) == "Blue.<|end|>"
    assert tokenizer.decode(ex.rejected_ids) == "Seven.<|end|>"
    assert tokenizer.eos_token_id not in ex.chosen_ids


def test_implicit_prompt_messages_tokenize_like_the_explicit_form(tokenizer):
    implicit = {"chosen": [user("Hi"), bot("Hello.")], "rejected": [user("Hi"), bot("Go away.")]}
    explicit = {"prompt": [user("Hi")], "chosen": [bot("Hello.")], "rejected": [bot("Go away.")]}
    a, b = load_examples([implicit, explicit], tokenizer, None, None)
    assert (a.prompt_ids, a.chosen_ids, a.rejected_ids) == (b.prompt_ids, b.chosen_ids, b.rejected_ids)


def test_max_prompt_length_keeps_the_end_of_the_prompt(tokenizer):
    row = {"prompt": "Say hello politely. What is the capital of France?", "chosen": " Paris.", "rejected": " London."}
    (full,) = load_examples([row], tokenizer, None, None)
    (cut,) = load_examples([row], tokenizer, None, max_prompt_length=4)
    assert len(full.prompt_ids) > 4
    assert cut.prompt_ids == full.prompt_ids[-4:]
    assert tokenizer.decode(cut.prompt_ids).endswith("France?")
    assert (cut.chosen_ids, cut.rejected_ids) == (full.chosen_ids, full.rejected_ids)


def test_max_length_cuts_completions_from_the_right(tokenizer):
    row = {"prompt": "How are you?", "chosen": " Fine, thanks for asking.", "rejected": " Why do you care?"}
    (full,) = load_examples([row], tokenizer, None, None)
    max_length = len(full.prompt_ids) + 2
    (cut,) = load_examples([row], tokenizer, max_length=max_length, max_prompt_length=None)
    assert cut.prompt_ids == full.prompt_ids
    assert cut.chosen_ids == full.chosen_ids[:2] and cut.rejected_ids == full.rejected_ids[:2]
    assert len(cut.prompt_ids) + len(cut.chosen_ids) == max_length
    assert tokenizer.decode(cut.chosen_ids) == tokenizer.decode(full.chosen_ids[:2])


def test_both_limits_together(tokenizer):
    row = {"prompt": "Say hello politely. Count to three.", "chosen": " One, two, three.", "rejected": " One, three, two."}
    (full,) = load_examples([row], tokenizer, None, None)
    (cut,) = load_examples([row], tokenizer, max_length=6, max_prompt_length=3)
    assert cut.prompt_ids == full.prompt_ids[-3:]
    assert cut.chosen_ids == full.chosen_ids[:3] and cut.rejected_ids == full.rejected_ids[:3]


def test_weight_and_margin_reach_the_examples(tokenizer):
    rows, _ = LAYOUTS["standard"]
    a, b = load_examples(rows, tokenizer, None, None)
    assert (a.weight, a.margin, b.weight, b.margin) == (2.0, 0.5, 1.0, 0.0)


def test_prompt_with_no_room_for_a_completion(tokenizer, tmp_path):
    path = write("jsonl", LAYOUTS["standard"][0], tmp_path)
    with pytest.raises(DataError) as e:
        load_examples(path, tokenizer, max_length=3, max_prompt_length=None)
    assert (e.value.source, e.value.row) == (str(path), 1)
    assert "no room for a completion within max_length=3" in e.value.problem


def test_identical_once_truncated_is_reported(tokenizer):
    row = {"prompt": "Count to three.", "chosen": " One, two, three.", "rejected": " One, three, two."}
    (full,) = load_examples([row], tokenizer, None, None)
    shared = next(i for i, (x, y) in enumerate(zip(full.chosen_ids, full.rejected_ids)) if x != y)
    assert shared >= 1
    with pytest.raises(DataError, match="identical once truncated"):
        load_examples([row], tokenizer, max_length=len(full.prompt_ids) + shared, max_prompt_length=None)


def test_limits_that_leave_nothing_are_config_errors(tokenizer):
    with pytest.raises(DpokitError, match="max_prompt_length must be >= 1"):
        load_examples([], tokenizer, None, max_prompt_length=0)
    with pytest.raises(DpokitError, match="max_length must be >= 2"):
        load_examples([], tokenizer, max_length=1, max_prompt_length=None)


def test_prompt_that_merges_into_the_completion(tokenizer):
    # "Hel" + "lo, nice" tokenizes with no token boundary at the prompt's end: nothing would predict
    # the completion's first token
    assert tokenizer.tokenize("Hello")[0] != tokenizer.tokenize("Hel")[0]
    with pytest.raises(DataError, match="the prompt has no tokens of its own"):
        load_examples([{"prompt": "Hel", "chosen": "lo, nice", "rejected": " no"}], tokenizer, None, None)


def test_chat_template_refusal_is_a_row_problem(tokenizer):
    strict = copy.deepcopy(tokenizer)
    strict.chat_template = "{{ raise_exception('roles must alternate user/assistant') }}"
    rows = [{"prompt": [user("Hi")], "chosen": [bot("a")], "rejected": [bot("b")]}]
    with pytest.raises(DataError) as e:
        load_examples(rows, strict, None, None)
    assert e.value.row == 1 and "the chat template rejects these messages: roles must alternate" in e.value.problem


def test_conversational_data_needs_a_chat_template(tokenizer):
    bare = tokenizer.__class__(tokenizer_object=tokenizer.backend_tokenizer, eos_token="<eos>")
    assert bare.chat_template is None
    rows = [{"prompt": [user("Hi")], "chosen": [bot("a")], "rejected": [bot("b")]}]
    # a tokenizer problem, not a row problem: skipping rows would not help
    with pytest.raises(DpokitError, match="needs a tokenizer with a chat template") as e:
        load_examples(rows, bare, None, None, on_bad_row="skip")
    assert not isinstance(e.value, DataError)


# ---------------------------------------------------------------- bad rows

BAD_ROWS = [
    ({"prompt": "p", "rejected": " b"}, "missing field 'chosen'"),
    ({"prompt": "p", "chosen": None, "rejected": " b"}, "missing field 'chosen'"),
    ({"prompt": "p", "chosen": "   ", "rejected": " b"}, "field 'chosen' is empty"),
    ({"prompt": "", "chosen": " a", "rejected": " b"}, "field 'prompt' is empty"),
    ({"prompt": "p", "chosen": 7, "rejected": " b"}, "field 'chosen' must be a string or a list of {role, content} messages, got int 7"),
    ({"prompt": "p", "chosen": ["a"], "rejected": " b"}, "field 'chosen' must be a string or a list"),
    ({"prompt": [user("p")], "chosen": [], "rejected": [bot("b")]}, "field 'chosen' is an empty message list"),
    ({"prompt": [user("p")], "chosen": [{"role": "assistant"}], "rejected": [bot("b")]}, "message 0 needs string 'role' and 'content'"),
    ({"prompt": "p", "chosen": [bot("a")], "rejected": [bot("b")]}, "all be strings or all be message lists"),
    ({"prompt": "p", "chosen": " same", "rejected": " same"}, "chosen and rejected are identical"),
    ({"prompt": "p", "chosen": " a", "rejected": " b", "weight": "2"}, "field 'weight' must be a finite number, got '2'"),
    ({"prompt": "p", "chosen": " a", "rejected": " b", "weight": True}, "field 'weight' must be a finite number"),
    ({"prompt": "p", "chosen": " a", "rejected": " b", "weight": -1}, "field 'weight' must be >= 0"),
    ({"prompt": "p", "chosen": " a", "rejected": " b", "margin": float("nan")}, "field 'margin' must be a finite number"),
    ({"prompt": "p", "chosen": " a", "rejected": " b", "margin": [1]}, "field 'margin' must be a finite number"),
    ({"chosen": "no dialogue", "rejected": "here"}, "has no '\\n\\nAssistant:' turn"),
    ({"chosen": "\n\nHuman: hi\n\nAssistant: ", "rejected": "\n\nHuman: hi\n\nAssistant: no"}, "the chosen reply is empty"),
    ({"chosen": "\n\nHuman: hi\n\nAssistant: yes", "rejected": "\n\nHuman: hi\n\nAssistant:"}, "the rejected reply is empty"),
    ({"chosen": "\n\nHuman: hi\n\nAssistant: yes", "rejected": "\n\nHuman: ho\n\nAssistant: no"}, "differ before their last assistant turn"),
    # the rejected dialogue goes on past the chosen one's last turn, as in one HH row
    ({"chosen": "\n\nHuman: hi\n\nAssistant: yes",
      "rejected": "\n\nHuman: hi\n\nAssistant: no  Human: ok\n\nAssistant: fine"}, "differ before their last assistant turn"),
    ({"chosen": [user("hi"), bot("a")], "rejected": [user("ho"), bot("b")]}, "differ before their last assistant message"),
    ({"chosen": [user("hi"), bot("a"), user("?")], "rejected": [user("hi"), bot("b")]}, "chosen ends with a 'user' message"),
    ({"chosen": [user("hi")], "rejected": [user("hi"), bot("b")]}, "chosen has no assistant message"),
    ({"chosen": [bot("a")], "rejected": [bot("b")]}, "chosen holds only the assistant's reply"),
    ({"chosen": [user("hi"), bot(" ")], "rejected": [user("hi"), bot("b")]}, "the chosen reply is empty"),
    ({"chosen": "\n\nHuman: hi\n\nAssistant: a", "rejected": [user("hi"), bot("b")]}, "both be strings or both be message lists"),
]


@pytest.mark.parametrize("row,problem", BAD_ROWS)
def test_bad_row_is_named_with_its_problem(row, problem, tmp_path):
    good = {"prompt": "fine", "chosen": " yes", "rejected": " no"}
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps(good) + "\n" + json.dumps(row) + "\n")
    with pytest.raises(DataError) as e:
        load_pairs(path)
    assert (e.value.source, e.value.row) == (str(path), 2)
    assert problem in e.value.problem
    assert str(e.value).startswith(f"{path}, row 2: ")
    assert "\n" not in str(e.value)
    # the same row is dropped under the skip policy, and the good one kept
    assert load_pairs(path, on_bad_row="skip") == [Pair("fine", " yes", " no")]


def test_text_field_is_one_validator_for_every_reader():
    """Recipes prefix where in a raw row the field sits; `dpokit score` accepts either of two keys."""
    assert text_field({"response": " r"}, "completion", "response") == " r"
    with pytest.raises(RowProblem, match=r"^missing field 'completion' or 'response'$"):
        text_field({"completion": None}, "completion", "response")
    with pytest.raises(RowProblem, match=r"^response 2: field 'text' is empty$"):
        text_field({"text": " "}, "text", where="response 2: ")
    with pytest.raises(RowProblem, match=r"^reply 0: field 'text': message 0 needs string 'role' and 'content'"):
        text_field({"text": [{"role": "user"}]}, "text", where="reply 0: ")


def test_skip_policy_counts_and_warns(tmp_path, caplog):
    good = {"prompt": "p", "chosen": " a", "rejected": " b"}
    lines = [json.dumps(good), '{"prompt": "p", "chosen": " a"', json.dumps(good), "",
             json.dumps({**good, "rejected": " a"}), "[1, 2]", json.dumps({**good, "rejected": " a"}), json.dumps(good)]
    path = tmp_path / "d.jsonl"
    path.write_text("\n".join(lines) + "\n")
    with caplog.at_level(logging.WARNING, logger="dpokit"):
        pairs = load_pairs(path, on_bad_row="skip")
    assert len(pairs) == 3
    (record,) = [r for r in caplog.records if r.name == "dpokit"]
    message = record.getMessage()
    assert record.levelno == logging.WARNING
    assert f"{path}: skipped 4 bad row(s) of 7" in message
    # grouped by problem, most frequent first, with the line numbers (the blank line 4 counts as a line)
    assert message.index("chosen and rejected are identical (2: rows 5, 7)") < message.index("not valid JSON")
    assert "not valid JSON" in message and "(1: row 2)" in message
    assert "expected a JSON object, got an array (1: row 6)" in message


def test_error_policy_stops_at_the_first_bad_row(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"prompt": "p", "chosen": " a", "rejected": " b"}\n{"prompt": "p", "chosen": " a"\n')
    with pytest.raises(DataError) as e:
        load_pairs(path)
    assert e.value.row == 2 and "not valid JSON" in e.value.problem and "on_bad_row=skip" in e.value.problem


def test_all_rows_bad_or_none_at_all(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"prompt": "p", "chosen": " a", "rejected": " a"}\n')
    with pytest.raises(DataError, match=r"all 1 rows are bad: chosen and rejected are identical \(1: row 1\)"):
        load_pairs(path, on_bad_row="skip")
    for name, text in [("e.jsonl", ""), ("e.json", "  \n"), ("e.csv", ""), ("f.json", "[]")]:
        (tmp_path / name).write_text(text)
        with pytest.raises(DataError, match=r"no rows \(it is empty\)") as e:
            load_pairs(tmp_path / name)
        assert e.value.source == str(tmp_path / name)


def test_unknown_policy(tmp_path):
    with pytest.raises(DpokitError, match="on_bad_row must be 'error' or 'skip'"):
        load_pairs([], on_bad_row="ignore")


# ---------------------------------------------------------------- readers


def test_json_file_shapes(tmp_path):
    row = {"prompt": "p", "chosen": " a", "rejected": " b"}
    expected = [Pair("p", " a", " b")]
    shapes = {
        "one_row.json": row,
        "columns.json": {k: [v] for k, v in row.items()},
        "pandas.json": {k: {"0": v} for k, v in row.items()},  # DataFrame.to_json()'s default layout
        "conv_row.json": {"prompt": [user("p")], "chosen": [bot("a")], "rejected": [bot("b")]},
    }
    for name, data in shapes.items():
        (tmp_path / name).write_text(json.dumps(data))
    for name in ("one_row.json", "columns.json", "pandas.json"):
        assert load_pairs(tmp_path / name) == expected, name
    # a single conversational row is one row, not columns of messages
    assert load_pairs(tmp_path / "conv_row.json") == [Pair([user("p")], [bot("a")], [bot("b")])]


def test_json_lines_under_a_json_name(tmp_path):
    # Dataset.to_json writes JSON Lines whatever the suffix
    path = tmp_path / "d.json"
    datasets.Dataset.from_list(LAYOUTS["standard"][0]).to_json(str(path))
    assert load_pairs(path) == LAYOUTS["standard"][1]
    path.write_text(path.read_text() + '{"prompt": broken\n')
    with pytest.raises(DataError) as e:
        load_pairs(path)
    assert e.value.row == 3 and "not valid JSON" in e.value.problem


def test_broken_json_documents(tmp_path):
    cases = {
        "trunc.json": ('[{"prompt": "p",\n "chosen": ', "not valid JSON (Expecting value at line 2, column 12)"),
        "scalar.json": ("42", "expected a list of row objects, got a number"),
        "keys.json": ('{"data": 1}', "got an object with keys ['data']"),
        "ragged.json": ('{"prompt": ["a", "b"], "chosen": [" c"], "rejected": [" d", " e"]}', "columns have different lengths"),
    }
    for name, (text, problem) in cases.items():
        (tmp_path / name).write_text(text)
        with pytest.raises(DataError) as e:
            load_pairs(tmp_path / name)
        assert e.value.row is None and problem in e.value.problem, name
    (tmp_path / "mixed.json").write_text('[{"prompt": "p", "chosen": " a", "rejected": " b"}, "oops"]')
    with pytest.raises(DataError) as e:
        load_pairs(tmp_path / "mixed.json")
    assert e.value.row == 2 and "expected an object, got a string" in e.value.problem


def test_non_utf8_bytes_are_a_problem_of_their_row(tmp_path):
    path = tmp_path / "d.jsonl"
    good = b'{"prompt": "p", "chosen": " a", "rejected": " b"}\n'
    path.write_bytes(good + b'{"prompt": "p", "chosen": " caf\xe9", "rejected": " b"}\n' + good)
    with pytest.raises(DataError) as e:
        load_pairs(path)
    assert e.value.row == 2
    assert "text in field 'chosen' is not valid UTF-8 (byte 0xe9" in e.value.problem
    assert len(load_pairs(path, on_bad_row="skip")) == 2
    csv_path = tmp_path / "d.csv"
    csv_path.write_bytes(b"prompt,chosen,rejected\np, a, b\np,\xff, b\n")
    with pytest.raises(DataError) as e:
        load_pairs(csv_path)
    assert e.value.row == 3 and "byte 0xff" in e.value.problem


def test_byte_order_mark_is_ignored(tmp_path):
    path = tmp_path / "d.csv"
    path.write_bytes("\ufeffprompt,chosen,rejected\np, a, b\n".encode("utf-8"))
    assert load_pairs(path) == [Pair("p", " a", " b")]
    path = tmp_path / "d.jsonl"
    path.write_bytes('\ufeff{"prompt": "p", "chosen": " a", "rejected": " b"}\n'.encode("utf-8"))
    assert load_pairs(path) == [Pair("p", " a", " b")]


def test_csv_specifics(tmp_path):
    path = tmp_path / "d.csv"
    path.write_text('prompt,chosen,rejected,weight,margin\n'
                    'p," a, with comma"," b",,\n'          # empty weight/margin cells: not given
                    'q," c"," d",abc,\n'                   # a weight that is not a number
                    'r," e"," f",1,0,extra\n'              # one cell too many
                    's,"[1, 2]"," [not json",,\n'       # cells that only look like JSON stay text
                    '"multi\nline"," h"," i",0.5,2\n')
    pairs = load_pairs(path, on_bad_row="skip")
    assert pairs == [Pair("p", " a, with comma", " b"), Pair("s", "[1, 2]", " [not json", weight=1.0),
                     Pair("multi\nline", " h", " i", 0.5, 2.0)]
    with pytest.raises(DataError) as e:
        load_pairs(path)
    assert e.value.row == 3 and "field 'weight' must be a finite number, got 'abc'" in e.value.problem
    rows = list(iter_rows(path))
    assert rows[2][0] == 4 and isinstance(rows[2][1], RowProblem) and "has 6 fields, the header has 5" in str(rows[2][1])
    assert rows[4][0] == 6  # spreadsheet rows: a quoted newline does not start a new row


def test_csv_without_a_needed_column(tmp_path):
    path = tmp_path / "d.csv"
    path.write_text("prompt,chosen\np, a\n")
    with pytest.raises(DataError) as e:
        load_pairs(path)
    assert e.value.row == 1 and "the header has no 'rejected' column (columns: prompt, chosen)" in e.value.problem


def test_unreadable_sources(tmp_path):
    with pytest.raises(DpokitError, match="no such file or folder"):
        load_pairs(tmp_path / "missing.jsonl")
    (tmp_path / "d.txt").write_text("x")
    with pytest.raises(DpokitError, match=r"unknown data format '\.txt'"):
        load_pairs(tmp_path / "d.txt")
    (tmp_path / "folder").mkdir()
    (tmp_path / "folder" / "notes.md").write_text("hi")
    with pytest.raises(DpokitError, match="a folder, but not one written by Dataset.save_to_disk"):
        load_pairs(tmp_path / "folder")
    (tmp_path / "bad.parquet").write_bytes(b"not parquet at all")
    with pytest.raises(DpokitError, match="cannot read Parquet"):
        load_pairs(tmp_path / "bad.parquet")
    with pytest.raises(DpokitError, match="no data given"):
        load_pairs("")
    with pytest.raises(DpokitError, match="expected a file path, a datasets.Dataset or a list of row dicts"):
        load_pairs({"prompt": "p"})


def test_dataset_dicts_use_their_train_split(tmp_path):
    rows, expected = LAYOUTS["implicit_text"]
    dd = datasets.DatasetDict({"train": datasets.Dataset.from_list(rows), "test": datasets.Dataset.from_list(rows[:1])})
    assert load_pairs(dd) == expected
    dd.save_to_disk(str(tmp_path / "dd"))
    assert load_pairs(tmp_path / "dd") == expected
    with pytest.raises(DpokitError, match=r"splits \['test'\] and no 'train'"):
        load_pairs(datasets.DatasetDict({"test": dd["test"]}))


def test_read_rows_raises_on_an_unreadable_row(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"chosen": "x"}\n\nnot json\n')
    rows = read_rows(path)
    assert next(rows) == (1, {"chosen": "x"})
    with pytest.raises(DataError) as e:
        next(rows)
    assert e.value.row == 3


def test_in_memory_rows_that_are_not_mappings():
    with pytest.raises(DataError) as e:
        load_pairs([{"prompt": "p", "chosen": " a", "rejected": " b"}, ("p", " a", " b")])
    assert (e.value.source, e.value.row) == ("in-memory list", 2) and "expected a mapping, got tuple" in e.value.problem


# ---------------------------------------------------------------- real data


@pytest.mark.skipif(not HH.exists(), reason=f"real HH-harmless data not found at {HH}")
def test_real_hh_harmless_rows(caplog):
    with caplog.at_level(logging.WARNING, logger="dpokit"):
        pairs = load_pairs(HH, on_bad_row="skip")
    (warning,) = [r.getMessage() for r in caplog.records if r.name == "dpokit"]
    skipped = int(warning.split("skipped ")[1].split(" ")[0])
    assert "of 2000" in warning
    assert 0 < skipped <= 20 and len(pairs) == 2000 - skipped
    # an independent reading of the rule: both dialogues agree up to their last "Assistant:" turn, and
    # neither reply is blank
    raw = [json.loads(line) for line in HH.read_text().splitlines()]
    heads = [[d.rsplit("\n\nAssistant:", 1) for d in (r["chosen"], r["rejected"])] for r in raw]
    good = [(c[0] == r[0] and c[1].strip() != "" and r[1].strip() != "") for c, r in heads]
    assert sum(good) == len(pairs)
    # the messy rows named in the warning: empty replies and dialogues that share no prompt
    assert "the chosen reply is empty" in warning
    assert "differ before their last assistant turn, so they share no prompt" in warning
    for pair in pairs:
        assert pair.prompt.startswith("\n\nHuman:") and pair.prompt.endswith("\n\nAssistant:")
        assert pair.chosen.strip() and pair.rejected.strip() and pair.chosen != pair.rejected
        assert "\n\nAssistant:" not in pair.chosen and "\n\nAssistant:" not in pair.rejected
    with pytest.raises(DataError) as e:
        load_pairs(HH)
    assert e.value.source == str(HH) and e.value.row is not None
