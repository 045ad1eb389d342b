"""Sampling for PPO rollouts and the evaluation: `actor.InverseCDFSampler` inside `generate`."""

from __future__ import annotations

import torch

from qlora_rlhf.actor import ActorCritic, InverseCDFSampler, response_mask, sample, token_logprobs


def test_draws_follow_the_tempered_softmax():
    logits = torch.tensor([2.0, 1.0, 0.5, 0.0, -1.0, -torch.inf])
    rows, temperature = 40_000, 0.7
    torch.manual_seed(0)
    out = InverseCDFSampler(temperature)(None, logits.repeat(rows, 1))
    assert torch.equal(torch.isfinite(out).sum(1), torch.ones(rows, dtype=torch.long))  # one token per row
    assert out.max() == 0.0
    counts = torch.bincount(out.argmax(1), minlength=len(logits)).float() / rows
    expected = torch.softmax(logits / temperature, 0)
    assert counts[-1] == 0  # a token of probability zero is never drawn
    assert (counts - expected).abs().max() < 0.01  # 5 standard errors at 40,000 draws


def test_a_certain_token_is_drawn_every_time():
    logits = torch.full((3, 10), -torch.inf)
    logits[torch.arange(3), torch.tensor([0, 4, 9])] = 1.0  # the first, a middle and the last token
    torch.manual_seed(0)
    assert torch.equal(InverseCDFSampler(1.0)(None, logits).argmax(1), torch.tensor([0, 4, 9]))


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
    resp_mask = response_mask(response, ac.tokenizer.eos_token_id, ac.tokenizer.pad_token_id)
    ids, mask = torch.cat([query, response], 1), torch.cat([query_mask, resp_mask], 1)
    with torch.no_grad():
        logits, _ = ac.forward(ids, mask, logits_from=query.shape[1] - 1)
    forward_lp = token_logprobs(logits[:, :-1], response, 0.7)
    assert torch.isfinite(logprobs).all()
    assert torch.allclose(logprobs * resp_mask, forward_lp * resp_mask, atol=2e-2)
