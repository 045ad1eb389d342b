"""Intervals the evaluation and the seed study report."""

from __future__ import annotations

import numpy as np


def bootstrap_ci(values: np.ndarray, samples: int, seed: int) -> tuple[float, float]:
    """95 % percentile bootstrap interval of the mean of `values` (resampled `samples` times)."""
    rng = np.random.default_rng(seed)
    means = rng.choice(values, size=(samples, len(values)), replace=True).mean(1)
    return float(np.quantile(means, 0.025)), float(np.quantile(means, 0.975))
