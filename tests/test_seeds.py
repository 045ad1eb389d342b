"""The seed study's report: per-seed gains against the one SFT evaluation, the interval over seeds,
the count of seeds whose own interval excludes zero, the figure and the paper with its section."""

from __future__ import annotations

import json
import math
import re
import shutil

import numpy as np
import pandas as pd
import pytest

from qlora_rlhf.config import Config
from qlora_rlhf.errors import PaperError
from qlora_rlhf.paths import RunPaths
from qlora_rlhf.stages import paper, seeds

from conftest import smoke_params

PROMPTS = [f"\n\nHuman: question {i}?\n\nAssistant:" for i in range(40)]


def generations(policy: str, gold: np.ndarray | None, reward: np.ndarray, kl: float = 0.0) -> pd.DataFrame:
    return pd.DataFrame({"policy": policy, "prompt": PROMPTS, "response": "r", "reward": reward,
                         "gold": gold if gold is not None else np.nan, "kl_to_sft": kl, "ends_with_eos": True})


def write_eval(folder, *frames: pd.DataFrame) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    pd.concat(frames).to_csv(folder / "generations.csv", index=False)


def study(tmp_path, gains: dict[int, float], gold: bool = True) -> tuple[Config, RunPaths]:
    """A run whose SFT scores 0/1 gold and 1.0 reward, and whose PPO seeds gain by `gains` on both."""
    config = Config.model_validate(smoke_params("unused", tmp_path / "results", **{
        "run.seed": next(iter(gains)), "seeds.ppo": list(gains)[1:]}))
    paths = RunPaths.of(config)
    rng = np.random.default_rng(0)
    sft_gold = (rng.random(len(PROMPTS)) < 0.5).astype(float)
    sft = generations("sft", sft_gold if gold else None, np.ones(len(PROMPTS)))
    for seed, gain in gains.items():
        noise = rng.normal(0, 0.05, len(PROMPTS))
        ppo = generations("ppo", sft_gold + gain + noise if gold else None, 1.0 + gain + noise, kl=0.3)
        frames = (sft, ppo) if seed == config.run.seed else (ppo,)
        write_eval(RunPaths.of(config, seed).eval, *frames)
    return config, paths


def test_seed_paths_share_the_runs_stages(tmp_path):
    config, paths = study(tmp_path, {1234: 0.1, 1: 0.2})
    seed = RunPaths.of(config, 1)
    assert seed.root == paths.root / "seeds" / "1"
    assert (seed.sft, seed.rm, seed.data, seed.base_model) == (paths.sft, paths.rm, paths.data, paths.base_model)
    assert seed.ppo != paths.ppo and seed.eval != paths.eval and seed.checkpoints("ppo") != paths.checkpoints("ppo")
    assert RunPaths.of(config, config.run.seed) == paths and seed.main == paths and seed.seed_study == paths.seed_study


def test_per_seed_gains_and_the_interval_over_seeds(tmp_path):
    config, paths = study(tmp_path, {1234: 0.30, 1: 0.25, 2: -0.20, 3: 0.01})
    sft = seeds.policy_rows(paths.eval, "sft")
    table = pd.DataFrame([seeds.seed_row(s, sft, seeds.policy_rows(RunPaths.of(config, s).eval, "ppo"), 500)
                          for s in (1234, 1, 2, 3)])
    assert table["gold_gain"].to_numpy() == pytest.approx([0.30, 0.25, -0.20, 0.01], abs=0.03)
    assert table["reward_gain"].to_numpy() == pytest.approx(table["gold_gain"].to_numpy(), abs=1e-9)
    assert ((table["gold_gain_ci_low"] < table["gold_gain"]).all()
            and (table["gold_gain"] < table["gold_gain_ci_high"]).all())
    assert table.loc[0, "winrate_gold"] == 1.0 and table.loc[2, "winrate_gold"] == 0.0
    summary = seeds.across_seeds(table)
    gains = table["gold_gain"].to_numpy()
    half = 3.182 * gains.std(ddof=1) / 2  # t(0.975, 3 df) x standard error of 4 seeds
    assert summary["gold_gain_mean"] == pytest.approx(gains.mean())
    assert ((summary["gold_gain_ci_low"], summary["gold_gain_ci_high"])
            == pytest.approx((gains.mean() - half, gains.mean() + half)))
    assert (summary["gold_seeds_above_zero"], summary["gold_seeds_below_zero"]) == (2, 1)
    assert summary["gold_seeds_excluding_zero"] == 3 and summary["kl_to_sft_mean"] == pytest.approx(0.3)
    assert summary["kl_to_sft_max"] == table["kl_to_sft"].max()  # the worst seed against the KL target
    assert summary["eos_fraction_min"] == table["eos_fraction"].min()


