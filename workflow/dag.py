"""Read dvc.yaml (the one definition of the DAG) and resolve it against a params mapping.

The Snakefile derives its rules from `load_stages`; tests/test_dag.py uses the same reader to
check that the two front doors agree. Only the subset of dvc.yaml this project uses is supported:
`${dotted.key}` interpolation from params, `deps`, `params` (keys of params.yaml), `outs`
(always directories), `metrics` and `plots` (always files), `cmd`, and `foreach` over a list of
scalars (one stage `name@item` per item, `${item}` filled in, as DVC names them). A dep that is a
folder holding other stages' outputs depends on all of them, as in DVC.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

_REF = re.compile(r"\$\{([^}]+)\}")


class DagError(ValueError):
    """dvc.yaml uses something this reader cannot translate for Snakemake."""


def lookup(params: dict, dotted: str) -> Any:
    value: Any = params
    for part in dotted.split("."):
        if not isinstance(value, dict) or part not in value:
            raise DagError(f"dvc.yaml refers to {dotted!r}, which params has no value for")
        value = value[part]
    return value


def interpolate(text: str, params: dict) -> str:
    return _REF.sub(lambda m: str(lookup(params, m.group(1).strip())), text)


def _inside(path: str, folder: str) -> bool:
    return path.startswith(folder.rstrip("/") + "/")


def _entries(raw: list | None) -> list[str]:
    """Entries may be plain paths or `{path: {options}}` mappings."""
    out = []
    for item in raw or []:
        if isinstance(item, str):
            out.append(item)
        elif isinstance(item, dict) and len(item) == 1:
            out.append(next(iter(item)))
        else:
            raise DagError(f"unsupported dvc.yaml entry {item!r}")
    return out


@dataclass(frozen=True)
class Stage:
    name: str
    cmd: str
    deps: list[str]
    params: dict[str, Any]          # dotted params key -> its value in params.yaml
    outs: list[str]                 # directories
    files: list[str] = field(default_factory=list)   # metrics + plots files
    group_size: int = 1             # how many stages one `foreach` made (1 for a plain stage)

    @property
    def rule_name(self) -> str:
        """Snakemake rule names are identifiers: `ppo_seed@3` -> `ppo_seed_3`."""
        return re.sub(r"\W", "_", self.name)

    @property
    def outputs(self) -> list[str]:
        return self.outs + self.files

    @property
    def locks_run_folder(self) -> bool:
        """The stage holds results/<run>/ while it runs (src/qlora_rlhf/lock.py); a seed's stage
        (`--seed N`) holds only results/<run>/seeds/<N>/."""
        return "--seed" not in self.cmd.split()

    def rule_params(self) -> dict[str, Any]:
        """Snakemake params need identifiers: `model.name_or_path` -> `model__name_or_path`."""
        return {key.replace(".", "__"): value for key, value in self.params.items()}


def load_stages(dvc_yaml: str | Path, params: dict) -> dict[str, Stage]:
    raw = yaml.safe_load(Path(dvc_yaml).read_text())
    stages = {}
    for name, spec in raw["stages"].items():
        if "matrix" in spec:
            raise DagError(f"stage {name}: matrix stages are not translated")
        if "foreach" not in spec:
            stages[name] = _stage(name, spec, params)
            continue
        items = _REF.fullmatch(spec["foreach"].strip()) if isinstance(spec["foreach"], str) else None
        items = lookup(params, items.group(1).strip()) if items else spec["foreach"]
        if not isinstance(items, list) or not all(isinstance(i, (str, int)) for i in items):
            raise DagError(f"stage {name}: foreach must be a list of scalars, got {items!r}")
        for item in items:
            stages[f"{name}@{item}"] = _stage(f"{name}@{item}", spec["do"], params | {"item": item}, len(items))
    return stages


def _stage(name: str, spec: dict, params: dict, group_size: int = 1) -> Stage:
    param_keys = []
    for item in spec.get("params") or []:
        if not isinstance(item, str):
            raise DagError(f"stage {name}: only keys of params.yaml are supported, got {item!r}")
        param_keys.append(item)
    return Stage(
        name=name,
        cmd=interpolate(spec["cmd"], params),
        deps=[interpolate(p, params) for p in _entries(spec.get("deps"))],
        params={key: lookup(params, key) for key in param_keys},
        outs=[interpolate(p, params) for p in _entries(spec.get("outs"))],
        files=[interpolate(p, params) for p in _entries(spec.get("metrics")) + _entries(spec.get("plots"))],
        group_size=group_size,
    )


def producers(stages: dict[str, Stage]) -> dict[str, str]:
    return {out: stage.name for stage in stages.values() for out in stage.outputs}


def produced_under(dep: str, made_by: dict[str, str]) -> list[str]:
    """The outputs that a dep stands for: itself if a stage writes it, else those inside it (a folder)."""
    return [dep] if dep in made_by else sorted(out for out in made_by if _inside(out, dep))


def edges(stages: dict[str, Stage]) -> set[tuple[str, str]]:
    """(upstream, downstream) pairs: a stage depends on whoever writes one of its deps."""
    made_by = producers(stages)
    return {(made_by[out], stage.name) for stage in stages.values() for dep in stage.deps
            for out in produced_under(dep, made_by)}


def source_files(path: str, root: str | Path = ".") -> list[str]:
    """A dep that is a source folder (e.g. paper/) becomes its files for Snakemake, which tracks
    files, not folder contents; DVC hashes the folder itself. Editor/LaTeX litter is ignored."""
    base = Path(root) / path
    if not base.is_dir():
        return [path]
    skip = re.compile(r"(^\.|~$|\.(aux|log|fls|fdb_latexmk|out|synctex\.gz|pyc)$)")
    found = sorted(
        str(p.relative_to(root)) for p in base.rglob("*")
        if p.is_file() and not any(skip.search(part) for part in p.relative_to(base).parts)
    )
    return found or [path]


def snakemake_inputs(stage: Stage, stages: dict[str, Stage], root: str | Path = ".") -> list[str]:
    made_by = producers(stages)
    inputs: list[str] = []
    for dep in stage.deps:
        inputs.extend(produced_under(dep, made_by) or source_files(dep, root))
    return inputs
