"""PPO's equations (ppo.py) against trl 1.12.0's own functions where it has them
(trl.experimental.ppo.ppo_trainer: masked_mean, masked_var, masked_whiten, first_true_indices) and
against its training loop's lines or hand-computed values where it has none. docs/ppo.md lists the
deliberate differences from TRL's PPOTrainer."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import yaml
from trl.experimental.ppo import ppo_trainer as trl_ppo

from qlora_rlhf.actor import response_mask, truncate_after_eos
from qlora_rlhf.config import PPOConfig
from qlora_rlhf.stages import ppo

from conftest import REPO

EOS, PAD = 2, 0


def _cfg(**overrides) -> PPOConfig:
    """The smoke profile's PPO section with the settings these tests rely on."""
    smoke = yaml.safe_load((REPO / "configs" / "smoke.yaml").read_text())["ppo"]
    base = dict(batch_size=4, samples_per_prompt=1, mini_batch_size=4, kl_coef=0.05, cliprange=0.2, cliprange_value=0.2,
                gamma=1.0, lam=0.95, missing_eos_penalty=1.0)
    return PPOConfig(**(smoke | base | overrides))


# ------------------------------------------------------------------ masks
def test_response_mask_is_by_position_so_a_sampled_pad_id_leaves_no_hole():
    sampled = torch.tensor([[7, PAD, 9, EOS, 5, 6],  # the pad id sampled mid-response, then EOS
                            [7, 8, 9, 4, 5, 6],  # no EOS: every position is real
                            [EOS, 3, 3, 3, 3, 3]])  # EOS first
    response = truncate_after_eos(sampled, EOS, PAD)
    assert response.tolist()[0] == [7, PAD, 9, EOS, PAD, PAD]
    mask = response_mask(response, EOS)
    assert mask.tolist() == [[1, 1, 1, 1, 0, 0], [1] * 6, [1, 0, 0, 0, 0, 0]]
    # the score sits on the EOS (position 3), not before the sampled pad id
    rewards, _ = ppo.token_rewards(torch.zeros(3, 6), torch.zeros(3, 6), torch.tensor([1.0, 2.0, 3.0]), mask, 0.1)
    assert rewards.tolist() == [[0, 0, 0, 1, 0, 0], [0, 0, 0, 0, 0, 2], [3, 0, 0, 0, 0, 0]]


def test_masked_mean_and_whiten_agree_with_trl():
    torch.manual_seed(0)
    values, mask = torch.randn(4, 7), (torch.rand(4, 7) > 0.3).float()
    torch.testing.assert_close(ppo.masked_mean(values, mask), trl_ppo.masked_mean(values, mask))
    # Population variance (TRL's masked_var with unbiased=False) ...
    expected = ((values - trl_ppo.masked_mean(values, mask))
                * torch.rsqrt(trl_ppo.masked_var(values, mask, unbiased=False) + 1e-8))
    torch.testing.assert_close(ppo.masked_whiten(values, mask), expected * mask)
    # ... so TRL's masked_whiten (Bessel-corrected) is ours times sqrt((n - 1) / n) at the real positions.
    n = mask.sum()
    torch.testing.assert_close(ppo.masked_whiten(values, mask) * torch.sqrt((n - 1) / n),
                               trl_ppo.masked_whiten(values, mask) * mask, rtol=1e-5, atol=1e-6)
    whitened = ppo.masked_whiten(values, mask)
    assert (ppo.masked_mean(whitened, mask).abs() < 1e-6
            and ppo.masked_mean(whitened**2, mask) == pytest.approx(1, rel=1e-5))


# ------------------------------------------------------------------ rollout arithmetic
def test_per_token_kl_penalty_and_score_on_the_last_real_token():
    logprobs = torch.tensor([[-1.0, -2.0, -0.5], [-1.0, -1.5, -3.0]])
    ref = torch.tensor([[-1.5, -1.0, -0.5], [-0.5, -1.5, -9.0]])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    rewards, kl = ppo.token_rewards(logprobs, ref, torch.tensor([2.0, -1.0]), mask, kl_coef=0.1)
    # k1: log pi - log pi_ref; 0 on padding
    torch.testing.assert_close(kl, torch.tensor([[0.5, -1.0, 0.0], [-0.5, 0.0, 0.0]]))
    torch.testing.assert_close(rewards, torch.tensor([[-0.05, 0.1, 2.0], [0.05, -1.0, 0.0]]))


