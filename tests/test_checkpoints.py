"""Checkpoints resume a killed run of the same stage, but never a run with other params or inputs
(the checkpoint folder is not a DVC output, so DVC does not clear it when a param changes)."""

from __future__ import annotations

from qlora_rlhf.config import load_config
from qlora_rlhf.paths import RunPaths
from qlora_rlhf.training import checkpoints_for


def _setup(write_params, tmp_path, **overrides):
    config = load_config(write_params(**overrides))
    paths = RunPaths.of(config)
    data = tmp_path / "split.jsonl"
    if not data.exists():
        data.write_text('{"prompt": "a"}\n')
    return config, paths, data


def test_same_params_and_inputs_keep_the_checkpoints(write_params, tmp_path):
    config, paths, data = _setup(write_params, tmp_path)
    root = checkpoints_for(paths, "ppo", config, [data])
    (root / "step-000002").mkdir()
    assert (checkpoints_for(paths, "ppo", config, [data]) / "step-000002").is_dir()


def test_changed_params_start_over(write_params, tmp_path, capsys):
    config, paths, data = _setup(write_params, tmp_path)
    (checkpoints_for(paths, "ppo", config, [data]) / "step-000002").mkdir()
    changed, paths, _ = _setup(write_params, tmp_path, **{"ppo.learning_rate": 0.123})
    root = checkpoints_for(paths, "ppo", changed, [data])
    assert root.is_dir() and not (root / "step-000002").exists()
    assert "starting over" in capsys.readouterr().out


def test_changed_inputs_start_over(write_params, tmp_path):
    config, paths, data = _setup(write_params, tmp_path)
    (checkpoints_for(paths, "rm", config, [data]) / "checkpoint-4").mkdir()
    data.write_text('{"prompt": "b"}\n')
    assert not (checkpoints_for(paths, "rm", config, [data]) / "checkpoint-4").exists()


def test_checkpoints_without_a_fingerprint_are_not_trusted(write_params, tmp_path):
    config, paths, data = _setup(write_params, tmp_path)
    (paths.checkpoints("sft") / "checkpoint-4").mkdir(parents=True)
    assert not (checkpoints_for(paths, "sft", config, [data]) / "checkpoint-4").exists()


def test_a_longer_run_resumes(write_params, tmp_path):
    config, paths, data = _setup(write_params, tmp_path)
    (checkpoints_for(paths, "ppo", config, [data]) / "step-000002").mkdir()
    longer, paths, _ = _setup(write_params, tmp_path, **{"ppo.steps": config.ppo.steps + 5, "ppo.max_kl": 3.0})
    assert (checkpoints_for(paths, "ppo", longer, [data]) / "step-000002").is_dir()
