"""Faults: a kill -9 during SFT, RM or PPO, then the same command again, resumes from the last
checkpoint and finishes with complete outputs; a half-written output never looks finished."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import yaml

from conftest import smoke_params
from qlora_rlhf.atomic import append_jsonl, read_jsonl

LONG = {"sft": {"sft.max_steps": 30, "sft.save_steps": 2}, "rm": {"rm.max_steps": 30, "rm.save_steps": 2},
        "ppo": {"ppo.steps": 6, "ppo.save_steps": 1}}
# a complete checkpoint: Trainer writes trainer_state.json last, PPO its state.json inside an atomic rename
FIRST_CHECKPOINT = {"sft": ("checkpoint-2/trainer_state.json", 2), "rm": ("checkpoint-2/trainer_state.json", 2),
                    "ppo": ("step-000001/state.json", 1)}
NEEDS = {"sft": ("data", "base"), "rm": ("data", "base", "sft"), "ppo": ("data", "base", "sft", "rm")}


def _cli(params: Path, verb: str) -> list[str]:
    return [sys.executable, "-m", "qlora_rlhf", verb, "--params", str(params)]


def _copy_inputs(pipeline_paths, run: Path, stage: str) -> None:
    """The stage's inputs (data, base, upstream stages) from the finished tiny pipeline into `run`."""
    for needed in NEEDS[stage]:
        shutil.copytree(pipeline_paths.root / needed, run / needed)


def _stage_inputs(pipeline, tmp_path: Path, tiny_model_dir: Path, stage: str, overrides: dict) -> tuple[Path, Path]:
    """(run folder, params file) for running `stage` alone as a subprocess: the pipeline's inputs copied in."""
    _, paths, _ = pipeline
    run = tmp_path / "results" / "smoke"
    _copy_inputs(paths, run, stage)
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump(smoke_params(tiny_model_dir, tmp_path / "results", **overrides)))
    return run, params


def _history_steps(run: Path, stage: str) -> list[int]:
    return [row["step"] for row in read_jsonl(run / "checkpoints" / stage / "history.jsonl")]


