"""CPU memory for the model stages: freed blocks stay in the process instead of going back to the kernel.

glibc serves each block above its mmap threshold with a fresh `mmap` and unmaps it when it is freed. A forward
pass over a batch of evaluation or rollout sequences makes several such blocks per layer, so on a CPU the operators
write into memory the kernel must fault in and zero page by page. Keeping freed memory in the heap (no `mmap` for
blocks, no trimming of the heap's top) removes those faults; it is what the PyTorch CPU performance guide gets from
jemalloc or tcmalloc, without a library to install. The cost: a stage keeps its peak memory until it exits (its
RSS is the peak, not the bytes in use), which a stage that runs once and exits does not mind.

The CLI does this for every model stage, whatever the compute dtype: where a result is a function of its inputs,
where its memory comes from cannot change it (tests/test_determinism.py runs PPO under it; a float32-only rule
rested on a bf16 difference that was a stage's first float32 cos, warmup.py, not the heap's; the
whole bf16 DAG gives the same dvc.lock with and without: docs/findings.md). A user's own glibc
malloc settings (MALLOC_*_ variables or GLIBC_TUNABLES) are left as they are, and other C libraries (macOS, musl)
are not touched."""

from __future__ import annotations

import ctypes
import os
import sys

M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4  # glibc's <malloc.h> parameter numbers
_NEVER_TRIM = -1  # mallopt takes an int; glibc stores it as a size_t, so -1 is the largest threshold there is
USER_SETTINGS = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_MMAP_MAX_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_",
                 "GLIBC_TUNABLES")


def keep_freed_memory() -> bool:
    """Sets glibc's malloc to serve large blocks from the heap and keep what is freed; True if it did."""
    if not sys.platform.startswith("linux") or any(name in os.environ for name in USER_SETTINGS):
        return False
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):  # not glibc
        return False
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    return bool(mallopt(M_MMAP_MAX, 0)) and bool(mallopt(M_TRIM_THRESHOLD, _NEVER_TRIM))
