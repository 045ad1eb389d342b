"""`make metrics` (scripts/metrics.py): the run's metrics in 120 columns, with no error before the seed study."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import yaml

from conftest import REPO, smoke_params


def metrics_output(root) -> str:
    done = subprocess.run([sys.executable, str(REPO / "scripts" / "metrics.py")], cwd=root, capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0 and not done.stderr, done.stderr
    return done.stdout


def test_metrics_table_before_and_after_the_seed_study(tmp_path):
    shutil.copy(REPO / "dvc.yaml", tmp_path / "dvc.yaml")
    params = smoke_params("unused-model", "results")
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    metrics = tmp_path / "results" / params["run"]["name"] / "metrics"
    metrics.mkdir(parents=True)
    keys = {"sft": ["perplexity_base", "perplexity_sft", "train_loss_first", "train_loss_last", "seconds"],
            "rm": ["accuracy", "margin_mean", "train_loss_first", "train_loss_last", "seconds"],
            "ppo": ["reward_mean_first", "reward_mean_last", "kl_last", "kl_coef_last", "steps", "seconds"],
            "eval": [f"{policy}_{measure}" for policy in ("base", "sft", "ppo")
                     for measure in ("gold_mean", "reward_mean", "kl_to_sft", "perplexity", "response_length")],
            "best_of_n": ["n_max", "gold_mean_at_n_max"]}
    for stage, names in keys.items():
        (metrics / f"{stage}.json").write_text(json.dumps({name: 12345.678901 for name in names}
                                                          | {"compute_dtype": "bfloat16"}))
    before = metrics_output(tmp_path)
    assert "failed" not in before.lower() and "not yet made: seeds.json (make seeds)" in before
    header = before.splitlines()[1].split()
    assert header == ["metric", "sft", "rm", "ppo", "eval", "best_of_n"]
    assert "1.235e+04" in before and all(name in before for names in keys.values() for name in names)

    (metrics / "seeds.json").write_text(json.dumps({"gold_gain_mean": 0.03, "gold_gain_ci_low": -0.021,
                                                     "seeds_gold_above_zero": 1, "seeds": 5}))
    after = metrics_output(tmp_path)
    assert "not yet made" not in after and after.splitlines()[1].split()[-1] == "seeds"
    assert max(len(line) for line in before.splitlines() + after.splitlines()) <= 120