def test_t_quantiles_and_a_single_seed():
    assert seeds.t_quantile(4) == 2.776 and seeds.t_quantile(11) == 2.228 and seeds.t_quantile(100) == 1.96
    assert all(math.isnan(v) for v in seeds.interval_over_seeds(np.array([0.3])))


def test_a_seed_evaluated_on_other_prompts_is_a_clear_error(tmp_path):
    config, paths = study(tmp_path, {1234: 0.1, 1: 0.2})
    other = seeds.policy_rows(RunPaths.of(config, 1).eval, "ppo").iloc[::-1].reset_index(drop=True)
    with pytest.raises(PaperError, match="other prompts"):
        seeds.seed_row(1, seeds.policy_rows(paths.eval, "sft"), other, 100)


def test_without_a_gold_judge_only_the_reward_model_is_reported(tmp_path):
    config, paths = study(tmp_path, {1234: 0.1, 1: 0.2, 2: 0.3}, gold=False)
    sft = seeds.policy_rows(paths.eval, "sft")
    table = pd.DataFrame([seeds.seed_row(s, sft, seeds.policy_rows(RunPaths.of(config, s).eval, "ppo"), 200)
                          for s in (1234, 1, 2)])
    assert "gold_gain" not in table and table["reward_gain"].notna().all()
    summary = seeds.across_seeds(table)
    text, latex = seeds.section_text(summary), seeds.latex_table(table)
    assert "no gold judge" in text and "gold judge" not in latex and "nan" not in (text + latex).lower()


@pytest.mark.skipif(shutil.which("latexmk") is None, reason="latexmk is not installed")
def test_run_writes_table_figure_metrics_and_the_paper_with_its_section(tmp_path):
    from test_figures import write_fake_results

    from qlora_rlhf.stages import figures

    config, paths = study(tmp_path, {1234: 0.3, 1: 0.2, 2: 0.25})
    eval_of_run = paths.eval / "generations.csv"
    kept = eval_of_run.read_text()
    shutil.rmtree(paths.eval)
    write_fake_results(paths.root)  # the run's metrics and tables for its paper
    eval_of_run.write_text(kept)
    for seed in (1, 2):  # each seed's PPO history, with its held-out curve (steps 0, 4, 8, 12)
        RunPaths.of(config, seed).metrics.mkdir(parents=True, exist_ok=True)
        shutil.copy(paths.metrics / "ppo_history.csv", RunPaths.of(config, seed).metrics / "ppo_history.csv")
    figures.run(config, paths)
    paper.run(config, paths)
    summary = seeds.run(config, paths)
    out = paths.seed_study
    curves = pd.read_csv(out / "held_out_curves.csv")
    assert curves.groupby("seed")["step"].apply(list).to_dict() == {s: [0, 4, 8, 12] for s in (1234, 1, 2)}
    assert (out / "held_out_curves.png").read_bytes()[:4] == b"\x89PNG"
    assert pd.read_csv(out / "seeds.csv")["seed"].tolist() == [1234, 1, 2]
    assert json.loads(paths.stage_metrics("seeds").read_text()) == pytest.approx(summary)
    assert summary["gold_seeds_above_zero"] == 3
    assert (out / "seeds.png").read_bytes()[:4] == b"\x89PNG"
    assert (out / "paper" / "paper.pdf").read_bytes()[:5] == b"%PDF-"
    assert r"\ResSeedsGoldGainMean" in (out / "paper" / "text" / "seeds.tex").read_text()
    assert r"\newcommand{\ResSeedsGoldGainMean}" in (out / "paper" / "macros.tex").read_text()
    assert "Across PPO seeds" in (out / "paper" / "text" / "seeds.tex").read_text()
    assert not (paths.paper / "text" / "seeds.tex").exists()  # the run's own paper stays single-seed


