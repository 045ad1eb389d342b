"""Faults: a kill -9 during SFT, RM or PPO, then the same command again, resumes from the last
checkpoint and finishes with complete outputs; a half-written output never looks finished."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import yaml

from qlora_rlhf.atomic import append_jsonl, read_jsonl

from conftest import smoke_params

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
    if stage == "ppo":  # the held-out curve (every 2 steps) keeps the points logged before the kill
        history = pd.read_csv(run / "metrics" / "ppo_history.csv")
        assert history.dropna(subset=["held_out_reward_mean"])["step"].tolist() == [0, 2, 4, 6]


@pytest.mark.parametrize("stage", ["sft", "rm"])
def test_a_resumed_bf16_run_ends_with_the_uninterrupted_runs_adapter(stage, pipeline, tmp_path, tiny_model_dir):
    """Trainer resumes by loading the checkpoint's adapter through peft, which cast bf16 LoRA weights
    up to float32: the resumed run trained on in float32 and ended with another model (the embedded
    default's SFT perplexity 1.840 after a resume at step 20, 1.845 without)."""
    import torch
    from safetensors.torch import load_file

    from qlora_rlhf.config import Config
    from qlora_rlhf.paths import RunPaths
    from qlora_rlhf.stages import rm, sft

    _, paths, _ = pipeline
    config = Config.model_validate(smoke_params(tiny_model_dir, tmp_path / "results",
                                                **{"model.compute_dtype": "bfloat16"}))
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

    from qlora_rlhf.config import Config
    from qlora_rlhf.paths import RunPaths
    from qlora_rlhf.stages import ppo

    _, paths, _ = pipeline
    adaptive = {"ppo.kl_control": "adaptive", "ppo.kl_horizon": 2}
    configs = {n: Config.model_validate(smoke_params(tiny_model_dir, tmp_path / "results", **{"ppo.steps": n},
                                                     **adaptive))
               for n in (2, 3)}
    run = RunPaths.of(configs[3])
    _copy_inputs(paths, run.root, "ppo")

    def outputs():
        return load_file(run.ppo / "adapter" / "adapter_model.safetensors") | torch.load(run.ppo / "value_head.pt")

    ppo.run(configs[3], run)
    history = pd.read_csv(run.metrics / "ppo_history.csv")
    straight, coefs = outputs(), history["kl_coef"].dropna().tolist()  # step 0: the held-out curve's only
    card = (run.ppo / "adapter" / "README.md").read_text()
    assert coefs[0] == configs[3].ppo.kl_coef and len(set(coefs)) == 3  # steered after every step
    shutil.rmtree(run.checkpoints("ppo"))
    ppo.run(configs[2], run)
    ppo.run(configs[3], run)
    assert [row["step"] for row in read_jsonl(run.checkpoints("ppo") / "seconds.jsonl")] == [1, 2, 3]
    resumed = outputs()
    assert all(torch.equal(straight[name], resumed[name]) for name in straight)
    pd.testing.assert_frame_equal(pd.read_csv(run.metrics / "ppo_history.csv"), history)  # held-out curve included
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
    assert ((checkpoint / "adapter_model.safetensors").is_file()
            or (checkpoint / "adapter" / "adapter_model.safetensors").is_file())
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


# ------------------------------------------------------------------ issue 35: two writers, damaged
# checkpoints, failed writes, paths from another folder, validate's checks

def test_a_second_writer_is_refused_at_once_naming_the_holder(pipeline, tmp_path, tiny_model_dir):
    """A real stage (SFT) holds its run's folder; the same stage started again (another front door, or
    a second user) exits 1 at once with one line naming the holder's PID and command, and writes
    nothing: the first run's history stays in step order (issue 35 saw steps 12, 20, 14, 22, ...).
    A seed's stages lock only the seed's folder, so they may run beside the run's stages."""
    from qlora_rlhf import lock

    run, params = _stage_inputs(pipeline, tmp_path, tiny_model_dir, "sft",
                                {"sft.max_steps": 40, "sft.save_steps": 4, "sft.logging_steps": 1})
    history = run / "checkpoints" / "sft" / "history.jsonl"
    first = subprocess.Popen(_cli(params, "sft"), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 300
        while not read_jsonl(history) and first.poll() is None and time.time() < deadline:
            time.sleep(0.1)
        assert read_jsonl(history), "the first writer logged no step"
        started = time.monotonic()
        second = subprocess.run(_cli(params, "sft"), capture_output=True, text=True, timeout=120)
        assert second.returncode == 1, second.stderr[-2000:]
        err = second.stderr.strip().splitlines()
        assert len(err) == 1 and err[0].startswith(f"error: {run} is being written by PID {first.pid} ("), err
        assert "qlora_rlhf sft --params" in err[0] and "one writer per results folder" in err[0]
        assert time.monotonic() - started < 60  # before any model is loaded (imports only)
        with lock.exclusive(run / "seeds" / "1"):  # a seed's folder is free while the run's is held
            pass
        assert first.poll() is None, "the first writer stopped"
    finally:
        first.kill() if first.poll() is None else None
        first.wait()
    steps = _history_steps(run, "sft")
    assert steps == sorted(steps) and len(steps) == len(set(steps)), steps  # one writer: nothing interleaved


def test_the_lock_is_released_when_its_holder_is_killed(tmp_path):
    """flock: the kernel drops it with the process (kill -9 included), so no stale lock is left to clear."""
    from qlora_rlhf import lock

    code = ("import sys, time; from qlora_rlhf import lock; held = lock.exclusive(sys.argv[1]); held.__enter__(); "
            "print('held', flush=True); time.sleep(60)")
    holder = subprocess.Popen([sys.executable, "-c", code, str(tmp_path)], stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    with pytest.raises(lock.FolderBusy, match=f"PID {holder.pid} "):
        with lock.exclusive(tmp_path):
            pass
    holder.kill()
    holder.wait()
    with lock.exclusive(tmp_path):  # free again at once
        pass


def _whole_files(folder: Path, adapter: str = "adapter_model.safetensors") -> None:
    """A checkpoint's kinds of files, each whole: torch zip archives, a safetensors file, JSON."""
    import torch
    from safetensors.torch import save_file

    folder.mkdir(parents=True)
    (folder / Path(adapter).parent).mkdir(parents=True, exist_ok=True)
    save_file({"w": torch.arange(4096, dtype=torch.float32)}, folder / adapter)
    torch.save({"state": {0: torch.ones(4096)}}, folder / "optimizer.pt")
    (folder / "trainer_state.json").write_text('{"global_step": 1}')


@pytest.mark.parametrize("damaged", ["optimizer.pt", "adapter_model.safetensors"])
def test_a_truncated_newest_trainer_checkpoint_falls_back_to_the_one_before(damaged, tmp_path, capsys):
    """SFT and RM (training.trainer_checkpoint_to_resume): the newest complete checkpoint with a truncated file is
    reported with its path and cause, and the one before it is resumed."""
    from qlora_rlhf.training import trainer_checkpoint_to_resume

    for step in (2, 4):
        _whole_files(tmp_path / f"checkpoint-{step}")
    target = tmp_path / "checkpoint-4" / damaged
    target.write_bytes(target.read_bytes()[:1024])
    assert trainer_checkpoint_to_resume(tmp_path, max_steps=10, stage="sft") == str(tmp_path / "checkpoint-2")
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"sft: checkpoint {tmp_path / 'checkpoint-4'} cannot be loaded: {damaged}: truncated")
    assert f"resuming from {tmp_path / 'checkpoint-2'} instead" in err and "\n" not in err
    (tmp_path / "checkpoint-2" / "optimizer.pt").write_bytes(b"")  # none whole: start over, said so
    assert trainer_checkpoint_to_resume(tmp_path, max_steps=10, stage="sft") is None
    assert "no earlier checkpoint: starting over" in capsys.readouterr().err


def test_a_truncated_newest_ppo_checkpoint_is_reported_and_the_run_resumes_from_the_one_before(
        pipeline, tmp_path, tiny_model_dir, capsys):
    """The probe of issue 35: step-N/optimizer.pt cut to 1 KB with step-(N-1) intact made every re-run
    fail in torch.load. Now the stage names the damaged step and resumes from the one before."""
    from qlora_rlhf.config import Config
    from qlora_rlhf.paths import RunPaths
    from qlora_rlhf.stages import ppo

    _, paths, _ = pipeline
    configs = {n: Config.model_validate(smoke_params(tiny_model_dir, tmp_path / "results", **{"ppo.steps": n}))
               for n in (2, 3)}
    run = RunPaths.of(configs[3])
    _copy_inputs(paths, run.root, "ppo")
    ppo.run(configs[2], run)
    newest = run.checkpoints("ppo") / "step-000002"
    (newest / "optimizer.pt").write_bytes((newest / "optimizer.pt").read_bytes()[:1024])
    capsys.readouterr()
    ppo.run(configs[3], run)
    out, err = capsys.readouterr()
    assert f"ppo: checkpoint {newest} cannot be loaded: optimizer.pt: truncated" in err
    assert f"ppo: resuming from {run.checkpoints('ppo') / 'step-000001'} (step 1)" in out
    assert [row["step"] for row in read_jsonl(run.checkpoints("ppo") / "seconds.jsonl")] == [1, 2, 2, 3]
    assert ppo.Checkpoints(configs[3], run).latest().name == "step-000003"  # the damaged step was rewritten


def test_damaged_saved_generations_are_reported_and_generated_again(tmp_path, capsys):
    """The evaluation's saved generations (checkpoints/evaluate/<policy>.jsonl): a truncated file is
    named with its cause and generated again, not read short (read_jsonl skips a torn line)."""
    from qlora_rlhf.stages.evaluate import load_saved, save

    rows = [{"prompt": f"p{i}", "response": "r" * 50} for i in range(20)]
    save(tmp_path, "sft", rows)
    assert load_saved(tmp_path, "sft") == rows
    saved = tmp_path / "sft.jsonl"
    saved.write_bytes(saved.read_bytes()[: saved.stat().st_size // 2])
    assert load_saved(tmp_path, "sft") is None  # the caller generates them again and saves them whole
    err = capsys.readouterr().err
    assert f"evaluate: saved generations {saved} cannot be read: truncated" in err and "generating them again" in err
    save(tmp_path, "sft", rows)
    assert load_saved(tmp_path, "sft") == rows


def mount_tmpfs(mount: Path, size: str) -> None:
    """A tmpfs of `size` at `mount` (as root; the test is skipped where mounting is not allowed)."""
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(mount)], capture_output=True,
                          text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")


@pytest.fixture
def small_filesystem(tmp_path):
    """A 1 MB tmpfs (as root; skipped where mounting is not allowed)."""
    mount = tmp_path / "small"
    mount.mkdir()
    mount_tmpfs(mount, "1m")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False)


def test_a_full_disk_under_torch_and_safetensors_saves_is_one_line_with_the_cause(small_filesystem):
    """torch.save's zip writer ("unexpected pos ...") and safetensors ("os error 28") on a real full
    file system: SaveError naming the folder and "No space left on device"; the previous output stays."""
    import torch
    from safetensors.torch import save_file

    from qlora_rlhf.atomic import SaveError, atomic_dir

    target = small_filesystem / "step-000002"
    with atomic_dir(target) as out:
        (out / "state.json").write_text("{}")
    for save in (lambda out: torch.save(torch.zeros(1_000_000), out / "optimizer.pt"),
                 lambda out: save_file({"w": torch.zeros(1_000_000)}, out / "adapter_model.safetensors")):
        with pytest.raises(SaveError) as info:
            with atomic_dir(target) as out:
                save(out)
        message = str(info.value)
        assert message.startswith(f"could not write {target}: No space left on device"), message
        assert message.endswith("the previous output is left as it was") and "\n" not in message
        assert sorted(p.name for p in target.iterdir()) == ["state.json"]
    assert [p.name for p in small_filesystem.iterdir()] == ["step-000002"]  # the partial folder is gone


WRITE_FAILURES = {
    "safetensors": lambda: __import__("safetensors").SafetensorError(
        "Error while serializing: No space left on device (os error 28)"),
    "torch": lambda: RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 123392 vs 123280"),
    "read-only": lambda: OSError(30, "Read-only file system", "results/smoke/checkpoints/ppo/history.jsonl"),
    "permission": lambda: PermissionError(13, "Permission denied", "results/smoke/metrics/ppo.json"),
}


@pytest.mark.parametrize("kind", WRITE_FAILURES)
def test_a_write_error_in_any_stage_ends_with_one_line(kind, write_params, monkeypatch, capsys):
    """Whatever raised it (a stage's own file, a library's save, a log line), a failed write ends the
    verb with exit 1 and `error: could not write <path>: <cause>; ...left as they were`, no traceback."""
    import types

    from qlora_rlhf import cli

    def fails(config, paths):
        raise WRITE_FAILURES[kind]()

    monkeypatch.setattr(cli.importlib, "import_module", lambda name: types.SimpleNamespace(run=fails))
    assert cli.main(["figures", "--params", str(write_params())]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: could not write ") and "\n" not in err, err
    assert err.endswith("the previous outputs and checkpoints are left as they were")
    cause = {"safetensors": "No space left on device", "torch": "the write stopped short",
             "read-only": "results/smoke/checkpoints/ppo/history.jsonl: Read-only file system",
             "permission": "results/smoke/metrics/ppo.json: Permission denied"}[kind]
    assert cause in err, err


def test_a_read_only_results_folder_is_one_line_and_keeps_the_outputs(tmp_path, tiny_model_dir):
    """A results folder on a file system remounted read-only after the data stage (tmpfs, as root)."""
    results = tmp_path / "results"
    results.mkdir()
    mount_tmpfs(results, "64m")
    try:
        params = tmp_path / "params.yaml"
        params.write_text(yaml.safe_dump(smoke_params(tiny_model_dir, results)))
        env = os.environ | {"HF_HUB_OFFLINE": "1"}
        first = subprocess.run(_cli(params, "data"), capture_output=True, text=True, env=env, timeout=300)
        assert first.returncode == 0, first.stderr[-2000:]
        manifest = (results / "smoke" / "data" / "manifest.json").read_bytes()
        subprocess.run(["mount", "-o", "remount,ro", str(results)], check=True)
        again = subprocess.run(_cli(params, "data"), capture_output=True, text=True, env=env, timeout=300)
        assert again.returncode == 1
        err = again.stderr.strip().splitlines()
        assert err == [f"error: could not write {results / 'smoke' / '.qlora-rlhf.lock'}: Read-only file system; "
                       "nothing was changed"], err
        assert (results / "smoke" / "data" / "manifest.json").read_bytes() == manifest
    finally:
        subprocess.run(["umount", "-l", str(results)], check=False)


def test_a_full_disk_during_a_trainer_checkpoint_is_one_line_and_the_rerun_resumes(pipeline, tmp_path, tiny_model_dir,
                                                                                    monkeypatch, capsys):
    """SFT's checkpoint-4 save hits ENOSPC in optimizer.pt: one line naming the file and the cause, the
    half-written checkpoint-4 removed, checkpoint-2 kept; the re-run says it resumes from it."""
    import errno

    import torch

    from qlora_rlhf import cli

    run, params = _stage_inputs(pipeline, tmp_path, tiny_model_dir, "sft", {"sft.max_steps": 6, "sft.save_steps": 2})
    real_save = torch.save

    def save(obj, f, *args, **kwargs):
        if str(f).endswith("checkpoint-4/optimizer.pt"):
            raise OSError(errno.ENOSPC, "No space left on device", str(f))
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", save)
    assert cli.main(["sft", "--params", str(params)]) == 1
    lines = capsys.readouterr().err.replace("\r", "\n").splitlines()
    err = [line[line.index("error: "):] for line in lines if "error: " in line]  # after tqdm's unfinished bar
    folder = run / "checkpoints" / "sft"
    assert err == [(f"error: could not write {folder / 'checkpoint-4' / 'optimizer.pt'}: No space left on device; "
                   "the previous checkpoints are left as they were")], err
    assert "Traceback" not in err
    assert sorted(p.name for p in folder.glob("checkpoint-*")) == ["checkpoint-2"]
    assert not (run / "sft").exists()
    monkeypatch.setattr(torch, "save", real_save)
    assert cli.main(["sft", "--params", str(params)]) == 0
    assert f"sft: resuming from {folder / 'checkpoint-2'} (step 2)" in capsys.readouterr().out


def _project(tmp_path: Path, tiny_model_dir: Path, **overrides) -> Path:
    """A folder with dvc.yaml (what marks a project root), params.yaml and a docs/ subfolder."""
    (tmp_path / "dvc.yaml").write_text("stages: {}\n")
    (tmp_path / "docs").mkdir()
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(smoke_params(tiny_model_dir, "results", **overrides)))
    return tmp_path


@pytest.mark.parametrize("how", [[], ["--params", "../params.yaml"]])
def test_a_verb_started_in_a_subfolder_writes_where_it_would_in_the_project_root(how, tmp_path, tiny_model_dir,
                                                                                  monkeypatch):
    """run.results_dir is the project root's (the folder with dvc.yaml): issue 35's `data --params
    ../params.yaml` from docs/ wrote docs/results/; and without --params the root's params.yaml is read."""
    from qlora_rlhf import cli

    root = _project(tmp_path, tiny_model_dir)
    monkeypatch.chdir(root / "docs")
    assert cli.main(["data", *how]) == 0
    assert (root / "results" / "smoke" / "data" / "manifest.json").is_file()
    assert not (root / "docs" / "results").exists()
    assert Path.cwd() == root / "docs"  # given back


@pytest.mark.parametrize("results_dir, allowed", [("..", False), ("results/../../elsewhere", False), ("/", False),
                                                  ("absolute", True), ("results/sub", True)])
def test_a_results_folder_outside_the_project_needs_an_absolute_path(results_dir, allowed, tmp_path, tiny_model_dir,
                                                                      capsys):
    from qlora_rlhf import cli

    if results_dir == "absolute":
        results_dir = str(tmp_path.parent / "outside-results")
    root = _project(tmp_path, tiny_model_dir, **{"run.results_dir": results_dir, "model.quantization": "none",
                                                "model.optimizer": "adamw_torch"})
    code = cli.main(["validate", "--params", str(root / "params.yaml")])
    err = capsys.readouterr().err
    assert code == (0 if allowed else 2), err
    if not allowed:
        assert f"run.results_dir={results_dir!r}" in err and ("outside the project" in err or "root" in err)


def test_validate_checks_the_model_and_the_data_source_without_loading_them(write_params, tmp_path, capsys):
    from qlora_rlhf import cli

    cheap = {"model.quantization": "none", "model.optimizer": "adamw_torch"}
    assert cli.main(["validate", "--params", str(write_params(**cheap, **{"model.name_or_path": "/nonexistent"}))]) == 2
    assert "model.name_or_path='/nonexistent' is a path but does not exist" in capsys.readouterr().err
    missing = str(tmp_path / "missing.jsonl")
    assert cli.main(["validate", "--params", str(write_params(**cheap, **{"data.source": missing}))]) == 2
    assert f"data.source: not found: {missing}" in capsys.readouterr().err


def test_validate_finds_a_hub_model_offline_in_the_local_cache_or_says_it_is_not_there(write_params, tmp_path):
    """Under HF_HUB_OFFLINE=1 a hub id is looked up in the cache (HF_HUB_CACHE), in seconds: issue 35
    measured 51 s of retries without a network before the stage said anything."""
    cache = tmp_path / "hub"
    snapshot = cache / "models--someorg--cached-model" / "snapshots" / "abc123"
    snapshot.mkdir(parents=True)
    (snapshot / "config.json").write_text("{}")
    (cache / "models--someorg--cached-model" / "refs").mkdir()
    (cache / "models--someorg--cached-model" / "refs" / "main").write_text("abc123")
    env = os.environ | {"HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(cache)}
    cheap = {"model.quantization": "none", "model.optimizer": "adamw_torch"}
    for model, code in (("someorg/cached-model", 0), ("someorg/not-downloaded", 2)):
        started = time.monotonic()
        done = subprocess.run([sys.executable, "-m", "qlora_rlhf", "validate", "--params",
                               str(write_params(**cheap, **{"model.name_or_path": model}))],
                              capture_output=True, text=True, env=env, timeout=120)
        assert done.returncode == code, done.stderr[-2000:]
        assert time.monotonic() - started < 30
    assert (f"model.name_or_path='someorg/not-downloaded' is not in the local Hugging Face cache ({cache})"
            in done.stderr)
    assert "HF_HUB_OFFLINE is set" in done.stderr and "Traceback" not in done.stderr


def test_validate_without_a_network_says_so_in_seconds(write_params, monkeypatch, capsys):
    from qlora_rlhf import cli, preflight

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setattr(preflight, "hub_reachable", lambda: False)
    params = write_params(**{"model.quantization": "none", "model.optimizer": "adamw_torch",
                             "model.name_or_path": "someorg/not-downloaded"})
    assert cli.main(["validate", "--params", str(params)]) == 2
    assert "huggingface.co cannot be reached" in capsys.readouterr().err


@pytest.mark.slow
def test_snakemake_beside_a_running_dvc_repro_is_refused_and_dvcs_run_stands(tmp_path, tiny_model_dir):
    """The race of issue 35 through both front doors: `snakemake --cores 1 sft` while `dvc repro sft`
    trains. Snakemake's job is refused by the lock (its error names DVC's stage as the holder), it
    records nothing, DVC's run finishes alone with its history in step order and matches dvc.lock."""
    from conftest import BIN, scratch_env, scratch_project

    root = scratch_project(tmp_path / "project", tiny_model_dir,
                           **{"sft.max_steps": 40, "sft.save_steps": 4, "sft.logging_steps": 1})
    env = scratch_env()
    history = root / "results" / "smoke" / "checkpoints" / "sft" / "history.jsonl"
    dvc = subprocess.Popen([str(BIN / "dvc"), "repro", "sft"], cwd=root, env=env, stdout=subprocess.PIPE,
                           stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.time() + 600
        while not read_jsonl(history) and dvc.poll() is None and time.time() < deadline:
            time.sleep(0.2)
        assert read_jsonl(history), "DVC's sft logged no step"
        smk = subprocess.run([str(BIN / "snakemake"), "--cores", "1", "sft"], cwd=root, env=env, capture_output=True,
                             text=True, timeout=600)
        said = smk.stdout + smk.stderr
        assert smk.returncode != 0, said[-3000:]
        assert "is being written by PID" in said and "qlora_rlhf sft --params params.yaml" in said, said[-3000:]
        assert "dvc_record: recorded" not in said
        out = dvc.communicate(timeout=900)[0]
        assert dvc.returncode == 0, out[-3000:]
    finally:
        if dvc.poll() is None:
            dvc.kill()
            dvc.wait()
    steps = [row["step"] for row in read_jsonl(history)]
    assert steps == list(range(1, 41)), steps  # one writer: no step logged twice, none out of order
    status = subprocess.run([str(BIN / "dvc"), "status", "sft"], cwd=root, env=env, capture_output=True, text=True)
    assert "up to date" in status.stdout, status.stdout + status.stderr


def test_snakemakes_record_step_reports_dvcs_own_error(tmp_path):
    """Issue 35: "recording it in dvc.lock failed (dvc commit ... --quiet ...):" with an empty cause,
    because --quiet silenced DVC's error too. With DVC's repository lock held (as by `dvc repro`)."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "workflow"))
    from dvc_record import RecordError, record

    from conftest import BIN, scratch_env

    env = scratch_env()
    subprocess.run(["git", "init", "-q"], cwd=tmp_path, check=True, env=env)
    subprocess.run([str(BIN / "dvc"), "init", "-q"], cwd=tmp_path, check=True, env=env)
    (tmp_path / "dvc.yaml").write_text("stages:\n  a:\n    cmd: echo a\n")
    from dvc.repo import Repo

    with Repo(str(tmp_path)).lock:
        with pytest.raises(RecordError) as info:
            record(tmp_path, ["a"])
    assert "Unable to acquire lock" in str(info.value), str(info.value)


def test_snakemake_runs_one_of_the_runs_stages_at_a_time_and_seeds_side_by_side():
    """The run's rules each take the one unit of the Snakefile's run_folder resource (data and base,
    independent in the DAG, would otherwise start together under --cores 2 and collide on the run
    folder's lock); a seed's rules take none, so `snakemake --cores N seeds` still runs seeds at once."""
    from conftest import BIN, REPO, scratch_env

    done = subprocess.run([str(BIN / "snakemake"), "-n", "--cores", "2", "--forceall", "all", "seeds"], cwd=REPO,
                          env=scratch_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    # One block per job; a block ends where the next job's rule line begins, so a rule without the resource
    # (`all`) cannot borrow the next job's (the order of jobs in the plan varies between runs).
    blocks = re.split(r"^(?:local)?rule ", done.stdout, flags=re.M)[1:]
    asked = {block.split(":", 1)[0]: (re.findall(r"run_folder=(\d)", block) or [None])[0] for block in blocks}
    seeded = {rule for rule in asked if "_seed_" in rule}
    assert seeded and all(asked[rule] == "0" for rule in seeded), asked
    assert {rule for rule, n in asked.items() if n == "1"} >= {"data", "base", "sft", "rm", "ppo", "evaluate",
                                                               "figures", "paper", "seeds"}, asked
