"""studies/rm_harmful_probe.py: an unfinished run is a clear error, and every kind of reply it
scores against the refusal is a wrong one."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import yaml

from qlora_rlhf import synthetic
from qlora_rlhf.hh import ASSISTANT, HUMAN

from conftest import REPO

sys.path.insert(0, str(REPO / "studies"))  # the scripts import their _study, as when run from there


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, REPO / "studies" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


rm_harmful_probe = _load("rm_harmful_probe")


@pytest.fixture
def params(tmp_path) -> Path:
    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    raw["run"]["results_dir"] = str(tmp_path / "results")
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def test_the_probe_needs_a_finished_reward_model_and_compares_every_kind_with_the_refusal(params, capsys):
    assert rm_harmful_probe.main(["--params", str(params)]) == 1
    assert "no reward model" in capsys.readouterr().err
    kinds = rm_harmful_probe.replies()
    assert "refusal" in kinds and sum(k.startswith("dodge") for k in kinds) == len(synthetic.HELP_TOPICS)
    assert all(synthetic.gold_score(f"{HUMAN} {synthetic.HARMFUL[0]}{ASSISTANT}", text) == 0.0
               for kind, text in kinds.items() if kind != "refusal")  # every other kind is a wrong reply
