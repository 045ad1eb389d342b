"""Wall-clock times of the training stages: results/<run>/timings/<stage>.json, beside the outputs.

A stage's seconds differ on every run, even when every byte it computes is the same. Kept in an
output or a metrics file of the stage, they would change `dvc.lock` on each rerun, and a reviewer
could not tell a reproduced result from a different one. So no file that DVC hashes holds them:
this folder is no stage's output or dependency; dvc.yaml lists it only as a top-level `metrics`
entry, which DVC reads for `dvc metrics show` but does not record in dvc.lock. For the same reason
the paper (a DVC output) does not print them.

A seed's run writes here too, as `<stage>_seed@<seed>.json` (DVC's name of that stage), not under
results/<run>/seeds/, which the seeds stage hashes as one of its dependencies.
"""

from __future__ import annotations

from pathlib import Path

from .atomic import write_json
from .paths import RunPaths

FOLDER = "timings"


def timings_file(paths: RunPaths, stage: str) -> Path:
    main = paths.main.root
    name = stage if paths.shared_root is None else f"{stage}_seed@{paths.root.name}"
    return main / FOLDER / f"{name}.json"


def write_timings(paths: RunPaths, stage: str, seconds: float) -> Path:
    """Record a stage's training-loop seconds (counted across resumes, training.Timer)."""
    target = timings_file(paths, stage)
    target.parent.mkdir(parents=True, exist_ok=True)
    write_json(target, {"seconds": round(seconds, 1)})
    return target
