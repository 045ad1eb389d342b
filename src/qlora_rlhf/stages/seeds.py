"""The seed study's report (`dvc repro seeds`): PPO against SFT with every PPO seed, the run of
run.seed first and then each of seeds.ppo, all on the same data, SFT and reward model, and all
compared with the one evaluation of SFT (results/<run>/eval). Writes results/<run>/seed_study/:

- seeds.csv       one row per seed: SFT's and PPO's mean gold and reward-model scores, PPO's gain over
                  SFT with a paired bootstrap interval over prompts, win rates, KL to SFT
- metrics/seeds.json  across seeds: the mean gain with a 95 % t interval over seeds, and how many
                  seeds' own interval excludes 0 (outside the folder: DVC's metrics)
- seeds.png/.pdf  the figure: each seed's gain with its interval, and the across-seed mean
- best_of_n.png/.pdf  every seed's PPO on best-of-n's frontier from SFT (figures.save_best_of_n)
- held_out_curves.csv/.png/.pdf  every seed's held-out curve during PPO and their mean over seeds
- paper/          the run's paper with a section built from them (paper.pdf); its numbers are macros,
                  added to the copy's macros.tex as the paper stage names them (`seed_macros`)

A bootstrap interval over prompts measures evaluation noise within one PPO run; the interval over
seeds measures how much PPO's outcome varies between runs, which the claim is about."""

from __future__ import annotations

import math
import shutil
import warnings
from pathlib import Path

import numpy as np
import pandas as pd

from ..atomic import atomic_dir, write_json
from ..config import Config
from ..errors import PaperError
from ..paths import RunPaths
from ..stats import bootstrap_ci, win_rate
from .paper import GENERATED_MACRO_USE, Macro, build_pdf, camel, fmt, latexmk_path

JUDGES = {"gold": "gold judge", "reward": "reward model"}
# Two-sided 95 % quantiles of Student's t by degrees of freedom (no scipy in the stack); 1.96 beyond.
T_975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228,
         12: 2.179, 15: 2.131, 20: 2.086, 30: 2.042}


def t_quantile(df: int) -> float:
    return T_975[max(k for k in T_975 if k <= df)] if df < 60 else 1.96


def interval_over_seeds(values: np.ndarray) -> tuple[float, float]:
    """95 % t interval of the mean over seeds (NaN with fewer than two)."""
    if len(values) < 2:
        return math.nan, math.nan
    half = t_quantile(len(values) - 1) * values.std(ddof=1) / math.sqrt(len(values))
    return float(values.mean() - half), float(values.mean() + half)


def seed_row(seed: int, sft: pd.DataFrame, ppo: pd.DataFrame, samples: int) -> dict:
    """PPO (one seed's generations) against SFT, prompt by prompt: both are in the evaluation's order."""
    if list(sft["prompt"]) != list(ppo["prompt"]):
        raise PaperError(f"seed {seed}: its evaluation covers other prompts than SFT's; re-run `dvc repro seeds`")
    row: dict = {"seed": seed, "kl_to_sft": float(ppo["kl_to_sft"].mean()),
                 "eos_fraction": float(ppo["ends_with_eos"].astype(bool).mean())}
    for judge in JUDGES:
        a, b = sft[judge].astype(float).to_numpy(), ppo[judge].astype(float).to_numpy()
        keep = ~(np.isnan(a) | np.isnan(b))
        if not keep.any():  # real prompts: no gold judge
            continue
        diff = b[keep] - a[keep]
        low, high = bootstrap_ci(diff, samples, seed)  # paired: over per-prompt differences
        row |= {f"sft_{judge}": float(a[keep].mean()), f"ppo_{judge}": float(b[keep].mean()),
                f"{judge}_gain": float(diff.mean()), f"{judge}_gain_ci_low": low, f"{judge}_gain_ci_high": high,
                f"winrate_{judge}": win_rate(b[keep], a[keep])}
    return row


