"""Wall time of the embedded default's whole DAG, per stage, with the CPU it ran on and the compute
dtype `auto` chose there: a fresh `git clone` of HEAD, then `dvc repro paper` in it (what `make run`
runs; the seed study is another target), setup excluded (the clone uses this interpreter's
environment, with PYTHONPATH on the clone's own src/).

    python benchmarks/repro_time.py                      # this CPU as it is
    ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 MKL_ENABLE_INSTRUCTIONS=AVX2 \\
        python benchmarks/repro_time.py                  # a CPU with native bf16 held to AVX2 kernels
    OMP_NUM_THREADS=1 ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 MKL_ENABLE_INSTRUCTIONS=AVX2 \\
        python benchmarks/repro_time.py                  # ... on one thread: a slower AVX2 CPU's float32 rate

Torch multiplies float32 through MKL, which ignores the first two variables: without the third, a "capped"
Xeon kept its AVX-512 float32 matmuls. The file records the float32 GFLOP/s of matmul_dtype.py's probe, the
number to compare with another machine's.

Writes benchmarks/results/repro_time-<cpu kind>.json: the total in seconds at the top level, each
stage's seconds (from dvc's "Running stage" lines to the next), the learning results that the
training-stages issue asks to keep, and the machine. A timing is only meaningful on an otherwise
idle machine: the JSON records the load average before and after. It also records the minor page faults of
all the stages' processes: on a VM their cost varies from hour to hour, and the model stages are meant to
cause few (qlora_rlhf/allocator.py)."""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from qlora_rlhf import precision

from _common import CAPPING_ENV, REPO, cpu_kind, load_average, write


def timed_repro(clone: Path, env: dict) -> tuple[float, dict[str, float], str]:
    """Runs `dvc repro paper` in the clone, timing each stage from its "Running stage" line to the next."""
    marks: list[tuple[str, float]] = []
    log = []
    start = time.perf_counter()
    with subprocess.Popen(["dvc", "repro", "paper"], cwd=clone, env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, bufsize=1) as proc:
        for line in proc.stdout:
            log.append(line)
            sys.stdout.write(line)
            if line.startswith("Running stage '"):
                marks.append((line.split("'")[1], time.perf_counter()))
    total = time.perf_counter() - start
    if proc.returncode:
        raise SystemExit(f"dvc repro paper failed (exit {proc.returncode}); last lines:\n{''.join(log[-20:])}")
    ends = [t for _, t in marks[1:]] + [start + total]
    return total, {name: round(end - begin, 1) for (name, begin), end in zip(marks, ends)}, "".join(log)


def _seconds(run: Path, stage: str) -> float | None:
    """A stage's training-loop time: timings/<stage>.json (no DVC output holds it: timings.py)."""
    import json

    path = run / "timings" / f"{stage}.json"
    return json.loads(path.read_text()).get("seconds") if path.is_file() else None


def learning_results(run: Path) -> dict:
    """What the training-stages issue asks to keep in either precision, read from the run's metrics."""
    import json

    read = {stage: json.loads((run / "metrics" / f"{stage}.json").read_text())
            for stage in ("sft", "rm", "ppo", "eval")}
    ev = read["eval"]
    return {
        "sft_perplexity_base": read["sft"]["perplexity_base"], "sft_perplexity_sft": read["sft"]["perplexity_sft"],
        "rm_accuracy": read["rm"]["accuracy"],
        "sft_reward_mean": ev.get("sft_reward_mean"), "ppo_reward_mean": ev.get("ppo_reward_mean"),
        "sft_gold_mean": ev.get("sft_gold_mean"), "ppo_gold_mean": ev.get("ppo_gold_mean"),
        "ppo_kl_to_sft": ev.get("ppo_kl_to_sft"),
        "compute_dtype": {stage: read[stage].get("compute_dtype") for stage in read},
        "training_loop_seconds": {stage: _seconds(run, stage) for stage in ("sft", "rm", "ppo")},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--keep", action="store_true", help="keep the clone (printed) instead of deleting it")
    args = parser.parse_args()

    import torch
    from matmul_dtype import gflops

    kind = cpu_kind()
    chosen = precision.resolve("auto", "cpu")
    float32_gflops = round(gflops(torch.float32), 1)
    clone = Path(tempfile.mkdtemp(prefix="repro-time-")) / "clone"
    subprocess.run(["git", "clone", "-q", str(REPO), str(clone)], check=True)
    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=clone, check=True, capture_output=True,
                            text=True).stdout.strip()
    env = os.environ | {"PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
                        "PYTHONPATH": str(clone / "src")}
    load_before = load_average()
    faults_before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_minflt
    try:
        total, stages, _ = timed_repro(clone, env)
        faults = resource.getrusage(resource.RUSAGE_CHILDREN).ru_minflt - faults_before
        learning = learning_results(clone / "results" / "smollm2-synthetic")
    finally:
        if args.keep:
            print(f"clone kept in {clone}")
        else:
            shutil.rmtree(clone.parent, ignore_errors=True)
    result = {
        "total_seconds": round(total, 1),
        "command": "dvc repro paper, i.e. make run (fresh git clone of HEAD, setup excluded)",
        "commit": commit,
        "stages_seconds": stages,
        "minor_page_faults": faults,
        "compute_dtype": chosen.dtype, "compute_dtype_reason": chosen.reason,
        "learning": learning,
        "cpu": {"kind": kind, "model": precision.cpu_model(),
                "native_bf16_flags": sorted(set(precision.NATIVE_BF16_CPU_FLAGS) & precision.cpu_flags()),
                "capping_env": {k: os.environ[k] for k in CAPPING_ENV if k in os.environ},
                "torch_threads": torch.get_num_threads(), "float32_matmul_gflops": float32_gflops,
                "load_average_before": load_before, "load_average_after": load_average()},
    }
    write(f"repro_time-{kind}", result)
    print(f"dvc repro paper: {total:.0f} s in {chosen.dtype} on {kind} ({precision.cpu_model()})")


if __name__ == "__main__":
    main()
