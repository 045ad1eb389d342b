"""Independent jobs side by side on a CPU, one worker process each, the cores shared out between them.

Small-batch decoding uses a second thread poorly (a 128-prompt `generate` is 1.4× faster on 2 threads
than on 1 here, benchmarks/README.md), while two 1-thread processes each keep their full speed; and
a thread count does not change a result on this CPU, so the outputs are the same bit for bit. On a GPU,
or with one core, the jobs run one after another in this process."""

from __future__ import annotations

import ctypes
import os
import signal
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context

import torch


def _worker_start(threads: int) -> None:
    torch.set_num_threads(threads)
    try:  # Linux: a worker dies with its parent (kill -9 of the stage), instead of computing for nobody
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def side_by_side(fn, jobs: list[tuple]) -> list:
    """[fn(*args) for args in jobs]; fn must be a module-level function (it is pickled by name)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    if len(jobs) < 2 or cores < 2 or torch.cuda.is_available():
        return [fn(*args) for args in jobs]
    workers = min(len(jobs), cores)
    with ProcessPoolExecutor(workers, mp_context=get_context("spawn"), initializer=_worker_start,
                             initargs=(max(1, cores // workers),)) as pool:
        return [future.result() for future in [pool.submit(fn, *args) for args in jobs]]
