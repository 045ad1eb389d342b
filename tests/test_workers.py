"""Jobs side by side in worker processes: the same results as in one process, errors reach the
caller, and a worker dies with a parent killed by -9."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from qlora_rlhf import evaluate
from qlora_rlhf.data import read_split
from qlora_rlhf.workers import side_by_side

TWO_CORES = pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="runs the jobs in this process on one core")


@TWO_CORES
def test_each_job_runs_in_a_worker_of_its_own():
    pids = side_by_side(os.getpid, [(), ()])
    assert len(set(pids)) == 2 and os.getpid() not in pids


@TWO_CORES
def test_a_workers_error_reaches_the_caller_with_its_type():
    with pytest.raises(ValueError, match="invalid literal"):
        side_by_side(int, [("1",), ("not a number",)])


def mark_then_sleep(marker: str) -> None:
    """A job for the kill test: its marker says the worker is past its start-up, then it waits."""
    Path(marker).touch()
    time.sleep(120)


@TWO_CORES
def test_workers_die_with_a_parent_killed_by_minus_nine(tmp_path):
    markers = [str(tmp_path / name) for name in ("a", "b")]
    script = (f"import sys; sys.path.insert(0, {str(Path(__file__).parent)!r}); from test_workers import mark_then_sleep; "
              f"from qlora_rlhf.workers import side_by_side; side_by_side(mark_then_sleep, [({markers[0]!r},), ({markers[1]!r},)])")
    parent = subprocess.Popen([sys.executable, "-c", script])
    try:
        deadline = time.monotonic() + 120
        while not all(Path(m).exists() for m in markers):
            assert time.monotonic() < deadline and parent.poll() is None, "the workers did not start"
            time.sleep(0.2)
        children = psutil.Process(parent.pid).children()  # the two workers and multiprocessing's resource tracker
        assert len(children) >= 2
        parent.send_signal(signal.SIGKILL)
        parent.wait()
        _, alive = psutil.wait_procs(children, timeout=30)
        assert not alive
    finally:
        parent.kill()


def test_policy_rollouts_in_workers_equal_those_in_one_process(pipeline):
    config, paths, _ = pipeline
    split = read_split(paths, "eval")[:4]
    jobs = [(config, paths, names, [r["prompt"] for r in split], split) for names in evaluate.POLICY_GROUPS]
    in_one_process = [evaluate.evaluate_policies(*job) for job in jobs]
    for (frames, perplexity), (frames_one, perplexity_one) in zip(side_by_side(evaluate.evaluate_policies, jobs), in_one_process):
        assert perplexity == perplexity_one
        for frame, frame_one in zip(frames, frames_one, strict=True):
            assert frame.equals(frame_one)
