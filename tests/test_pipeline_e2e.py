"""The real DAG end to end on a tiny model through both front doors (minutes on 2 cores): `dvc repro
paper` (make run) builds every table, figure and the paper; built once, it is computed again from
scratch (`dvc repro --force paper`, no checkpoints), and dvc.lock and every output come out byte for
byte the same. `dvc repro seeds` adds each PPO seed's run and the across-seed report; Snakemake then
has nothing to do; a second `dvc repro paper` does nothing; a PPO param change reruns only ppo and
what follows. `snakemake --cores 1 figures` on a fresh copy makes the same figures, `snakemake` adds
the paper, and DVC then finds that folder up to date; its outputs pushed to a DVC remote reach a git
clone through `dvc pull` (or the run cache), where `dvc repro` runs nothing."""

from __future__ import annotations

import hashlib
import re
import shutil
from pathlib import Path

import pytest
import yaml

from conftest import BIN
from conftest import run_ok as _run
from conftest import scratch_project as _project

SINGLE_RUN = {"data", "base", "sft", "rm", "ppo", "evaluate", "best_of_n", "figures", "paper"}
DOWNSTREAM_OF = {"ppo": {"ppo", "evaluate", "figures", "paper"}}


def _reran(root: Path) -> set[str]:
    return set(re.findall(r"Running stage '([^']+)'", _run(root, str(BIN / "dvc"), "repro", "paper")))


def _nothing_to_do(root: Path, *targets: str) -> bool:
    return "Nothing to be done" in _run(root, str(BIN / "snakemake"), "-n", *targets)


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
    assert (run / "best_of_n" / "best_of_n.csv").stat().st_size > 0 and (run / "figures" / "best_of_n.png").is_file()
    assert (run / "paper" / "macros.tex").stat().st_size > 0
    if shutil.which("latexmk"):
        assert (run / "paper" / "paper.pdf").stat().st_size > 0
    assert "sft.json" in _run(root, str(BIN / "dvc"), "metrics", "show")
    assert not (run / "seeds").exists()  # the seed study is its own target
    assert _nothing_to_do(root)  # the other front door agrees: the folder DVC built is up to date
    _rerun_reproduces_every_byte(root)

    seeds = yaml.safe_load((root / "params.yaml").read_text())["seeds"]["ppo"]
    ran = set(re.findall(r"Running stage '([^']+)'", _run(root, str(BIN / "dvc"), "repro", "seeds")))
    assert ran == {f"{stage}@{seed}" for stage in ("ppo_seed", "evaluate_seed") for seed in seeds} | {"seeds"}
    table = (run / "seed_study" / "seeds.csv").read_text().splitlines()
    assert len(table) == 1 + 1 + len(seeds)  # header, run.seed, each seed
    assert "gold_gain_mean" in _run(root, str(BIN / "dvc"), "metrics", "show")
    if shutil.which("latexmk"):
        assert (run / "seed_study" / "paper" / "paper.pdf").stat().st_size > 0

    assert _nothing_to_do(root, "seeds")
    assert _reran(root) == set()  # nothing changed: nothing reruns
    _set(root, "ppo", "kl_coef", 0.2)  # (which params rerun which stages: tests/test_dag.py, on stand-in stages)
    assert _reran(root) == DOWNSTREAM_OF["ppo"]


def _files(folder: Path, skip: set[str]) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file() and not skip & set(p.relative_to(folder).parts)}


def _rerun_reproduces_every_byte(root: Path) -> None:
    """The built run (`make run`'s DAG, up to the paper) computed again from scratch, as a reviewer's
    clone would: checkpoints removed, then `dvc repro --force paper` (each seed's PPO twice in fresh
    processes: tests/test_determinism.py). dvc.lock must not change by a byte, nor any file of
    results/ but the wall times (timings/) and the bookkeeping beside the outputs (checkpoints, DVCLive
    logs). Run-dependent bytes would show up here: times, dates in figures and PDFs, IDs, hostnames,
    and any stage whose computation differs from one process to the next."""
    # .qlora-rlhf.lock: the writer lock (lock.py) names its holder's PID and start time, and is no output
    results, skip = root / "results", {"checkpoints", "dvclive", "timings", ".qlora-rlhf.lock"}
    lock, before = (root / "dvc.lock").read_bytes(), _files(results, skip)
    timings = sorted(p.name for p in (results / "smoke" / "timings").iterdir())
    assert timings == sorted(f"{stage}.json" for stage in ("sft", "rm", "ppo"))
    shown = _run(root, str(BIN / "dvc"), "metrics", "show")
    assert "timings/sft.json" in shown and "seconds" in shown  # no DVC output, but `dvc metrics show` lists it
    for folder in results.rglob("checkpoints"):
        shutil.rmtree(folder)
    _run(root, str(BIN / "dvc"), "repro", "--force", "paper")
    after = _files(results, skip)
    assert sorted(after) == sorted(before)
    changed = sorted(name for name in before if after[name] != before[name])
    assert not changed, f"a rerun from scratch changed {changed}"
    assert (root / "dvc.lock").read_bytes() == lock


