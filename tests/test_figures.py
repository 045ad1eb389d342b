"""The figures stage on fake contract files (no models): every figure appears as PNG and PDF."""

from __future__ import annotations

import csv
import json
import math
import random
from pathlib import Path

import pytest

HELD_OUT = ["held_out_reward_mean", "held_out_reward_ci_low", "held_out_reward_ci_high", "held_out_gold_mean",
            "held_out_gold_ci_low", "held_out_gold_ci_high", "held_out_kl_to_sft", "held_out_kl_ci_low",
            "held_out_kl_ci_high"]


def _held_out_point(step: int) -> list[float]:
    """PPO's held-out curve at `step` (ppo.py's HeldOutCurve), in HELD_OUT's order."""
    reward, gold, kl = 2 + step / 3, 0.42 + step / 60, step / 40
    return [reward, reward - 0.3, reward + 0.3, gold, gold - 0.04, gold + 0.04, kl, kl * 0.8, kl * 1.2]


def write_fake_results(root: Path, held_out: bool = True) -> Path:
    """A results/<run>/ folder with every file the figures and paper stages read, shaped as the
    upstream stages' contract says (history CSVs, metrics JSON, eval tables). Returns `root`. With
    `held_out`, PPO's history has its held-out curve (steps 0, 4, 8, 12) and ppo.json its ends."""
    rng = random.Random(0)
    metrics, eval_dir = root / "metrics", root / "eval"
    metrics.mkdir(parents=True)
    eval_dir.mkdir(parents=True)

    def write_csv(path: Path, header: list[str], rows: list[list]) -> None:
        with path.open("w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(header)
            writer.writerows(rows)

    write_csv(metrics / "sft_history.csv", ["step", "loss"],
              [[s, 2.5 * math.exp(-s / 20) + 1.2] for s in range(2, 41, 2)])
    write_csv(metrics / "rm_history.csv", ["step", "loss", "accuracy"],
              [[s, 0.69 - s / 200, "" if s % 10 else 0.5 + s / 300] for s in range(2, 61, 2)])
    steps = [[s, 2 + s / 2 + rng.gauss(0, 0.2), 0.05 + s / 50, 1.5 - s / 40, 0.1, 0.5 / s, 20 + s, 0.8, -0.01 * s,
              0.05 * 1.02 ** s] for s in range(1, 13)]
    header = ["step", "reward_mean", "kl", "entropy", "clip_fraction", "value_loss", "response_length",
              "eos_fraction", "policy_loss", "kl_coef"]
    if held_out:
        steps = [[0] + [""] * (len(header) - 1)] + steps
        steps = [row + (_held_out_point(row[0]) if row[0] % 4 == 0 else [""] * len(HELD_OUT)) for row in steps]
    write_csv(metrics / "ppo_history.csv", header + (HELD_OUT if held_out else []), steps)
    json.dump({"perplexity_base": 12.04, "perplexity_sft": 3.41, "train_loss_first": 2.5, "train_loss_last": 1.2,
               "steps": 40}, (metrics / "sft.json").open("w"))
    json.dump({"accuracy": 0.72, "margin_mean": 0.83, "train_loss_first": 0.69, "train_loss_last": 0.35,
               "steps": 60}, (metrics / "rm.json").open("w"))
    ends = {f"{key}_{end}": value for end, step in (("first", 0), ("last", 12))
            for key, value in zip(HELD_OUT, _held_out_point(step), strict=True)}
    json.dump({"reward_mean_first": 2.0, "reward_mean_last": 8.0, "kl_last": 0.25, "kl_coef_last": 0.063, "steps": 12}
              | (ends | {"held_out_points": 4} if held_out else {}), (metrics / "ppo.json").open("w"))
    json.dump({"sft_perplexity": 3.41, "base_perplexity": 12.04, "rm_accuracy": 0.72, "rm_margin_mean": 0.83,
               "ppo_reward_mean": 7.5, "sft_reward_mean": 2.1, "base_reward_mean": -0.4, "ppo_gold_mean": 0.61,
               "sft_gold_mean": 0.42, "winrate_rm": 0.81, "winrate_gold": 0.64, "ppo_kl_to_sft": 0.27},
              (metrics / "eval.json").open("w"))
    write_csv(eval_dir / "summary.csv",
              ["policy", "reward_mean", "reward_ci_low", "reward_ci_high", "gold_mean", "gold_ci_low",
               "gold_ci_high", "kl_to_sft", "response_length", "eos_fraction"],
              [["base", -0.4, -0.6, -0.2, 0.3, 0.25, 0.35, 1.8, 31.0, 0.4],
               ["sft", 2.1, 1.9, 2.3, 0.42, 0.38, 0.46, 0.0, 24.5, 0.9],
               ["ppo", 7.5, 7.1, 7.9, 0.61, 0.57, 0.65, 0.27, 22.0, 0.95]])
    write_csv(eval_dir / "winrate.csv", ["judge", "win_rate", "ci_low", "ci_high"],
              [["reward_model", 0.81, 0.72, 0.89], ["gold", 0.64, 0.55, 0.73]])
    rows = []
    for i in range(16):
        prompt = f"\n\nHuman: question #{i} about 50% of $x_1 & {{y}}?\n\nAssistant:"
        for policy, shift in (("base", -0.4), ("sft", 2.1), ("ppo", 7.5)):
            rows.append([policy, prompt, "word " * rng.randint(3, 30) + "caf\u00e9 \u2014 done_",
                         shift + rng.gauss(0, 1), 0.4 + shift / 20 + rng.gauss(0, 0.1)])
    write_csv(eval_dir / "generations.csv", ["policy", "prompt", "response", "reward", "gold"], rows)
    write_csv(eval_dir / "gold_by_category.csv", ["category", "base", "sft", "ppo", "prompts"],
              [["arithmetic", 0.05, 0.41, 0.39, 56], ["harmful", 0.02, 0.39, 0.98, 49]])
    write_csv(eval_dir / "rm_pairs.csv", ["margin", "correct"],
              [[m, int(m > 0)] for m in (rng.gauss(0.8, 1.0) for _ in range(64))])
    (root / "best_of_n").mkdir()
    kl = [math.log(n) - (n - 1) / n for n in (1, 2, 4, 8, 16)]
    write_csv(root / "best_of_n" / "best_of_n.csv",
              ["n", "kl", "sqrt_kl", "reward_mean", "reward_ci_low", "reward_ci_high", "gold_mean", "gold_ci_low",
               "gold_ci_high", "response_length", "eos_fraction", "prompts"],
              [[n, k, math.sqrt(k), 2.1 + k, 1.9 + k, 2.3 + k, 0.42 + k / 10, 0.38 + k / 10, 0.46 + k / 10, 24.0, 0.9,
                64]
               for n, k in zip((1, 2, 4, 8, 16), kl)])
    return root


@pytest.mark.parametrize("held_out", [True, False])
def test_figures_written_as_png_and_pdf(tmp_path, held_out):
    """With PPO's held-out curve (the timeline's fourth panel, Gao et al.'s axes), and without (ppo.eval_every 0)."""
    from qlora_rlhf.stages.figures import FIGURES, make_figures

    results = write_fake_results(tmp_path / "run", held_out=held_out)
    out = tmp_path / "figures"
    out.mkdir()
    written = make_figures(results / "metrics", results / "eval", out)
    expected = {f"{name}.{ext}" for name in FIGURES for ext in ("png", "pdf")}
    assert {p.name for p in written} == expected
    assert {p.name for p in out.iterdir()} == expected
    for path in written:
        assert path.stat().st_size > 1000, path
    assert (out / "timeline.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (out / "timeline.pdf").read_bytes()[:5] == b"%PDF-"


def test_run_writes_atomically_into_results(tmp_path, monkeypatch):
    from qlora_rlhf.paths import RunPaths
    from qlora_rlhf.stages import figures

    paths = RunPaths(tmp_path / "run")
    write_fake_results(paths.root)
    (paths.eval / "rm_pairs.csv").unlink()
    with pytest.raises(figures.FiguresError, match="rm_pairs.csv is missing"):
        figures.run(None, paths)
    assert not paths.figures.exists()
    assert not [p for p in paths.root.iterdir() if p.name.startswith(".figures")]


@pytest.mark.parametrize("gold", [True, False])
def test_best_of_n_figure_puts_ppo_on_the_frontiers_axes(tmp_path, gold):
    """The figures stage draws best-of-n's frontier with PPO's point (gold and RM panels, or only the
    RM's on real prompts); the seed study draws the same figure with one point per seed."""
    import pandas as pd

    from qlora_rlhf.stages.figures import BEST_OF_N, FIGURES, make_figures, save_best_of_n

    results = write_fake_results(tmp_path / "run")
    if not gold:
        table = pd.read_csv(results / "best_of_n" / "best_of_n.csv")
        table.drop(columns=["gold_mean", "gold_ci_low", "gold_ci_high"]).to_csv(results / "best_of_n" / "best_of_n.csv",
                                                                                index=False)
    out = tmp_path / "figures"
    out.mkdir()
    written = make_figures(results / "metrics", results / "eval", out, best_of_n=results / "best_of_n")
    assert {p.name for p in written} == {f"{n}.{e}" for n in [*FIGURES, BEST_OF_N] for e in ("png", "pdf")}
    assert (out / f"{BEST_OF_N}.png").read_bytes()[:4] == b"\x89PNG"
    seeds = tmp_path / "seeds"
    seeds.mkdir()
    points = [{"label": f"PPO seed {s}", "kl_to_sft": kl, "reward_mean": 2.5, "reward_ci_low": 2.0,
               "reward_ci_high": 3.0, "gold_mean": 0.5, "gold_ci_low": 0.4, "gold_ci_high": 0.6}
              for s, kl in ((0, 0.3), (1, -0.01))]  # a sampled KL a little below 0 is drawn at 0
    assert [p.name for p in save_best_of_n(results / "best_of_n", points, seeds)] == ["best_of_n.png", "best_of_n.pdf"]
    assert (seeds / "best_of_n.pdf").read_bytes()[:5] == b"%PDF-"
