"""The compute dtype, decided once per process from what the hardware reports.

`model.compute_dtype: auto` resolves to bfloat16 where bf16 matmuls run natively (a CUDA device that
supports bf16; a CPU with AVX512-BF16 or AMX that torch's kernels use) and to float32 everywhere else.
On a CPU without native bf16, torch emulates bf16 matmuls, orders of magnitude slower than float32,
so a bf16 default tuned on one kind of CPU would make the same DAG take hours on another."""

from __future__ import annotations

import functools
import os
import platform
import sys
from dataclasses import dataclass

NATIVE_BF16_CPU_FLAGS = ("avx512_bf16", "amx_bf16")


@dataclass(frozen=True)
class Precision:
    dtype: str  # float32 | bfloat16 | float16
    reason: str

    @property
    def torch_dtype(self):
        import torch

        return getattr(torch, self.dtype)


def _cpuinfo(field: str) -> str | None:
    """The first value of `field` in /proc/cpuinfo (Linux); None where there is none."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as handle:
            for line in handle:
                if line.startswith(field):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


def cpu_flags() -> set[str]:
    """The CPU feature flags of /proc/cpuinfo; empty where there is none."""
    return set((_cpuinfo("flags") or "").split())


def cpu_model() -> str:
    return _cpuinfo("model name") or platform.processor() or platform.machine()


def cpu_native_bf16() -> tuple[bool, str]:
    """Whether torch runs bf16 matmuls natively on this CPU, and what says so. The flags alone are not
    enough: ATEN_CPU_CAPABILITY or ONEDNN_MAX_CPU_ISA can cap torch below the CPU's own instructions."""
    import torch

    capability = torch.backends.cpu.get_cpu_capability()
    native = sorted(set(NATIVE_BF16_CPU_FLAGS) & cpu_flags())
    if not native:
        return False, (f"no native bf16 on this CPU (no {' or '.join(NATIVE_BF16_CPU_FLAGS)} flag; "
                       f"torch uses {capability})")
    isa_cap = os.environ.get("ONEDNN_MAX_CPU_ISA", "ALL").upper()
    if not capability.startswith("AVX512") or not any(word in isa_cap for word in ("BF16", "AMX", "ALL")):
        return False, (f"torch is capped below this CPU's {'+'.join(native)} "
                       f"(capability {capability}, ONEDNN_MAX_CPU_ISA={isa_cap})")
    return True, f"the CPU has {'+'.join(native)} (torch capability {capability})"


def cuda_native_bf16() -> bool:
    import torch

    return torch.cuda.is_available() and torch.cuda.is_bf16_supported(including_emulation=False)


@functools.cache
def resolve(requested: str, device: str | None = None) -> Precision:
    """The dtype that `requested` (auto | float32 | bfloat16 | float16) means on `device` (cuda | cpu;
    None: the device this process computes on)."""
    if requested in ("float32", "float16") or (requested == "bfloat16" and device == "cuda"):
        return Precision(requested, "set in params")  # nothing to decide: no torch import (plan-memory stays fast)
    import torch

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda":
        if torch.cuda.is_available():
            native = cuda_native_bf16()
            why = "the GPU supports bf16" if native else "the GPU has no native bf16"
        else:  # planning for a GPU that is not here: the paper's target (Ampere or newer) has bf16
            native, why = True, "planned for a GPU with bf16"
    else:
        native, why = cpu_native_bf16()
    if requested == "auto":
        return Precision("bfloat16" if native else "float32", f"auto: {why}")
    if requested == "bfloat16" and not native and device == "cpu":
        print(f"warning: model.compute_dtype: bfloat16 on a CPU without native bf16 ({why}): its matmuls are "
              f"emulated, typically 50-150x slower than float32; use auto or float32", file=sys.stderr)
        return Precision(requested, f"set in params; {why}")
    return Precision(requested, "set in params")


def of(config) -> Precision:
    """The resolved compute dtype of a Config on this process's device."""
    return resolve(config.model.compute_dtype)


def describe(precision: Precision) -> str:
    return f"compute dtype {precision.dtype} ({precision.reason})"


def generation_engine(requested: str, dtype: str) -> str:
    """model.generation with `auto` resolved for a compute dtype name: the dense copy in a 16-bit dtype,
    where it halves sampling time on a CPU; peft's NF4 path in float32, where a dense float32 copy is four
    times the bytes to stream per decoding step and measured no faster (docs/findings.md). Torch-free, so
    that the memory planner applies the same rule as the sampler (generation.py)."""
    if requested != "auto":
        return requested
    return "peft" if dtype == "float32" else "dense"
