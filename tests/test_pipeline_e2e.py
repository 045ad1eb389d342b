"""The real DAG end to end on a tiny model through both front doors (about 5 minutes on 2 cores):
`dvc repro paper` (make run) builds every table, figure and the paper; `dvc repro seeds` adds each
PPO seed's run and the across-seed report; a second `dvc repro paper` does nothing; a PPO param
change reruns only ppo and what follows; an SFT param change reruns sft onwards;
`snakemake --cores 1 figures` on a fresh copy makes the same figures."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest
import yaml

from conftest import BIN
from conftest import run_ok as _run
from conftest import scratch_project as _project

DOWNSTREAM_OF = {"ppo": {"ppo", "evaluate", "figures", "paper"}, "sft": {"sft", "rm", "ppo", "evaluate", "figures", "paper"}}


def _reran(root: Path) -> set[str]:
    return set(re.findall(r"Running stage '([^']+)'", _run(root, str(BIN / "dvc"), "repro", "paper")))


def _set(root: Path, section: str, key: str, value) -> None:
    params = yaml.safe_load((root / "params.yaml").read_text())
    params[section][key] = value
    (root / "params.yaml").write_text(yaml.safe_dump(params))


@pytest.mark.slow
def test_dvc_repro_builds_everything_then_reruns_only_what_changed(tmp_path, tiny_model_dir):
    root = _project(tmp_path, tiny_model_dir)
    _run(root, str(BIN / "dvc"), "repro", "paper")
    run = root / "results" / "smoke"
    for name in ("summary.csv", "winrate.csv", "samples.csv", "generations.csv"):
        assert (run / "eval" / name).stat().st_size > 0
    assert list((run / "figures").glob("*.png")) and list((run / "figures").glob("*.pdf"))
    assert (run / "paper" / "macros.tex").stat().st_size > 0
    if shutil.which("latexmk"):
        assert (run / "paper" / "paper.pdf").stat().st_size > 0
    assert "sft.json" in _run(root, str(BIN / "dvc"), "metrics", "show")
    assert not (run / "seeds").exists()  # the seed study is its own target

    seeds = yaml.safe_load((root / "params.yaml").read_text())["seeds"]["ppo"]
    ran = set(re.findall(r"Running stage '([^']+)'", _run(root, str(BIN / "dvc"), "repro", "seeds")))
    assert ran == {f"{stage}@{seed}" for stage in ("ppo_seed", "evaluate_seed") for seed in seeds} | {"seeds"}
    table = (run / "seed_study" / "seeds.csv").read_text().splitlines()
    assert len(table) == 1 + 1 + len(seeds)  # header, run.seed, each seed
    assert "gold_gain_mean" in _run(root, str(BIN / "dvc"), "metrics", "show")
    if shutil.which("latexmk"):
        assert (run / "seed_study" / "paper" / "paper.pdf").stat().st_size > 0

    assert _reran(root) == set()  # nothing changed: nothing reruns
    _set(root, "ppo", "kl_coef", 0.2)
    assert _reran(root) == DOWNSTREAM_OF["ppo"]
    _set(root, "sft", "learning_rate", 1.0e-3)
    assert _reran(root) == DOWNSTREAM_OF["sft"]


@pytest.mark.slow
def test_snakemake_figures_on_a_fresh_copy(tmp_path, tiny_model_dir):
    root = _project(tmp_path, tiny_model_dir)
    _run(root, str(BIN / "snakemake"), "--cores", "1", "figures")
    figures = root / "results" / "smoke" / "figures"
    assert list(figures.glob("*.png")) and list(figures.glob("*.pdf"))
    assert not (root / "results" / "smoke" / "paper").exists()  # the figures target stops before the paper
    assert "Nothing to be done" in _run(root, str(BIN / "snakemake"), "--cores", "1", "figures")
