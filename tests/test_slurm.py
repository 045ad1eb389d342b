"""The DAG on a real SLURM cluster, through Snakemake's own executor (snakemake-executor-plugin-slurm).

The module starts a one-node cluster on this machine (scripts/slurm-local.sh: munged, slurmctld,
slurmd from Debian's packages, which scripts/setup.sh installs as root) and stops it afterwards. The
smoke DAG on the tiny model runs up to the paper with `snakemake --executor slurm` (the profile
workflow/profiles/slurm), then the two-seed study (`seeds`); each rule must have been a SLURM job that
SLURM itself recorded as completed (its job-completion log), and the two PPO seeds must have run side
by side. Nothing is mocked: sbatch, squeue and srun are SLURM's.

This node has no GPU, so the test runs the profile with one override, said here and in
local_profile(): every rule's gres request is removed and its memory request shrunk to what the tiny
model needs; the per-rule runtimes and everything else are the profile's. The profile's numbers
themselves are checked against their derivation (workflow/slurm_resources.py) without SLURM.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import BIN, REPO, run_ok, scratch_env, scratch_project

SCRIPT = REPO / "scripts" / "slurm-local.sh"
PROFILE = REPO / "workflow" / "profiles" / "slurm" / "config.yaml"
DAEMONS = ("munged", "slurmctld", "slurmd", "sbatch", "squeue")
MISSING = [name for name in DAEMONS if shutil.which(name, path=os.environ.get("PATH", "") + ":/usr/sbin") is None]
PAPER_RULES = {"data", "base", "sft", "rm", "ppo", "evaluate", "best_of_n", "figures", "paper"}
TIMEOUT = 900  # seconds per snakemake run: a job SLURM cannot place would otherwise wait forever
TINY_MEM_MB = 3072  # the tiny model's stages stay well under this; the node has two cores and ~24 GB

needs_slurm = pytest.mark.skipif(
    bool(MISSING) or os.geteuid() != 0,
    reason=f"needs root and SLURM's binaries (missing: {', '.join(MISSING) or 'none'}); "
           "scripts/setup.sh installs scripts/apt-packages-slurm.txt as root")


def test_profile_resources_are_derived():
    sys.path.insert(0, str(REPO / "workflow"))
    from slurm_resources import derive

    derived = derive()
    profile = yaml.safe_load(PROFILE.read_text())
    assert profile["executor"] == "slurm"
    assert {k: profile["default-resources"][k] for k in derived["default"]} == derived["default"]
    assert set(profile["set-resources"]) == set(derived["rules"])
    for rule, resources in derived["rules"].items():
        assert {k: profile["set-resources"][rule][k] for k in resources} == resources, rule
    gpu = {rule for rule, res in derived["rules"].items() if res["gres"]}
    assert gpu == {"sft", "rm", "ppo", "evaluate", "best_of_n", "ppo_seed_1", "ppo_seed_2", "evaluate_seed_1",
                   "evaluate_seed_2"}


def test_profile_asks_for_sigterm_before_the_limit_and_requeues():
    """Issue 35: SIGTERM ahead of the time limit, long enough for the longest measured step plus a
    checkpoint save (twice), for every rule; a preempted job requeued by SLURM; a failed one retried."""
    import json

    sys.path.insert(0, str(REPO / "workflow"))
    from slurm_resources import SAFETY, derive

    profile = yaml.safe_load(PROFILE.read_text())
    extra = profile["default-resources"]["slurm_extra"]
    assert extra == derive()["default"]["slurm_extra"]
    seconds = int(re.fullmatch(r"--signal=TERM@(\d+)", extra).group(1))  # not B: the stage runs in an srun step
    measured = json.loads((REPO / "benchmarks" / "results" / "throughput-llama2-7b.json").read_text())
    assert seconds >= SAFETY * measured["ppo"]["seconds_per_step"] and seconds % 60 == 0
    assert not any("slurm_extra" in rule for rule in profile["set-resources"].values())  # every rule inherits it
    assert profile["slurm-requeue"] is True and profile["retries"] >= 1


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    """A running one-node cluster; yields the environment that points SLURM's clients at it."""
    state = tmp_path_factory.mktemp("slurm-state")
    env = scratch_env() | {"PATH": f"{BIN}:{os.environ['PATH']}:/usr/sbin", "SLURM_CONF": str(state / "slurm.conf")}
    started = subprocess.run(["bash", str(SCRIPT), "start", str(state)], env=env, capture_output=True, text=True)
    assert started.returncode == 0, started.stdout + started.stderr
    try:
        yield env | {"SLURM_STATE": str(state)}
    finally:
        subprocess.run(["bash", str(SCRIPT), "stop", str(state)], env=env, check=False)


