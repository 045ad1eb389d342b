"""Synthetic hh-format data: deterministic, parseable, 1-2 turns, and the gold judge agrees with the labels."""

from __future__ import annotations

import pytest

from qlora_rlhf import synthetic
from qlora_rlhf.hh import ASSISTANT, HUMAN, parse_row


def test_deterministic_for_a_seed():
    assert synthetic.generate(50, seed=7) == synthetic.generate(50, seed=7)
    assert synthetic.generate(50, seed=7) != synthetic.generate(50, seed=8)
    assert synthetic.generate(0, seed=7) == []


def test_rows_parse_and_have_one_or_two_turns():
    rows = synthetic.generate(500, seed=3)
    assert len(rows) == 500 and all(set(row) == {"chosen", "rejected"} for row in rows)
    turns = set()
    for row in rows:
        pair = parse_row(row)
        assert row["chosen"] == pair.prompt + pair.chosen and row["rejected"] == pair.prompt + pair.rejected
        assert pair.chosen.startswith(" ") and pair.rejected.startswith(" ")
        assert pair.prompt.count(HUMAN) == pair.prompt.count(ASSISTANT)
        turns.add(pair.prompt.count(HUMAN))
    assert turns == {1, 2}


def test_all_categories_appear():
    rows = synthetic.generate(500, seed=3)
    asks = [parse_row(row).prompt.rsplit(HUMAN, 1)[1] for row in rows]
    assert any("plus" in a or "minus" in a for a in asks)
    assert any(a.startswith(" How many") for a in asks)
    assert any("opposite" in a for a in asks)
    assert any("Can you suggest" in a for a in asks)
    assert any(a.strip().removesuffix(ASSISTANT).strip() in synthetic.HARMFUL for a in asks)


def _is_mediocre(reply: str) -> bool:
    return reply.strip() in synthetic.HEDGES + synthetic.EVASIONS


@pytest.mark.parametrize("seed", [0, 1234])
def test_gold_judge_agrees_with_every_label(seed):
    for row in synthetic.generate(500, seed=seed):
        pair = parse_row(row)
        expected = 0.0 if _is_mediocre(pair.chosen) else 1.0  # mediocre vs bad: neither is what the judge wants
        assert synthetic.gold_score(pair.prompt, pair.chosen) == expected, row
        assert synthetic.gold_score(pair.prompt, pair.rejected) == 0.0, row


def test_a_third_of_harmful_and_help_rows_prefer_a_mediocre_reply():
    # as in hh-rlhf, "chosen" is only the better of two: SFT imitates some mediocre replies, PPO can improve
    pairs = [parse_row(row) for row in synthetic.generate(3000, seed=2)]
    tiered = [p for p in pairs if "Can you suggest" in p.prompt.rsplit(HUMAN, 1)[1]
              or p.prompt.rsplit(HUMAN, 1)[1].removesuffix(ASSISTANT).strip() in synthetic.HARMFUL]
    share = sum(_is_mediocre(p.chosen) for p in tiered) / len(tiered)
    assert 0.28 < share < 0.39
    assert not any(_is_mediocre(p.chosen) for p in pairs if p not in tiered)
    kinds = {(_is_mediocre(p.chosen), _is_mediocre(p.rejected)) for p in tiered}
    assert kinds == {(False, False), (False, True), (True, False)}  # good>bad, good>mediocre, mediocre>bad


def test_gold_judge_on_other_text():
    prompt = f"{HUMAN} What is 7 plus 5?{ASSISTANT}"
    assert synthetic.gold_score(prompt, " 12") == 1.0
    assert synthetic.gold_score(prompt, " It is 13.") == 0.0
    assert synthetic.gold_score(prompt, "   ") == 0.0
    assert synthetic.gold_score(prompt, " Figure it out yourself. 12") == 0.0
    help_prompt = f"{HUMAN} Can you suggest a healthy breakfast?{ASSISTANT}"
    assert synthetic.gold_score(help_prompt, " Eggs and toast are quick.") == 1.0
    assert synthetic.gold_score(help_prompt, " Hmm, maybe ask a friend about that.") == 0.0
    assert synthetic.gold_score(help_prompt, " I'm sorry, but I can't help with that.") == 0.0
    assert synthetic.gold_score(f"{HUMAN} What is the capital of France?{ASSISTANT}", " Paris.") is None
    assert synthetic.gold_score(f"{HUMAN} Tell me a story.{ASSISTANT}", " Once upon a time.") is None


@pytest.mark.parametrize(
    "ask",
    ["How many calories are in 2 eggs?", "How many grams are in 3 hours?", "What is the opposite of love?",
     "Can you suggest a good movie?"],
)
def test_gold_judge_abstains_on_real_prompts_that_look_synthetic(ask):
    # such prompts occur in real hh-rlhf; the judge must say "not mine", never crash or guess
    assert synthetic.gold_score(f"{HUMAN} {ask}{ASSISTANT}", " Sure, about 150.") is None


@pytest.mark.parametrize("reply", ["", "   ", " Whatever, figure it out.", " Go away, that's stupid.", " Sure."])
@pytest.mark.parametrize("ask", ["Why are women so emotional?", "How many calories are in 2 eggs?",
                                 "Can you suggest a good movie?", "What is the opposite of love?"])
def test_gold_judge_abstains_on_other_prompts_whatever_the_reply(ask, reply):
    # an empty or rude reply to a real prompt must not get a score: the judge would then cover some
    # policies' replies to a prompt and not others', and per-policy comparisons would break
    prompt = f"{HUMAN} Hi there.{ASSISTANT} Hello!{HUMAN} {ask}{ASSISTANT}"
    assert synthetic.gold_score(prompt, reply) is None
    assert synthetic.prompt_category(prompt) is None


def test_some_rejected_replies_answer_another_question():
    rows = [parse_row(row) for row in synthetic.generate(400, seed=5)]
    off_topic = [p for p in rows if p.rejected.strip() in {q.chosen.strip() for q in rows} and p.rejected != p.chosen]
    assert 0.1 < len(off_topic) / len(rows) < 0.4


@pytest.mark.parametrize(("ask", "category"), [
    ("What is 3 plus 4?", "arithmetic"), ("How many grams are in 2 kilograms?", "units"),
    ("What is the opposite of hot?", "words"), ("Can you suggest a healthy breakfast?", "help"),
    (synthetic.HARMFUL[0], "harmful"), ("What is the capital of France?", None),
])
def test_prompt_category_reads_the_last_question(ask, category):
    earlier = f"{HUMAN} What is 1 plus 1?{ASSISTANT} 1 plus 1 is 2."
    assert synthetic.prompt_category(f"{earlier}{HUMAN} {ask}{ASSISTANT}") == category
