"""What the three training stages share: seeds, the DVCLive logger, resumable checkpoints and
the non-finite guard."""

from __future__ import annotations

import math


class TrainingError(RuntimeError):
    """Training cannot go on (non-finite loss, KL explosion, missing input); the message names the step."""


def check_finite(step: int, **values: float) -> None:
    bad = {k: v for k, v in values.items() if not math.isfinite(v)}
    if bad:
        names = ", ".join(f"{k}={v}" for k, v in bad.items())
        raise TrainingError(f"step {step}: non-finite {names}; stopped, the last good checkpoint is kept")
