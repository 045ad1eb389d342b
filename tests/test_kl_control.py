"""KL control: a fixed coefficient stays put; the adaptive one follows Ziegler et al. (2019) and TRL's
classic AdaptiveKLController (proportional error clipped to +-0.2, scaled by episodes / horizon),
aiming at the middle of the target band that the figures shade."""

from __future__ import annotations

import pytest

from qlora_rlhf.config import Config
from qlora_rlhf.stages.ppo import KLController

from conftest import smoke_params


def ppo_config(**overrides):
    return Config.model_validate(smoke_params("unused", "results", **{f"ppo.{k}": v for k, v in overrides.items()})).ppo


def trl_classic_update(value: float, current: float, target: float, n_steps: int, horizon: int) -> float:
    """trl<=0.11 AdaptiveKLController.update, written out."""
    proportional_error = min(max(current / target - 1, -0.2), 0.2)
    return value * (1 + proportional_error * n_steps / horizon)


def test_fixed_control_keeps_the_coefficient():
    kl = KLController(ppo_config(kl_control="fixed", kl_coef=0.05))
    for current in (0.0, 0.2, 5.0):
        kl.update(current, 16)
    assert kl.value == 0.05


@pytest.mark.parametrize("current", [0.0, 0.15, 0.2, 0.22, 0.9, 40.0])
def test_adaptive_control_matches_trls_classic_controller(current):
    cfg = ppo_config(kl_control="adaptive", kl_coef=0.05, kl_target_low=0.1, kl_target_high=0.3, kl_horizon=32)
    kl = KLController(cfg)
    assert kl.target == pytest.approx(0.2)
    kl.update(current, 16)
    assert kl.value == pytest.approx(trl_classic_update(0.05, current, 0.2, 16, 32))


def test_adaptive_control_moves_towards_the_band_and_at_most_by_the_clip():
    cfg = ppo_config(kl_control="adaptive", kl_coef=0.1, kl_horizon=16)
    above, below = KLController(cfg), KLController(cfg)
    above.update(3.0, 16)  # far above: +20 % at most per horizon's worth of episodes
    below.update(0.0, 16)
    assert above.value == pytest.approx(0.12) and below.value == pytest.approx(0.08)
    assert KLController(cfg, value=0.3).value == 0.3  # a resumed run starts from its checkpoint's value


def test_the_target_band_must_be_a_range():
    with pytest.raises(ValueError, match="kl_target_low=0.4 must be smaller than ppo.kl_target_high=0.3"):
        ppo_config(kl_target_low=0.4)
