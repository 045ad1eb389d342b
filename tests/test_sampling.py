"""Sampling for PPO rollouts and the evaluation (`actor.sample`)."""

from __future__ import annotations

import torch

from qlora_rlhf.actor import ActorCritic, response_mask, sample, token_logprobs


def test_sample_is_seeded_and_its_log_probs_are_the_policys(pipeline):
    """Same seed, same responses; the returned log-probs are those of a forward over the sampled
    sequence at the sampling temperature (what PPO's ratio and the evaluation's KL rely on)."""
    config, paths, _ = pipeline
    ac = ActorCritic.load(config, paths.sft / "merged", paths.rm / "adapter", trainable=False)
    prompts = ["\n\nHuman: What is 2 plus 3?\n\nAssistant:", "\n\nHuman: Hi?\n\nAssistant:"]
    runs = []
    for _ in range(2):
        torch.manual_seed(5)
        runs.append(sample(ac.model, ac.tokenizer, prompts, 6, 0.7, logprobs=True))
    (query, query_mask, response, logprobs), again = runs
    assert torch.equal(response, again[2]) and torch.equal(logprobs, again[3])
    resp_mask = response_mask(response, ac.tokenizer.eos_token_id)
    ids, mask = torch.cat([query, response], 1), torch.cat([query_mask, resp_mask], 1)
    with torch.no_grad():
        logits, _ = ac.forward(ids, mask, logits_from=query.shape[1] - 1)
    forward_lp = token_logprobs(logits[:, :-1], response, 0.7)
    assert torch.isfinite(logprobs).all()
    assert torch.allclose(logprobs * resp_mask, forward_lp * resp_mask, atol=2e-2)