@pytest.mark.slow
@pytest.mark.parametrize("stage", ["sft", "rm", "ppo"])
def test_kill_minus_nine_then_rerun_resumes_and_completes(stage, pipeline, tmp_path, tiny_model_dir):
    run, params = _stage_inputs(pipeline, tmp_path, tiny_model_dir, stage, LONG[stage])

    proc = subprocess.Popen(_cli(params, stage), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    checkpoint, checkpoint_step = FIRST_CHECKPOINT[stage]
    marker = run / "checkpoints" / stage / checkpoint
    deadline = time.time() + 300
    while not marker.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.2)
    assert marker.exists(), "no checkpoint appeared before the deadline"
    os.killpg(proc.pid, signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL, "the stage finished before it could be killed"
    assert not (run / stage).exists(), "a killed stage must not leave an output that looks finished"
    steps_before_kill = _history_steps(run, stage)

    done = subprocess.run(_cli(params, stage), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    resumed_steps = _history_steps(run, stage)[len(steps_before_kill):]
    assert resumed_steps and resumed_steps[0] > checkpoint_step, f"restarted from scratch: {resumed_steps[:5]}"
    metrics = json.loads((run / "metrics" / f"{stage}.json").read_text())
    assert metrics["steps"] == next(iter(LONG[stage].values()))
    # the training time runs on across the resume: the steps before the resumed checkpoint are counted
    totals = {row["step"]: row["seconds"] for row in read_jsonl(run / "checkpoints" / stage / "seconds.jsonl")}
    running = [totals[step] for step in range(1, metrics["steps"] + 1)]
    seconds = json.loads((run / "timings" / f"{stage}.json").read_text())["seconds"]  # never in a DVC output
    assert running == sorted(running) and seconds >= running[-1] - 0.1 and "seconds" not in metrics
    assert (run / stage / "adapter" / "adapter_model.safetensors").is_file()


@pytest.mark.parametrize("stage", ["sft", "rm"])
def test_a_resumed_bf16_run_ends_with_the_uninterrupted_runs_adapter(stage, pipeline, tmp_path, tiny_model_dir):
    """Trainer resumes by loading the checkpoint's adapter through peft, which cast bf16 LoRA weights
    up to float32: the resumed run trained on in float32 and ended with another model (the embedded
    default's SFT perplexity 1.840 after a resume at step 20, 1.845 without)."""
    import torch
    from safetensors.torch import load_file

    from qlora_rlhf.stages import rm, sft
    from qlora_rlhf.config import Config
    from qlora_rlhf.paths import RunPaths

    _, paths, _ = pipeline
    config = Config.model_validate(smoke_params(tiny_model_dir, tmp_path / "results", **{"model.compute_dtype": "bfloat16"}))
    run = RunPaths.of(config)
    _copy_inputs(paths, run.root, stage)
    module, adapter = {"sft": sft, "rm": rm}[stage], run.root / stage / "adapter" / "adapter_model.safetensors"
    module.run(config, run)  # 4 steps, checkpoints at 2 and 4
    uninterrupted = load_file(adapter)
    module.run(config, run)  # resumes from checkpoint-2: a finished run's last checkpoint is not resumed
    resumed = load_file(adapter)
    steps = [row["step"] for row in read_jsonl(run.checkpoints(stage) / "seconds.jsonl")]
    assert steps == [1, 2, 3, 4, 3, 4]
    assert {tensor.dtype for tensor in resumed.values()} == {torch.bfloat16}
    assert all(torch.equal(uninterrupted[name], resumed[name]) for name in uninterrupted)


def test_a_resumed_ppo_run_ends_with_the_uninterrupted_runs_policy(pipeline, tmp_path, tiny_model_dir):
    """Two PPO steps, then the same run lengthened to three (it resumes from step 2), against three
    steps straight: the same policy adapter and value head, bit for bit. Adaptive KL control with a short
    horizon, so that a resume that lost the coefficient would train step 3 with another penalty."""
    import torch
    from safetensors.torch import load_file

    from qlora_rlhf.stages import ppo
    from qlora_rlhf.config import Config
    from qlora_rlhf.paths import RunPaths

    _, paths, _ = pipeline
    adaptive = {"ppo.kl_control": "adaptive", "ppo.kl_horizon": 2}
    configs = {n: Config.model_validate(smoke_params(tiny_model_dir, tmp_path / "results", **{"ppo.steps": n}, **adaptive))
               for n in (2, 3)}
    run = RunPaths.of(configs[3])
    _copy_inputs(paths, run.root, "ppo")

    def outputs():
        return load_file(run.ppo / "adapter" / "adapter_model.safetensors") | torch.load(run.ppo / "value_head.pt")

    ppo.run(configs[3], run)
    straight, coefs = outputs(), pd.read_csv(run.metrics / "ppo_history.csv")["kl_coef"].tolist()
    card = (run.ppo / "adapter" / "README.md").read_text()
    assert coefs[0] == configs[3].ppo.kl_coef and len(set(coefs)) == 3  # steered after every step
    shutil.rmtree(run.checkpoints("ppo"))
    ppo.run(configs[2], run)
    ppo.run(configs[3], run)
    assert [row["step"] for row in read_jsonl(run.checkpoints("ppo") / "seconds.jsonl")] == [1, 2, 3]
    resumed = outputs()
    assert all(torch.equal(straight[name], resumed[name]) for name in straight)
    assert pd.read_csv(run.metrics / "ppo_history.csv")["kl_coef"].tolist() == coefs
    assert (run.ppo / "adapter" / "README.md").read_text() == card  # the model card too: the output's md5 holds


def test_a_half_written_trainer_checkpoint_is_not_resumed(tmp_path):
    from qlora_rlhf.training import trainer_checkpoint_to_resume

    for step, state in ((2, "{}"), (4, None), (6, '{"best_metric": nu')):  # 6: killed while Trainer wrote it
        folder = tmp_path / f"checkpoint-{step}"
        folder.mkdir()
        if state is not None:
            (folder / "trainer_state.json").write_text(state)
    assert trainer_checkpoint_to_resume(tmp_path, max_steps=10) == str(tmp_path / "checkpoint-2")
    assert trainer_checkpoint_to_resume(tmp_path / "missing", max_steps=10) is None


def test_a_finished_runs_final_checkpoint_is_not_resumed(tmp_path):
    """Resuming the checkpoint at max_steps made Trainer train step max_steps + 1: a re-run of a
    finished SFT or RM stage (after a code change) gave a different model (an RM of 49 steps, not 48)."""
    from qlora_rlhf.training import trainer_checkpoint_to_resume

    for step in (32, 48):
        (tmp_path / f"checkpoint-{step}").mkdir()
        (tmp_path / f"checkpoint-{step}" / "trainer_state.json").write_text("{}")
    assert trainer_checkpoint_to_resume(tmp_path, max_steps=48) == str(tmp_path / "checkpoint-32")
    assert trainer_checkpoint_to_resume(tmp_path, max_steps=64) == str(tmp_path / "checkpoint-48")
    assert trainer_checkpoint_to_resume(tmp_path, max_steps=32) is None


def test_a_log_line_cut_off_by_a_kill_spoils_only_itself(tmp_path):
    log = tmp_path / "history.jsonl"
    append_jsonl(log, {"step": 1, "loss": 2.0})
    with open(log, "a") as handle:
        handle.write('{"step": 2, "lo')  # killed mid-write
    append_jsonl(log, {"step": 2, "loss": 1.5})  # the resumed run logs the step again
    assert read_jsonl(log) == [{"step": 1, "loss": 2.0}, {"step": 2, "loss": 1.5}]
    assert read_jsonl(tmp_path / "missing.jsonl") == []


def test_a_dvclive_summary_cut_off_by_a_kill_is_rebuilt_from_the_history(tmp_path):
    """DVCLive rewrites its metrics.json in place; a kill mid-write once left JSON that its resume
    could not parse, and the re-run stage died (CI, the rm kill test). The history is the record."""
    from qlora_rlhf.paths import RunPaths
    from qlora_rlhf.training import History

    paths = RunPaths(tmp_path)
    first = History(paths, "rm")
    first.log(1, {"loss": 0.7})
    first.log(2, {"loss": 0.6, "accuracy": 0.5})
    summary = paths.dvclive("rm") / "metrics.json"
    summary.write_text('{"step": 2, "lo')  # killed mid-write

    resumed = History(paths, "rm")
    assert json.loads(summary.read_text()) == {"step": 2, "loss": 0.6, "accuracy": 0.5}
    resumed.log(3, {"loss": 0.5})
    assert json.loads(summary.read_text())["step"] == 3
    assert list(resumed.rows()["loss"]) == [0.7, 0.6, 0.5]
    tsv = (paths.dvclive("rm") / "plots" / "metrics" / "loss.tsv").read_text().splitlines()
    assert [line.split("\t")[0] for line in tsv] == ["step", "1", "2", "3"]


# SIGTERM after the first logged step; no regular checkpoint falls in the steps run before the rerun,
# so the one found is the one SIGTERM saved
PREEMPT = {"sft": {"sft.max_steps": 12, "sft.save_steps": 1000, "sft.logging_steps": 1},
           "ppo": {"ppo.steps": 6, "ppo.save_steps": 1000}}


@pytest.mark.parametrize("stage", ["sft", "ppo"])  # rm shares sft's Trainer path (training.train_resumably)
def test_sigterm_saves_a_checkpoint_exits_143_and_the_rerun_resumes_from_it(stage, pipeline, tmp_path, tiny_model_dir):
    run, params = _stage_inputs(pipeline, tmp_path, tiny_model_dir, stage, PREEMPT[stage])
    history = run / "checkpoints" / stage / "history.jsonl"

    proc = subprocess.Popen(_cli(params, stage), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while not read_jsonl(history) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.1)
    assert read_jsonl(history), "no step was logged before the deadline"
    os.kill(proc.pid, signal.SIGTERM)
    stderr = proc.communicate(timeout=300)[1]
    assert proc.returncode == 143, stderr[-3000:]
    reached = max(row["step"] for row in read_jsonl(run / "checkpoints" / stage / "seconds.jsonl"))
    total = next(iter(PREEMPT[stage].values()))
    assert 1 <= reached < total, "the stage finished before SIGTERM could stop it"
    if stage == "ppo":
        checkpoint = run / "checkpoints" / "ppo" / f"step-{reached:06d}"
        assert json.loads((checkpoint / "state.json").read_text())["step"] == reached
    else:
        checkpoint = run / "checkpoints" / stage / f"checkpoint-{reached}"
        assert json.loads((checkpoint / "trainer_state.json").read_text())["global_step"] == reached
    assert (checkpoint / "adapter_model.safetensors").is_file() or (checkpoint / "adapter" / "adapter_model.safetensors").is_file()
    last_line = stderr.strip().splitlines()[-1]
    assert last_line.startswith("preempted:") and str(checkpoint) in last_line and "resumes" in last_line, last_line
    assert not (run / stage).exists(), "a preempted stage must not write its outputs"

    seconds_rows = len(read_jsonl(run / "checkpoints" / stage / "seconds.jsonl"))
    done = subprocess.run(_cli(params, stage), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    resumed = [row["step"] for row in read_jsonl(run / "checkpoints" / stage / "seconds.jsonl")][seconds_rows:]
    assert resumed == list(range(reached + 1, total + 1)), f"did not resume from step {reached}: {resumed[:5]}"
    assert json.loads((run / "metrics" / f"{stage}.json").read_text())["steps"] == total
    assert (run / stage / "adapter" / "adapter_model.safetensors").is_file()