def test_missing_eos_penalty_then_leave_one_out():
    scores, has_eos = torch.tensor([1.0, 2.0, 3.0, 4.0]), torch.tensor([True, False, True, True])
    torch.testing.assert_close(ppo.sequence_scores(scores, has_eos, _cfg(missing_eos_penalty=0.5)),
                               torch.tensor([1.0, 1.5, 3.0, 4.0]))
    # k = 2: the penalty first, then each score minus its prompt's other (penalized) sample
    centered = ppo.sequence_scores(scores, has_eos, _cfg(missing_eos_penalty=0.5, samples_per_prompt=2))
    torch.testing.assert_close(centered, torch.tensor([1.0 - 1.5, 1.5 - 1.0, 3.0 - 4.0, 4.0 - 3.0]))
    assert torch.equal(ppo.sequence_scores(scores, has_eos, _cfg(missing_eos_penalty=0.0)), scores)


def test_gae_by_hand_and_as_a_discounted_sum_of_td_errors():
    rewards, values = torch.tensor([[1.0, 0.0, 2.0]]), torch.tensor([[0.5, 1.0, -1.0]])
    gamma, lam = 0.9, 0.8
    # deltas: r_t + gamma V_{t+1} - V_t, with V after the last token = 0
    d = [1.0 + 0.9 * 1.0 - 0.5, 0.0 + 0.9 * -1.0 - 1.0, 2.0 - (-1.0)]
    expected = [d[0] + 0.72 * d[1] + 0.72**2 * d[2], d[1] + 0.72 * d[2], d[2]]
    torch.testing.assert_close(ppo.gae(rewards, values, gamma, lam), torch.tensor([expected]))

    torch.manual_seed(1)
    rewards, values = torch.randn(3, 6), torch.randn(3, 6)
    next_values = torch.cat([values[:, 1:], torch.zeros(3, 1)], 1)
    deltas = rewards + gamma * next_values - values
    closed = torch.stack([sum((gamma * lam) ** (k - t) * deltas[:, k] for k in range(t, 6)) for t in range(6)], 1)
    torch.testing.assert_close(ppo.gae(rewards, values, gamma, lam), closed)
    # gamma = lam = 1: the advantage is the return-to-go minus the value
    torch.testing.assert_close(ppo.gae(rewards, values, 1.0, 1.0), rewards.flip(1).cumsum(1).flip(1) - values)


def _trl_rollout_arithmetic(logprobs, ref_logprobs, scores, values, response, cfg):
    """trl 1.12.0 PPOTrainer.train, steps "Response Processing 3." to "6. compute advantages and returns",
    transcribed (kl_estimator k1, whiten_rewards off)."""
    sequence_lengths = trl_ppo.first_true_indices(response == PAD) - 1
    contain_eos_token = torch.any(response == EOS, dim=-1)
    scores = scores.clone()
    scores[~contain_eos_token] -= cfg.missing_eos_penalty
    response_idxs = torch.arange(response.shape[1]).repeat(response.shape[0], 1)
    padding_mask = response_idxs > sequence_lengths.unsqueeze(1)
    logprobs = torch.masked_fill(logprobs, padding_mask, trl_ppo.INVALID_LOGPROB)
    ref_logprobs = torch.masked_fill(ref_logprobs, padding_mask, trl_ppo.INVALID_LOGPROB)
    sequence_lengths_p1 = sequence_lengths + 1
    padding_mask_p1 = response_idxs > (sequence_lengths_p1.unsqueeze(1))
    values = torch.masked_fill(values, padding_mask_p1, 0)
    kl = logprobs - ref_logprobs
    rewards = -cfg.kl_coef * kl
    actual_end = torch.where(sequence_lengths_p1 < rewards.size(1), sequence_lengths_p1, sequence_lengths)
    rewards[torch.arange(rewards.size(0)), actual_end] += scores
    lastgaelam, advantages_reversed, gen_length = 0, [], response.shape[1]
    for t in reversed(range(gen_length)):
        nextvalues = values[:, t + 1] if t < gen_length - 1 else 0.0
        delta = rewards[:, t] + cfg.gamma * nextvalues - values[:, t]
        lastgaelam = delta + cfg.gamma * cfg.lam * lastgaelam
        advantages_reversed.append(lastgaelam)
    advantages = torch.stack(advantages_reversed[::-1], axis=1)
    returns = advantages + values
    advantages = torch.masked_fill(trl_ppo.masked_whiten(advantages, ~padding_mask), padding_mask, 0)
    return rewards, advantages, returns


