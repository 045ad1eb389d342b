"""Preemption: SLURM sends SIGTERM some time before SIGKILL, at a job's time limit or when a job of
higher priority takes its node (KillWait or GraceTime apart; `--signal=TERM@<seconds>` asks for
earlier notice). While a training loop runs, SIGTERM no longer ends the process: the loop finishes
the step it is in, saves a checkpoint the way its regular checkpoints are saved (the Trainer's own
save for SFT and RM, `Checkpoints.save` for PPO) and the stage exits with EXIT_CODE (143). The same
command then resumes from that checkpoint. Outside the loop (loading, evaluating, writing outputs) SIGTERM
ends the process as before: there is nothing unsaved, and every output is written atomically.

transformers' own `TrainingArguments(enable_jit_checkpoint=True)` is not used: it waits 3 s before
acting, may save between a step's backward pass and its optimizer step (the RNG state then is not a
step's), and lets `train()` return as if it had finished, so the stage would write its outputs."""

from __future__ import annotations

import signal

import torch
from transformers import TrainerCallback

from .errors import Preempted

EXIT_CODE = Preempted.exit_code  # 143 = 128 + SIGTERM (errors.Preempted says why)


class SigtermFlag:
    """Inside the block, SIGTERM sets `received` instead of ending the process; the previous handler
    is restored on the way out. The handler only sets a flag: the loop decides when to act."""

    def __init__(self):
        self.received = False

    def _handler(self, signum, frame):
        self.received = True

    def __enter__(self) -> SigtermFlag:
        self.previous = signal.signal(signal.SIGTERM, self._handler)
        return self

    def __exit__(self, *exc) -> None:
        signal.signal(signal.SIGTERM, self.previous)


def any_process(flag: bool, device) -> bool:
    """`flag` or-ed over all processes of a distributed run, so that they stop at the same step (one
    that stopped alone would leave the others waiting in their next gradient all-reduce)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return flag
    tensor = torch.tensor([int(flag)], device=device)
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return bool(tensor.item())


class PreemptionCallback(TrainerCallback):
    """After SIGTERM, the Trainer's own flow: `should_save` at the end of the current step (the
    Trainer then saves as at save_steps: adapter, optimizer, scheduler, RNG, trainer_state.json last),
    and `should_training_stop`, so `train()` returns after that save. A SIGTERM during a regular save
    stops training right after it. `stopped_at` is the step it stopped after, or None."""

    def __init__(self, flag: SigtermFlag):
        self.flag, self.stopped_at = flag, None

    def on_step_end(self, args, state, control, **kwargs):
        if any_process(self.flag.received, args.device):
            control.should_save = control.should_training_stop = True
            self.stopped_at = state.global_step

    def on_save(self, args, state, control, **kwargs):
        if any_process(self.flag.received, args.device):
            control.should_training_stop = True
            self.stopped_at = state.global_step


def stopped(stage: str, step: int, checkpoint) -> Preempted:
    """The one-line message of a preempted stage: where its checkpoint is and that re-running resumes."""
    if checkpoint is None:
        return Preempted(f"{stage}: stopped by SIGTERM after step {step}, before any resumable checkpoint; "
                         "re-running the same command starts over")
    return Preempted(f"{stage}: stopped by SIGTERM after step {step}; checkpoint {checkpoint}; "
                     "re-running the same command resumes from it")
