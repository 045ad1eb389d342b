"""`accelerate launch` of the SFT and reward stages: two CPU processes (gloo) on the tiny model train
with the single process's effective batch, and one of them writes the outputs."""

from __future__ import annotations

import json
import math
import os
import shutil
import socket
import subprocess
import sys

import pytest
import yaml

from qlora_rlhf.atomic import read_jsonl
from qlora_rlhf.cli import main
from qlora_rlhf.distributed import BatchSplit, split_batch
from qlora_rlhf.errors import ConfigError

from conftest import smoke_params

NEEDS = {"sft": ("data", "base"), "rm": ("data", "base", "sft")}
SUMMARY = {"sft": "sft: held-out perplexity", "rm": "rm: held-out accuracy"}


def test_the_split_keeps_the_effective_batch_and_never_grows_a_micro_batch():
    assert split_batch("sft", 4, 2, processes=1) == BatchSplit(4, 2, 1)  # one process: the params unchanged
    assert split_batch("sft", 2, 4, processes=2) == BatchSplit(2, 2, 2)
    assert split_batch("sft", 4, 1, processes=2) == BatchSplit(2, 1, 2)
    assert split_batch("sft", 4, 3, processes=2) == BatchSplit(2, 3, 2)
    assert split_batch("sft", 8, 4, processes=8) == BatchSplit(4, 1, 8)
    for batch, accumulation, processes in ((4, 2, 1), (2, 4, 2), (4, 3, 2), (3, 4, 6), (16, 1, 4)):
        split = split_batch("rm", batch, accumulation, processes)
        assert split.effective == batch * accumulation and split.per_process_batch <= batch
    with pytest.raises(ConfigError, match=r"rm.batch_size x rm.gradient_accumulation_steps = 3 x 1 = 3 .* 2 processes"):
        split_batch("rm", 3, 1, processes=2)


def test_a_batch_that_the_processes_cannot_share_fails_before_any_model_is_loaded(write_params, monkeypatch, capsys):
    monkeypatch.setenv("WORLD_SIZE", "3")  # as a launcher would set it; smoke's sft batch is 4 x 1
    assert main(["sft", "--params", str(write_params())]) == 2
    err = capsys.readouterr().err.strip()
    assert (err.startswith("error: sft.batch_size x sft.gradient_accumulation_steps = 4 x 1 = 4")
            and len(err.splitlines()) == 1)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.parametrize("stage", ["sft", "rm"])
def test_two_cpu_processes_train_with_the_single_process_effective_batch(stage, pipeline, tmp_path, tiny_model_dir):
    _, paths, _ = pipeline
    run = tmp_path / "results" / "smoke"
    for needed in NEEDS[stage]:
        shutil.copytree(paths.root / needed, run / needed)
    batch = {f"{stage}.batch_size": 2, f"{stage}.gradient_accumulation_steps": 4}  # 8 per step: 2 x 2 in each of 2
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump(smoke_params(tiny_model_dir, tmp_path / "results", **batch)))
    # accelerate's --multi_gpu launcher is torchrun; with no GPU visible each process takes the CPU and gloo
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
              "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
              "--main_process_port", str(_free_port()), "-m", "qlora_rlhf", stage, "--params", str(params)]
    done = subprocess.run(launch, capture_output=True, text=True, timeout=600,
                          env=os.environ | {"CUDA_VISIBLE_DEVICES": ""})
    assert done.returncode == 0, done.stderr[-3000:]

    metrics = json.loads((run / "metrics" / f"{stage}.json").read_text())
    single = split_batch(stage, 2, 4, processes=1)
    assert metrics["processes"] == 2 and metrics["effective_batch"] == single.effective == 8
    assert metrics["steps"] == 4 and math.isfinite(metrics["train_loss_last"])
    # the Trainer's own count of samples seen: 4 steps of 8 are one pass over the 32 training rows
    rows = len(read_jsonl(run / "data" / f"{stage}.jsonl"))
    assert (json.loads((run / "checkpoints" / stage / "checkpoint-4" / "trainer_state.json").read_text())["epoch"]
            == 4 * 8 / rows)
    assert f"{stage}: 2 processes, each 2 samples x 2 accumulation steps: 8 per step" in done.stdout
    # one process wrote: each step logged and timed once, one summary, no temporary folder left behind
    checkpoints = run / "checkpoints" / stage
    assert [row["step"] for row in read_jsonl(checkpoints / "seconds.jsonl")] == [1, 2, 3, 4]
    assert [row["step"] for row in read_jsonl(checkpoints / "history.jsonl")] == [2, 4]
    assert done.stdout.count(SUMMARY[stage]) == 1
    assert not [p for p in run.rglob("*") if ".tmp-" in p.name]
    assert (run / stage / "adapter" / "adapter_model.safetensors").is_file()
