"""Where each stage reads and writes: everything a run produces lives under results/<run.name>/.

A run of the seed study (PPO and its evaluation with another seed) writes under
results/<run.name>/seeds/<seed>/ in the same layout, and reads the run's own data, base, SFT and
reward model."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from .config import Config, ConfigError

PROJECT_MARKER = "dvc.yaml"


def project_root(params: Path | None = None) -> Path:
    """The folder that relative paths of a params file are relative to (run.results_dir, data.source,
    a local model.name_or_path): the project's root, the nearest folder holding dvc.yaml above the
    params file, else above the current folder, else the current folder. `dvc repro` runs every
    command there; the CLI changes to it before a stage runs, so a verb started in docs/ writes
    where the same verb started in the root would."""
    starts = ([Path(os.path.abspath(params)).parent] if params is not None else []) + [Path.cwd()]
    for start in starts:
        for folder in (start, *start.parents):
            if (folder / PROJECT_MARKER).is_file():
                return folder
    return Path.cwd()


def check_results_dir(config: Config, root: Path) -> None:
    """A relative run.results_dir must stay inside the project (`..` would write beside it); outside
    it, the folder must be given as an absolute path, and never the file system's root. Compared as
    text, not through symlinks: results/ may be a link to a larger disk."""
    given = config.run.results_dir
    if Path(given).is_absolute():
        if Path(os.path.normpath(given)) == Path("/"):
            raise ConfigError(f"run.results_dir={given!r} is the file system's root: give a folder for the results")
        return
    resolved = Path(os.path.normpath(root / given))
    if resolved != root and root not in resolved.parents:
        raise ConfigError(f"run.results_dir={given!r} leads outside the project {root} (to {resolved}); "
                          "a results folder outside the project must be given as an absolute path")

# Files one stage writes into its folder for a later one. Named here, not in the writing stage's
# module, so that a reader (the evaluation) depends on paths.py, not on the code of the stage that wrote them.
# The SFT stage's held-out perplexity of the base and SFT models. Not metrics/sft.json: that also holds the
# stage's wall time, which differs on every run, so depending on it would re-run the evaluation after an SFT
# re-run with identical outputs.
HELD_OUT_PERPLEXITY = "held_out_perplexity.json"
HELD_OUT_MARGINS = "held_out_margins.csv"  # the rm stage's margin for each pair of the eval split

# The checkout this package runs from (it is installed editable: scripts/setup.sh, the Dockerfile). The tests,
# benchmarks and studies find params files and results through it; the stages use paths relative to the cwd.
REPO = Path(__file__).resolve().parents[2]


@dataclass(frozen=True)
class RunPaths:
    root: Path
    shared_root: Path | None = None  # a seed's run: where the run's data, base, SFT and RM are

    @classmethod
    def of(cls, config: Config, seed: int | None = None) -> RunPaths:
        """The run's paths, or with `seed` (other than run.seed) those of that seed's PPO run."""
        main = Path(config.run.results_dir) / config.run.name
        return cls(main) if seed in (None, config.run.seed) else cls(main / "seeds" / str(seed), main)

    @property
    def main(self) -> RunPaths:
        """The run a seed belongs to (itself for the run of run.seed)."""
        return RunPaths(self.shared_root) if self.shared_root else self

    @property
    def seeds(self) -> Path:
        return self.main.root / "seeds"

    @property
    def seed_study(self) -> Path:
        return self.main.root / "seed_study"

    # data stage
    @property
    def data(self) -> Path:
        return self.main.root / "data"

    def split(self, name: str) -> Path:
        return self.data / f"{name}.jsonl"

    @property
    def manifest(self) -> Path:
        return self.data / "manifest.json"

    # base / training stages: one folder each, written atomically
    @property
    def base_model(self) -> Path:
        return self.main.root / "base"

    @property
    def sft(self) -> Path:
        return self.main.root / "sft"

    @property
    def rm(self) -> Path:
        return self.main.root / "rm"

    @property
    def ppo(self) -> Path:
        return self.root / "ppo"

    def checkpoints(self, stage: str) -> Path:
        """Resumable state lives beside, not inside, a stage's final output."""
        return self.root / "checkpoints" / stage

    def dvclive(self, stage: str) -> Path:
        return self.root / "dvclive" / stage

    @property
    def metrics(self) -> Path:
        return self.root / "metrics"

    def stage_metrics(self, stage: str) -> Path:
        return self.metrics / f"{stage}.json"

    @property
    def eval(self) -> Path:
        return self.root / "eval"

    @property
    def best_of_n(self) -> Path:
        """Best-of-n from SFT: once per run (it reads no PPO), so a seed's run shares the run's."""
        return self.main.root / "best_of_n"

    @property
    def figures(self) -> Path:
        return self.root / "figures"

    @property
    def paper(self) -> Path:
        return self.root / "paper"
