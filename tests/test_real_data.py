"""The real-data path: the hh-rlhf rows shipped in data/ through every stage on the tiny model, the
evaluation without a gold judge (no NaN or empty tables), the figures and the paper's tables on
its results, and an evaluation that keeps each policy's rollouts across a crash."""

from __future__ import annotations

import gzip
import json
import math
from pathlib import Path

import pandas as pd
import pytest
import yaml

from conftest import REPO, smoke_params

SHIPPED = "data/hh-rlhf-harmless-base/sample.jsonl.gz"  # relative: the stages run from the repo root


def real_params(model_dir: Path, results: Path) -> dict:
    return smoke_params(
        model_dir, results, **{"run.name": "real", "data.source": SHIPPED, "data.sft_size": 8, "data.rm_size": 8,
                               "data.ppo_size": 4, "data.eval_size": 4, "data.max_prompt_tokens": 192,
                               "data.max_length": 256, "eval.num_prompts": 4, "eval.num_sample_rows": 2})


@pytest.fixture(scope="module")
def real_run(tmp_path_factory, tiny_model_dir):
    from qlora_rlhf.config import Config
    from qlora_rlhf.models import load_tokenizer
    from qlora_rlhf.paths import RunPaths
    from qlora_rlhf.stages import base, data, evaluate, ppo, rm, sft

    config = Config.model_validate(real_params(tiny_model_dir, tmp_path_factory.mktemp("real") / "results"))
    paths = RunPaths.of(config)
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(REPO)
        manifest = data.write_subsets(config, paths, load_tokenizer(tiny_model_dir))
    base.run(config, paths)
    sft.run(config, paths)
    rm.run(config, paths)
    ppo.run(config, paths)
    metrics = evaluate.run(config, paths)
    return config, paths, manifest, metrics


def test_the_shipped_rows_carry_their_licence_and_are_real_hh_rlhf():
    folder = REPO / "data" / "hh-rlhf-harmless-base"
    assert "MIT License" in (folder / "LICENSE").read_text()
    assert "Anthropic" in (folder / "README.md").read_text()
    with gzip.open(folder / "sample.jsonl.gz", "rt") as handle:
        rows = [json.loads(line) for line in handle]
    assert len(rows) == 1156 and all({"chosen", "rejected"} <= row.keys() for row in rows)
    profile = yaml.safe_load((REPO / "configs" / "hh-harmless-cpu.yaml").read_text())
    assert profile["data"]["source"] == SHIPPED


def test_the_data_stage_reads_the_shipped_rows_by_a_relative_path(real_run):
    _, paths, manifest, _ = real_run
    assert manifest["source"] == SHIPPED and manifest["rows_read"]["train"] == 1156
    dropped = sum(manifest["dropped"]["train"].values())
    assert dropped > 0 and manifest["rows_usable"]["train"] + dropped == 1156  # every row accounted for
    assert set(manifest["prompt_overlap"].values()) == {0}


def test_the_evaluation_of_real_prompts_has_no_gold_judge_and_no_nan(real_run):
    _, paths, _, metrics = real_run
    generations = pd.read_csv(paths.eval / "generations.csv")
    assert generations["gold"].isna().all()  # for every policy alike: real prompts are not the judge's
    assert sorted(generations["policy"].unique()) == ["base", "ppo", "sft"]
    assert not (paths.eval / "gold_by_category.csv").exists()
    summary = pd.read_csv(paths.eval / "summary.csv")
    assert not [c for c in summary.columns if c.startswith("gold")]
    assert not summary.isna().any().any()
    winrate = pd.read_csv(paths.eval / "winrate.csv")
    assert list(winrate["judge"]) == ["reward_model"] and not winrate.isna().any().any()
    assert not [k for k in metrics if "gold" in k]
    written = json.loads(paths.stage_metrics("eval").read_text())
    assert all(isinstance(v, (int, float, str)) and not (isinstance(v, float) and math.isnan(v))
               for v in written.values())


