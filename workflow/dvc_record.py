"""Record the stages a Snakemake run executed in DVC's lock, so that one results folder has one
record whichever front door built it.

After a run, the Snakefile's `onsuccess` and `onerror` handlers call `record`: for exactly the jobs
Snakemake ran to the end (not those it found up to date, nor those that failed),
`dvc commit --force --no-relink <stage>...` hashes the stage's deps and outs as they are now, writes them to
dvc.lock, stores the outs in DVC's cache
(for `dvc push`) and adds a run-cache entry. That is what `dvc repro` itself writes after running
the same command on the same deps. Stages Snakemake did not run are left as DVC last recorded them:
Snakemake has no record of params for outputs DVC made, so it may call up to date a stage whose
params changed, and committing it would hide that from `dvc status`.
`--no-relink` leaves the files Snakemake wrote untouched, mtimes included, which its own
up-to-date check reads. `.snakemake_timestamp` in folder outputs is in `.dvcignore`, so it is no
part of DVC's hashes.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path


class RecordError(RuntimeError):
    """`dvc commit` failed after a successful Snakemake run."""


def ran_stages(workflow, stages: dict) -> list[str]:
    """DVC stage names of the jobs this Snakemake run executed to the end (in DAG order); after a
    failed run, those that finished before the failure."""
    dag = workflow.dag
    by_rule = {stage.rule_name: name for name, stage in stages.items()}
    ran = {job.rule.name for job in dag.needrun_jobs(exclude_finished=False) if dag.finished(job)}
    return [name for rule, name in by_rule.items() if rule in ran]


def record(root: str | Path, names: list[str]) -> list[str]:
    """`dvc commit` the named stages in the DVC project at root; nothing without one."""
    root = Path(root)
    if not names:
        return []
    if not (root / ".dvc").is_dir():
        print(f"dvc_record: {root} is not a DVC project (no .dvc/): dvc.lock not updated", file=sys.stderr)
        return []
    # Not --quiet: it silences DVC's error too, and a failure then read "failed (...):" with no cause
    # (issue 35: DVC's "Unable to acquire lock" while a `dvc repro` held the repository).
    cmd = [sys.executable, "-m", "dvc", "commit", "--force", "--no-relink", *names]
    done = subprocess.run(cmd, cwd=root, capture_output=True, text=True)
    if done.returncode != 0:
        lines = (done.stdout + done.stderr).strip().splitlines()
        errors = [line for line in lines if line.startswith("ERROR")]  # DVC's error, not its traceback
        said = "\n".join(errors or lines[-5:]) or f"(dvc exited {done.returncode} and said nothing)"
        raise RecordError(
            f"the Snakemake run succeeded, but recording it in dvc.lock failed ({' '.join(cmd[2:])}):\n"
            f"{said}\nrun that command once the cause is fixed"
        )
    print(f"dvc_record: recorded in dvc.lock and DVC's cache: {', '.join(names)}", file=sys.stderr)
    return names
