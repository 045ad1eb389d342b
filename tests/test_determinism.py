"""PPO is a function of its inputs and its seed: the same seed, run twice in separate processes, gives the
same adapter, value head and history to the byte, for several seeds, with the sampler that `auto` picks
here (the dense copy in bf16 on a bf16 CPU, peft's NF4 path in float32). A process is the unit because
what can differ between runs (thread timing, memory placement, hash seeds) is fixed within one. The second
run keeps glibc's own malloc behaviour (a user's MALLOC_* setting wins over allocator.py's), so the same
comparison shows that keeping freed memory in the heap changes no byte either."""

from __future__ import annotations

import hashlib
import shutil
import subprocess
import sys

import pytest
import yaml

from conftest import scratch_env, smoke_params

SEEDS = (1, 2, 3)
OUTPUTS = ("ppo/adapter/adapter_model.safetensors", "ppo/value_head.pt", "metrics/ppo_history.csv")


def _md5s(run) -> dict[str, str]:
    return {name: hashlib.md5((run / name).read_bytes()).hexdigest() for name in OUTPUTS}


GLIBC_DEFAULT = {"MALLOC_MMAP_MAX_": "65536"}  # glibc's own value: allocator.py then leaves malloc alone


def _ppo_in_a_fresh_process(pipeline, tmp_path, tiny_model_dir, seed: int, attempt: str, env=None) -> dict[str, str]:
    _, paths, _ = pipeline
    results = tmp_path / f"seed{seed}-{attempt}" / "results"
    run = results / "smoke"
    for needed in ("data", "base", "sft", "rm"):
        shutil.copytree(paths.root / needed, run / needed)
    params = tmp_path / f"seed{seed}-{attempt}" / "params.yaml"
    # run.seed itself, not --seed: the seed study's seeds are the run's own seed passed the same way
    overrides = {"run.seed": seed, "seeds.ppo": [s for s in (7, 8) if s != seed], "ppo.steps": 2}
    params.write_text(yaml.safe_dump(smoke_params(tiny_model_dir, results, **overrides)))
    done = subprocess.run([sys.executable, "-m", "qlora_rlhf", "ppo", "--params", str(params)], cwd=tmp_path,
                          env=scratch_env() | (env or {}), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return _md5s(run)


@pytest.mark.parametrize("seed", SEEDS)
def test_ppo_twice_in_separate_processes_gives_the_same_bytes(pipeline, tmp_path, tiny_model_dir, seed):
    first = _ppo_in_a_fresh_process(pipeline, tmp_path, tiny_model_dir, seed, "a")
    second = _ppo_in_a_fresh_process(pipeline, tmp_path, tiny_model_dir, seed, "b", env=GLIBC_DEFAULT)
    assert first == second
