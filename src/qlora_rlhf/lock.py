"""One writer per results folder: every stage verb holds an exclusive `flock` on a lock file in the
folder it writes, from before it touches anything until it exits, whichever front door started it
(`dvc repro`, `snakemake`, SLURM, a stage verb by hand). DVC's own repository lock covers two
`dvc repro` only; Snakemake takes none that DVC sees, so without this a Snakemake run and a DVC run
trained into the same checkpoints at once and interleaved their logs.

The run's stages (data ... paper, seeds) lock results/<run>/; a seed's PPO and evaluation
(`--seed N`) lock results/<run>/seeds/<N>/ only, so that the seeds of `snakemake --cores N seeds`
still run side by side. A second writer fails at once with one line naming the holder.

flock, not a PID file: the kernel drops the lock when the holder exits, however it ends (kill -9
included), so there is never a stale lock to clear. The file's text (PID, command, start time) only
names the holder for that message. On NFS, Linux maps flock to NFS byte-range locks (NFSv4, or v3
with lockd); on a file system without working locks, flock fails and the stage stops with the cause."""

from __future__ import annotations

import errno
import fcntl
import os
import shlex
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from .errors import SaveError, UserError

LOCK_FILE = ".qlora-rlhf.lock"  # in .dvcignore: the seeds stage hashes results/<run>/seeds, which holds a seed's lock


class FolderBusy(UserError):
    """Another process is writing the same results folder."""


def own_command() -> str:
    """This process's command line as a shell would show it (`python -m qlora_rlhf sft ...`)."""
    try:
        argv = Path("/proc/self/cmdline").read_bytes().rstrip(b"\0").split(b"\0")
        return shlex.join(arg.decode(errors="replace") for arg in argv)
    except OSError:
        return shlex.join([sys.executable, *sys.argv])


def holder(lock_file: Path, wait: float = 1.0) -> str:
    """Who holds the lock, from the text it wrote after taking it (waits briefly: it may not have yet)."""
    deadline = time.monotonic() + wait
    while True:
        try:
            pid, command, since = Path(lock_file).read_text().split("\n")[:3]
            return f"PID {int(pid)} ({command}, since {since})"
        except (OSError, ValueError):
            if time.monotonic() > deadline:
                return "another process (it has not written its PID)"
            time.sleep(0.05)


@contextmanager
def exclusive(folder: Path) -> Iterator[Path]:
    """Hold the exclusive lock of `folder` (created if missing) for the block; FolderBusy at once if
    another process holds it, SaveError if the folder cannot be written at all (read-only, full)."""
    folder = Path(folder)
    lock_file = folder / LOCK_FILE
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd = os.open(lock_file, os.O_RDWR | os.O_CREAT, 0o666)
    except OSError as exc:
        raise SaveError(f"could not write {lock_file}: {exc.strerror or exc}; nothing was changed") from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise SaveError(f"could not lock {lock_file}: {exc.strerror or exc} "
                                "(the file system may not support locks)") from None
            raise FolderBusy(f"{folder} is being written by {holder(lock_file)}; one writer per results folder: "
                             "wait for it to end (or stop it), then run this again") from None
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n{own_command()}\n{time.strftime('%Y-%m-%d %H:%M:%S')}\n".encode(), 0)
        except OSError:
            pass  # a full disk: the lock holds all the same, only the message of a second writer is vaguer
        yield lock_file
    finally:
        os.close(fd)  # releases the flock
