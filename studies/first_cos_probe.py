"""Is a model stage's first float32 `cos` the same in every process? (qlora_rlhf/warmup.py, issue 33 item 3.)

Each trial is a fresh process that loads the finished run's policy the way PPO does, builds the dense sampler's
copy and runs one prefill over the held-out curve's prompts, the first forward of PPO's step 0, and hashes the
rotary embedding's cos table there. Half the trials first call `warmup.vector_math()`, as the CLI does, half do
not. With the warm-up every trial should give one hash; without it, on the AMX Xeon, some processes gave another
(their cos off by up to 1.5e-4 over one thread's half). Writes studies/results/first_cos_probe.json with the CPU.

    .venv/bin/python studies/first_cos_probe.py --trials 10     # ~15 s a trial on 2 CPU cores
    ONEDNN_MAX_CPU_ISA=AVX512_CORE_BF16 .venv/bin/python studies/first_cos_probe.py   # where it was most frequent
"""

from __future__ import annotations

import argparse
import hashlib
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

from qlora_rlhf import precision
from qlora_rlhf.atomic import write_json

from _study import REPO, RESULTS, run_paths


def one_trial(params: Path, warm: bool) -> str:
    """The md5 of the rotary cos table in this process's first prefill."""
    import torch

    from qlora_rlhf import allocator, warmup
    from qlora_rlhf.actor import SharedBaseRoles
    from qlora_rlhf.config import load_config
    from qlora_rlhf.generation import dense_copy
    from qlora_rlhf.stages.ppo import HeldOutCurve
    from qlora_rlhf.training import seed_everything

    allocator.keep_freed_memory()  # as the CLI
    if warm:
        warmup.vector_math()
    config, paths = load_config(params), run_paths(params)
    seed_everything(config)
    roles = SharedBaseRoles.load(config, paths.sft / "merged", paths.rm / "adapter")
    prompts = HeldOutCurve(config, paths, roles).prompts
    roles.tokenizer.padding_side = "left"
    batch = roles.tokenizer(prompts, return_tensors="pt", padding=True)
    tables = []
    with torch.no_grad():
        dense = dense_copy(roles.model, roles.compute_dtype)
        dense.model.rotary_emb.register_forward_hook(lambda module, args, out: tables.append(out[0]))
        dense(**batch)
    return hashlib.md5(tables[0].float().numpy().tobytes()).hexdigest()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", type=Path, default=REPO / "params.yaml")
    parser.add_argument("--trials", type=int, default=10, help="fresh processes per arm")
    parser.add_argument("--once", choices=("warm", "cold"), help=argparse.SUPPRESS)  # one trial, in this process
    args = parser.parse_args()
    import torch

    if args.once:
        print(one_trial(args.params, args.once == "warm"))
        return
    arms = {}
    for arm in ("cold", "warm"):
        hashes = []
        for trial in range(args.trials):
            done = subprocess.run([sys.executable, __file__, "--params", str(args.params), "--once", arm],
                                  capture_output=True, text=True, check=True, cwd=REPO)
            hashes.append(done.stdout.split()[-1])
            print(f"{arm} {trial + 1}/{args.trials}: {hashes[-1][:10]}", flush=True)
        arms[arm] = dict(Counter(hashes).most_common())
    record = {
        "question": "is a model stage's first float32 cos (the rotary table) the same in every process?",
        "trials_per_arm": args.trials,
        "distinct_tables": {arm: len(counts) for arm, counts in arms.items()},
        "tables": arms,
        "cpu": {"model": precision.cpu_model(), "capability": torch.backends.cpu.get_cpu_capability(),
                "native_bf16_flags": sorted(set(precision.NATIVE_BF16_CPU_FLAGS) & precision.cpu_flags()),
                "onednn_max_cpu_isa": os.environ.get("ONEDNN_MAX_CPU_ISA"),
                "compute_dtype": precision.resolve("auto", "cpu").dtype},
    }
    write_json(RESULTS / "first_cos_probe.json", record)
    print({arm: len(counts) for arm, counts in arms.items()}, "distinct tables per arm")


if __name__ == "__main__":
    main()