def test_figures_and_paper_on_real_results_say_what_is_measured(real_run, tmp_path):
    from qlora_rlhf.stages import figures, paper

    config, paths, _, _ = real_run
    out = tmp_path / "figures"
    out.mkdir()
    figures.make_figures(paths.metrics, paths.eval, out, config)
    params = config.model_dump(mode="json", exclude={"eval"})
    book = tmp_path / "paper"
    book.mkdir()
    macros = paper.write_paper(book, paths.metrics, paths.eval, out, params, pdf=False)
    assert all(not m.name.startswith(("ResGold", "ResEvalPpoGold")) for m in macros.values())
    summary = (book / "tables" / "summary.tex").read_text()
    assert "Gold" not in summary and "--" not in "".join(macros[m].value for m in paper.MACRO_USE.findall(summary))
    assert (book / "tables" / "gold_by_category.tex").read_text() == ""  # no empty table
    comparison = (book / "text" / "comparison.tex").read_text()
    assert "no gold judge" in comparison and "reward model" in comparison
    rm_text = (book / "text" / "rm.tex").read_text()
    assert "RewardBench" in rm_text and r"\ResRmAccuracyCiLow" in rm_text
    low, high = float(macros["ResRmAccuracyCiLow"].value), float(macros["ResRmAccuracyCiHigh"].value)
    assert 0 <= low <= float(macros["ResRmAccuracy"].value) <= high <= 1
    metrics_sft = json.loads(paths.stage_metrics("sft").read_text())
    assert macros["ResSftComputeDtype"].value == metrics_sft.get("compute_dtype", config.model.compute_dtype)
    assert r"\ResSftComputeDtype" in (book / "tables" / "setup.tex").read_text()


def test_an_evaluation_killed_after_one_policy_keeps_its_rollouts_and_reuses_them(real_run, monkeypatch):
    from qlora_rlhf.stages import evaluate

    config, paths, _, _ = real_run
    before = pd.read_csv(paths.eval / "generations.csv")
    saved = paths.checkpoints("evaluate")
    for old in saved.glob("*.jsonl"):
        old.unlink()
    real_generate, calls = evaluate.generate, []

    def failing(name, *args):
        calls.append(name)
        if name == "sft":
            raise KeyboardInterrupt  # a kill while the second policy generates
        return real_generate(name, *args)

    monkeypatch.setattr(evaluate, "generate", failing)
    with pytest.raises(KeyboardInterrupt):
        evaluate.run(config, paths)
    assert calls == ["base", "sft"] and (saved / "base.jsonl").is_file() and not (saved / "sft.jsonl").exists()

    calls.clear()
    monkeypatch.setattr(evaluate, "generate", lambda name, *args: calls.append(name) or real_generate(name, *args))
    evaluate.run(config, paths)
    assert calls == ["sft", "ppo"]  # base's rollouts were read back, not generated again
    pd.testing.assert_frame_equal(pd.read_csv(paths.eval / "generations.csv"), before)

    calls.clear()  # a table-only param keeps the rollouts; one the rollouts depend on starts over
    evaluate.run(config.model_copy(update={"eval": config.eval.model_copy(update={"bootstrap_samples": 50})}), paths)
    assert calls == []
    evaluate.run(config.model_copy(update={"eval": config.eval.model_copy(update={"max_new_tokens": 4})}), paths)
    assert calls == ["base", "sft", "ppo"]


def test_best_of_n_on_real_prompts_reports_the_reward_model_only(real_run, tmp_path):
    """No gold judge: best-of-n's table, metrics, figure and paragraph carry the reward model's score only."""
    from qlora_rlhf.stages import best_of_n, figures, paper

    config, paths, _, _ = real_run
    metrics = best_of_n.run(config, paths)
    table = pd.read_csv(paths.best_of_n / best_of_n.TABLE)
    assert table["n"].tolist() == config.best_of_n.ns and not table.isna().any().any()
    assert not [c for c in table.columns if "gold" in c] and not [k for k in metrics if "gold" in k]
    out = tmp_path / "figures"
    out.mkdir()
    figures.make_figures(paths.metrics, paths.eval, out, config, best_of_n=paths.best_of_n)
    assert (out / "best_of_n.png").stat().st_size > 1000
    book = tmp_path / "paper"
    book.mkdir()
    params = config.model_dump(mode="json", exclude={"eval", "best_of_n"})
    macros = paper.write_paper(book, paths.metrics, paths.eval, out, params, pdf=False, best_of_n=paths.best_of_n)
    text = (book / "text" / "best_of_n.tex").read_text()
    assert "fig:bestofn" in text and "gold" not in text.lower() and "ResBestOfNAtPpoKlGoldGap" not in macros
