"""Every module of the package that a stage runs is one of the stage's deps in dvc.yaml, so that an
edit to it reruns the stage under both front doors (the Snakefile's inputs are the same deps).

What a stage runs is found two ways, and their union is checked:
- at run time: a subprocess imports the CLI (the stage's command is `python -m qlora_rlhf <verb>`)
  and the verb's module, as cli.main does, then reads `sys.modules` (one forked child per verb, after
  the third-party libraries are imported once: none of them imports this package);
- from the source: every `import` of the package in those modules, function-local ones included
  (a stage imports some lazily, e.g. seeds the paper's build), followed transitively.
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import REPO, scratch_env

PACKAGE = "qlora_rlhf"
SRC = REPO / "src"
SEED_TWINS = {"ppo_seed": "ppo", "evaluate_seed": "evaluate"}

# One child per verb, forked after the heavy third-party imports: each child starts with no module of
# this package loaded, imports what `python -m qlora_rlhf <verb>` imports before calling run(), and
# prints those modules.
_PROBE = r"""
import importlib, json, os, sys
for heavy in ("torch", "transformers", "trl", "peft", "datasets", "pandas", "matplotlib", "seaborn", "dvclive"):
    try:
        importlib.import_module(heavy)
    except ImportError:
        pass
assert not [m for m in sys.modules if m.split(".")[0] == "qlora_rlhf"], "a library imported the package"
found = {}
for verb in sys.argv[1:]:
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(read)
        from qlora_rlhf import cli
        importlib.import_module(cli.STAGES[verb].module)
        names = sorted(m for m in sys.modules if m.split(".")[0] == "qlora_rlhf")
        os.write(write, json.dumps(names).encode())
        os._exit(0)
    os.close(write)
    with os.fdopen(read) as handle:
        found[verb] = json.loads(handle.read())
    assert os.waitpid(pid, 0)[1] == 0, verb
print(json.dumps(found))
"""


def _file(module: str) -> Path:
    path = SRC.joinpath(*module.split("."))
    return path / "__init__.py" if path.is_dir() else path.with_suffix(".py")


def _package_imports(module: str) -> set[str]:
    """The package's modules that `module`'s source imports anywhere (and the packages above them)."""
    path = _file(module)
    package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
    named: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            named |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parts + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            named |= {base} | {f"{base}.{alias.name}" for alias in node.names}  # `from . import x` imports module x
    found = set()
    for name in named:
        parts = name.split(".")
        if parts[0] == PACKAGE:
            found |= {".".join(parts[:i]) for i in range(1, len(parts) + 1) if _file(".".join(parts[:i])).is_file()}
    return found


def _closure(modules: set[str]) -> set[str]:
    """The modules given, what they import, transitively, and the packages above each (importing a
    module runs its packages' __init__ first)."""
    seen: set[str] = set()
    todo = list(modules)
    while todo:
        module = todo.pop()
        if module not in seen:
            seen.add(module)
            parts = module.split(".")
            todo.extend({".".join(parts[:i]) for i in range(1, len(parts))} | _package_imports(module) - seen)
    return seen


@pytest.fixture(scope="module")
def dvc_stages() -> dict:
    """dvc.yaml's stages as YAML reads them (anchors resolved), `foreach` stages by their `do` body."""
    raw = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    return {name: spec.get("do", spec) for name, spec in raw.items()}


def _verb(cmd: str) -> str:
    words = cmd.split()
    assert words[:3] == ["python", "-m", PACKAGE], cmd
    return words[3]


@pytest.fixture(scope="module")
def runtime_modules(dvc_stages) -> dict[str, set[str]]:
    verbs = sorted({_verb(spec["cmd"]) for spec in dvc_stages.values()})
    done = subprocess.run([sys.executable, "-c", _PROBE, *verbs], env=scratch_env(), capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return {verb: set(names) for verb, names in json.loads(done.stdout.splitlines()[-1]).items()}


def test_every_module_a_stage_runs_is_one_of_its_deps(dvc_stages, runtime_modules):
    from qlora_rlhf import cli

    missing = {}
    for name, spec in dvc_stages.items():
        verb = _verb(spec["cmd"])
        ran = _closure(runtime_modules[verb] | {f"{PACKAGE}.__main__"})  # `python -m qlora_rlhf` runs __main__
        assert {f"{PACKAGE}.cli", cli.STAGES[verb].module} <= ran, name
        deps = [str(dep) for dep in spec["deps"]]
        files = {str(_file(module).relative_to(REPO)) for module in ran}
        absent = sorted(f for f in files if not any(f == dep or f.startswith(dep.rstrip("/") + "/") for dep in deps))
        if absent:
            missing[name] = absent
    assert not missing, f"modules a stage runs but does not depend on: {missing}"


def test_the_source_finds_at_least_what_the_import_loads(runtime_modules):
    """The static half is no weaker than the run-time one: it finds every module the import loaded."""
    from qlora_rlhf import cli

    for verb, loaded in runtime_modules.items():
        assert loaded <= _closure({f"{PACKAGE}.cli", cli.STAGES[verb].module}), verb


def test_a_stage_lists_no_module_of_the_package_that_it_does_not_run(dvc_stages, runtime_modules):
    """The other direction: a dep on code the stage never runs would rerun it for nothing."""
    for name, spec in dvc_stages.items():
        ran = {str(_file(m).relative_to(REPO))
               for m in _closure(runtime_modules[_verb(spec["cmd"])] | {f"{PACKAGE}.__main__"})}
        extra = [str(dep) for dep in spec["deps"] if str(dep).startswith(f"src/{PACKAGE}/") and str(dep) not in ran]
        assert not extra, f"{name}: {extra}"


def test_a_seed_twin_runs_the_same_code_and_reads_the_same_params(dvc_stages):
    """ppo_seed shares ppo's deps and params (YAML anchors). evaluate_seed's deps differ in two run
    folders (the run's eval/, the seed's ppo/) and YAML cannot join lists, so its code list is
    written out: it must be evaluate's, entry for entry."""
    for twin, stage in SEED_TWINS.items():
        code = [[dep for dep in dvc_stages[name]["deps"] if not dep.startswith("${")] for name in (twin, stage)]
        assert code[0] == code[1], twin
        assert dvc_stages[twin]["params"] == dvc_stages[stage]["params"], twin
    assert {"run", "model", "eval"} <= set(dvc_stages["evaluate"]["params"])
