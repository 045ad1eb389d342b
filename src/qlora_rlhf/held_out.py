"""Held-out prompts sampled from a policy and scored: the evaluation stage's rows and the points of
PPO's held-out curve are made by these same functions.

- `generate`: one reply per prompt from the base, SFT or PPO policy, every policy from the same seed
  (the same sampling noise), with the evaluation's settings (eval.*) or PPO's (ppo.temperature,
  ppo.max_new_tokens, ppo.eval_batch_size: the curve reads no eval params, so editing them keeps
  PPO's checkpoints);
- `score`: a row per reply with its reward-model score, gold score (synthetic prompts) and KL to SFT;
- `summary`: the rows' means with 95 % bootstrap intervals over prompts."""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from .actor import Samples, SharedBaseRoles
from .config import EvalConfig, PPOConfig
from .stats import bootstrap_ci
from .synthetic import gold_score


@dataclass(frozen=True)
class Sampling:
    """How held-out replies are drawn."""

    batch_size: int
    max_new_tokens: int
    temperature: float
    seed: int

    @classmethod
    def of_eval(cls, cfg: EvalConfig, seed: int) -> Sampling:
        return cls(cfg.batch_size, cfg.max_new_tokens, cfg.temperature, seed)

    @classmethod
    def of_ppo(cls, cfg: PPOConfig, seed: int) -> Sampling:
        return cls(cfg.eval_batch_size, cfg.max_new_tokens, cfg.temperature, seed)


@torch.no_grad()
def generate(policy: str, roles: SharedBaseRoles, base, prompts: list[str], sampling: Sampling,
             desc: str | None = None) -> list[tuple[list[str], Samples]]:
    """One response per prompt from `policy`, in batches, drawn through model.generation's engine: the
    base model (`base`); SFT, the shared base with its adapters off (the reference role); or PPO, with
    the policy adapter. Each policy starts from the same seed: the same sampling noise."""
    model = base if policy == "base" else roles.model
    role = roles.reference if policy == "sft" else nullcontext
    torch.manual_seed(sampling.seed)
    batches = []
    for start in tqdm(range(0, len(prompts), sampling.batch_size), desc=desc or f"evaluate {policy}", unit="batch",
                      leave=desc is None):
        batch = prompts[start : start + sampling.batch_size]
        with role():
            drawn = roles.sample(batch, sampling.max_new_tokens, sampling.temperature, logprobs=True, model=model)
        batches.append((batch, drawn))
    return batches


@torch.no_grad()
def score(policy: str, roles: SharedBaseRoles, batches: list[tuple[list[str], Samples]],
          temperature: float) -> list[dict]:
    """A row per response: its reward-model score, its gold score (synthetic prompts; None on real ones),
    and its KL to SFT, from the sampled tokens' log-probs under the distribution that drew them and
    under SFT (the reference role; 0 by definition for SFT itself)."""
    tok, rows = roles.tokenizer, []
    for prompts, sample in batches:
        kl = torch.zeros(len(prompts))
        if policy != "sft":
            with roles.reference():
                sft = roles.score_response(sample.ids, sample.mask, sample.prompt_len, temperature).logprobs
            kl = (sample.logprobs * sample.response_mask).sum(1) - (sft * sample.response_mask).sum(1)
        rewards = roles.reward(sample.ids, sample.mask)
        for i, prompt in enumerate(prompts):
            text = tok.decode(sample.response[i][sample.response_mask[i].bool()], skip_special_tokens=True)
            rows.append({"policy": policy, "prompt": prompt, "response": text, "reward": rewards[i].item(),
                         "gold": gold_score(prompt, text), "kl_to_sft": kl[i].item(),
                         "response_length": int(sample.response_mask[i].sum()),
                         "ends_with_eos": bool(sample.has_eos[i])})
    return pd.DataFrame(rows).to_dict("records")  # as a table column: a missing gold score is NaN, not None


def summary(rows: pd.DataFrame, has_gold: bool, samples: int, seed: int) -> dict[str, float]:
    """One policy's mean reward (and gold) score with 95 % bootstrap intervals over prompts, its mean KL to
    SFT (with an interval too), reply length and the share of replies that end with EOS."""

    def with_interval(name: str, mean_key: str, values: np.ndarray) -> dict[str, float]:
        low, high = bootstrap_ci(values, samples, seed)
        return {mean_key: values.mean(), f"{name}_ci_low": low, f"{name}_ci_high": high}

    out = with_interval("reward", "reward_mean", rows["reward"].to_numpy(dtype=float))
    if has_gold:
        out |= with_interval("gold", "gold_mean", rows["gold"].dropna().to_numpy(dtype=float))
    out |= with_interval("kl", "kl_to_sft", rows["kl_to_sft"].to_numpy(dtype=float))
    return out | {"response_length": rows["response_length"].mean(),
                  "eos_fraction": rows["ends_with_eos"].astype(float).mean()}
