"""What the evaluation and the reports built on it (figures, paper, seed study) share: the policies
compared, in the order every table and figure shows them, how one policy beats another prompt by
prompt, and bootstrap intervals."""

from __future__ import annotations

import numpy as np

POLICIES = ("base", "sft", "ppo")  # the evaluation's `policy` column, in evaluation order
POLICY_LABELS = {"base": "Base", "sft": "SFT", "ppo": "PPO"}


def wins(ours: np.ndarray, theirs: np.ndarray) -> np.ndarray:
    """Per prompt: 1 where `ours` scores higher than `theirs`, 0.5 on a tie, 0 where lower."""
    ours, theirs = np.asarray(ours, dtype=float), np.asarray(theirs, dtype=float)
    return np.where(ours > theirs, 1.0, np.where(ours == theirs, 0.5, 0.0))


def win_rate(ours: np.ndarray, theirs: np.ndarray) -> float:
    """The share of prompts on which `ours` wins, a tie counting half (`wins`)."""
    return float(wins(ours, theirs).mean())


def bootstrap_ci(values: np.ndarray, samples: int, seed: int) -> tuple[float, float]:
    """95 % percentile bootstrap interval of the mean of `values` (resampled `samples` times)."""
    rng = np.random.default_rng(seed)
    means = rng.choice(values, size=(samples, len(values)), replace=True).mean(1)
    return float(np.quantile(means, 0.025)), float(np.quantile(means, 0.975))
