"""The figures stage: seaborn PNG + PDF from the metrics and evaluation tables, written atomically
into results/<run>/figures. Reads only the contract files of the upstream stages:

- metrics/{sft,rm,ppo}_history.csv  per-step training curves (PPO's with its held-out curve, held_out_*)
- eval/generations.csv               per-response reward / gold score of base, SFT and PPO
- eval/rm_pairs.csv                  reward-model margin on held-out pairs
- eval/summary.csv, best_of_n/best_of_n.csv  PPO's scores and KL, and best-of-n's frontier from SFT
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pandas as pd

from ..atomic import atomic_dir
from ..config import Config
from ..paths import RunPaths
from ..stats import POLICIES, POLICY_LABELS
from .paper import PaperError

# One colour per stage / policy everywhere in the paper.
COLORS = {"base": "#7f7f7f", "sft": "#1f77b4", "rm": "#2ca02c", "ppo": "#d62728", "kl": "#9467bd"}
FULL_WIDTH = 7.0     # inches: a two-column paper's text width
HALF_WIDTH = 3.5

FIGURES = ["timeline", "reward_vs_kl", "reward_distributions", "rm_margins", "response_lengths", "ppo_diagnostics"]
BEST_OF_N = "best_of_n"  # drawn when make_figures gets the best_of_n stage's folder (the stage always passes it)


class FiguresError(PaperError):
    """An upstream result the figures need is missing or malformed."""


def _read_csv(path: Path, required: list[str]) -> pd.DataFrame:
    if not path.is_file():
        raise FiguresError(f"{path} is missing; run the stage that writes it first (dvc repro / snakemake)")
    frame = pd.read_csv(path)
    missing = [col for col in required if col not in frame.columns]
    if missing:
        raise FiguresError(f"{path}: missing column(s) {', '.join(missing)}")
    for col in frame.columns:
        if col not in {"policy", "prompt", "response", "judge"}:
            frame[col] = pd.to_numeric(frame[col], errors="coerce")
    return frame


def _series(frame: pd.DataFrame, column: str) -> pd.DataFrame:
    return frame[["step", column]].dropna()


# Figures are DVC outputs: the same plot must give the same bytes on every run. Matplotlib writes the
# current date into a PDF unless told not to (or SOURCE_DATE_EPOCH is set); a PNG gets no date, only
# the version of the pinned matplotlib.
SAVE_METADATA = {"pdf": {"CreationDate": None}, "png": {}}


def save_figure(fig, path: Path, **kwargs) -> None:
    """`fig.savefig` with no run-dependent bytes (no dates) in the file."""
    fig.savefig(path, metadata=SAVE_METADATA[Path(path).suffix.lstrip(".")], **kwargs)


def _save(fig, folder: Path, name: str) -> None:
    save_figure(fig, folder / f"{name}.png", dpi=200, bbox_inches="tight")
    save_figure(fig, folder / f"{name}.pdf", bbox_inches="tight")


def _timeline(plt, sft: pd.DataFrame, rm: pd.DataFrame, ppo: pd.DataFrame):
    """The three training stages side by side, in order, as in the design note's metrics timeline; with
    PPO's held-out curve (ppo.eval_every > 0), a fourth panel for its gold score and KL to SFT."""
    held_out = _held_out(ppo)
    gold = held_out is not None and _has(held_out, "held_out_gold_mean")
    panels = 4 if held_out is not None else 3
    fig, axes = plt.subplots(1, panels, figsize=(FULL_WIDTH * panels / 3, 2.6), constrained_layout=True)

    ax = axes[0]
    data = _series(sft, "loss")
    ax.plot(data["step"], data["loss"], color=COLORS["sft"], marker="o", markersize=2.5, label="train loss")
    ax.set(title="1. SFT", xlabel="optimizer step", ylabel="cross-entropy (nats / token)")

    ax = axes[1]
    data = _series(rm, "loss")
    ax.plot(data["step"], data["loss"], color=COLORS["rm"], marker="o", markersize=2.5, label="loss")
    ax.set(title="2. Reward model", xlabel="optimizer step", ylabel="pairwise loss (nats)")
    twin = _twin_line(ax, _series(rm, "accuracy"), "accuracy", "black", "accuracy", "pairwise accuracy")
    if twin is not None:
        twin.set_ylim(0, 1.02)
        twin.axhline(0.5, color="grey", linewidth=0.6, linestyle=":")

    ax = axes[2]
    data = _series(ppo, "reward_mean")
    ax.plot(data["step"], data["reward_mean"], color=COLORS["ppo"], marker="o", markersize=2, linewidth=0.6,
            alpha=0.35, label="batch mean")
    if "reward_running_mean" in ppo.columns:
        data = _series(ppo, "reward_running_mean")
        ax.plot(data["step"], data["reward_running_mean"], color=COLORS["ppo"], linewidth=1.2, label="running mean")
    if held_out is not None:
        _band(ax, held_out, "held_out_reward", "black", "held-out prompts")
    ax.set(title="3. PPO: reward model", xlabel="PPO step", ylabel="mean reward (RM score)")
    ax.legend(loc="best", fontsize="x-small")
    if held_out is None:
        _twin_line(ax, _series(ppo, "kl"), "kl", COLORS["kl"], "KL to SFT", "KL to SFT (nats)")
    else:
        ax = axes[3]
        if gold:
            _band(ax, held_out, "held_out_gold", "black", "gold score")
            ax.set(ylabel="gold score")
        ax.set(title="PPO on held-out prompts", xlabel="PPO step")
        twin = ax.twinx()
        _band(twin, held_out, "held_out_kl", COLORS["kl"], "KL to SFT", mean="held_out_kl_to_sft", linestyle="--")
        twin.set_ylabel("KL to SFT (nats)")
        twin.grid(False)
        _joint_legend(ax, twin)
    fig.suptitle("Training metrics timeline: SFT \u2192 reward model \u2192 PPO")
    return fig