def ppo_point(seed: int, ppo: pd.DataFrame, samples: int) -> dict:
    """One seed's PPO as a point of the best-of-n figure: mean scores with 95 % bootstrap intervals over
    prompts (as its evaluation's summary.csv has them) at its mean sampled KL to SFT."""
    point: dict = {"label": f"PPO seed {seed}", "kl_to_sft": float(ppo["kl_to_sft"].mean())}
    for judge in JUDGES:
        values = ppo[judge].astype(float).dropna().to_numpy()
        if len(values):
            low, high = bootstrap_ci(values, samples, seed)
            point |= {f"{judge}_mean": float(values.mean()), f"{judge}_ci_low": low, f"{judge}_ci_high": high}
    return point


def across_seeds(table: pd.DataFrame) -> dict:
    summary: dict = {"seeds": len(table)}
    for judge in JUDGES:
        if f"{judge}_gain" not in table:
            continue
        gains = table[f"{judge}_gain"].to_numpy()
        low, high = interval_over_seeds(gains)
        summary |= {f"{judge}_gain_mean": float(gains.mean()), f"{judge}_gain_ci_low": low,
                    f"{judge}_gain_ci_high": high,
                    f"{judge}_seeds_above_zero": int((table[f"{judge}_gain_ci_low"] > 0).sum()),
                    f"{judge}_seeds_below_zero": int((table[f"{judge}_gain_ci_high"] < 0).sum()),
                    f"{judge}_seeds_excluding_zero": int(((table[f"{judge}_gain_ci_low"] > 0)
                                                          | (table[f"{judge}_gain_ci_high"] < 0)).sum())}
    # the worst seed against issue 32's targets: KL to SFT at most 0.4 nats, EOS share at least 0.9, in every seed
    summary |= {"kl_to_sft_mean": float(table["kl_to_sft"].mean()), "kl_to_sft_max": float(table["kl_to_sft"].max()),
                "eos_fraction_min": float(table["eos_fraction"].min())}
    return summary


def policy_rows(eval_dir: Path, policy: str) -> pd.DataFrame:
    path = eval_dir / "generations.csv"
    if not path.is_file():
        raise PaperError(f"{path} is missing; run `dvc repro seeds` (it evaluates every seed first)")
    frame = pd.read_csv(path)
    return frame[frame["policy"] == policy].reset_index(drop=True)


