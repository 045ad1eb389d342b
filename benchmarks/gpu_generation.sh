#!/usr/bin/env bash
# The GPU checks of fast generation, as one script for a machine with a CUDA device (each run writes
# its JSON under benchmarks/results/ with the machine described):
#   - the GPU-marked tests (the CUDA NF4 path, the dense sampler on CUDA);
#   - the paper's PPO shape on random Llama-2-7B weights in NF4, sampling through peft's NF4 model and
#     through the dense copy (decoding seconds per step, the whole step, generated tokens/s);
#   - the PPO peak memory against plan-memory, with the dense copy (the paper profile's default).
# Usage: bash benchmarks/gpu_generation.sh   (about 10 min on an H100-class GPU; ~14 GB of disk)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
$PY -m pytest -q -m gpu tests/test_gpu.py
$PY benchmarks/throughput.py --llama7b --generation peft --steps 2 --out throughput-llama2-7b-peft
$PY benchmarks/throughput.py --llama7b --generation dense --steps 2 --out throughput-llama2-7b
$PY benchmarks/memory_vs_plan.py --llama7b --out memory_vs_plan-llama2-7b
