"""Several processes for the SFT and reward stages (`accelerate launch` or `torchrun`): which process
this is, which device it owns, and how the params' batch is split so that the effective batch (the
samples behind one optimizer step) stays what one process would use.

The launcher's environment (RANK, LOCAL_RANK, WORLD_SIZE, set by torchrun, which `accelerate launch`
runs) is read directly: it is what accelerate's own state reads, and reading it starts no process
group, so a bad split fails before any model is loaded. docs/multi-gpu.md has the rule and why."""

from __future__ import annotations

import math
import os
from typing import NamedTuple

from .errors import ConfigError


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def rank() -> int:
    return int(os.environ.get("RANK", "0"))


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def is_main() -> bool:
    """The process that writes the stage's outputs (Trainer's `args.should_save` is the same one)."""
    return rank() == 0


class BatchSplit(NamedTuple):
    per_process_batch: int  # per_device_train_batch_size: samples in one forward pass of one process
    accumulation: int  # gradient_accumulation_steps of each process
    processes: int

    @property
    def effective(self) -> int:
        return self.per_process_batch * self.accumulation * self.processes


def split_batch(section: str, batch_size: int, accumulation: int, processes: int | None = None) -> BatchSplit:
    """The params' effective batch E = batch_size x gradient_accumulation_steps, shared out over N
    processes: each process takes E / N samples per optimizer step, in micro-batches of
    gcd(batch_size, E / N), so that a process never holds more samples at once than one process did
    (the memory plan stays valid) and accumulates the rest. With N = 1 that is the params unchanged.
    E not divisible by N is a ConfigError, raised before any compute."""
    processes = world_size() if processes is None else processes
    effective = batch_size * accumulation
    if effective % processes:
        raise ConfigError(
            f"{section}.batch_size x {section}.gradient_accumulation_steps = {batch_size} x {accumulation} = "
            f"{effective} samples per optimizer step cannot be shared out over {processes} processes; "
            f"make it a multiple of {processes} or launch a number of processes that divides it")
    share = effective // processes
    micro = math.gcd(batch_size, share)
    return BatchSplit(micro, share // micro, processes)
