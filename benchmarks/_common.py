"""Shared by the benchmark scripts: the machine's description, the model to benchmark, JSON output."""

from __future__ import annotations

import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

from qlora_rlhf.paths import REPO

RESULTS = REPO / "benchmarks" / "results"

# Dense bf16 tensor-core peaks from vendor spec sheets (TFLOP/s), used when --peak-tflops is not given.
PEAK_BF16_TFLOPS = {"H200": 989.0, "H100 80GB HBM3": 989.0, "H100 PCIe": 756.0, "H100": 989.0,
                    "A100": 312.0, "RTX 4090": 165.2, "L4": 121.0, "A10G": 70.0}


def machine() -> dict:
    import torch

    info = {"cpu_count": os.cpu_count(), "platform": platform.platform(), "python": sys.version.split()[0],
            "torch": torch.__version__, "torch_threads": torch.get_num_threads(), "cuda_device": None}
    try:
        import bitsandbytes
        import peft
        import transformers

        info |= {"transformers": transformers.__version__, "peft": peft.__version__,
                 "bitsandbytes": bitsandbytes.__version__}
    except ImportError:
        pass
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info |= {"cuda_device": props.name, "cuda_memory_gib": props.total_memory / 1024**3,
                 "cuda_version": torch.version.cuda}
    return info


# What can hold torch below the CPU it runs on: recorded with every CPU timing.
CAPPING_ENV = ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA", "MKL_ENABLE_INSTRUCTIONS", "OMP_NUM_THREADS")


def cpu_kind() -> str:
    """amx_bf16+avx512_bf16, avx2, ...; '-capped' when an environment variable holds torch below the CPU,
    '-<n>thread' when torch runs on fewer threads than the machine has cores."""
    import torch

    from qlora_rlhf import precision

    native, _ = precision.cpu_native_bf16()
    flags = sorted(set(precision.NATIVE_BF16_CPU_FLAGS) & precision.cpu_flags())
    kind = "+".join(flags) if native else torch.backends.cpu.get_cpu_capability().lower().replace(" ", "_")
    threads = torch.get_num_threads()
    return (kind + ("-capped" if flags and not native else "")
            + (f"-{threads}thread" if threads < (os.cpu_count() or threads) else ""))


def default_peak_tflops() -> float | None:
    import torch

    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name(0)
    return next((peak for key, peak in PEAK_BF16_TFLOPS.items() if key in name), None)


def tiny_model_dir(out: Path) -> Path:
    """The tests' tiny random Llama (qlora_rlhf.tiny) with the embedded model's tokenizer: for smoke runs."""
    from qlora_rlhf.config import EMBEDDED_MODEL
    from qlora_rlhf.models import load_tokenizer
    from qlora_rlhf.tiny import save_tiny_llama

    if (out / "config.json").is_file():
        return out
    return save_tiny_llama(out, load_tokenizer(EMBEDDED_MODEL))


LLAMA2_7B_DIR = Path(tempfile.gettempdir()) / "qlora-rlhf-llama2-7b-random"


def random_llama2_7b(out: Path = LLAMA2_7B_DIR, tokenizer: str | None = None) -> Path:
    """Random weights in Llama-2-7B's shape (bf16 safetensors, ~13.5 GB; no download), drawn on the GPU
    when there is one, saved with a tokenizer (the embedded model's unless `tokenizer` names a folder;
    token ids stay below 32000). Kept in `out` and reused."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from qlora_rlhf.config import EMBEDDED_MODEL
    from qlora_rlhf.models import load_tokenizer

    if (out / "config.json").is_file() and any(out.glob("*.safetensors")):
        return out
    cfg = LlamaConfig(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                      num_key_value_heads=32, vocab_size=32000, max_position_embeddings=4096,
                      tie_word_embeddings=False, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    with torch.device("meta"):
        model = LlamaForCausalLM(cfg)
    model.to_empty(device="cuda" if torch.cuda.is_available() else "cpu").to(torch.bfloat16)
    torch.manual_seed(0)
    with torch.no_grad():
        for name, param in model.named_parameters():
            param.fill_(1.0) if "norm" in name else param.normal_(0.0, 0.02)
    model.save_pretrained(out, safe_serialization=True)
    load_tokenizer(tokenizer or EMBEDDED_MODEL).save_pretrained(out)
    del model
    torch.cuda.empty_cache()
    return out


def model_dir(config, explicit: str | None, tiny: bool) -> Path:
    """--model, else --tiny, else the base stage's output for the params' run."""
    from qlora_rlhf.paths import RunPaths

    if explicit:
        return Path(explicit)
    if tiny:
        return tiny_model_dir(Path(tempfile.gettempdir()) / "qlora-rlhf-tiny-llama")
    path = RunPaths.of(config).base_model / "model"
    if not (path / "config.json").is_file():
        sys.exit(f"{path} is missing: run the base stage first (dvc repro base), or pass --model DIR or --tiny")
    return path


def with_overrides(config, **sections):
    """config with {section: {key: value}} replaced (the Config models are frozen)."""
    for section, changes in sections.items():
        changes = {k: v for k, v in changes.items() if v is not None}
        if changes:
            config = config.model_copy(update={section: getattr(config, section).model_copy(update=changes)})
    return config


def code_version() -> dict:
    """The commit measured, and which of the files that decide the numbers differed from it."""
    import subprocess

    def git(*args):
        return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True).stdout.rstrip("\n")

    try:
        return {"git_commit": git("rev-parse", "HEAD"),
                "uncommitted": git("status", "--porcelain", "--", "src", "params.yaml", "configs").splitlines()}
    except OSError:
        return {}


def write(name: str, payload: dict) -> Path:
    from qlora_rlhf.atomic import write_json

    RESULTS.mkdir(parents=True, exist_ok=True)
    target = RESULTS / f"{name}.json"
    write_json(target, payload | {"machine": machine(), "code": code_version(),
                                  "written_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")})
    # --out may be a path elsewhere
    print(f"wrote {target.relative_to(REPO) if target.is_relative_to(REPO) else target}")
    return target


def dumps(payload: dict) -> str:
    return json.dumps(payload, indent=2, default=str)


# ------------------------------------------------------------------ measuring in a fresh process
def in_fresh_process(fn, *args):
    """fn(*args) in a new interpreter (spawn), so each measurement starts from the same clean heap
    and imports; fn must be a module-level function of an importable module."""
    from concurrent.futures import ProcessPoolExecutor
    from multiprocessing import get_context

    with ProcessPoolExecutor(max_workers=1, mp_context=get_context("spawn")) as pool:
        return pool.submit(fn, *args).result()


def rss() -> int:
    import psutil

    return psutil.Process().memory_info().rss


def reset_peak_rss() -> bool:
    """Reset the kernel's resident-memory high-water mark (VmHWM) of this process (Linux >= 4.0)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def peak_rss() -> int:
    """VmHWM: the kernel's exact peak resident set size since the last reset_peak_rss()."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise OSError("no VmHWM in /proc/self/status")


def load_average() -> list[float] | None:
    """The 1/5/15-minute load averages: timings taken while other work ran are not comparable."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None
