"""Anthropic/hh-rlhf format: each row is {"chosen": str, "rejected": str}, each a whole dialogue
"\\n\\nHuman: ...\\n\\nAssistant: ..." The prompt is everything up to and including the last
"\\n\\nAssistant:", the response is the rest. Every stage formats text through this module."""

from __future__ import annotations

from dataclasses import dataclass

HUMAN = "\n\nHuman:"
ASSISTANT = "\n\nAssistant:"


@dataclass(frozen=True)
class Pair:
    prompt: str
    chosen: str  # response text only, starting with a space as in hh-rlhf
    rejected: str


def split_dialogue(text: str) -> tuple[str, str]:
    """Split a dialogue into (prompt, response); raises ValueError with a reason on malformed text."""
    cut = text.rfind(ASSISTANT)
    if cut < 0:
        raise ValueError("no_assistant_turn")
    prompt, response = text[: cut + len(ASSISTANT)], text[cut + len(ASSISTANT) :]
    if HUMAN not in prompt:
        raise ValueError("no_human_turn")
    if not response.strip():
        raise ValueError("empty_response")
    return prompt, response


def _encodable(text: str) -> bool:
    """False for lone surrogates ("\\ud800" escapes in JSON): they cannot be written back as UTF-8."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def parse_row(row: object) -> Pair:
    """Validate one hh-rlhf row; ValueError's message is the drop reason counted in the manifest."""
    if not isinstance(row, dict) or not {"chosen", "rejected"} <= row.keys():
        raise ValueError("missing_keys")
    chosen, rejected = row["chosen"], row["rejected"]
    if not isinstance(chosen, str) or not isinstance(rejected, str):
        raise ValueError("not_text")
    if "\ufffd" in chosen or "\ufffd" in rejected or not _encodable(chosen + rejected):
        raise ValueError("undecodable_text")
    if chosen == rejected:
        raise ValueError("chosen_equals_rejected")
    prompt, chosen_response = split_dialogue(chosen)
    rejected_prompt, rejected_response = split_dialogue(rejected)
    if rejected_prompt != prompt:
        raise ValueError("prompt_mismatch")
    if chosen_response.strip() == rejected_response.strip():
        raise ValueError("chosen_equals_rejected")
    return Pair(prompt=prompt, chosen=chosen_response, rejected=rejected_response)


def last_human_turn(prompt: str) -> str:
    """The text of the final Human turn of a prompt (what the gold judge reads)."""
    start = prompt.rfind(HUMAN)
    end = prompt.rfind(ASSISTANT)
    return prompt[start + len(HUMAN) : end if end > start else None].strip()