def draw(table: pd.DataFrame, summary: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import seaborn as sns

    from .figures import save_figure

    judges = [j for j in JUDGES if f"{j}_gain" in table]
    sns.set_theme(style="whitegrid", context="paper")
    fig, axes = plt.subplots(1, len(judges), figsize=(3.5 * len(judges), 2.6), squeeze=False)
    for ax, judge in zip(axes[0], judges):
        x = np.arange(len(table))
        gain = table[f"{judge}_gain"].to_numpy()
        err = np.vstack([gain - table[f"{judge}_gain_ci_low"], table[f"{judge}_gain_ci_high"] - gain])
        ax.axhline(0.0, color="black", linewidth=0.8)
        low, high = summary[f"{judge}_gain_ci_low"], summary[f"{judge}_gain_ci_high"]
        if not math.isnan(low):
            ax.axhspan(low, high, color="#d62728", alpha=0.15, label="mean, 95 % over seeds")
        ax.axhline(summary[f"{judge}_gain_mean"], color="#d62728", linewidth=1.2)
        ax.errorbar(x, gain, yerr=err, fmt="o", color="#1f77b4", capsize=3, label="seed, 95 % over prompts")
        ax.set_xticks(x, [str(s) for s in table["seed"]])
        ax.set_xlabel("PPO seed")
        ax.set_ylabel(f"PPO − SFT, {JUDGES[judge]}")
    axes[0][0].legend(fontsize=7, loc="best")
    fig.tight_layout()
    for suffix in ("png", "pdf"):
        save_figure(fig, out / f"seeds.{suffix}", dpi=200)
    plt.close(fig)


CURVES = {"held_out_gold_mean": "gold score", "held_out_reward_mean": "RM score (logit)",
          "held_out_kl_to_sft": "KL to SFT (nats)"}


def held_out_curves(histories: dict[int, pd.DataFrame]) -> pd.DataFrame:
    """Every seed's held-out curve (ppo.py's HeldOutCurve) in one long table: seed, step, and CURVES'
    columns that the run measured; empty when no seed has a curve (ppo.eval_every 0)."""
    frames = [history.dropna(subset=["held_out_reward_mean"]).assign(seed=seed)
              for seed, history in histories.items() if "held_out_reward_mean" in history]
    if not frames:
        return pd.DataFrame()
    curves = pd.concat(frames, ignore_index=True)
    return curves[["seed", "step", *[c for c in CURVES if c in curves and curves[c].notna().any()]]]


def draw_curves(curves: pd.DataFrame, out: Path) -> None:
    """The held-out curves of every seed (thin) and their mean over seeds with a 95 % t interval (band)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import seaborn as sns

    from .figures import save_figure

    columns = [c for c in CURVES if c in curves]
    sns.set_theme(style="whitegrid", context="paper")
    fig, axes = plt.subplots(1, len(columns), figsize=(3.2 * len(columns), 2.6), squeeze=False)
    for ax, column in zip(axes[0], columns, strict=True):
        for _, seed in curves.groupby("seed"):
            ax.plot(seed["step"], seed[column], color="#1f77b4", alpha=0.35, linewidth=0.8)
        by_step = curves.groupby("step")[column]
        steps, mean = np.array(sorted(by_step.groups)), by_step.mean().to_numpy()
        bands = np.array([interval_over_seeds(by_step.get_group(step).to_numpy()) for step in steps])
        ax.fill_between(steps, bands[:, 0], bands[:, 1], color="#d62728", alpha=0.15, linewidth=0)
        ax.plot(steps, mean, color="#d62728", marker="o", markersize=2.5, label="mean, 95 % over seeds")
        ax.set(xlabel="PPO step", ylabel=CURVES[column])
    axes[0][0].legend(fontsize=7, loc="best")
    fig.suptitle("PPO on held-out prompts, every seed")
    fig.tight_layout()
    for suffix in ("png", "pdf"):
        save_figure(fig, out / f"held_out_curves.{suffix}", dpi=200)
    plt.close(fig)


# ------------------------------------------------------------------ the paper's section
def seed_macros(table: pd.DataFrame, summary: dict) -> dict[str, Macro]:
    """The seed study's numbers as macros, named as the paper stage names its own: `ResSeeds` + key for
    metrics/seeds.json (\\ResSeedsGoldGainMean), `ResSeed` + seed + column for a row of seeds.csv
    (\\ResSeedOneGoldGain). Gains and scores with three decimals, so that a column lines up, win rates
    and KL with two, counts as integers."""
    macros = {}
    for key, value in summary.items():
        macros[_summary_macro(key)] = (value, key, f"metrics/seeds.json:{key}")
    for row in table.to_dict("records"):
        for column, value in row.items():
            if column != "seed":
                source = f"seed_study/seeds.csv:{row['seed']}.{column}"
                macros[_seed_macro(row["seed"], column)] = (value, column, source)
    return {name: Macro(name, fmt(value, _digits(key, value)), source) for name, (value, key, source) in macros.items()}


def _summary_macro(key: str) -> str:
    return f"ResSeeds{camel(key)}"


def _seed_macro(seed: int, column: str) -> str:
    return f"ResSeed{camel(str(seed))}{camel(column)}"


def _digits(key: str, value) -> int | None:
    if isinstance(value, (int, np.integer)) and not isinstance(value, bool):
        return None  # a count
    return 2 if key.startswith(("winrate", "kl_to_sft")) else 3


def latex_table(table: pd.DataFrame) -> str:
    judges = [j for j in JUDGES if f"{j}_gain" in table]
    groups = " & ".join(f"\\multicolumn{{4}}{{c}}{{{JUDGES[j].capitalize()}}}" for j in judges)
    rules = "".join(f"\\cmidrule(lr){{{2 + 4 * i}-{5 + 4 * i}}}" for i in range(len(judges)))
    head = ["Seed"] + ["SFT", "PPO", "gain [95\\%]", "win"] * len(judges) + ["KL"]
    lines = [r"\begin{table*}[ht]", r"  \centering\small",
             r"  \caption{PPO against SFT with each PPO seed (same data, SFT and reward model; SFT evaluated once). "
             r"Gain intervals: paired bootstrap over prompts. Last row: mean over seeds with its 95\% $t$ interval.}",
             r"  \label{tab:seeds}", r"  \resizebox{\textwidth}{!}{%",
             r"  \begin{tabular}{@{}l" + "rrrr" * len(judges) + r"r@{}}", r"    \toprule",
             f"    & {groups} & \\\\ {rules}", "    " + " & ".join(head) + r" \\", r"    \midrule"]
    for seed in table["seed"]:
        cells = [str(seed)]
        for j in judges:
            gain, low, high = (_cell(seed, f"{j}_gain{end}") for end in ("", "_ci_low", "_ci_high"))
            cells += [_cell(seed, f"sft_{j}"), _cell(seed, f"ppo_{j}"), f"{gain} [{low}, {high}]",
                      _cell(seed, f"winrate_{j}")]
        lines.append("    " + " & ".join(cells + [_cell(seed, "kl_to_sft")]) + r" \\")
    cells = ["Mean"]
    for j in judges:
        cells += ["", "", f"{_use(f'{j}_gain_mean')} [{_use(f'{j}_gain_ci_low')}, {_use(f'{j}_gain_ci_high')}]", ""]
    lines += [r"    \midrule", "    " + " & ".join(cells + [_use("kl_to_sft_mean")]) + r" \\",
              r"    \bottomrule", r"  \end{tabular}}", r"\end{table*}", ""]
    return "\n".join(lines)


def _cell(seed: int, column: str) -> str:
    return "\\" + _seed_macro(seed, column)


def _use(key: str) -> str:
    """A summary number in the text: its macro, with {} so that a following space survives."""
    return "\\" + _summary_macro(key) + "{}"


def section_text(summary: dict) -> str:
    """The paper's section on the seed study; every number is a macro of `seed_macros`."""
    parts = [r"\subsection{Across PPO seeds}", "",
             f"PPO was run with {_use('seeds')} seeds on the same data, SFT model and reward model, and each policy "
             r"was evaluated on the same held-out prompts against the one evaluation of SFT (Table~\ref{tab:seeds}, "
             r"Figure~\ref{fig:seeds}). A seed's interval is a paired bootstrap over prompts and measures evaluation "
             r"noise within that run; the interval over seeds measures how much PPO's outcome varies between runs."]
    for judge, name in JUDGES.items():
        if f"{judge}_gain_mean" not in summary:
            continue
        parts.append(
            f"Under the {name}, PPO's mean gain over SFT is {_use(f'{judge}_gain_mean')} "
            f"(95\\% interval over seeds {_use(f'{judge}_gain_ci_low')} to "
            f"{_use(f'{judge}_gain_ci_high')}); the interval of {_use(f'{judge}_seeds_above_zero')} of "
            f"{_use('seeds')} seeds lies above zero and that of {_use(f'{judge}_seeds_below_zero')} below it.")
    if "gold_gain_mean" not in summary:
        parts.append("There is no gold judge for these prompts: a gain under the reward model shows that PPO "
                     "optimised the reward model, not that its responses are better.")
    parts += ["", r"\begin{figure}[ht]", r"  \centering", r"  \includegraphics[width=\linewidth]{figures/seeds.pdf}",
              r"  \caption{PPO's gain over SFT with each seed (95\% paired bootstrap over prompts) and the mean over "
              r"seeds (line) with its 95\% interval (band).}", r"  \label{fig:seeds}", r"\end{figure}", "",
              r"\input{tables/seeds}", ""]
    return "\n".join(parts)


def add_to_paper(paper: Path, table: pd.DataFrame, summary: dict) -> None:
    """The section, its table and its macros in a copy of the run's paper (macros.tex gains the seed
    study's, each with its source, as the paper stage writes its own)."""
    macros = seed_macros(table, summary)
    section, latex = section_text(summary), latex_table(table)
    undefined = sorted(set(GENERATED_MACRO_USE.findall(section + latex)) - set(macros))
    if undefined:
        raise PaperError("the seed study's section uses macros it does not define: " + ", ".join(undefined))
    existing = (paper / "macros.tex").read_text()
    clash = sorted(name for name in macros if f"\\newcommand{{\\{name}}}" in existing)
    if clash:
        raise PaperError("the seed study's macros are defined by the paper already: " + ", ".join(clash))
    lines = [f"\\newcommand{{\\{name}}}{{{macros[name].value}}} % {macros[name].source}" for name in sorted(macros)]
    (paper / "macros.tex").write_text(existing + "\n% The seed study's (qlora-rlhf seeds)\n" + "\n".join(lines) + "\n")
    (paper / "tables" / "seeds.tex").write_text(latex)
    (paper / "text" / "seeds.tex").write_text(section)


def run(config: Config, paths: RunPaths) -> dict:
    from .figures import save_best_of_n

    latexmk_path()  # fail before any work when the toolchain is missing
    seeds = [config.run.seed, *config.seeds.ppo]
    sft = policy_rows(paths.eval, "sft")
    ppo_of = {seed: policy_rows(RunPaths.of(config, seed).eval, "ppo") for seed in seeds}
    rows = [seed_row(seed, sft, ppo_of[seed], config.eval.bootstrap_samples) for seed in seeds]
    table = pd.DataFrame(rows)
    summary = across_seeds(table)
    if not (paths.paper / "paper.tex").is_file():
        raise PaperError(f"{paths.paper} is missing: run the paper stage first")
    with atomic_dir(paths.seed_study) as out:
        table.to_csv(out / "seeds.csv", index=False)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # tight_layout's notes on small figures
            draw(table, summary, out)
        save_best_of_n(paths.best_of_n, [ppo_point(seed, ppo_of[seed], config.eval.bootstrap_samples)
                                         for seed in seeds], out, config)
        curves = held_out_curves({seed: pd.read_csv(RunPaths.of(config, seed).metrics / "ppo_history.csv")
                                  for seed in seeds})
        if len(curves):
            curves.to_csv(out / "held_out_curves.csv", index=False)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", UserWarning)
                draw_curves(curves, out)
        paper = out / "paper"
        shutil.copytree(paths.paper, paper)
        (paper / "paper.pdf").unlink(missing_ok=True)
        shutil.copy2(out / "seeds.pdf", paper / "figures" / "seeds.pdf")
        add_to_paper(paper, table, summary)
        build_pdf(paper)
    write_json(paths.stage_metrics("seeds"), {k: (None if isinstance(v, float) and math.isnan(v) else v)
                                              for k, v in summary.items()})
    columns = [c for c in ("seed", "sft_gold", "ppo_gold", "gold_gain", "sft_reward", "ppo_reward", "reward_gain",
                           "kl_to_sft") if c in table]
    print(table[columns].to_string(index=False, float_format=lambda v: f"{v:.3f}"))
    print(f"seeds: wrote {paths.seed_study}")
    return summary
