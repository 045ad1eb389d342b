"""Checkpoints resume a killed run of the same stage, but never a run with other params or inputs
(the checkpoint folder is not a DVC output, so DVC does not clear it when a param changes)."""

from __future__ import annotations

import pytest
import yaml

from qlora_rlhf.config import load_config
from qlora_rlhf.paths import RunPaths
from qlora_rlhf.training import checkpoints_for, declared_params, fingerprint_params

from conftest import REPO


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


@pytest.mark.parametrize("edit, kept", [
    ({"eval.temperature": 0.3, "eval.num_prompts": 3}, True),   # ppo does not declare `eval`: DVC does not rerun it
    ({"seeds.ppo": [7, 8]}, True),
    ({"sft.learning_rate": 0.5}, True),   # reaches PPO only through the SFT adapter, one of its inputs
    ({"ppo.kl_coef": 0.5}, False),
    ({"model.lora.r": 4}, False),
    ({"run.seed": 99}, False),
])
def test_ppo_checkpoints_follow_the_params_dvc_yaml_declares_for_it(write_params, tmp_path, monkeypatch, edit, kept):
    monkeypatch.chdir(REPO)  # where DVC and Snakemake run the stages: dvc.yaml is read from there
    config, paths, data = _setup(write_params, tmp_path)
    (checkpoints_for(paths, "ppo", config, [data]) / "step-000002").mkdir()
    edited, paths, _ = _setup(write_params, tmp_path, **edit)
    assert (checkpoints_for(paths, "ppo", edited, [data]) / "step-000002").is_dir() == kept


def test_the_fingerprint_reads_the_stages_params_from_dvc_yaml(write_params, tmp_path, monkeypatch):
    """The keys come from dvc.yaml itself, so the fingerprint and DVC cannot disagree; a foreach
    stage's from its `do` body. Outside a project, every param counts (the safe side)."""
    stages = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    assert declared_params("ppo", REPO / "dvc.yaml") == stages["ppo"]["params"]
    assert declared_params("ppo_seed", REPO / "dvc.yaml") == stages["ppo"]["params"]
    config, paths, data = _setup(write_params, tmp_path)
    edited, _, _ = _setup(write_params, tmp_path, **{"eval.temperature": 0.3})
    project = tmp_path / "project"
    project.mkdir()
    monkeypatch.chdir(project)
    assert declared_params("ppo") is None
    assert fingerprint_params(config, "ppo") != fingerprint_params(edited, "ppo")
    (project / "dvc.yaml").write_text(yaml.safe_dump({"stages": {"ppo": {"cmd": "x",
                                                                         "params": ["ppo", "eval.temperature"]}}}))
    assert set(fingerprint_params(config, "ppo")) == {"ppo", "eval", "model"}  # + the resolved compute dtype
    assert fingerprint_params(config, "ppo")["eval"] == {"temperature": config.eval.temperature}
    (checkpoints_for(paths, "ppo", config, [data]) / "step-000002").mkdir()
    assert not (checkpoints_for(paths, "ppo", edited, [data]) / "step-000002").exists()


def test_the_fingerprint_keeps_the_resolved_dtype_and_drops_the_run_length(write_params, tmp_path, monkeypatch):
    monkeypatch.chdir(REPO)
    from qlora_rlhf import precision

    config, _, _ = _setup(write_params, tmp_path)
    params = fingerprint_params(config, "ppo")
    assert params["model"]["compute_dtype"] == precision.of(config).dtype != "auto"
    assert not {"steps", "save_steps", "max_kl"} & set(params["ppo"])


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
