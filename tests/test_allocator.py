"""allocator.keep_freed_memory: a large block freed and allocated again costs no page faults."""

import os
import platform
import subprocess
import sys

import pytest

from qlora_rlhf import allocator

# Frees a 64 MiB block (above glibc's largest mmap threshold), allocates it again and prints the
# minor page faults of the second allocation.
PROBE = """
import resource, sys
from qlora_rlhf import allocator
kept = allocator.keep_freed_memory() if sys.argv[1] == "keep" else False
block = bytearray(64 << 20); del block
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
block = bytearray(64 << 20)
print(kept, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""

glibc = pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc's malloc only")


def _probe(mode: str, **env: str) -> tuple[bool, int]:
    clean = {k: v for k, v in os.environ.items() if k not in allocator.USER_SETTINGS}
    out = subprocess.run([sys.executable, "-c", PROBE, mode], env=clean | env, capture_output=True, text=True,
                         check=True)
    kept, faults = out.stdout.split()
    return kept == "True", int(faults)


@glibc
def test_a_freed_large_block_is_reused_without_page_faults():
    kept, faults_kept = _probe("keep")
    default, faults_default = _probe("default")
    assert kept and not default
    # without it the block is mapped again page by page (16,384 faults, or 32 with transparent huge pages)
    assert faults_kept < 1000 and faults_kept * 10 < faults_default


@glibc
def test_a_users_own_malloc_settings_win():
    kept, _ = _probe("keep", MALLOC_MMAP_THRESHOLD_="65536")
    assert not kept


def test_other_platforms_are_left_alone(monkeypatch):
    monkeypatch.setattr(sys, "platform", "darwin")
    assert allocator.keep_freed_memory() is False
