"""One layout of token ids for every stage: the one TRL's trainers (trl 1.12.0) train on.

SFTTrainer (prompt-completion rows) and RewardTrainer (prompt, chosen, rejected rows) both append
the EOS *string* to the response when it does not end with it already, then tokenize the whole
text `prompt + response + eos` with the tokenizer's defaults (`add_special_tokens=True`: `<s>`
first for Llama-2, nothing for SmolLM2). SFTTrainer also tokenizes the prompt alone, the same way,
and counts its length as the prompt part that the completion-only loss masks out. Both pad on the
right, so real tokens sit at positions 0..n-1.

Our own paths (PPO rollouts, the reward model's held-out scoring, held-out perplexity, the
evaluation) lay out ids with these functions, so the policy samples and the reward model scores
sequences laid out as in training, and pad on the left (generation appends on the right) with
position ids that count real tokens only (`positions`), which gives each real token the position
it had in training.
"""

from __future__ import annotations

import torch


def prompt_ids(tokenizer, prompt: str) -> list[int]:
    """A prompt's ids as SFTTrainer tokenizes it (BOS first where the tokenizer adds one): the query of
    a rollout, and the part of a training sequence that carries no loss."""
    return tokenizer(prompt).input_ids


def with_eos(tokenizer, text: str) -> str:
    """The text with the EOS string appended unless it ends with it (TRL's `add_eos`)."""
    return text if text.endswith(tokenizer.eos_token) else text + tokenizer.eos_token


def sequence_ids(tokenizer, text: str) -> list[int]:
    """The ids of a whole dialogue (prompt + response, EOS appended), as both trainers tokenize it."""
    return tokenizer(with_eos(tokenizer, text)).input_ids


def dialogue_ids(tokenizer, prompt: str, response: str) -> tuple[list[int], int]:
    """(ids of prompt + response + EOS, number of leading prompt ids). TRL appends EOS to the response
    before it joins the prompt; the whole text is tokenized at once, so ids at the seam are the
    trainers', not those of the two parts tokenized apart."""
    return tokenizer(prompt + with_eos(tokenizer, response)).input_ids, len(prompt_ids(tokenizer, prompt))


def left_pad(sequences: list[list[int]], pad_id: int, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids, attention mask) of sequences padded on the left to the longest."""
    width = max(len(s) for s in sequences)
    ids = torch.tensor([[pad_id] * (width - len(s)) + list(s) for s in sequences], dtype=torch.long, device=device)
    mask = torch.tensor([[0] * (width - len(s)) + [1] * len(s) for s in sequences], dtype=torch.long, device=device)
    return ids, mask


def positions(mask: torch.Tensor) -> torch.Tensor:
    """Position ids that count real tokens only (0 at each row's first real token), as in training."""
    return (mask.long().cumsum(1) - 1).clamp(min=0)
