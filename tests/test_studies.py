"""The study scripts: each seed of studies/ppo_seeds.py reuses the finished run's stages through its
own params file, the summary reads what the evaluation wrote, and an unfinished run is a clear
error (also for studies/rm_harmful_probe.py)."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_figures import write_fake_results  # noqa: E402

from qlora_rlhf import synthetic  # noqa: E402
from qlora_rlhf.config import load_config  # noqa: E402
from qlora_rlhf.hh import ASSISTANT, HUMAN  # noqa: E402
from qlora_rlhf.paths import RunPaths  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "studies"))  # the scripts import their _study, as when run from there


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, REPO / "studies" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


ppo_seeds, rm_harmful_probe = _load("ppo_seeds"), _load("rm_harmful_probe")


@pytest.fixture
def params(tmp_path) -> Path:
    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    raw["run"]["results_dir"] = str(tmp_path / "results")
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def test_a_seed_gets_its_own_params_and_reuses_the_finished_stages(params, tmp_path):
    seeded = ppo_seeds.seed_params(params, 7, tmp_path / "work" / "seed-7")
    config = load_config(seeded)
    assert config.run.seed == 7 and Path(config.run.results_dir) == tmp_path / "work" / "seed-7"
    source, target = ppo_seeds.run_paths(params), ppo_seeds.run_paths(seeded)
    for stage in ppo_seeds.SHARED:
        assert (target.root / stage).resolve() == (source.root / stage).resolve()
    assert not (target.root / "ppo").exists()  # PPO and the evaluation are the seed's own
    assert ppo_seeds.seed_params(params, 7, tmp_path / "work" / "seed-7") == seeded  # a re-run resumes in place


def test_summary_reads_the_evaluation_tables(tmp_path):
    root = write_fake_results(tmp_path / "run")
    row = ppo_seeds.summarize(5, RunPaths(root))
    assert row["seed"] == 5 and row["ppo_seconds"] == 300.5
    assert set(row["gold_by_category"]) == {"arithmetic", "harmful"}
    assert row["gold_by_category"]["harmful"] == {"sft": 0.39, "ppo": 0.98}
    assert len(row["winrate_gold_ci"]) == 2
    json.dumps(row)  # what main() writes


def test_an_unfinished_run_or_the_runs_own_seed_is_a_clear_error(params, capsys):
    assert ppo_seeds.main(["--params", str(params), "--seeds", "1"]) == 1
    assert "not finished" in capsys.readouterr().err
    root = ppo_seeds.run_paths(params).root
    for stage in (*ppo_seeds.SHARED, "eval"):
        (root / stage).mkdir(parents=True)
    assert ppo_seeds.main(["--params", str(params), "--seeds", str(load_config(params).run.seed)]) == 1
    assert "the DAG's own run" in capsys.readouterr().err


def test_the_probe_needs_a_finished_reward_model_and_compares_every_kind_with_the_refusal(params, capsys):
    assert rm_harmful_probe.main(["--params", str(params)]) == 1
    assert "no reward model" in capsys.readouterr().err
    kinds = rm_harmful_probe.replies()
    assert "refusal" in kinds and sum(k.startswith("dodge") for k in kinds) == len(synthetic.HELP_TOPICS)
    assert all(synthetic.gold_score(f"{HUMAN} {synthetic.HARMFUL[0]}{ASSISTANT}", text) == 0.0
               for kind, text in kinds.items() if kind != "refusal")  # every other kind is a wrong reply


def test_an_evaluated_seed_is_reused_until_an_input_is_newer(tmp_path):
    import os

    paths = RunPaths(tmp_path / "run")
    inputs = [paths.split("eval"), paths.sft / "merged", paths.rm / "adapter", paths.ppo / "adapter"]
    for path in inputs:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.mkdir() if path.suffix == "" else path.write_text("")
        os.utime(path, (1_000, 1_000))
    assert not ppo_seeds.is_fresh(paths)  # not evaluated yet
    paths.eval.mkdir()
    (paths.eval / "summary.csv").write_text("")
    assert ppo_seeds.is_fresh(paths)
    os.utime(paths.rm / "adapter")  # the DAG re-ran the reward model
    assert not ppo_seeds.is_fresh(paths)


def test_a_variant_changes_only_ppo_or_eval_params_and_runs_in_its_own_folder(params, tmp_path):
    overrides = ppo_seeds.parse_overrides(["ppo.steps=10", "eval.num_prompts=128"])
    assert overrides == {"ppo.steps": 10, "eval.num_prompts": 128}
    assert ppo_seeds.variant_name(overrides) == "eval.num_prompts=128,ppo.steps=10"
    config = load_config(ppo_seeds.seed_params(params, 3, tmp_path / "work" / "seed-3", overrides))
    assert (config.ppo.steps, config.eval.num_prompts, config.run.seed) == (10, 128, 3)
    for wrong in ("sft.max_steps=3", "steps=3", "ppo.steps"):
        with pytest.raises(ValueError, match="SECTION.KEY=VALUE"):
            ppo_seeds.parse_overrides([wrong])


def test_a_variant_with_an_invalid_value_is_a_clear_error_before_any_run(params, tmp_path, capsys):
    root = ppo_seeds.run_paths(params).root
    for stage in (*ppo_seeds.SHARED, "eval"):
        (root / stage).mkdir(parents=True)
    argv = ["--params", str(params), "--work", str(tmp_path / "work"), "--seeds", "1"]
    assert ppo_seeds.main([*argv, "--set", "ppo.steps=-1"]) == 2
    assert "ppo.steps=-1" in capsys.readouterr().err
    assert ppo_seeds.main([*argv, "--set", "rm.max_steps=1"]) == 2
    assert "reused" in capsys.readouterr().err
    assert not (tmp_path / "work" / "ppo.steps=-1" / "seed-1" / "smollm2-synthetic" / "ppo").exists()
