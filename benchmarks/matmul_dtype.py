"""How fast this CPU multiplies in float32 and in bfloat16: the number behind `compute_dtype: auto`.

A 1024x576 @ 576x1536 matmul (one SFT step's MLP input projection of the embedded default) in each dtype,
on torch's threads, with the CPU kind and what `auto` resolves to. Where bf16 is emulated it runs about
100x slower than float32; where the CPU has AVX512-BF16 or AMX, several times faster.

    python benchmarks/matmul_dtype.py
    ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 MKL_ENABLE_INSTRUCTIONS=AVX2 \\
        python benchmarks/matmul_dtype.py                # held to AVX2 kernels (MKL too: torch's float32 matmuls)

Writes benchmarks/results/matmul_dtype-<cpu kind>.json."""

from __future__ import annotations

import time

import torch

from qlora_rlhf import precision

from _common import CAPPING_ENV, cpu_kind, load_average, write

SHAPE = (1024, 576, 1536)


def gflops(dtype: torch.dtype, seconds: float = 1.5) -> float:
    m, k, n = SHAPE
    torch.manual_seed(0)
    a, b = torch.randn(m, k, dtype=dtype), torch.randn(k, n, dtype=dtype)
    for _ in range(2):
        a @ b
    start, calls = time.perf_counter(), 0
    while time.perf_counter() - start < seconds:
        a @ b
        calls += 1
    return 2 * m * k * n * calls / (time.perf_counter() - start) / 1e9


def main() -> None:
    import os

    load = load_average()
    rates = {name: round(gflops(getattr(torch, name)), 1) for name in ("float32", "bfloat16")}
    chosen = precision.resolve("auto", "cpu")
    kind = cpu_kind()
    write(f"matmul_dtype-{kind}", {
        "shape": list(SHAPE), "gflops": rates, "bf16_over_fp32": round(rates["bfloat16"] / rates["float32"], 3),
        "auto": chosen.dtype, "auto_reason": chosen.reason,
        "cpu": {"kind": kind, "model": precision.cpu_model(),
                "torch_capability": torch.backends.cpu.get_cpu_capability(),
                "capping_env": {k: os.environ[k] for k in CAPPING_ENV if k in os.environ},
                "load_average_before": load, "load_average_after": load_average()},
    })
    print(f"{kind}: float32 {rates['float32']} GFLOP/s, bfloat16 {rates['bfloat16']} GFLOP/s; auto -> {chosen.dtype}")


if __name__ == "__main__":
    main()
