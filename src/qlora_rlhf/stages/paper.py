"""The paper stage: every number in paper/*.tex is a macro generated here from results/<run>/.

results/<run>/paper/ gets (written atomically):
- macros.tex     \\Res... from metrics/*.json, eval/summary.csv, eval/winrate.csv and
                 eval/gold_by_category.csv;
                 \\Cfg... from the params (setup table); one `% source` comment per macro
- tables/*.tex   setup, training, summary, win-rate and gold-by-category tables (cells are the
                 macros) + samples
- figures/*.pdf  copied from results/<run>/figures
- the paper sources from paper/, and paper.pdf built with latexmk

Macro names are letters only: `Res` + file stem + key in CamelCase (metrics/sft.json
`perplexity_sft` -> \\ResSftPerplexitySft), `Cfg` + dotted params key (sft.learning_rate ->
\\CfgSftLearningRate). tests/test_paper.py checks that every \\Res/\\Cfg the paper uses is generated.
"""

from __future__ import annotations

import csv
import json
import math
import os
import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from ..errors import PaperError  # noqa: F401  (re-exported: callers import it from here)
from ..stats import POLICIES, POLICY_LABELS

# The project's paper/ folder, relative to the project root where DVC and Snakemake run every stage
# (dvc.yaml declares it as the paper stage's dependency); not found through the package's own path,
# which points into site-packages once the package is installed.
PAPER_SOURCES = Path("paper")
MACRO_USE = re.compile(r"\\((?:Res|Cfg)[A-Za-z]+)")
GENERATED_MACRO_USE = re.compile(r"\\((?:Res|Cfg|Ref)[A-Za-z]+)")
METRIC_FILES = ("sft", "rm", "ppo", "eval")
SUMMARY_COLUMNS = ("reward_mean", "reward_ci_low", "reward_ci_high", "gold_mean", "gold_ci_low", "gold_ci_high",
                   "kl_to_sft", "response_length", "eos_fraction")
GOLD_COLUMNS = ("gold_mean", "gold_ci_low", "gold_ci_high")  # only where the data has a gold judge
WINRATE_COLUMNS = ("win_rate", "ci_low", "ci_high")
CATEGORY_COLUMNS = (*POLICIES, "prompts")
INSTALL_HINT = "install it with: sudo apt-get install $(cat scripts/apt-packages.txt)"
# Pairwise accuracy of small (up to a few hundred million parameters) reward models on the harmless
# subset of RewardBench (Lambert et al., 2024, arXiv:2403.13787): the band a real-data run's reward
# model is put next to. A literature figure, not a result of this project.
REWARDBENCH_SMALL_HARMLESS = (0.56, 0.65)


@dataclass(frozen=True)
class Macro:
    name: str
    value: str      # LaTeX
    source: str     # where the value came from, e.g. "metrics/sft.json:perplexity_sft"


# ---------------------------------------------------------------- formatting


_WORDS = "Zero One Two Three Four Five Six Seven Eight Nine".split()


def camel(text: str) -> str:
    """`reward_mean_first` -> `RewardMeanFirst`; digits become words so names stay letters only."""
    text = re.sub(r"\d", lambda m: f"_{_WORDS[int(m.group())]}_", str(text))
    return "".join(part[:1].upper() + part[1:] for part in re.split(r"[^A-Za-z]+", text) if part)


def escape(text: str) -> str:
    """Plain text -> LaTeX-safe ASCII text."""
    text = str(text).encode("ascii", "replace").decode("ascii")
    specials = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_",
                "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}",
                "<": r"\textless{}", ">": r"\textgreater{}"}
    return "".join(specials.get(ch, ch) for ch in text)


def fmt(value: object, digits: int | None = None) -> str:
    """A number as LaTeX text: at most about three significant digits, or with `digits`, that many
    decimals (a column of gains lines up; a value that rounds to zero then has no sign); a real minus
    sign; `--` for missing values."""
    if value is None or isinstance(value, str) and value.strip() == "":
        return "--"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            return escape(value)
    if isinstance(value, float) and not math.isfinite(value):
        return "--"
    if digits is not None:
        text = f"{abs(value):.{digits}f}"
        return (r"\ensuremath{-}" if value < 0 and float(text) else "") + text
    sign = r"\ensuremath{-}" if value < 0 else ""
    mag = abs(value)
    if isinstance(value, int) or (float(mag).is_integer() and mag >= 1):
        text = f"{int(mag):d}"
    elif mag >= 100:
        text = f"{mag:.0f}"
    elif mag >= 10:
        text = f"{mag:.1f}"
    elif mag >= 0.01 or mag == 0:
        text = f"{mag:.2f}"
    else:
        mantissa, exponent = f"{mag:.1e}".split("e")
        return rf"\ensuremath{{{'-' if value < 0 else ''}{mantissa}\times 10^{{{int(exponent)}}}}}"
    return sign + text