def local_profile(root: Path) -> Path:
    """workflow/profiles/slurm for this GPU-less node: no gres, a small memory request, this node's
    cores, squeue for status (no accounting daemon here) polled soon after submission, and every
    job's log kept."""
    profile = yaml.safe_load(PROFILE.read_text())
    for resources in (profile["default-resources"], *profile["set-resources"].values()):
        resources["gres"] = ""
        resources["mem_mb"] = TINY_MEM_MB
    profile |= {"cores": os.cpu_count(), "slurm-status-command": "squeue", "slurm-init-seconds-before-status-checks": 2,
                "slurm-keep-successful-logs": True, "latency-wait": 5, "retries": 0}
    folder = root / "profiles" / "slurm-local"
    folder.mkdir(parents=True)
    (folder / "config.yaml").write_text(yaml.safe_dump(profile))
    return folder


def slurm_jobs(root: Path) -> dict[str, list[str]]:
    """rule -> SLURM job ids, from the executor's per-job logs (.snakemake/slurm_logs/rule_<name>/<id>.log)."""
    jobs: dict[str, list[str]] = {}
    for log in (root / ".snakemake" / "slurm_logs").glob("rule_*/**/*.log"):
        rule = next(p for p in log.relative_to(root / ".snakemake" / "slurm_logs").parts if p.startswith("rule_"))
        jobs.setdefault(rule.removeprefix("rule_"), []).append(log.stem)
    return jobs


def completed(state: str) -> dict[str, dict[str, str]]:
    """SLURM's own record of finished jobs (jobcomp/filetxt): job id -> its fields."""
    records = {}
    for line in (Path(state) / "jobcomp.log").read_text().splitlines():
        fields = dict(re.findall(r"(\w+)=(\S*)", line))
        records[fields["JobId"]] = fields
    return records


@needs_slurm
@pytest.mark.slow
def test_dag_and_seed_study_through_snakemake_slurm_executor(tmp_path, tiny_model_dir, slurm):
    root = scratch_project(tmp_path, tiny_model_dir)
    assert yaml.safe_load((root / "params.yaml").read_text())["seeds"]["ppo"] == [1, 2]
    profile = local_profile(root)
    snakemake = [str(BIN / "snakemake"), "--workflow-profile", str(profile)]

    run_ok(root, *snakemake, "paper", env=slurm, timeout=TIMEOUT)
    run = root / "results" / "smoke"
    assert (run / "eval" / "summary.csv").stat().st_size > 0
    assert list((run / "figures").glob("*.png"))
    assert (run / "paper" / "macros.tex").stat().st_size > 0
    if shutil.which("latexmk"):
        assert (run / "paper" / "paper.pdf").stat().st_size > 0
    jobs = slurm_jobs(root)
    assert set(jobs) == PAPER_RULES
    record = completed(slurm["SLURM_STATE"])
    for rule, ids in jobs.items():
        assert [record[i]["JobState"] for i in ids] == ["COMPLETED"], (rule, ids)

    run_ok(root, *snakemake, "seeds", env=slurm, timeout=TIMEOUT)
    table = (run / "seed_study" / "seeds.csv").read_text().splitlines()
    assert len(table) == 1 + 1 + 2  # header, run.seed, the two seeds
    assert (root / "results" / "smoke" / "metrics" / "seeds.json").is_file()
    jobs = slurm_jobs(root)
    seed_rules = {"ppo_seed_1", "ppo_seed_2", "evaluate_seed_1", "evaluate_seed_2", "seeds"}
    assert set(jobs) == PAPER_RULES | seed_rules
    assert all(len(ids) == 1 for ids in jobs.values())  # the second run submitted only the seed study
    record = completed(slurm["SLURM_STATE"])
    for rule in seed_rules:
        assert record[jobs[rule][0]]["JobState"] == "COMPLETED", rule
    first, second = (record[jobs[f"ppo_seed_{seed}"][0]] for seed in (1, 2))
    assert first["StartTime"] < second["EndTime"] and second["StartTime"] < first["EndTime"]  # side by side
