"""CPU memory for the model stages: freed blocks stay in the process instead of going back to the kernel.

glibc serves each block above its mmap threshold (which grows to at most 32 MiB) with a fresh `mmap`
and unmaps it when it is freed. A forward pass over a batch of evaluation or rollout sequences makes
several such blocks per layer (an MLP activation of 128 sequences is ~64 MiB in float32), so the
operators write into memory the kernel must fault in and zero page by page: millions of page faults
per forward, and on a CPU much of the element-wise operators' time goes to them. Keeping freed memory
in the heap (no `mmap` for blocks, no trimming of the heap's top) removes the faults. It is what the
PyTorch CPU performance guide gets from jemalloc or tcmalloc, without a library to install. The cost:
a stage keeps its peak memory until it exits (its RSS is the peak, not the bytes in use), which a
stage that runs once and exits does not mind.

The CLI does this for float32 stages only. There every result is the same to the bit with or without
it (the embedded default's whole DAG held to AVX2 kernels: every learning result to the digit). In
bfloat16 on an AMX CPU the PPO stage drew other samples from its first step with it (the same ones
from run to run, but not those of the run without it), so some bf16 kernel's result depends on the
state of the memory it is handed; until that is understood, bf16 stages keep glibc's defaults, under
which the recorded runs were made.

A user's own glibc malloc settings (MALLOC_*_ variables or GLIBC_TUNABLES) are left as they are, and
other C libraries (macOS, musl) are not touched. docs/findings.md has the measurements."""

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