def _held_out(ppo: pd.DataFrame) -> pd.DataFrame | None:
    """The held-out curve's points (ppo.py's HeldOutCurve), or None when the run measured none."""
    if "held_out_reward_mean" not in ppo.columns:
        return None
    points = ppo.dropna(subset=["held_out_reward_mean"])
    return points if len(points) else None


def _has(frame: pd.DataFrame, column: str) -> bool:
    """Whether `column` holds any value (a gold column exists only where the data has a gold judge)."""
    return column in frame.columns and bool(frame[column].notna().any())


def _band(ax, points: pd.DataFrame, prefix: str, color, label: str, mean: str | None = None, **line) -> None:
    """A held-out series: its means joined by a line, its 95 % intervals as a band."""
    mean = mean or f"{prefix}_mean"
    ax.fill_between(points["step"], points[f"{prefix}_ci_low"], points[f"{prefix}_ci_high"], color=color, alpha=0.15,
                    linewidth=0)
    ax.plot(points["step"], points[mean], color=color, marker="o", markersize=2.5, label=label, **line)


def _twin_line(ax, data: pd.DataFrame, column: str, color, label: str, ylabel: str):
    """A dashed second series on a right-hand axis, sharing one legend; None when there is no data."""
    if not len(data):
        return None
    twin = ax.twinx()
    twin.plot(data["step"], data[column], color=color, linestyle="--", marker="s", markersize=2.5, label=label)
    twin.set_ylabel(ylabel)
    twin.grid(False)
    _joint_legend(ax, twin)
    return twin


def _joint_legend(ax, twin) -> None:
    handles, labels = ax.get_legend_handles_labels()
    more, more_labels = twin.get_legend_handles_labels()
    twin.legend(handles + more, labels + more_labels, loc="best", frameon=True, fontsize="small")


