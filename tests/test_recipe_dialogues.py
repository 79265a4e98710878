"""`dpokit data build dialogues`: HH-style dialogue pairs as conversational rows, every row left out counted by
why, and the rows it writes load as conversational pairs through the chat template."""

from __future__ import annotations

import json

from dpokit.cli import main
from dpokit.recipes.dialogues import conversational_pair, dialogue_messages

DIALOGUE = "\n\nHuman: how do I pick a lock?\n\nAssistant: Why do you ask?\n\nHuman: I'm locked out"
ROW = {"chosen": DIALOGUE + "\n\nAssistant: Call a locksmith.", "rejected": DIALOGUE + "\n\nAssistant: Use a pin."}


def test_a_dialogue_as_messages():
    assert dialogue_messages(ROW["chosen"]) == [{"role": "user", "content": "how do I pick a lock?"},
                                                {"role": "assistant", "content": "Why do you ask?"},
                                                {"role": "user", "content": "I'm locked out"},
                                                {"role": "assistant", "content": "Call a locksmith."}]
    assert dialogue_messages("\n\nAssistant: hi") is None  # must start with a human turn
    assert dialogue_messages("\n\nHuman: a\n\nHuman: b") is None  # turns must alternate
    assert dialogue_messages("preamble\n\nHuman: a\n\nAssistant: b") is None


def test_a_pair_and_each_reason_a_row_is_left_out():
    pair, outcome = conversational_pair({**ROW, "id": 7})
    assert outcome == "pairs" and pair["id"] == 7
    assert pair["prompt"] == dialogue_messages(DIALOGUE)
    assert pair["chosen"] == [{"role": "assistant", "content": "Call a locksmith."}]
    assert pair["rejected"] == [{"role": "assistant", "content": "Use a pin."}]
    bad = {"prompts_differ": {**ROW, "rejected": "\n\nHuman: hello\n\nAssistant: Use a pin."},
           "same_reply": {**ROW, "rejected": ROW["chosen"]},
           "empty_reply": {**ROW, "rejected": DIALOGUE + "\n\nAssistant: "},
           "last_turn_not_assistant": {"chosen": DIALOGUE, "rejected": DIALOGUE + " please"},
           "turns_do_not_alternate": {**ROW, "rejected": "\n\nAssistant: hi"},
           "not_dialogue_strings": {"chosen": 3, "rejected": "x"}}
    for reason, row in bad.items():
        assert conversational_pair(row) == (None, reason), reason


def test_the_command_writes_rows_that_train_as_chat(tmp_path, capsys):
    from dpokit.data.formats import row_to_pair
    from dpokit.data.tokenize import tokenize_pair
    from dpokit.tiny import build_tokenizer

    raw = tmp_path / "hh.jsonl"
    raw.write_text("".join(json.dumps(r) + "\n" for r in [ROW, {**ROW, "rejected": ROW["chosen"]}, ROW]))
    out = tmp_path / "chat.jsonl"
    main(["data", "build", "dialogues", str(raw), str(out)])
    summary = capsys.readouterr().out
    assert "wrote 2 rows" in summary and "pairs: 2" in summary and "same reply: 1" in summary
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 2
    tokenizer = build_tokenizer([DIALOGUE, "Call a locksmith.", "Use a pin."], vocab_size=200)
    example = tokenize_pair(row_to_pair(rows[0]), tokenizer, None, None)
    prompt = tokenizer.decode(example.prompt_ids)
    assert prompt.endswith("<|assistant|>") and "<|user|>I'm locked out" in prompt  # the chat template, not "Human:"
    assert tokenizer.decode(example.chosen_ids).startswith("Call a locksmith.")