# ---------------------------------------------------------------- macros


def _read_json(path: Path) -> dict:
    if not path.is_file():
        raise PaperError(f"{path} is missing; run the stage that writes it first (dvc repro / snakemake)")
    try:
        payload = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise PaperError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(payload, dict):
        raise PaperError(f"{path}: expected a JSON object of metrics")
    return payload


def _read_rows(path: Path, key: str, columns: tuple[str, ...]) -> dict[str, dict]:
    if not path.is_file():
        raise PaperError(f"{path} is missing; run the evaluate stage first")
    with path.open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    if rows and (missing := [c for c in (key, *columns) if c not in rows[0]]):
        raise PaperError(f"{path}: missing column(s) {', '.join(missing)}")
    return {row[key]: row for row in rows}


def _flatten(prefix: str, value: object) -> list[tuple[str, object]]:
    if isinstance(value, dict):
        return [item for key, sub in value.items() for item in _flatten(f"{prefix}.{key}" if prefix else key, sub)]
    return [(prefix, value)]


def _config_value(value: object) -> str:
    if isinstance(value, (list, tuple)):
        return ", ".join(escape(v) for v in value)
    if value is None:
        return "--"
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return fmt(value)
    return escape(value)


def build_macros(metrics: Path, eval_dir: Path, params: dict) -> dict[str, Macro]:
    """Every macro the paper may use, from the contract files and the params mapping."""
    macros: dict[str, Macro] = {}

    def add(name: str, value: str, source: str) -> None:
        if name in macros and macros[name].source != source:
            raise PaperError(f"macro \\{name} would come from both {macros[name].source} and {source}")
        macros[name] = Macro(name, value, source)

    read = {stem: _read_json(metrics / f"{stem}.json") for stem in METRIC_FILES}
    for stem in METRIC_FILES:
        for key, value in read[stem].items():
            if isinstance(value, (int, float)) or value is None:
                add(f"Res{camel(stem)}{camel(key)}", fmt(value), f"metrics/{stem}.json:{key}")
    required = tuple(c for c in SUMMARY_COLUMNS if c not in GOLD_COLUMNS)
    for policy, row in _read_rows(eval_dir / "summary.csv", "policy", required).items():
        for column in SUMMARY_COLUMNS:
            if column in row:
                add(f"ResSummary{camel(policy)}{camel(column)}", fmt(row[column]),
                    f"eval/summary.csv:{policy}.{column}")
    for judge, row in _read_rows(eval_dir / "winrate.csv", "judge", WINRATE_COLUMNS).items():
        for column in WINRATE_COLUMNS:
            add(f"ResWinrate{camel(judge)}{camel(column)}", fmt(row.get(column)), f"eval/winrate.csv:{judge}.{column}")
    gold_table = eval_dir / "gold_by_category.csv"  # written only where the data has a gold judge
    for category, row in (_read_rows(gold_table, "category", CATEGORY_COLUMNS) if gold_table.is_file() else {}).items():
        for column in CATEGORY_COLUMNS:
            add(f"ResGold{camel(category)}{camel(column)}", fmt(row.get(column)),
                f"eval/gold_by_category.csv:{category}.{column}")
    # The dtype the model stages ran in (`auto` resolves per machine), else the configured one.
    sft, rm = read["sft"], read["rm"]
    if "compute_dtype" in sft:
        add("ResSftComputeDtype", escape(sft["compute_dtype"]), "metrics/sft.json:compute_dtype")
    else:
        add("ResSftComputeDtype", escape(params.get("model", {}).get("compute_dtype", "--")),
            "params:model.compute_dtype")
    if isinstance(rm.get("accuracy"), (int, float)) and isinstance(rm.get("eval_pairs"), int) and rm["eval_pairs"] > 0:
        low, high = wilson_interval(rm["accuracy"], rm["eval_pairs"])
        add("ResRmAccuracyCiLow", fmt(low), "metrics/rm.json:accuracy,eval_pairs (Wilson 95% interval)")
        add("ResRmAccuracyCiHigh", fmt(high), "metrics/rm.json:accuracy,eval_pairs (Wilson 95% interval)")
    add("RefRewardBenchLow", fmt(REWARDBENCH_SMALL_HARMLESS[0]), "paper.py:REWARDBENCH_SMALL_HARMLESS")
    add("RefRewardBenchHigh", fmt(REWARDBENCH_SMALL_HARMLESS[1]), "paper.py:REWARDBENCH_SMALL_HARMLESS")
    for key, value in _flatten("", params):
        add(f"Cfg{camel(key)}", _config_value(value), f"params:{key}")
    return macros