def _reward_vs_kl(plt, ppo: pd.DataFrame, config: Config | None):
    """Gao et al. (2022)'s axes: score against sqrt(KL to SFT), one point per held-out measurement (its
    95 % intervals both ways), coloured by step: the reward model's score and, where the data has one,
    the gold judge's, side by side. Without a held-out curve: the per-step batch means."""
    held_out = _held_out(ppo)
    if held_out is None:
        data = ppo[["step", "kl", "reward_mean"]].dropna()
        judges = [(data.assign(x=np.sqrt(data["kl"].clip(lower=0))), "reward_mean", None, "mean reward (RM score)",
                   "PPO: batch reward vs KL to SFT")]
    else:
        x = np.sqrt(held_out["held_out_kl_to_sft"].clip(lower=0))
        judges = [(held_out.assign(x=x), "held_out_reward", "held_out_kl", "RM score (logit)",
                   "Reward model, held-out prompts")]
        if _has(held_out, "held_out_gold_mean"):
            judges.append((held_out.assign(x=x), "held_out_gold", "held_out_kl", "gold score",
                           "Gold judge, held-out prompts"))
    fig, axes = plt.subplots(1, len(judges), figsize=(FULL_WIDTH if len(judges) > 1 else HALF_WIDTH + 0.6, 2.8),
                             constrained_layout=True, squeeze=False)
    for ax, (data, column, kl, ylabel, title) in zip(axes[0], judges, strict=True):
        if config is not None:
            ax.axvspan(np.sqrt(config.ppo.kl_target_low), np.sqrt(config.ppo.kl_target_high), color=COLORS["kl"],
                       alpha=0.12,
                       label="target KL range" if config.ppo.kl_control == "adaptive" else "healthy KL range")
        y = data[column if kl is None else f"{column}_mean"]
        if kl is not None:
            root = np.sqrt(data[[f"{kl}_ci_low", f"{kl}_ci_high"]].clip(lower=0))
            ax.errorbar(data["x"], y, yerr=[y - data[f"{column}_ci_low"], data[f"{column}_ci_high"] - y],
                        xerr=[(data["x"] - root[f"{kl}_ci_low"]).clip(lower=0),
                              (root[f"{kl}_ci_high"] - data["x"]).clip(lower=0)],
                        fmt="none", ecolor="lightgrey", elinewidth=0.8, zorder=1)
        ax.plot(data["x"], y, color="lightgrey", linewidth=0.8, zorder=1)
        points = ax.scatter(data["x"], y, c=data["step"], cmap="viridis", s=14, zorder=2)
        ax.set(title=title, xlabel="$\\sqrt{\\mathrm{KL}}$ to SFT ($\\sqrt{\\mathrm{nats}}$)", ylabel=ylabel)
        if config is not None:
            ax.legend(loc="best", fontsize="x-small")
    fig.colorbar(points, ax=axes[0].tolist(), label="PPO step")
    return fig


def _reward_distributions(plt, sns, generations: pd.DataFrame):
    judges = [col for col in ("reward", "gold") if generations[col].notna().any()]
    fig, axes = plt.subplots(1, max(len(judges), 1), figsize=(FULL_WIDTH if len(judges) > 1 else HALF_WIDTH, 2.6),
                             constrained_layout=True, squeeze=False)
    titles = {"reward": ("Reward model", "RM score (logit)"), "gold": ("Gold judge", "gold score")}
    order = [p for p in POLICIES if p in set(generations["policy"])]
    for ax, judge in zip(axes[0], judges):
        data = generations[["policy", judge]].dropna()
        bins = np.histogram_bin_edges(data[judge], bins=20) if len(data) else 20   # shared by all policies
        stat = "probability" if judge == "gold" else "density"  # gold scores are 0/1: show shares, no smoothing
        for policy in order:
            values = data.loc[data["policy"] == policy, judge]
            label = f"{POLICY_LABELS[policy]} (mean {values.mean():.2f})"
            sns.histplot(values, ax=ax, color=COLORS[policy], label=label, stat=stat, element="step",
                         fill=True, alpha=0.25, bins=bins)
            if judge != "gold" and values.nunique() > 1:
                sns.kdeplot(values, ax=ax, color=COLORS[policy], linewidth=1.2, warn_singular=False)
        ax.set(title=f"{titles[judge][0]} scores of responses", xlabel=titles[judge][1],
               ylabel="share of responses" if judge == "gold" else "density")
        ax.legend(fontsize="small")
    fig.suptitle("Reward distributions on held-out prompts: base vs SFT vs PPO")
    return fig


def _rm_margins(plt, sns, pairs: pd.DataFrame):
    data = pairs[["margin", "correct"]].dropna().copy()
    data["outcome"] = data["correct"].astype(bool).map({True: "chosen ranked higher", False: "rejected ranked higher"})
    fig, ax = plt.subplots(figsize=(HALF_WIDTH + 0.6, 2.6), constrained_layout=True)
    sns.histplot(data, x="margin", hue="outcome", ax=ax, bins=30, element="step",
                 palette={"chosen ranked higher": COLORS["rm"], "rejected ranked higher": COLORS["ppo"]},
                 hue_order=["chosen ranked higher", "rejected ranked higher"])
    ax.axvline(0, color="black", linewidth=0.8)
    accuracy = data["correct"].astype(float).mean() if len(data) else float("nan")
    ax.set(title=f"Reward-model margins on held-out pairs (accuracy {accuracy:.2f})",
           xlabel="margin r(chosen) \u2212 r(rejected) (logit)", ylabel="pairs")
    ax.title.set_fontsize("medium")
    return fig


