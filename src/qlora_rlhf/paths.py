"""Where each stage reads and writes: everything a run produces lives under results/<run.name>/."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from .config import Config


@dataclass(frozen=True)
class RunPaths:
    root: Path

    @classmethod
    def of(cls, config: Config) -> RunPaths:
        return cls(Path(config.run.results_dir) / config.run.name)

    # data stage
    @property
    def data(self) -> Path:
        return self.root / "data"

    def split(self, name: str) -> Path:
        return self.data / f"{name}.jsonl"

    @property
    def manifest(self) -> Path:
        return self.data / "manifest.json"

    # base / training stages: one folder each, written atomically
    @property
    def base_model(self) -> Path:
        return self.root / "base"

    @property
    def sft(self) -> Path:
        return self.root / "sft"

    @property
    def rm(self) -> Path:
        return self.root / "rm"

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
    def figures(self) -> Path:
        return self.root / "figures"

    @property
    def paper(self) -> Path:
        return self.root / "paper"
