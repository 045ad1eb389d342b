"""model.compute_dtype: auto resolves from what the hardware reports; an explicit bf16 on a CPU that
emulates it still runs, with a one-line warning; every model stage records the dtype it ran in."""

from __future__ import annotations

import json

import pytest
import torch

from qlora_rlhf import memory, precision
from qlora_rlhf.cli import main
from qlora_rlhf.config import load_config

from conftest import REPO


@pytest.fixture
def cpu(monkeypatch):
    """cpu(flags, capability): a CPU as precision.py sees it, with the resolution cache cleared."""

    def _cpu(flags: set[str], capability: str = "AVX512", onednn_isa: str | None = None):
        monkeypatch.setattr(precision, "cpu_flags", lambda: flags)
        monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: capability)
        monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
        if onednn_isa is None:
            monkeypatch.delenv("ONEDNN_MAX_CPU_ISA", raising=False)
        else:
            monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", onednn_isa)
        precision.resolve.cache_clear()

    yield _cpu
    precision.resolve.cache_clear()


@pytest.mark.parametrize("flags", [{"avx512_bf16"}, {"amx_bf16", "avx512f"}])
def test_auto_is_bf16_on_a_cpu_with_native_bf16(cpu, flags):
    cpu(flags)
    chosen = precision.resolve("auto")
    assert chosen.dtype == "bfloat16" and chosen.torch_dtype == torch.bfloat16
    assert "auto" in chosen.reason and next(iter(flags & {"avx512_bf16", "amx_bf16"})) in chosen.reason


def test_auto_is_float32_on_an_avx2_cpu(cpu):
    cpu({"avx2", "fma"}, capability="AVX2")
    chosen = precision.resolve("auto")
    assert chosen.dtype == "float32" and "no native bf16" in chosen.reason


@pytest.mark.parametrize("capability, isa", [("AVX2", None), ("AVX512", "AVX2"), ("AVX512", "avx512_core")])
def test_auto_is_float32_when_torch_is_capped_below_the_cpu(cpu, capability, isa):
    """ATEN_CPU_CAPABILITY / ONEDNN_MAX_CPU_ISA make torch emulate bf16 even where the CPU has it."""
    cpu({"avx512_bf16", "amx_bf16"}, capability=capability, onednn_isa=isa)
    chosen = precision.resolve("auto")
    assert chosen.dtype == "float32" and "capped" in chosen.reason


def test_onednn_isa_that_keeps_bf16_keeps_auto_bf16(cpu):
    cpu({"amx_bf16"}, onednn_isa="AVX512_CORE_AMX")
    assert precision.resolve("auto").dtype == "bfloat16"


def test_explicit_bf16_on_an_emulating_cpu_runs_with_one_line_warning(cpu, capsys):
    cpu({"avx2"}, capability="AVX2")
    chosen = precision.resolve("bfloat16")
    assert chosen.dtype == "bfloat16"
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("warning:") and "slower than float32" in err
    precision.resolve("bfloat16")  # decided once per process: no second warning
    assert capsys.readouterr().err == ""


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_explicit_dtype_on_a_native_cpu_is_kept_silently(cpu, capsys, dtype):
    cpu({"amx_bf16"})
    assert precision.resolve(dtype).dtype == dtype
    assert capsys.readouterr().err == ""


def test_auto_on_cuda_plans_bf16_without_a_gpu(cpu):
    """plan-memory plans the paper's GPU (bf16) from a machine without one."""
    cpu({"avx2"}, capability="AVX2")
    assert precision.resolve("auto", "cuda").dtype == "bfloat16"
    assert precision.resolve("auto", "cpu").dtype == "float32"


def test_memory_plan_uses_the_dtype_auto_resolves_to(cpu):
    cpu({"avx2"}, capability="AVX2")
    config = load_config(REPO / "configs" / "paper-llama2-7b.yaml")
    auto = config.model_copy(update={"model": config.model.model_copy(update={"compute_dtype": "auto"})})
    assert memory.resolved_for(auto, "cuda").model.compute_dtype == "bfloat16"
    assert memory.resolved_for(auto, "cpu").model.compute_dtype == "float32"


def test_shipped_defaults_are_auto():
    for path in (REPO / "params.yaml", REPO / "configs" / "smoke.yaml"):
        assert load_config(path).model.compute_dtype == "auto", path


def test_validate_reports_the_resolved_dtype(cpu, write_params, capsys):
    cpu({"avx2"}, capability="AVX2")
    assert main(["validate", "--params", str(write_params(**{"model.compute_dtype": "auto"}))]) == 0
    out = capsys.readouterr().out
    assert "compute dtype float32 (auto: no native bf16" in out


def test_model_stages_record_the_dtype_they_ran_in(pipeline):
    config, paths, _ = pipeline
    expected = precision.of(config).dtype
    for stage in ("sft", "rm", "ppo", "eval"):
        recorded = json.loads(paths.stage_metrics(stage).read_text())["compute_dtype"]
        assert recorded == expected, stage