def test_rollout_arithmetic_matches_trl_where_the_score_positions_coincide():
    """Responses that fill the whole width (no padding after them): TRL too puts the score on the last
    token. Rewards and returns are then TRL's exactly, advantages up to TRL's Bessel factor."""
    torch.manual_seed(2)
    cfg = _cfg(lam=0.9)
    response = torch.tensor([[5, 6, 7, 8, EOS], [5, 6, 7, 8, 9], [9, 9, 9, 9, 9], [4, 4, 4, 4, EOS]])
    logprobs, ref, values, scores = -torch.rand(4, 5), -torch.rand(4, 5), torch.randn(4, 5), torch.randn(4)
    mask = response_mask(response, EOS)
    has_eos = (response == EOS).any(1)
    rewards, _ = ppo.token_rewards(logprobs, ref, ppo.sequence_scores(scores, has_eos, cfg), mask, cfg.kl_coef)
    advantages, returns = ppo.advantages_and_returns(rewards, values * mask, mask, cfg.gamma, cfg.lam)
    trl_rewards, trl_advantages, trl_returns = _trl_rollout_arithmetic(logprobs, ref, scores, values, response, cfg)
    torch.testing.assert_close(rewards, trl_rewards)
    torch.testing.assert_close(returns, trl_returns)
    n = mask.sum()
    torch.testing.assert_close(advantages * torch.sqrt((n - 1) / n), trl_advantages, rtol=1e-5, atol=1e-6)


def test_score_one_token_earlier_than_trl_after_an_early_eos():
    """After an EOS with padding behind it, TRL adds the score one position past the EOS (a padded
    position whose value it keeps); ours adds it on the EOS itself, the reward model's scored token."""
    cfg = _cfg()
    response = torch.tensor([[5, EOS, PAD, PAD]])
    zeros = torch.zeros(1, 4)
    rewards, _ = ppo.token_rewards(zeros, zeros, torch.tensor([1.5]), response_mask(response, EOS), cfg.kl_coef)
    trl_rewards, _, _ = _trl_rollout_arithmetic(zeros, zeros, torch.tensor([1.5]), zeros, response, cfg)
    assert rewards.tolist() == [[0, 1.5, 0, 0]] and trl_rewards.tolist() == [[0, 0, 1.5, 0]]


# ------------------------------------------------------------------ update losses
def _trl_losses(new_logprobs, old_logprobs, advantages, vpred, old_values, returns, padding_mask, cfg):
    """trl 1.12.0 PPOTrainer.train's loss lines, transcribed (value loss masked like the policy loss)."""
    new_logprobs = torch.masked_fill(new_logprobs, padding_mask, trl_ppo.INVALID_LOGPROB)
    old_logprobs = torch.masked_fill(old_logprobs, padding_mask, trl_ppo.INVALID_LOGPROB)
    vpredclipped = torch.clamp(vpred, old_values - cfg.cliprange_value, old_values + cfg.cliprange_value)
    vf_loss = 0.5 * trl_ppo.masked_mean(torch.max(torch.square(vpred - returns), torch.square(vpredclipped - returns)),
                                        ~padding_mask)
    ratio = torch.exp(new_logprobs - old_logprobs)
    pg_losses, pg_losses2 = (-advantages * ratio,
                             -advantages * torch.clamp(ratio, 1.0 - cfg.cliprange, 1.0 + cfg.cliprange))
    pg_loss = trl_ppo.masked_mean(torch.max(pg_losses, pg_losses2), ~padding_mask)
    clipfrac = trl_ppo.masked_mean((pg_losses2 > pg_losses).float(), ~padding_mask)
    return pg_loss, clipfrac, vf_loss


def test_clipped_losses_agree_with_trl():
    torch.manual_seed(3)
    cfg = _cfg()
    mask = torch.tensor([[1, 1, 1, 1, 0], [1, 1, 0, 0, 0], [1, 1, 1, 1, 1]]).float()
    old, adv = -torch.rand(3, 5) * 3, torch.randn(3, 5)
    new = old + torch.randn(3, 5) * 0.5  # ratios well outside [0.8, 1.2] for some tokens
    old_v, ret = torch.randn(3, 5), torch.randn(3, 5)
    vpred = old_v + torch.randn(3, 5) * 0.5
    pg, clipfrac = ppo.policy_loss(new, old, adv, mask, cfg.cliprange)
    vf = ppo.value_loss(vpred, old_v, ret, mask, cfg.cliprange_value)
    trl_pg, trl_clipfrac, trl_vf = _trl_losses(new, old, adv, vpred, old_v, ret, mask == 0, cfg)
    torch.testing.assert_close(pg, trl_pg)
    torch.testing.assert_close(clipfrac, trl_clipfrac)
    torch.testing.assert_close(vf, trl_vf)
    assert 0 < clipfrac < 1


