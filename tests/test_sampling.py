"""Sampling for PPO rollouts and the evaluation (`SharedBaseRoles.sample`), and the response-aligned
forward that scores what was sampled (`SharedBaseRoles.score_response`)."""

from __future__ import annotations

from dataclasses import replace

import torch

from qlora_rlhf.actor import SharedBaseRoles, forward, token_logprobs


def test_sample_is_seeded_and_its_log_probs_are_the_policys(pipeline):
    """Same seed, same responses; the returned log-probs are those of a forward over the sampled
    sequence at the sampling temperature (what PPO's ratio and the evaluation's KL rely on)."""
    config, paths, _ = pipeline
    roles = SharedBaseRoles.load(config, paths.sft / "merged", paths.rm / "adapter", trainable=False)
    roles = replace(roles, engine="peft")  # the NF4 model itself: the tolerance below is its own rounding
    prompts = ["\n\nHuman: What is 2 plus 3?\n\nAssistant:", "\n\nHuman: Hi?\n\nAssistant:"]
    runs = []
    for _ in range(2):
        torch.manual_seed(5)
        runs.append(roles.sample(prompts, 6, 0.7, logprobs=True))
    drawn, again = runs
    assert torch.equal(drawn.response, again.response) and torch.equal(drawn.logprobs, again.logprobs)
    assert torch.equal(drawn.mask[:, drawn.prompt_len :], drawn.response_mask)
    assert drawn.has_eos.tolist() == (drawn.response == roles.tokenizer.eos_token_id).any(1).tolist()
    with torch.no_grad():
        forward_lp = roles.score_response(drawn.ids, drawn.mask, drawn.prompt_len, 0.7).logprobs
    m = drawn.response_mask
    assert torch.isfinite(drawn.logprobs).all()
    assert torch.allclose(drawn.logprobs * m, forward_lp * m, atol=2e-2)


def test_score_response_lines_up_with_the_response_tokens(pipeline):
    """Entry t of score_response belongs to the t-th response token: the output at the position before
    it in a full forward, at the sampling temperature; the values read the same hidden states."""
    config, paths, _ = pipeline
    roles = SharedBaseRoles.load(config, paths.sft / "merged", paths.rm / "adapter", trainable=False)
    torch.nn.init.normal_(roles.value_head.weight)  # not zero, so that a misaligned value shows
    prompts = ["\n\nHuman: Hi?\n\nAssistant:", "\n\nHuman: Name a colour.\n\nAssistant:"]
    torch.manual_seed(2)
    drawn = replace(roles, engine="peft").sample(prompts, 5, 0.9)
    with torch.no_grad():
        scored = roles.score_response(drawn.ids, drawn.mask, drawn.prompt_len, 0.9)
        logits, hidden = forward(roles.model, drawn.ids, drawn.mask)
    n = drawn.response.shape[1]
    before = slice(drawn.prompt_len - 1, drawn.prompt_len - 1 + n)  # the positions that predict the response
    assert scored.logprobs.shape == scored.values.shape == drawn.response.shape
    assert torch.allclose(scored.logprobs, token_logprobs(logits[:, before], drawn.response, 0.9), atol=1e-4)
    values = roles.value_head(hidden[:, before].float()).squeeze(-1)
    assert torch.allclose(scored.values, values, atol=1e-5)
