"""hh-rlhf parsing: the prompt ends at the LAST "\\n\\nAssistant:", malformed rows raise ValueError(reason)."""

from __future__ import annotations

import json

import pytest

from qlora_rlhf.hh import Pair, last_human_turn, parse_row, split_dialogue

P = "\n\nHuman: What is 2 plus 2?\n\nAssistant:"


def test_single_turn():
    pair = parse_row({"chosen": P + " 4.", "rejected": P + " 5."})
    assert pair == Pair(prompt=P, chosen=" 4.", rejected=" 5.")


def test_multi_turn_splits_at_last_assistant():
    history = "\n\nHuman: Hi\n\nAssistant: Hello!\n\nHuman: What is 2 plus 2?\n\nAssistant:"
    pair = parse_row({"chosen": history + " 4.", "rejected": history + " 5."})
    assert pair.prompt == history
    assert pair.prompt.count("\n\nAssistant:") == 2 and pair.prompt.endswith("\n\nAssistant:")
    assert (pair.chosen, pair.rejected) == (" 4.", " 5.")
    assert last_human_turn(pair.prompt) == "What is 2 plus 2?"


def test_response_keeps_inner_newlines():
    prompt, response = split_dialogue(P + " Line one.\n\nLine two.")
    assert prompt == P and response == " Line one.\n\nLine two."


@pytest.mark.parametrize(
    ("row", "reason"),
    [
        ({"chosen": "\n\nHuman: hi there", "rejected": "\n\nHuman: hi you"}, "no_assistant_turn"),
        ({"chosen": P, "rejected": P + " 5."}, "empty_response"),
        ({"chosen": P + " 4.", "rejected": P + "   \n"}, "empty_response"),
        ({"chosen": P + " 4.", "rejected": P + " 4."}, "chosen_equals_rejected"),
        ({"chosen": P + " 4.", "rejected": P + " 4.  "}, "chosen_equals_rejected"),
        ({"chosen": P + " 4."}, "missing_keys"),
        ({"prompt": P, "response": " 4."}, "missing_keys"),
        (["chosen", "rejected"], "missing_keys"),
        (None, "missing_keys"),
        ("\n\nHuman: hi\n\nAssistant: yo", "missing_keys"),
        ({"chosen": P + " 4.", "rejected": 5}, "not_text"),
        ({"chosen": None, "rejected": P + " 5."}, "not_text"),
        ({"chosen": [P, " 4."], "rejected": P + " 5."}, "not_text"),
        ({"chosen": P + " 4\ufffd.", "rejected": P + " 5."}, "undecodable_text"),
        ({"chosen": P + " 4.", "rejected": json.loads('"' + P.replace("\n", "\\n") + ' \\ud800"')}, "undecodable_text"),
        ({"chosen": P + " 4.", "rejected": "\n\nHuman: What is 3 plus 3?\n\nAssistant: 6."}, "prompt_mismatch"),
        ({"chosen": "\n\nAssistant: 4.", "rejected": "\n\nAssistant: 5."}, "no_human_turn"),
    ],
)
def test_malformed_rows_raise_their_reason(row, reason):
    with pytest.raises(ValueError) as info:
        parse_row(row)
    assert str(info.value) == reason


def test_extra_keys_are_ignored():
    pair = parse_row({"chosen": P + " 4.", "rejected": P + " 5.", "source": "x"})
    assert pair.chosen == " 4."


def test_split_dialogue_reasons():
    with pytest.raises(ValueError, match="no_assistant_turn"):
        split_dialogue("")
    with pytest.raises(ValueError, match="empty_response"):
        split_dialogue(P + "\n")