def test_clipped_losses_by_hand():
    mask = torch.ones(1, 4)
    ratio = torch.tensor([[1.5, 0.5, 1.1, 0.5]])
    adv = torch.tensor([[1.0, -1.0, 2.0, 1.0]])
    # per token: max(-A r, -A clip(r, 0.8, 1.2)): -1.2 (clipped), 0.8 (clipped), -2.2, -0.5 (the unclipped, pessimistic)
    pg, clipfrac = ppo.policy_loss(torch.log(ratio), torch.zeros(1, 4), adv, mask, 0.2)
    assert pg.item() == pytest.approx((-1.2 + 0.8 - 2.2 - 0.5) / 4) and clipfrac.item() == 0.5
    # value: v moves 1.0 from the rollout's 0.0; clipped to 0.2. Returns 1.0: max(0, 0.64) ; returns 0.0: max(1, 0.04)
    vf = ppo.value_loss(torch.tensor([[1.0, 1.0]]), torch.zeros(1, 2), torch.tensor([[1.0, 0.0]]), torch.ones(1, 2),
                        0.2)
    assert vf.item() == pytest.approx(0.5 * (0.64 + 1.0) / 2)


@pytest.mark.parametrize("bad", [float("inf"), float("-inf"), 1e4, float("nan")])
def test_padded_log_probs_and_values_never_reach_the_loss(bad):
    """A padded position's log-prob (new or old) or value may be anything, an overflow included; the
    losses and their gradients stay finite and equal to those without it."""
    mask = torch.tensor([[1.0, 1.0, 0.0]])
    clean_new = torch.tensor([[-1.0, -2.0, -1.0]])
    adv, old = torch.tensor([[0.5, -0.5, 3.0]]), torch.tensor([[-1.2, -1.8, -1.0]])
    losses, grads = [], []
    for value in (None, bad):
        new = clean_new.clone()
        vpred = torch.tensor([[0.1, 0.2, 0.0]])
        old_padded = old.clone()
        if value is not None:
            new[0, 2] = value
            vpred[0, 2] = value
            old_padded[0, 2] = -value if value == value else value
        new.requires_grad_(True)
        vpred.requires_grad_(True)
        pg, _ = ppo.policy_loss(new, old_padded, adv, mask, 0.2)
        vf = ppo.value_loss(vpred, torch.zeros(1, 3), torch.ones(1, 3), mask, 0.2)
        (pg + 0.1 * vf).backward()
        losses.append((pg.item(), vf.item()))
        grads.append((new.grad.clone(), vpred.grad.clone()))
    assert all(torch.isfinite(torch.tensor(loss)).all() for loss in losses) and losses[0] == losses[1]
    for clean, dirty in zip(*grads):
        assert torch.isfinite(dirty).all() and torch.equal(clean, dirty)


def test_approx_kl_and_explained_variance_are_cleanrls():
    """cleanrl's ppo.py: approx_kl = mean((ratio - 1) - log ratio), explained_var = 1 - Var(y - ŷ) / Var(y),
    here over real response tokens only."""
    torch.manual_seed(0)
    new, old, mask = torch.randn(4, 6), torch.randn(4, 6), torch.ones(4, 6)
    mask[1, 4:] = 0
    log_ratio = (new - old)[mask.bool()]
    expected = ((log_ratio.exp() - 1) - log_ratio).mean()
    assert ppo.approx_kl(new, old, mask).item() == pytest.approx(expected.item(), rel=1e-5)
    values, returns = torch.randn(4, 6), torch.randn(4, 6)
    y, y_hat = returns[mask.bool()].numpy(), values[mask.bool()].numpy()
    assert ppo.explained_variance(values, returns, mask) == pytest.approx(1 - np.var(y - y_hat) / np.var(y), rel=1e-5)


def test_the_prompt_centred_score_is_the_gain_over_sfts_importance_weighted_score():
    """Per prompt (groups of k): mean score minus Σ w·score / Σ w with w = exp(−KL of the sequence).
    A policy equal to SFT (KL 0) gains nothing; one sample per prompt gives no estimate."""
    scores = torch.tensor([1.0, 3.0, 0.0, 2.0])
    assert ppo.prompt_centred(scores, torch.zeros(4), k=2) == pytest.approx(0.0)
    kl = torch.tensor([0.0, math.log(3.0), 0.0, 0.0])  # the second reply is 3x likelier under the policy
    # prompt 1: mean 2, SFT's estimate (1·1 + 3·1/3) / (1 + 1/3) = 1.5; prompt 2: 0
    assert ppo.prompt_centred(scores, kl, k=2) == pytest.approx((2 - 1.5) / 2)
    assert math.isnan(ppo.prompt_centred(scores, kl, k=1))
