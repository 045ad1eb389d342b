"""studies/: an unfinished run is a clear error; every kind of reply rm_harmful_probe scores against the
refusal is a wrong one; reward_vs_length tells a gain that is only longer replies from one at equal length."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from qlora_rlhf import synthetic
from qlora_rlhf.hh import ASSISTANT, HUMAN

from conftest import REPO

sys.path.insert(0, str(REPO / "studies"))  # the scripts import their _study, as when run from there


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, REPO / "studies" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


rm_harmful_probe = _load("rm_harmful_probe")


@pytest.fixture
def params(tmp_path) -> Path:
    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    raw["run"]["results_dir"] = str(tmp_path / "results")
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def test_the_probe_needs_a_finished_reward_model_and_compares_every_kind_with_the_refusal(params, capsys):
    assert rm_harmful_probe.main(["--params", str(params)]) == 1
    assert "no reward model" in capsys.readouterr().err
    kinds = rm_harmful_probe.replies()
    assert "refusal" in kinds and sum(k.startswith("dodge") for k in kinds) == len(synthetic.HELP_TOPICS)
    assert all(synthetic.gold_score(f"{HUMAN} {synthetic.HARMFUL[0]}{ASSISTANT}", text) == 0.0
               for kind, text in kinds.items() if kind != "refusal")  # every other kind is a wrong reply


reward_vs_length = _load("reward_vs_length")


def _generations(ppo_reward) -> pd.DataFrame:
    """Held-out replies of SFT and PPO to the same prompts: PPO's replies are 8 tokens longer, and a reply's
    score is 0.1 per token plus what `ppo_reward` adds for PPO."""
    rng = np.random.default_rng(0)
    rows = []
    for i, sft_length in enumerate(rng.integers(5, 30, 64)):
        for policy, length, bonus in (("sft", sft_length, 0.0), ("ppo", sft_length + 8, ppo_reward)):
            rows.append({"policy": policy, "prompt": f"p{i}", "response_length": int(length), "ends_with_eos": True,
                         "reward": 0.1 * length + bonus + rng.normal(0, 0.01)})
    return pd.DataFrame(rows)


@pytest.mark.parametrize("ppo_reward", [0.0, 1.0])
def test_reward_vs_length_separates_a_length_gain_from_a_gain_at_equal_length(ppo_reward):
    result = reward_vs_length.one_seed(_generations(ppo_reward), seed=0)
    assert result["gain"] == pytest.approx(0.8 + ppo_reward, abs=0.01)  # 8 tokens more, at 0.1 each
    assert result["gain_at_equal_length"] == pytest.approx(ppo_reward, abs=0.02)
    low, high = result["gain_at_equal_length_ci"]
    assert low <= result["gain_at_equal_length"] <= high
    assert result["reward_per_token"] == pytest.approx(0.1, abs=0.002)
    assert result["policies"]["ppo"]["length_mean"] - result["policies"]["sft"]["length_mean"] == pytest.approx(8)


def test_reward_vs_length_needs_a_finished_evaluation(params, capsys):
    assert reward_vs_length.main(["--params", str(params)]) == 1
    assert "no evaluation found" in capsys.readouterr().err
