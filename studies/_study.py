"""Shared by the study scripts: where the finished run of a params file lives."""

from __future__ import annotations

from pathlib import Path

from qlora_rlhf.config import load_config
from qlora_rlhf.paths import REPO, RunPaths

RESULTS = REPO / "studies" / "results"


def run_paths(params: Path) -> RunPaths:
    """Where the run of `params` lives; `results_dir` is relative to the repository, as DVC runs it."""
    return RunPaths(REPO / RunPaths.of(load_config(params)).root)


def shown(path: Path) -> str:
    """`path` relative to the repository where it lies inside it (what the JSON records)."""
    path = Path(path).resolve()
    return str(path.relative_to(REPO)) if path.is_relative_to(REPO) else str(path)