def wilson_interval(accuracy: float, n: int, z: float = 1.96) -> tuple[float, float]:
    """The 95 % Wilson score interval of a proportion measured on n items."""
    centre = (accuracy + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(accuracy * (1 - accuracy) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def render_macros(macros: dict[str, Macro]) -> str:
    lines = ["% Generated by `qlora-rlhf paper` from results/; do not edit.", ""]
    for macro in sorted(macros.values(), key=lambda m: m.name):
        lines.append(f"\\newcommand{{\\{macro.name}}}{{{macro.value}}} % {macro.source}")
    return "\n".join(lines) + "\n"


def used_macros(folder: Path) -> set[str]:
    return {name for tex in sorted(folder.glob("*.tex"))
            for name in MACRO_USE.findall(_strip_comments(tex.read_text()))}


def _strip_comments(text: str) -> str:
    return re.sub(r"(?<!\\)%.*", "", text)


# ---------------------------------------------------------------- tables


def _table(spec: str, header: str, rows: list[str]) -> str:
    return "\n".join([f"\\begin{{tabular}}{{{spec}}}", r"\toprule", header + r" \\", r"\midrule",
                      *[row + r" \\" for row in rows], r"\bottomrule", r"\end{tabular}", ""])


def setup_table(macros: dict[str, Macro]) -> str:
    rows = [
        ("Base model", r"\CfgModelNameOrPath"),
        ("Quantisation / compute dtype", r"\CfgModelQuantization{} / \ResSftComputeDtype"),
        ("LoRA rank / alpha / dropout", r"\CfgModelLoraR{} / \CfgModelLoraAlpha{} / \CfgModelLoraDropout"),
        ("LoRA target modules", r"\CfgModelLoraTargetModules"),
        ("Optimizer", r"\CfgModelOptimizer"),
        ("Data source", r"\CfgDataSource"),
        ("SFT / RM / PPO / eval examples",
         r"\CfgDataSftSize{} / \CfgDataRmSize{} / \CfgDataPpoSize{} / \CfgDataEvalSize"),
        ("Max sequence length (tokens)", r"\CfgDataMaxLength"),
        ("SFT steps / batch / learning rate", r"\CfgSftMaxSteps{} / \CfgSftBatchSize{} / \CfgSftLearningRate"),
        ("RM steps / batch / learning rate", r"\CfgRmMaxSteps{} / \CfgRmBatchSize{} / \CfgRmLearningRate"),
        ("PPO steps / batch / mini-batch / epochs",
         r"\CfgPpoSteps{} / \CfgPpoBatchSize{} / \CfgPpoMiniBatchSize{} / \CfgPpoPpoEpochs"),
        ("PPO samples per prompt", r"\CfgPpoSamplesPerPrompt"),
        ("PPO learning rate / KL coefficient", r"\CfgPpoLearningRate{} / \CfgPpoKlCoef"),
        ("PPO KL control / target (nats) / horizon",
         r"\CfgPpoKlControl{} / \CfgPpoKlTargetLow--\CfgPpoKlTargetHigh{} / \CfgPpoKlHorizon"),
        ("PPO clip range (policy / value)", r"\CfgPpoCliprange{} / \CfgPpoCliprangeValue"),
        ("PPO max new tokens / temperature", r"\CfgPpoMaxNewTokens{} / \CfgPpoTemperature"),
        ("Seed", r"\CfgRunSeed"),
    ]
    body = [f"{label} & \\texttt{{{value}}}" if "Modules" in value or "NameOrPath" in value or "Source" in value
            else f"{label} & {value}" for label, value in rows]
    return "\\begin{tabularx}{\\linewidth}{@{}lX@{}}\n\\toprule\nSetting & Value \\\\\n\\midrule\n" + \
        "\n".join(row + r" \\" for row in body) + "\n\\bottomrule\n\\end{tabularx}\n"


def training_table(macros: dict[str, Macro]) -> str:
    """One row per stage. PPO's row gives its held-out curve (ppo.py's HeldOutCurve: fixed held-out
    prompts, step 0 to the last step, with 95 % intervals) where the run measured one, else the raw
    batch means of its first and last rollouts."""
    rows = [
        r"SFT & perplexity \ResSftPerplexityBase{} $\to$ \ResSftPerplexitySft & "
        r"\ResSftTrainLossFirst{} $\to$ \ResSftTrainLossLast & \ResSftSteps",
        r"Reward model & accuracy \ResRmAccuracy, margin \ResRmMarginMean & "
        r"\ResRmTrainLossFirst{} $\to$ \ResRmTrainLossLast & \ResRmSteps",
    ]
    if "ResPpoHeldOutRewardMeanLast" not in macros:
        rows.append(r"PPO & reward \ResPpoRewardMeanFirst{} $\to$ \ResPpoRewardMeanLast, KL \ResPpoKlLast & -- & "
                    r"\ResPpoSteps")
    else:
        def point(name: str, end: str) -> str:
            key = f"ResPpoHeldOut{name}"
            return fr"\{key}Mean{end}{{}} [\{key}CiLow{end}, \{key}CiHigh{end}]"

        judges = [("Reward", "RM")] + ([("Gold", "gold")] if "ResPpoHeldOutGoldMeanLast" in macros else [])
        cells = [fr"held-out {label} {point(name, 'First')} $\to$ {point(name, 'Last')}" for name, label in judges]
        cells.append(r"held-out KL \ResPpoHeldOutKlToSftLast{} [\ResPpoHeldOutKlCiLowLast, \ResPpoHeldOutKlCiHighLast]")
        rows.append(fr"PPO & {cells[0]} & -- & \ResPpoSteps")  # one line per measure: the row fits the column
        rows += [f" & {cell} & & " for cell in cells[1:]]
    # No wall-clock column: the paper is a DVC output, and a time would change its bytes on every rerun
    # (the times are in results/<run>/timings/, timings.py).
    return _table("@{}llrr@{}", r"Stage & Held-out / rollout metric & Train loss (first $\to$ last) & Steps", rows)


def summary_table(policies: list[str], gold: bool = True) -> str:
    """Base, SFT and PPO on held-out prompts; the gold column only where the data has a gold judge."""
    rows = []
    for policy in policies:
        p = f"ResSummary{camel(policy)}"
        gold_cell = f"\\{p}GoldMean{{}} [\\{p}GoldCiLow, \\{p}GoldCiHigh] & " if gold else ""
        label = POLICY_LABELS.get(policy, escape(policy))
        rows.append(
            f"{label} & \\{p}RewardMean{{}} [\\{p}RewardCiLow, \\{p}RewardCiHigh] & "
            f"{gold_cell}\\{p}KlToSft & \\{p}ResponseLength & \\{p}EosFraction")
    header = (r"Policy & RM reward [95\% CI] & " + (r"Gold score [95\% CI] & " if gold else "")
              + r"KL to SFT (nats) & Length (tokens) & EOS")
    return _table("@{}lllrrr@{}" if gold else "@{}llrrr@{}", header, rows)


def winrate_table(judges: list[str]) -> str:
    names = {"reward_model": "Reward model", "gold": "Gold judge"}
    rows = [f"{names.get(j, escape(j))} & \\ResWinrate{camel(j)}WinRate & "
            f"[\\ResWinrate{camel(j)}CiLow, \\ResWinrate{camel(j)}CiHigh]" for j in judges]
    return _table("@{}lrl@{}", r"Judge & PPO win rate vs SFT & 95\% CI", rows)


def gold_by_category_table(categories: list[str]) -> str:
    """The whole table float, or nothing where the data has no gold judge (no empty table)."""
    if not categories:
        return ""
    rows = [f"{escape(c.capitalize())} & " + " & ".join(f"\\ResGold{camel(c)}{camel(col)}" for col in CATEGORY_COLUMNS)
            for c in categories]
    return "\n".join([r"\begin{table}[ht]", r"  \centering\small",
                      r"  \caption{Mean gold score by kind of held-out question: where the policies differ.}",
                      r"  \label{tab:gold}", _table("@{}lrrrr@{}", r"Question & Base & SFT & PPO & Prompts", rows),
                      r"\end{table}", ""])


def comparison_text(gold: bool) -> str:
    """What the policy comparison measures: with a gold judge (synthetic data), its score beside the
    reward model's; without one (real prompts), what the numbers can and cannot show."""
    if gold:
        return (r"Its gold score is \ResEvalPpoGoldMean{} against \ResEvalSftGoldMean{} for SFT. Against SFT, PPO "
                r"wins on a fraction \ResEvalWinrateRm{} of prompts according to the reward model and "
                r"\ResEvalWinrateGold{} according to the gold judge (Table~\ref{tab:winrate}); Table~\ref{tab:gold} "
                r"shows where the gold score moves. These numbers come from one training run with one seed, and the "
                r"intervals measure evaluation noise, not the spread between runs, which the seed study "
                r"(\texttt{dvc repro seeds}) measures. A PPO run can raise the reward model's score and lower the gold "
                r"score at once, by finding replies that the reward model overrates (reward hacking): the gold judge "
                r"is there to show it." "\n")
    return (r"There is no gold judge for these prompts (real hh-rlhf dialogues): what is measured is the learned "
            r"reward model's score of each response, the KL divergence to the SFT policy, the response length and "
            r"the share of responses that end with an end-of-sequence token. A higher reward shows that PPO "
            r"optimised the reward model, not that its responses are more harmless or more helpful. Against SFT, "
            r"PPO wins on a fraction \ResEvalWinrateRm{} of prompts according to the reward model "
            r"(Table~\ref{tab:winrate}). These numbers come from one training run with one seed, and the intervals "
            r"measure evaluation noise, not the spread between runs." "\n")


BEST_OF_N_TABLE = "best_of_n.csv"  # the best_of_n stage's table, one row per n
BEST_OF_N_COLUMNS = ("reward_mean", "reward_ci_low", "reward_ci_high", "gold_mean", "gold_ci_low", "gold_ci_high")


def best_of_n_macros(best_of_n: Path, ppo_kl: float | None, ppo_gold: float | None) -> list[Macro]:
    """Best-of-n's frontier at PPO's KL to SFT: each column interpolated linearly in sqrt(KL) between the
    two n around it (Gao et al.'s axis; a sampled KL below 0 counts as 0), and the real-valued n whose
    analytic KL log n - (n-1)/n it is. Outside the ns' range the values are `--`: no extrapolation."""
    rows = sorted(_read_rows(best_of_n / BEST_OF_N_TABLE, "n", ("sqrt_kl", "reward_mean")).values(),
                  key=lambda r: float(r["sqrt_kl"]))
    source = f"best_of_n/{BEST_OF_N_TABLE}"
    largest = rows[-1]
    macros = [Macro("ResBestOfNMaxN", fmt(int(largest["n"])), f"{source}:n (largest)"),
              Macro("ResBestOfNPrompts", fmt(int(largest["prompts"])), f"{source}:prompts"),
              Macro("ResBestOfNMaxNKl", fmt(float(largest["kl"])), f"{source}:{largest['n']}.kl")]
    for column in BEST_OF_N_COLUMNS:
        if column in largest:
            macros.append(Macro(f"ResBestOfNMaxN{camel(column)}", fmt(largest[column]),
                                f"{source}:{largest['n']}.{column}"))
    if ppo_kl is None:
        return macros
    x = math.sqrt(max(ppo_kl, 0.0))
    xs = [float(r["sqrt_kl"]) for r in rows]
    at = f"{source} at metrics/eval.json:ppo_kl_to_sft (linear in sqrt KL)"
    values: dict[str, float | None] = {c: None for c in BEST_OF_N_COLUMNS if c in largest} | {"n": None}
    if xs[0] <= x <= xs[-1]:
        k = max(i for i in range(len(xs)) if xs[i] <= x)
        j = min(k + 1, len(xs) - 1)
        w = 0.0 if xs[j] == xs[k] else (x - xs[k]) / (xs[j] - xs[k])
        for column in values:
            if column != "n":
                values[column] = (1 - w) * float(rows[k][column]) + w * float(rows[j][column])
        low, high = 1.0, float(largest["n"])  # the n whose log n - (n-1)/n is PPO's KL, by bisection
        for _ in range(60):
            mid = (low + high) / 2
            low, high = (mid, high) if math.log(mid) - (mid - 1) / mid < x * x else (low, mid)
        values["n"] = low
    macros += [Macro(f"ResBestOfNAtPpoKl{camel(c)}", fmt(v), at) for c, v in values.items()]
    gap = None if values.get("gold_mean") is None or ppo_gold is None else ppo_gold - values["gold_mean"]
    if "gold_mean" in values:
        macros.append(Macro("ResBestOfNAtPpoKlGoldGap", fmt(gap), f"metrics/eval.json:ppo_gold_mean minus {at}"))
    macros.append(Macro("ResBestOfNAtPpoKlInside", "yes" if values["n"] is not None else "no", at))
    return macros


def best_of_n_text(macros: dict[str, Macro]) -> str:
    """The paragraph and figure on best-of-n, the reference PPO is judged against; empty without the stage."""
    if "ResBestOfNMaxN" not in macros:
        return ""
    gold = "ResBestOfNAtPpoKlGoldGap" in macros
    text = [r"\paragraph{Against best-of-$n$.} Best-of-$n$ from SFT keeps, for each of the first \ResBestOfNPrompts{} "
            r"held-out prompts, the reply the reward model ranks best among $n$ SFT samples at the evaluation's "
            r"temperature, for $n$ up to \ResBestOfNMaxN{}; its KL to SFT is the analytic $\log n - (n-1)/n$ nats "
            r"(\ResBestOfNMaxNKl{} at the largest $n$). It is the reference frontier of Gao et al.\ (2022), and "
            r"Figure~\ref{fig:bestofn} puts PPO on its axes: score against $\sqrt{\mathrm{KL}}$."]
    if macros.get("ResBestOfNAtPpoKlInside", Macro("", "no", "")).value == "yes":
        text.append(r"At PPO's KL of \ResEvalPpoKlToSft{} nats, the KL of best-of-\ResBestOfNAtPpoKlN{}, best-of-$n$ "
                    r"reaches a reward-model score of \ResBestOfNAtPpoKlRewardMean{} (interpolated between the "
                    r"neighbouring $n$; 95\% interval \ResBestOfNAtPpoKlRewardCiLow--\ResBestOfNAtPpoKlRewardCiHigh)"
                    + (r" and a gold score of \ResBestOfNAtPpoKlGoldMean{} "
                       r"(\ResBestOfNAtPpoKlGoldCiLow--\ResBestOfNAtPpoKlGoldCiHigh); PPO's gold score, "
                       r"\ResEvalPpoGoldMean{}, minus best-of-$n$'s is \ResBestOfNAtPpoKlGoldGap{}" if gold else "")
                    + r". Best-of-$n$'s prompts are the first of the evaluation's, so the two share part of "
                      r"their prompts, not all.")
    elif "ResBestOfNAtPpoKlInside" in macros:
        text.append(r"PPO's KL of \ResEvalPpoKlToSft{} nats lies outside best-of-$n$'s range of $n$: the comparison "
                    r"at equal KL needs other $n$.")
    text += ["", r"\begin{figure}[ht]", r"  \centering", r"  \includegraphics[width=\linewidth]{figures/best_of_n.pdf}",
             r"  \caption{PPO against best-of-$n$ from SFT: mean scores on held-out prompts against "
             r"$\sqrt{\mathrm{KL}}$ to SFT, best-of-$n$ at its analytic KL with 95\% bootstrap intervals (band), "
             r"PPO at its sampled KL with its interval.}", r"  \label{fig:bestofn}", r"\end{figure}", ""]
    return "\n".join(text)


def rm_context_text(macros: dict[str, Macro], synthetic: bool) -> str:
    """On real pairs: the reward model's accuracy next to public small-model figures, and what limits it."""
    if synthetic or "ResRmAccuracyCiLow" not in macros:
        return ""
    return (r"On real preference pairs this accuracy (\ResRmAccuracy{} on \ResRmEvalPairs{} held-out pairs, 95\% "
            r"interval \ResRmAccuracyCiLow--\ResRmAccuracyCiHigh) is to be read next to public benchmarks: on the "
            r"harmless subset of RewardBench, small reward models reach \RefRewardBenchLow--\RefRewardBenchHigh, and "
            r"chance is one half. What limits it here: a small base model (\texttt{\CfgModelNameOrPath}) trained for "
            r"\CfgRmMaxSteps{} steps of \CfgRmBatchSize{} pairs from \CfgDataRmSize{} pairs, where a full run has tens "
            r"of thousands; dialogues longer than \CfgDataMaxLength{} tokens left out; labels that record one "
            r"crowdworker's choice between two replies of similar models, so many pairs differ little; and a small "
            r"held-out set, whose interval is wide." "\n")


def samples_table(eval_dir: Path, count: int, max_chars: int = 220) -> str:
    path = eval_dir / "generations.csv"
    if not path.is_file() or count <= 0:
        return "\\emph{No sample generations.}\n"
    with path.open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    prompts: list[str] = []
    by_key: dict[tuple[str, str], str] = {}
    for row in rows:
        if row["prompt"] not in prompts:
            prompts.append(row["prompt"])
        by_key.setdefault((row["prompt"], row["policy"]), row["response"])

    def cut(text: str) -> str:
        text = " ".join(str(text or "").split())
        return escape(text if len(text) <= max_chars else text[: max_chars - 3].rstrip() + "...")

    lines = [r"\begin{tabularx}{\linewidth}{@{}>{\raggedright\arraybackslash}p{0.22\linewidth}"
             r"*{3}{>{\raggedright\arraybackslash}X}@{}}", r"\toprule", r"Prompt & Base & SFT & PPO \\", r"\midrule"]
    for prompt in prompts[:count]:
        cells = [cut(prompt.replace("Human:", "").split("Assistant:")[0] if "Assistant:" in prompt else prompt)]
        cells += [cut(by_key.get((prompt, policy), "")) for policy in POLICIES]
        lines.append(r"\footnotesize " + r" & \footnotesize ".join(cells) + r" \\ \addlinespace")
    lines += [r"\bottomrule", r"\end{tabularx}", ""]
    return "\n".join(lines)


# ---------------------------------------------------------------- build


def latexmk_path() -> str:
    found = shutil.which("latexmk")
    if found is None:
        raise PaperError(f"latexmk is not installed, so paper.pdf cannot be built; {INSTALL_HINT}")
    return found


# The same PDF bytes on every build: build_pdf fixes the dates (SOURCE_DATE_EPOCH, FORCE_SOURCE_DATE) and
# runs this before the source: no trailer ID (pdfTeX hashes it from the build folder's path, a fresh
# temporary folder on every run), no pdfTeX banner or file names recorded for each included figure.
REPRODUCIBLE_PDF = r"\ifdefined\pdftrailerid\pdftrailerid{}\fi\ifdefined\pdfsuppressptexinfo\pdfsuppressptexinfo=-1\fi"


def build_pdf(folder: Path, main: str = "paper.tex") -> Path:
    latexmk = latexmk_path()
    env = {**os.environ, "SOURCE_DATE_EPOCH": "0", "FORCE_SOURCE_DATE": "1"}   # fixed dates (REPRODUCIBLE_PDF)
    cmd = [latexmk, "-pdf", f"-usepretex={REPRODUCIBLE_PDF}", "-interaction=nonstopmode", "-halt-on-error",
           "-file-line-error", main]
    result = subprocess.run(cmd, cwd=folder, env=env, capture_output=True, text=True)
    pdf = folder / Path(main).with_suffix(".pdf").name
    if result.returncode != 0 or not pdf.is_file():
        log = folder / Path(main).with_suffix(".log").name
        tail = log.read_text(errors="replace")[-3000:] if log.is_file() else result.stdout[-3000:]
        raise PaperError(f"latexmk failed (exit {result.returncode}) building {folder / main}:\n{tail}")
    subprocess.run([latexmk, "-c", main], cwd=folder, env=env, capture_output=True)
    return pdf


def results_summary(metrics: Path, run_name: str) -> str:
    """summary.md: the run's headline numbers in plain text beside the PDF, read from metrics/*.json."""
    read = {stage: _read_json(metrics / f"{stage}.json") for stage in METRIC_FILES}
    sft, rm, _, ev = (read[s] for s in METRIC_FILES)

    def num(value, digits=3):
        return "--" if value is None else f"{value:.{digits}f}"

    lines = [f"# {run_name}: results summary", "",
             "Written by `qlora-rlhf paper` from this run's `metrics/*.json`; `paper.pdf` has the tables, intervals "
             "and figures.", "",
             f"- Compute dtype: {sft.get('compute_dtype', '--')}",
             f"- SFT held-out perplexity: {num(sft['perplexity_base'], 2)} (base) -> "
             f"{num(sft['perplexity_sft'], 2)} (SFT)",
             f"- Reward model held-out pairwise accuracy: {num(rm['accuracy'])} on {rm.get('eval_pairs', '--')} pairs",
             f"- Mean reward-model score on {ev.get('eval_prompts', '--')} held-out prompts: SFT "
             f"{num(ev.get('sft_reward_mean'))}, PPO {num(ev.get('ppo_reward_mean'))}; PPO's win rate over SFT "
             f"{num(ev.get('winrate_rm'))}"]
    if ev.get("ppo_gold_mean") is not None:
        lines.append(f"- Mean gold-judge score: SFT {num(ev.get('sft_gold_mean'))}, "
                     f"PPO {num(ev.get('ppo_gold_mean'))}; PPO's win rate over SFT {num(ev.get('winrate_gold'))}")
    else:
        lines.append("- No gold judge for these prompts: the reward model's score is not a measure of quality")
    lines += [f"- KL(PPO || SFT) on held-out samples: {num(ev.get('ppo_kl_to_sft'))} nats",
              "- Training times are not part of the results (they differ on every run): they are in the run's "
              "`timings/*.json`, which `dvc metrics show` lists", "",
              "One PPO run is one sample of PPO's outcome: `dvc repro seeds` measures the spread over seeds.", ""]
    return "\n".join(lines)


def write_paper(out: Path, metrics: Path, eval_dir: Path, figures: Path, params: dict,
                sources: Path = PAPER_SOURCES, samples: int = 6, pdf: bool = True,
                best_of_n: Path | None = None) -> dict[str, Macro]:
    """Fill `out` (an existing, empty folder) with the paper; returns the macros it defined. With
    `best_of_n` (the stage's folder) the paper compares PPO with best-of-n at PPO's KL."""
    if not (sources / "paper.tex").is_file():
        raise PaperError(f"{sources.resolve() / 'paper.tex'} is missing: run the paper stage from the project root, "
                         "as dvc repro and snakemake do")
    macros = build_macros(metrics, eval_dir, params)
    if best_of_n is not None:
        evaluated = _read_json(metrics / "eval.json")
        macros |= {m.name: m for m in best_of_n_macros(best_of_n, evaluated.get("ppo_kl_to_sft"),
                                                       evaluated.get("ppo_gold_mean"))}
    missing = sorted(used_macros(sources) - set(macros))
    if missing:
        raise PaperError("the paper uses macros no result defines: " + ", ".join(f"\\{m}" for m in missing)
                         + f" (check the keys of {metrics}/*.json and {eval_dir}/*.csv)")
    for item in sources.iterdir():
        if item.is_file() and not item.name.startswith(".") and item.suffix in {".tex", ".bib", ".sty", ".cls"}:
            shutil.copy2(item, out / item.name)
    (out / "macros.tex").write_text(render_macros(macros))
    (out / "summary.md").write_text(results_summary(metrics, params.get("run", {}).get("name", "run")))
    tables = out / "tables"
    tables.mkdir()
    policies = [p for p in POLICIES if f"ResSummary{camel(p)}RewardMean" in macros]
    judges = [j for j in ("reward_model", "gold") if f"ResWinrate{camel(j)}WinRate" in macros]
    (tables / "setup.tex").write_text(setup_table(macros))
    (tables / "training.tex").write_text(training_table(macros))
    gold = all(f"ResSummary{camel(p)}GoldMean" in macros for p in policies)
    (tables / "summary.tex").write_text(summary_table(policies, gold))
    (tables / "winrate.tex").write_text(winrate_table(judges))
    categories = sorted({m.source.split(":")[1].split(".")[0] for m in macros.values()
                         if m.source.startswith("eval/gold_by_category.csv:")})
    (tables / "gold_by_category.tex").write_text(gold_by_category_table(categories))
    (tables / "samples.tex").write_text(samples_table(eval_dir, samples))
    text = out / "text"
    text.mkdir()
    (text / "comparison.tex").write_text(comparison_text(gold))
    (text / "rm.tex").write_text(rm_context_text(macros, params.get("data", {}).get("source") == "synthetic"))
    (text / "best_of_n.tex").write_text(best_of_n_text(macros))
    generated = "".join(f.read_text() for f in (*tables.glob("*.tex"), *text.glob("*.tex")))
    undefined = sorted(set(GENERATED_MACRO_USE.findall(generated)) - set(macros))
    if undefined:
        raise PaperError("the generated text uses macros no result defines: " + ", ".join(f"\\{m}" for m in undefined))
    (out / "figures").mkdir()
    pdfs = sorted(figures.glob("*.pdf"))
    if not pdfs:
        raise PaperError(f"{figures} holds no PDF figures; run the figures stage first")
    for figure in pdfs:
        shutil.copy2(figure, out / "figures" / figure.name)
    if pdf:
        build_pdf(out)
    return macros


def run(config, paths) -> None:
    latexmk_path()      # fail before doing any work when the toolchain is missing
    params = config.model_dump(mode="json", exclude={"eval", "best_of_n"})  # best-of-n's numbers: its own table
    from ..atomic import atomic_dir

    with atomic_dir(paths.paper) as tmp:
        write_paper(tmp, paths.metrics, paths.eval, paths.figures, params, samples=config.eval.num_sample_rows,
                    best_of_n=paths.best_of_n)
    print(f"paper: wrote {paths.paper / 'paper.pdf'}")