def _response_lengths(plt, sns, generations: pd.DataFrame, ppo: pd.DataFrame):
    data = generations[["policy", "response"]].copy()
    data["words"] = data["response"].fillna("").astype(str).str.split().str.len()
    data["policy"] = data["policy"].map(POLICY_LABELS).fillna(data["policy"])
    order = [POLICY_LABELS[p] for p in POLICIES if POLICY_LABELS[p] in set(data["policy"])]
    fig, axes = plt.subplots(1, 2, figsize=(FULL_WIDTH, 2.6), constrained_layout=True)
    with warnings.catch_warnings():     # seaborn 0.13 passes matplotlib's deprecated `vert`
        warnings.simplefilter("ignore", DeprecationWarning)
        sns.boxplot(data, x="policy", y="words", hue="policy", order=order, ax=axes[0], legend=False,
                    palette={POLICY_LABELS[p]: COLORS[p] for p in POLICIES})
    axes[0].set(title="Response length on held-out prompts", xlabel="policy", ylabel="length (words)")
    series = _series(ppo, "response_length")
    axes[1].plot(series["step"], series["response_length"], color=COLORS["ppo"], marker="o", markersize=2.5)
    axes[1].set(title="Response length during PPO", xlabel="PPO step", ylabel="mean length (tokens)")
    return fig


