"""The run's metrics as one table that fits 120 columns: `make metrics` (from the repository root).

`dvc metrics show` prints every metrics file of dvc.yaml as a row with every key of every file as a column
(several hundred columns), and reports each file the seed study has not written yet as "failed to load". This
reads the same files, those of the run's own stages (the seed study's per-seed files are summed up in its
seeds.json), and prints one row per metric and one column per file that exists.

    python scripts/metrics.py [--params params.yaml]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "workflow"))
from dag import load_stages  # noqa: E402

WIDTH = 120


def metric_files(params: dict, dvc_yaml: Path = Path("dvc.yaml")) -> list[Path]:
    """The JSON metrics files of dvc.yaml's stages, in its order, without the seed study's per-seed ones."""
    stages = load_stages(dvc_yaml, params)
    return [Path(f) for name, stage in stages.items() if "@" not in name for f in stage.files if f.endswith(".json")]


def cell(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return "-" if value is None else str(value)


def table(files: list[Path]) -> list[str]:
    present = {f.stem: json.loads(f.read_text()) for f in files if f.is_file()}
    if not present:
        return []
    keys = list(dict.fromkeys(key for values in present.values() for key in sorted(values)))  # in the DAG's order
    name_width = max(len(key) for key in keys)
    widths = {stem: max(len(stem), *(len(cell(v)) for v in values.values())) for stem, values in present.items()}
    lines = [f"{'metric':<{name_width}}  " + "  ".join(f"{stem:>{widths[stem]}}" for stem in present)]
    for key in keys:
        row = "  ".join(f"{cell(values.get(key)) if key in values else '':>{widths[stem]}}"
                        for stem, values in present.items())
        lines.append(f"{key:<{name_width}}  {row}".rstrip())
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    args = parser.parse_args(argv)
    files = metric_files(yaml.safe_load(args.params.read_text()))
    if files:
        print(f"{files[0].parent}/")
    lines = table(files)
    print("\n".join(lines) if lines else "no metrics yet: make run")
    missing = [f.name for f in files if not f.is_file()]
    if missing and lines:
        print("not yet made: " + ", ".join(f"{name} (make {'seeds' if name == 'seeds.json' else 'run'})"
                                          for name in missing))
    return 0


if __name__ == "__main__":
    sys.exit(main())
