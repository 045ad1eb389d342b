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


def test_training_time_counts_the_steps_before_the_resumed_checkpoint(tmp_path):
    from qlora_rlhf.atomic import append_jsonl
    from qlora_rlhf.training import Timer

    for step, seconds in ((1, 10.0), (2, 20.0), (3, 30.0), (2, 7.0)):  # steps 1-3, killed; a restart re-ran step 2
        append_jsonl(tmp_path / "seconds.jsonl", {"step": step, "seconds": seconds})
    assert Timer(tmp_path, 1).before == 10.0
    with Timer(tmp_path, 2) as timer:  # the latest record of step 2
        timer.step_done(3)
    assert 7.0 <= timer.seconds < 17.0
    assert 7.0 <= Timer(tmp_path, 3).before <= timer.seconds + 0.01  # the re-run step 3, not the killed one's 30
    assert Timer(tmp_path, 0).before == 0.0  # a fresh start drops the stale totals
    assert not (tmp_path / "seconds.jsonl").exists()
