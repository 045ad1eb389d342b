"""One DAG, two front doors: `dvc dag` and Snakemake's rule graph agree node for node and edge for
edge on the repo's own params.yaml, and each rule carries the DVC stage's command, deps, outs and
params. Runs in a scratch copy of the DAG files (no training, a few seconds)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import REPO

BIN = Path(sys.executable).parent
sys.path.insert(0, str(REPO / "workflow"))

from dag import edges, load_stages, produced_under, producers, snakemake_inputs  # noqa: E402

SINGLE_SEED = {"data", "base", "sft", "rm", "ppo", "evaluate", "best_of_n", "figures", "paper"}
PARAMS = yaml.safe_load((REPO / "params.yaml").read_text())
SEED_STUDY = ({f"{stage}@{seed}" for stage in ("ppo_seed", "evaluate_seed") for seed in PARAMS["seeds"]["ppo"]}
              | {"seeds"})
EXPECTED = SINGLE_SEED | SEED_STUDY


def rule_name(stage: str) -> str:
    return re.sub(r"\W", "_", stage)


def _tool(name: str) -> str:
    path = BIN / name
    if not path.exists():
        found = shutil.which(name)
        if found is None:
            pytest.skip(f"{name} is not installed")
        return found
    return str(path)


@pytest.fixture(scope="module")
def scratch(tmp_path_factory) -> Path:
    """dvc.yaml, Snakefile, workflow/, params.yaml and paper/ copied; every source dep present
    (copied, or an empty placeholder while a stage module is still being written)."""
    root = tmp_path_factory.mktemp("dag")
    for name in ("dvc.yaml", "Snakefile", "params.yaml"):
        shutil.copy(REPO / name, root / name)
    shutil.copytree(REPO / "workflow", root / "workflow", ignore=shutil.ignore_patterns("__pycache__"))
    (root / "paper").mkdir()
    for item in (REPO / "paper").iterdir():
        if item.is_file():
            shutil.copy(item, root / "paper" / item.name)
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    stages = load_stages(REPO / "dvc.yaml", params)
    made = producers(stages)
    for stage in stages.values():
        for dep in stage.deps:
            if produced_under(dep, made) or dep == "paper":
                continue
            if (REPO / dep).is_dir():  # shipped data
                shutil.copytree(REPO / dep, root / dep, dirs_exist_ok=True)
                continue
            target = root / dep
            target.parent.mkdir(parents=True, exist_ok=True)
            if (REPO / dep).is_file():
                shutil.copy(REPO / dep, target)
            else:
                target.touch()
    (root / "paper" / "paper.tex").touch(exist_ok=True)
    return root


def _env() -> dict:
    return {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"}


def _dvc_graph(root: Path) -> tuple[set[str], set[tuple[str, str]]]:
    dvc = _tool("dvc")
    subprocess.run([dvc, "init", "--no-scm", "-q"], cwd=root, check=True, env=_env())
    dot = subprocess.run([dvc, "dag", "--dot"], cwd=root, check=True, env=_env(),
                         capture_output=True, text=True).stdout
    nodes = set(re.findall(r'^"([^"]+)";$', dot, re.M))
    links = set(re.findall(r'^"([^"]+)" -> "([^"]+)";$', dot, re.M))
    return nodes, links


def _snakemake_graph(root: Path) -> tuple[set[str], set[tuple[str, str]]]:
    snakemake = _tool("snakemake")
    dot = subprocess.run([snakemake, "all", "seeds", "--rulegraph", "--cores", "1", "--forceall", "--quiet"],
                         cwd=root, check=True, env=_env(), capture_output=True, text=True).stdout
    labels = dict(re.findall(r'^\s*(\d+)\[label = "([^"]+)"', dot, re.M))
    links = {(labels[a], labels[b]) for a, b in re.findall(r"^\s*(\d+) -> (\d+)", dot, re.M)}
    nodes = set(labels.values()) - {"all"}
    links = {(a, b) for a, b in links if "all" not in (a, b)}
    return nodes, links


def _as_rules(nodes: set[str], links: set[tuple[str, str]]) -> tuple[set[str], set[tuple[str, str]]]:
    return {rule_name(n) for n in nodes}, {(rule_name(a), rule_name(b)) for a, b in links}


def test_dvc_and_snakemake_graphs_agree(scratch):
    dvc_nodes, dvc_edges = _dvc_graph(scratch)
    smk_nodes, smk_edges = _snakemake_graph(scratch)
    assert dvc_nodes == EXPECTED
    dvc_nodes_as_rules, dvc_edges_as_rules = _as_rules(dvc_nodes, dvc_edges)
    assert smk_nodes == dvc_nodes_as_rules
    assert smk_edges == dvc_edges_as_rules, (
        f"only in dvc: {sorted(dvc_edges_as_rules - smk_edges)}; "
        f"only in snakemake: {sorted(smk_edges - dvc_edges_as_rules)}")
    # and the derivation's own reading of dvc.yaml agrees with DVC's
    params = yaml.safe_load((scratch / "params.yaml").read_text())
    assert edges(load_stages(scratch / "dvc.yaml", params)) == dvc_edges


def test_rules_carry_dvc_stage_definitions(scratch):
    """Same command, deps, outs and params per stage, as DVC itself reads them."""
    from dvc.repo import Repo

    if not (scratch / ".dvc").exists():
        subprocess.run([_tool("dvc"), "init", "--no-scm", "-q"], cwd=scratch, check=True, env=_env())
    params = yaml.safe_load((scratch / "params.yaml").read_text())
    stages = load_stages(scratch / "dvc.yaml", params)
    cwd = os.getcwd()
    os.chdir(scratch)
    try:
        with Repo(str(scratch)) as repo:
            for dvc_stage in repo.index.stages:
                ours = stages[dvc_stage.name]
                assert ours.cmd == dvc_stage.cmd
                dvc_deps = [d.def_path for d in dvc_stage.deps if not d.def_path.endswith("params.yaml")]
                assert sorted(ours.deps) == sorted(dvc_deps)
                assert sorted(ours.outputs) == sorted(o.def_path for o in dvc_stage.outs)
                dvc_params = {}
                for dep in dvc_stage.deps:
                    if hasattr(dep, "read_params"):
                        dvc_params.update(dep.read_params())
                assert ours.params == dvc_params, f"stage {dvc_stage.name}: params differ"
    finally:
        os.chdir(cwd)
    # `snakemake -n` plans every stage with exactly the DVC command
    out = subprocess.run([_tool("snakemake"), "-n", "-p", "--cores", "1", "--forceall", "all", "seeds"], cwd=scratch,
                         check=True, env=_env(), capture_output=True, text=True).stdout
    for stage in stages.values():
        assert stage.cmd in out


def test_params_trigger_and_source_dirs(scratch):
    params = yaml.safe_load((scratch / "params.yaml").read_text())
    stages = load_stages(scratch / "dvc.yaml", params)
    # paper/ is a folder for DVC and its files for Snakemake
    assert "paper/paper.tex" in snakemake_inputs(stages["paper"], stages, scratch)
    # the Snakemake params carry the values, so changing one changes exactly the stages that read it
    changed = yaml.safe_load((scratch / "params.yaml").read_text())
    changed["ppo"]["kl_coef"] = 0.123
    after = load_stages(scratch / "dvc.yaml", changed)
    differs = {name for name in stages if stages[name].rule_params() != after[name].rule_params()}
    assert differs == {"ppo", "paper"} | {name for name in SEED_STUDY if name.startswith("ppo_seed@")}
    changed["model"]["name_or_path"] = "elsewhere"
    after = load_stages(scratch / "dvc.yaml", changed)
    differs = {name for name in stages if stages[name].rule_params() != after[name].rule_params()}
    # evaluate samples with the model's params (model.generation, the dtype), so it declares them too
    assert differs == {"data", "base", "sft", "rm", "ppo", "evaluate", "best_of_n", "paper"} | {
        n for n in SEED_STUDY if n.startswith(("ppo_seed@", "evaluate_seed@"))}


def test_only_the_reports_read_metrics_files(scratch):
    """Stages hand each other results inside their output folders (sft/held_out_perplexity.json,
    rm/held_out_margins.csv), never through metrics/<stage>.json, which only the reports (figures,
    paper, seeds) read."""
    params = yaml.safe_load((scratch / "params.yaml").read_text())
    stages = load_stages(scratch / "dvc.yaml", params)
    metrics_files = {path for stage in stages.values() for path in stage.files}
    readers = {name for name, stage in stages.items()
               if any(dep == f or f.startswith(dep + "/") for f in metrics_files for dep in stage.deps)}
    assert readers == {"figures", "paper", "seeds"}  # seeds reads its folder of seeds, metrics included


FAKE_STAGE = '''
"""Stand-in for `python -m qlora_rlhf <verb>`: writes the stage's outputs (fresh content each run),
or fails if FAIL_STAGE names the stage."""
import os, sys, uuid
from pathlib import Path
import yaml
sys.path.insert(0, "workflow")
from dag import load_stages
command = " ".join(["python -m qlora_rlhf", *sys.argv[1:]])
stages = load_stages("dvc.yaml", yaml.safe_load(Path("params.yaml").read_text())).values()
stage = next(s for s in stages if s.cmd == command)
if os.environ.get("FAIL_STAGE") == stage.name:
    sys.exit(f"{stage.name}: failing as asked")
token = uuid.uuid4().hex
for out in stage.outs:
    Path(out).mkdir(parents=True, exist_ok=True)
    (Path(out) / "out.txt").write_text(token)
for out in stage.files:
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_text('{"value": 1}' if out.endswith(".json") else "step,value\\n1,1\\n")
with open("ran.log", "a") as log:
    log.write(stage.name + "\\n")
'''


def _fake_project(root: Path, scratch: Path) -> dict:
    shutil.copytree(scratch, root, ignore=shutil.ignore_patterns(".dvc", ".snakemake", "results", "dvc.lock"))
    pkg = root / "fake" / "qlora_rlhf"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").touch()
    (pkg / "__main__.py").write_text(FAKE_STAGE)
    return {**_env(), "PYTHONPATH": str(root / "fake")}


def _ran(root: Path) -> list[str]:
    log = root / "ran.log"
    stages = log.read_text().split() if log.exists() else []
    log.unlink(missing_ok=True)
    return stages


def _set_param(root: Path, section: str, key: str, value: float) -> None:
    params = yaml.safe_load((root / "params.yaml").read_text())
    params[section][key] = value
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


RERUN_AFTER_KL_COEF = {"ppo", "evaluate", "figures", "paper"}
RERUN_AFTER_KL_BAND = RERUN_AFTER_KL_COEF  # adaptive control steers to it, and the figures shade it
SEEDS_AFTER_KL_COEF = {n for n in SEED_STUDY if "@" in n} | {"seeds"}  # every seed's PPO and evaluation


def _front_door(door: str, root: Path, env: dict) -> dict:
    """target -> the command that builds it, through Snakemake or DVC (initialised here)."""
    if door == "smk":
        return {target: [_tool("snakemake"), rule, "--cores", "1", "--quiet"]  # --quiet takes a value: targets first
                for target, rule in (("paper", "all"), ("seeds", "seeds"))}
    subprocess.run([_tool("dvc"), "init", "--no-scm", "-q"], cwd=root, env=env, check=True)
    return {target: [_tool("dvc"), "repro", "-q", target] for target in ("paper", "seeds")}


@pytest.mark.parametrize("door", ["smk", "dvc"])
def test_params_trigger_reruns_same_stages_through_both_doors(scratch, tmp_path, door):
    """Each front door runs every stage of the run once, nothing on a second call, after a change of
    ppo.kl_coef or of the KL target band exactly ppo and what follows it; its seed-study target then runs each
    seed's PPO and evaluation and the report, and after another kl_coef change all of them again (stand-in stage
    commands; seconds)."""
    root = tmp_path / door
    env = _fake_project(root, scratch)
    build = _front_door(door, root, env)

    def run(target: str) -> set[str]:
        subprocess.run(build[target], cwd=root, env=env, check=True, capture_output=True)
        return set(_ran(root))

    assert run("paper") == SINGLE_SEED
    assert run("paper") == set()
    _set_param(root, "ppo", "kl_coef", 0.321)
    assert run("paper") == RERUN_AFTER_KL_COEF
    _set_param(root, "ppo", "kl_target_high", 0.5)
    assert run("paper") == RERUN_AFTER_KL_BAND
    assert run("seeds") == SEED_STUDY
    assert run("seeds") == set()
    _set_param(root, "ppo", "kl_coef", 0.123)
    assert run("seeds") == RERUN_AFTER_KL_COEF | SEEDS_AFTER_KL_COEF


def _out(root: Path, env: dict, *cmd: str) -> str:
    done = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done.stdout + done.stderr


def test_one_results_folder_both_doors(scratch, tmp_path):
    """Snakemake records the stages it ran in dvc.lock (the Snakefile's onsuccess/onerror,
    workflow/dvc_record.py), and DVC does not see its .snakemake_timestamp files (.dvcignore): after a
    Snakemake run `dvc status` is clean and `dvc repro` runs nothing, also after a failed run and after
    a param change; after `dvc repro` `snakemake -n` has nothing to do (stand-in stages; seconds)."""
    root = tmp_path / "both"
    env = _fake_project(root, scratch)
    shutil.copy(REPO / ".dvcignore", root / ".dvcignore")
    dvc, smk = _tool("dvc"), _tool("snakemake")
    subprocess.run([dvc, "init", "--no-scm", "-q"], cwd=root, env=env, check=True)

    def clean(target: str = "paper") -> bool:  # the target and every stage upstream of it
        return "Data and pipelines are up to date" in _out(root, env, dvc, "status", target)

    failed = subprocess.run([smk, "--cores", "1"], cwd=root, env=env | {"FAIL_STAGE": "evaluate"},
                            capture_output=True, text=True)
    assert failed.returncode != 0
    before = set(_ran(root))  # best_of_n, a sibling of ppo and evaluate, may run before the failure or not
    assert {"data", "base", "sft", "rm", "ppo"} <= before <= {"data", "base", "sft", "rm", "ppo", "best_of_n"}
    assert clean("ppo") and not clean()  # what finished before the failure is recorded
    _out(root, env, smk, "--cores", "1")
    assert set(_ran(root)) == SINGLE_SEED - before
    assert list(root.glob("results/*/sft/.snakemake_timestamp"))  # there, and invisible to DVC
    assert clean()
    _out(root, env, dvc, "repro", "paper")
    assert _ran(root) == []
    _set_param(root, "ppo", "kl_coef", 0.321)
    assert not clean()
    _out(root, env, smk, "--cores", "1")
    assert set(_ran(root)) == RERUN_AFTER_KL_COEF
    assert clean()
    assert "Nothing to be done" in _out(root, env, smk, "-n")

    _out(root, env, dvc, "repro", "seeds")
    assert set(_ran(root)) == SEED_STUDY
    assert "Nothing to be done" in _out(root, env, smk, "-n", "seeds")
