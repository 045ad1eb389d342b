"""The command line: validate, clear one-line-per-problem errors with no stack trace, and stage verbs that
refuse bad params before touching any data or model."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

from qlora_rlhf import cli
from qlora_rlhf.config import load_config
from qlora_rlhf.paths import RunPaths

from conftest import REPO


def _cli(*args, timeout=120) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO / "src"), "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-m", "qlora_rlhf", *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=timeout)


@pytest.mark.parametrize("params", ["params.yaml", "configs/smoke.yaml"])
def test_validate_shipped_params(params):
    result = _cli("validate", "--params", params)
    assert result.returncode == 0, result.stderr
    assert f"{params}: valid" in result.stdout


def test_validate_bad_params_one_line_per_problem(write_params):
    path = write_params(**{"sft.batch_size": "four", "ppo.batch_size": 5, "model.lora.rank": 4})
    result = _cli("validate", "--params", str(path))
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    lines = lines[next(i for i, line in enumerate(lines) if line.startswith("error:")):]  # skip import-time noise
    assert lines[0] == f"error: {path}: invalid params (3 problem(s)):"
    problems = sorted(line.strip() for line in lines[1:])
    assert len(problems) == 3
    assert problems[0].startswith("model.lora.rank: unknown key")
    assert problems[1].startswith("ppo.batch_size=5 must be a multiple of ppo.mini_batch_size=2")
    assert problems[2].startswith("sft.batch_size: Input should be a valid integer")


def test_stage_verb_with_bad_params_stops_before_any_work(write_params, tmp_path):
    path = write_params(**{"data.max_prompt_tokens": 500})
    started = time.monotonic()
    result = _cli("data", "--params", str(path))
    elapsed = time.monotonic() - started
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "data.max_prompt_tokens=500 must be smaller than data.max_length=128" in result.stderr
    assert not (tmp_path / "results").exists()  # nothing written
    assert elapsed < 60  # no model was loaded (the tiny model is not even touched; imports only)


def test_stage_verb_bad_params_never_reaches_the_stage(write_params, monkeypatch, capsys):
    import qlora_rlhf.stages.data as stage

    def must_not_run(*args, **kwargs):
        raise AssertionError("the stage ran with invalid params")

    monkeypatch.setattr(stage, "run", must_not_run)
    assert cli.main(["data", "--params", str(write_params(**{"sft.batch_size": 999}))]) == 2
    assert "sft.batch_size=999 is larger than data.sft_size=32" in capsys.readouterr().err


def test_missing_params_file(tmp_path, capsys):
    assert cli.main(["validate", "--params", str(tmp_path / "nope.yaml")]) == 2
    assert capsys.readouterr().err.strip() == f"error: {tmp_path / 'nope.yaml'}: params file not found"


def test_validate_without_bitsandbytes(write_params, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)
    assert cli.main(["validate", "--params", str(write_params())]) == 2
    err = capsys.readouterr().err
    assert "model.quantization: 'nf4' needs bitsandbytes" in err and "set model.quantization: none" in err


def test_only_the_verbs_that_load_a_model_need_bitsandbytes(write_params, monkeypatch, capsys):
    """data, figures and paper skip the 4-second bitsandbytes import; a model stage still refuses
    before any work."""
    path = write_params()
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)
    assert cli.main(["data", "--params", str(path)]) == 0
    assert cli.main(["sft", "--params", str(path)]) == 2
    assert "model.quantization: 'nf4' needs bitsandbytes" in capsys.readouterr().err
    assert not RunPaths.of(load_config(path)).checkpoints("sft").exists()


def test_data_verb_runs_and_user_errors_exit_1(write_params, tmp_path, capsys):
    path = write_params()
    assert cli.main(["data", "--params", str(path)]) == 0
    paths = RunPaths.of(load_config(path))
    assert paths.manifest.is_file() and "data: wrote" in capsys.readouterr().out
    bad = write_params(**{"data.source": str(tmp_path / "missing.jsonl")})
    assert cli.main(["data", "--params", str(bad)]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: data.source: not found") and "\n" not in err
    assert paths.manifest.is_file()  # the previous output is kept


def test_unknown_verb_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as info:
        cli.main(["train-everything"])
    assert info.value.code == 2 and "invalid choice" in capsys.readouterr().err


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_model_verbs_keep_freed_memory_in_every_dtype(dtype, write_params, monkeypatch):
    """allocator.py: one rule; tests/test_determinism.py shows that it changes no result."""
    import types

    from qlora_rlhf import allocator

    calls = []
    monkeypatch.setattr(allocator, "keep_freed_memory", lambda: calls.append(True) or True)
    monkeypatch.setattr(cli.importlib, "import_module",
                        lambda name: types.SimpleNamespace(run=lambda config, paths: None))
    assert cli.main(["sft", "--params", str(write_params(**{"model.compute_dtype": dtype}))]) == 0
    assert cli.main(["data", "--params", str(write_params(**{"model.compute_dtype": dtype}))]) == 0  # loads no model
    assert calls == [True]


def test_model_verbs_warm_up_the_vector_math_before_the_stage_runs(write_params, monkeypatch):
    """warmup.py: the first float32 cos of a stage could be inexact on one thread; the CLI makes that first
    call itself, after the allocator is set and before the stage's module is imported and run."""
    import types

    from qlora_rlhf import allocator, warmup

    order = []
    monkeypatch.setattr(allocator, "keep_freed_memory", lambda: order.append("allocator") or True)
    monkeypatch.setattr(warmup, "vector_math", lambda: order.append("warmup"))
    monkeypatch.setattr(cli.importlib, "import_module",
                        lambda name: types.SimpleNamespace(run=lambda config, paths: order.append("stage")))
    assert cli.main(["ppo", "--params", str(write_params())]) == 0
    assert cli.main(["data", "--params", str(write_params())]) == 0  # loads no model: no warm-up
    assert order == ["allocator", "warmup", "stage", "stage"]


def test_the_warm_up_calls_each_function_on_a_float32_tensor_and_changes_no_result(monkeypatch):
    import torch

    from qlora_rlhf import warmup

    x = torch.linspace(0.0, 30.0, 3584)
    before = {name: getattr(torch, name)(x + 1) for name in warmup.FUNCTIONS}
    called = []
    for name in warmup.FUNCTIONS:
        original = getattr(torch, name)
        def recorded(t, original=original, name=name):
            called.append((name, t.dtype, t.numel()))
            return original(t)
        monkeypatch.setattr(torch, name, recorded)
    warmup.vector_math()
    monkeypatch.undo()
    assert called == [(name, torch.float32, warmup.SIZE) for name in warmup.FUNCTIONS]
    assert all(torch.equal(getattr(torch, name)(x + 1), before[name]) for name in warmup.FUNCTIONS)
