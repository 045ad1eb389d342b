"""PPO's per-prompt baseline: k samples of each prompt in a row, scores centered on the others' mean."""

from __future__ import annotations

import pytest
import torch

from qlora_rlhf.config import PPOConfig
from qlora_rlhf.stages import ppo


def _cfg(**overrides) -> PPOConfig:
    base = dict(steps=2, batch_size=8, samples_per_prompt=4, mini_batch_size=4, ppo_epochs=1, learning_rate=1e-4,
                kl_coef=0.05, kl_control="fixed", kl_target_low=0.1, kl_target_high=0.3, kl_horizon=32, cliprange=0.2,
                cliprange_value=0.2, vf_coef=0.1, gamma=1.0, lam=1.0, max_new_tokens=4, temperature=0.7,
                missing_eos_penalty=1.0, max_kl=20.0, save_steps=1, eval_every=1, eval_prompts=4, eval_batch_size=4)
    return PPOConfig(**(base | overrides))


def test_leave_one_out_centers_each_prompt_on_its_other_samples():
    scores = torch.tensor([1.0, 2.0, 3.0, 6.0, 10.0, 10.0, 10.0, 10.0])
    centered = ppo.leave_one_out(scores, 4)
    assert torch.allclose(centered[:4], torch.tensor([1 - 11 / 3, 2 - 10 / 3, 3 - 9 / 3, 6 - 6 / 3]))
    assert torch.equal(centered[4:], torch.zeros(4))  # an easy prompt gives no signal, however high its score
    assert torch.allclose(centered.view(2, 4).sum(1), torch.zeros(2))
    assert torch.equal(ppo.leave_one_out(scores, 1), scores)  # k = 1: TRL's PPO, the value head is the baseline


def test_rollout_prompts_repeat_each_prompt_k_times_in_a_row_and_are_deterministic():
    prompts = [f"p{i}" for i in range(10)]
    cfg = _cfg()
    batch = ppo.rollout_prompts(prompts, step=3, cfg=cfg, seed=1)
    assert len(batch) == cfg.batch_size and batch == ppo.rollout_prompts(prompts, step=3, cfg=cfg, seed=1)
    groups = [batch[i : i + 4] for i in range(0, 8, 4)]
    assert all(len(set(g)) == 1 for g in groups) and groups[0][0] != groups[1][0]
    assert ppo.rollout_prompts(prompts, 3, _cfg(samples_per_prompt=1), 1) == ppo.batch_prompts(prompts, 3, 8, 1)


def test_batch_size_must_be_a_multiple_of_samples_per_prompt():
    with pytest.raises(ValueError, match="must be a multiple of ppo.samples_per_prompt=3"):
        _cfg(samples_per_prompt=3)