NOT_OUTPUTS = {"checkpoints", "dvclive", "timings"}  # written beside the outputs, never pushed
# one door's bookkeeping, and the writer lock (lock.py): not a stage's output
MARKERS = {".snakemake_timestamp", ".gitignore", ".qlora-rlhf.lock"}


def _outputs(run: Path) -> dict[str, tuple[str, int]]:
    """Every file the stages wrote under run/: path -> (sha256, mtime in ns)."""
    return {str(p.relative_to(run)): (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns)
            for p in sorted(run.rglob("*"))
            if p.is_file() and p.name not in MARKERS and p.relative_to(run).parts[0] not in NOT_OUTPUTS}


def _contents(outputs: dict[str, tuple[str, int]]) -> dict[str, str]:
    return {name: digest for name, (digest, _) in outputs.items()}


@pytest.mark.slow
def test_snakemake_run_is_dvcs_and_travels_through_a_remote(tmp_path, tiny_model_dir):
    """One results folder, both front doors, then shared: Snakemake builds the run (figures, then the
    paper) and records it in dvc.lock, so `dvc status` is clean and `dvc repro` runs nothing; `dvc push
    --run-cache` to a local folder remote; a git clone gets every output with `dvc pull`, and `dvc repro`
    there trains nothing; without dvc.lock, `dvc repro --pull` restores each stage from the run cache."""
    root = _project(tmp_path / "project", tiny_model_dir)
    smk, dvc = str(BIN / "snakemake"), str(BIN / "dvc")
    _run(root, smk, "--cores", "1", "figures")
    run = root / "results" / "smoke"
    assert list((run / "figures").glob("*.png")) and list((run / "figures").glob("*.pdf"))
    assert not (run / "paper").exists()  # the figures target stops before the paper
    assert (run / "figures" / ".snakemake_timestamp").exists()  # DVC does not see it (.dvcignore)
    assert "Data and pipelines are up to date" in _run(root, dvc, "status", "figures")
    _run(root, smk, "--cores", "1")  # the default target: only the paper is left to run
    assert (run / "paper" / "macros.tex").stat().st_size > 0
    assert "Nothing to be done" in _run(root, smk, "--cores", "1")
    assert "Data and pipelines are up to date" in _run(root, dvc, "status", "paper")
    assert _reran(root) == set()
    built = _outputs(run)
    assert any(name.startswith("sft/") for name in built) and "metrics/sft.json" in built

    remote = tmp_path / "remote"  # users: s3://bucket/path or ssh://host/path (docs/reviewers.md)
    _run(root, dvc, "remote", "add", "--default", "shared", str(remote))
    _run(root, dvc, "push", "--run-cache")
    identity = ["-c", "user.name=test", "-c", "user.email=test@example.invalid"]
    _run(root, "git", "add", "dvc.lock", ".dvc/config")
    _run(root, "git", *identity, "commit", "-qm", "the run's record and its remote")

    clone = tmp_path / "clone"
    _run(tmp_path, "git", "clone", "-q", str(root), str(clone))
    pulled = clone / "results" / "smoke"
    _run(clone, dvc, "pull", "--with-deps", "paper")  # this run has no seed study: the paper and what it needs
    before = _outputs(pulled)
    assert _contents(before) == _contents(built)
    assert "Data and pipelines are up to date" in _run(clone, dvc, "status", "paper")
    assert _reran(clone) == set()
    assert _outputs(pulled) == before  # nothing rewritten
    assert not (pulled / "checkpoints").exists()  # nothing trained

    # A run that dvc.lock does not record (as the paper profile's, pushed from another params.yaml):
    # the run cache holds each stage's outputs under its command, deps and params.
    shutil.rmtree(pulled)
    shutil.rmtree(clone / ".dvc" / "cache")
    (clone / "dvc.lock").unlink()
    restored = _run(clone, dvc, "repro", "--pull", "paper")
    assert "Running stage" not in restored
    assert set(re.findall(r"Stage '([^']+)' is cached - skipping run", restored)) == SINGLE_RUN
    assert _contents(_outputs(pulled)) == _contents(built)