def test_a_seed_trains_its_own_ppo_and_reuses_the_runs_base_and_sft_evaluation(pipeline):
    """`ppo --seed N` and `evaluate --seed N` on the tiny pipeline: the seed's own folder, the run's
    data, SFT and RM, and the run's base and SFT generations, not new ones."""
    from qlora_rlhf.cli import with_seed
    from qlora_rlhf.stages import evaluate, ppo

    config, paths, _ = pipeline
    seed = config.seeds.ppo[0]
    seed_paths, seed_config = RunPaths.of(config, seed), with_seed(config, seed)
    ppo.run(seed_config, seed_paths)
    evaluate.run(seed_config, seed_paths)
    assert (seed_paths.ppo / "adapter").is_dir() and seed_paths.checkpoints("ppo").is_dir()
    run_gens = pd.read_csv(paths.eval / "generations.csv")
    seed_gens = pd.read_csv(seed_paths.eval / "generations.csv")
    for policy in ("base", "sft"):
        pd.testing.assert_frame_equal(run_gens[run_gens.policy == policy].reset_index(drop=True),
                                      seed_gens[seed_gens.policy == policy].reset_index(drop=True))
    assert not (seed_paths.checkpoints("evaluate") / "sft.jsonl").exists()  # read, not generated
    run_ppo, seed_ppo = run_gens[run_gens.policy == "ppo"], seed_gens[seed_gens.policy == "ppo"]
    assert run_ppo["prompt"].tolist() == seed_ppo["prompt"].tolist()
    assert run_ppo["response"].tolist() != seed_ppo["response"].tolist()  # another PPO run, other samples
    assert json.loads(seed_paths.stage_metrics("ppo").read_text())["steps"] == config.ppo.steps


def test_seed_table_numbers_carry_a_real_minus_sign():
    from qlora_rlhf.stages.paper import fmt

    assert fmt(-0.0271, 3) == r"\ensuremath{-}0.027" and fmt(0.066, 3) == "0.066"
    assert fmt(-0.0001, 3) == "0.000" and fmt(float("nan"), 3) == "--"


def test_the_seed_studys_numbers_are_macros(tmp_path):
    """As everywhere else in the paper: the section and the table name macros, and each macro carries
    the number and its source, in the paper stage's format (three decimals for gains, two for win
    rates and KL, counts as integers)."""
    config, paths = study(tmp_path, {1234: -0.0271, 1: 0.066})
    sft = seeds.policy_rows(paths.eval, "sft")
    table = pd.DataFrame([seeds.seed_row(s, sft, seeds.policy_rows(RunPaths.of(config, s).eval, "ppo"), 200)
                          for s in (1234, 1)])
    summary = seeds.across_seeds(table)
    macros = seeds.seed_macros(table, summary)
    text, latex = seeds.section_text(summary), seeds.latex_table(table)
    used = set(re.findall(r"\\(Res[A-Za-z]+)", text + latex))
    assert used and used <= set(macros)
    assert not re.search(r"\d\.\d", text + latex)  # no number typed in
    gain = macros["ResSeedOneTwoThreeFourGoldGain"]
    assert gain.value == paper.fmt(table.loc[0, "gold_gain"], 3)
    assert gain.source == "seed_study/seeds.csv:1234.gold_gain"
    assert macros["ResSeedOneWinrateGold"].value == paper.fmt(table.loc[1, "winrate_gold"], 2)
    assert macros["ResSeedsSeeds"].value == "2"
    assert macros["ResSeedsGoldGainMean"].source == "metrics/seeds.json:gold_gain_mean"