def _ppo_diagnostics(plt, ppo: pd.DataFrame):
    panels = [("reward_prompt_centred", "score minus SFT's, same prompts"), ("entropy", "entropy (nats / token)"),
              ("clip_fraction", "clipped fraction"), ("approx_kl", "KL(old \u2016 new) per token"),
              ("value_loss", "value loss"), ("explained_variance", "value head's explained variance"),
              ("policy_loss", "policy loss"),
              ("eos_fraction", "fraction ending with EOS"), ("kl", "KL to SFT (nats)"),
              ("kl_coef", "KL coefficient")]
    panels = [(column, label) for column, label in panels if column in ppo.columns]
    fig, axes = plt.subplots(2, (len(panels) + 1) // 2, figsize=(FULL_WIDTH, 4.2), constrained_layout=True, sharex=True)
    for ax in axes.flat[len(panels):]:
        ax.set_visible(False)
    for ax, (column, label) in zip(axes.flat, panels):
        series = _series(ppo, column)
        ax.plot(series["step"], series[column], color=COLORS["ppo"], marker="o", markersize=2)
        ax.set(title=column.replace("_", " "), ylabel=label)
    for ax in axes[-1]:
        ax.set_xlabel("PPO step")
    fig.suptitle("PPO diagnostics per step")
    return fig


def best_of_n_points(summary: Path, label: str) -> dict:
    """PPO's held-out scores and KL from an evaluation's summary.csv, as one point of the best-of-n figure."""
    frame = _read_csv(summary, ["policy", "reward_mean", "reward_ci_low", "reward_ci_high", "kl_to_sft"])
    rows = frame[frame["policy"] == "ppo"]
    if rows.empty:
        raise FiguresError(f"{summary}: no row for policy ppo")
    return {"label": label} | rows.iloc[0].to_dict()


def _best_of_n(plt, table: pd.DataFrame, points: list[dict], config: Config | None):
    """Gao et al. (2022)'s axes: score against sqrt(KL to SFT). Best-of-n from SFT is the frontier (its
    KL analytic, its intervals over prompts); each PPO run is a point at its measured KL. The sampled
    KL of a policy near SFT can come out slightly negative: it is drawn at 0."""
    judges = [(c, t) for c, t in (("gold", "gold score"), ("reward", "RM score (logit)"))
              if f"{c}_mean" in table.columns and table[f"{c}_mean"].notna().any()]
    fig, axes = plt.subplots(1, len(judges), figsize=(FULL_WIDTH if len(judges) > 1 else HALF_WIDTH + 0.6, 2.8),
                             constrained_layout=True, squeeze=False)
    markers = "os^DvP*X"
    for ax, (judge, ylabel) in zip(axes[0], judges):
        if config is not None:
            ax.axvspan(np.sqrt(config.ppo.kl_target_low), np.sqrt(config.ppo.kl_target_high), color=COLORS["kl"],
                       alpha=0.12,
                       label="target KL range" if config.ppo.kl_control == "adaptive" else "healthy KL range")
        x, mean = table["sqrt_kl"], table[f"{judge}_mean"]
        ax.fill_between(x, table[f"{judge}_ci_low"], table[f"{judge}_ci_high"], color=COLORS["sft"], alpha=0.2,
                        linewidth=0)
        ax.plot(x, mean, color=COLORS["sft"], marker="o", markersize=3, label="best-of-n from SFT")
        for n, xi, yi in zip(table["n"], x, mean):
            ax.annotate(f"n={int(n)}", (xi, yi), textcoords="offset points", xytext=(3, -9), fontsize=6,
                        color=COLORS["sft"])
        for k, point in enumerate(points):
            if f"{judge}_mean" not in point or point[f"{judge}_mean"] != point[f"{judge}_mean"]:
                continue
            y = point[f"{judge}_mean"]
            err = [[y - point[f"{judge}_ci_low"]], [point[f"{judge}_ci_high"] - y]]
            ax.errorbar([np.sqrt(max(point["kl_to_sft"], 0.0))], [y], yerr=err, fmt=markers[k % len(markers)],
                        color=COLORS["ppo"], alpha=1.0 if k == 0 else 0.7, capsize=2.5, markersize=4,
                        label=point["label"])
        ax.set(xlabel="$\\sqrt{\\mathrm{KL}}$ to SFT ($\\sqrt{\\mathrm{nats}}$)", ylabel=ylabel,
               title=f"{'Gold judge' if judge == 'gold' else 'Reward model'}: PPO vs best-of-n")
        ax.legend(loc="best", fontsize="x-small")
    return fig


def save_best_of_n(best_of_n: Path, points: list[dict], out: Path, config: Config | None = None) -> list[Path]:
    """The best-of-n figure with these PPO points (the seed study: one per seed) as PNG and PDF in `out`."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import seaborn as sns

    sns.set_theme(context="paper", style="whitegrid", font_scale=1.0)
    frontier = _read_csv(best_of_n / "best_of_n.csv",
                         ["n", "sqrt_kl", "reward_mean", "reward_ci_low", "reward_ci_high"])
    fig = _best_of_n(plt, frontier, points, config)
    try:
        _save(fig, out, BEST_OF_N)
    finally:
        plt.close(fig)
    return [out / f"{BEST_OF_N}.png", out / f"{BEST_OF_N}.pdf"]


def make_figures(metrics: Path, eval_dir: Path, out: Path, config: Config | None = None,
                 best_of_n: Path | None = None) -> list[Path]:
    """Write every figure as PNG and PDF into `out` (an existing folder); returns the files."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import seaborn as sns

    sns.set_theme(context="paper", style="whitegrid", font_scale=1.0)
    plt.rcParams.update({"axes.titlesize": "medium", "figure.titlesize": "large", "savefig.dpi": 200})

    sft = _read_csv(metrics / "sft_history.csv", ["step", "loss"])
    rm = _read_csv(metrics / "rm_history.csv", ["step", "loss", "accuracy"])
    ppo = _read_csv(metrics / "ppo_history.csv", ["step", "reward_mean", "kl", "entropy", "clip_fraction",
                                                  "value_loss", "response_length", "eos_fraction", "policy_loss"])
    generations = _read_csv(eval_dir / "generations.csv", ["policy", "prompt", "response", "reward", "gold"])
    pairs = _read_csv(eval_dir / "rm_pairs.csv", ["margin", "correct"])

    builders = {
        "timeline": lambda: _timeline(plt, sft, rm, ppo),
        "reward_vs_kl": lambda: _reward_vs_kl(plt, ppo, config),
        "reward_distributions": lambda: _reward_distributions(plt, sns, generations),
        "rm_margins": lambda: _rm_margins(plt, sns, pairs),
        "response_lengths": lambda: _response_lengths(plt, sns, generations, ppo),
        "ppo_diagnostics": lambda: _ppo_diagnostics(plt, ppo),
    }
    names = list(FIGURES)
    if best_of_n is not None:
        frontier = _read_csv(best_of_n / "best_of_n.csv",
                             ["n", "sqrt_kl", "reward_mean", "reward_ci_low", "reward_ci_high"])
        builders[BEST_OF_N] = lambda: _best_of_n(plt, frontier, [best_of_n_points(eval_dir / "summary.csv", "PPO")],
                                                 config)
        names.append(BEST_OF_N)
    written = []
    for name in names:
        fig = builders[name]()
        try:
            _save(fig, out, name)
        finally:
            plt.close(fig)
        written += [out / f"{name}.png", out / f"{name}.pdf"]
    return written


def run(config: Config, paths: RunPaths) -> None:
    with atomic_dir(paths.figures) as tmp:
        written = make_figures(paths.metrics, paths.eval, tmp, config, best_of_n=paths.best_of_n)
    print(f"figures: wrote {len(written)} files to {paths.figures}")
