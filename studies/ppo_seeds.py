"""Does PPO's gain hold across seeds? PPO and the evaluation again, on the finished run's data, SFT
model and reward model, with other values of `run.seed` (the PPO prompt order, its sampling noise
and the evaluation's). Each seed runs the project's own `ppo` and `evaluate` verbs in
studies/work/seed-<n>/ (git-ignored): a killed seed resumes from its last PPO checkpoint, and an
evaluated one is reused until the DAG's outputs change. The summary, with the DAG's own run as the
first row, goes to studies/results/ppo_seeds.json.

`--set ppo.KEY=VALUE` / `eval.KEY=VALUE` (repeatable) studies a variant of PPO or the evaluation on
the same SFT and reward model: every seed, the DAG's own included, runs with the changed params in
studies/work/<variant>/, and the summary goes to studies/results/ppo_seeds-<variant>.json.

    .venv/bin/python studies/ppo_seeds.py                                  # seeds 1 2 3, ~7 min each on 2 CPU cores
    .venv/bin/python studies/ppo_seeds.py --set ppo.steps=10 --seeds 1234 1 2 3   # a cheaper PPO, 4 seeds
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

import pandas as pd
import yaml

from _study import REPO, RESULTS, run_paths, shown
from qlora_rlhf.atomic import read_json, write_json
from qlora_rlhf.config import ConfigError, load_config
from qlora_rlhf.paths import RunPaths

SHARED = ("data", "base", "sft", "rm")  # the finished run's stages that every seed reuses
VARIABLE = ("ppo", "eval")  # the params sections a variant may change: the stages that each seed re-runs


def parse_overrides(items: list[str]) -> dict[str, object]:
    """["ppo.steps=10", ...] -> {"ppo.steps": 10, ...}; values are read as YAML."""
    overrides = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or key.count(".") != 1 or key.split(".")[0] not in VARIABLE:
            raise ValueError(f"--set {item}: expected SECTION.KEY=VALUE with SECTION one of {', '.join(VARIABLE)} "
                             "(the other stages are the finished run's and are reused)")
        overrides[key] = yaml.safe_load(value)
    return overrides


def variant_name(overrides: dict[str, object]) -> str:
    return ",".join(f"{k}={v}" for k, v in sorted(overrides.items())) or "default"


def seed_params(params: Path, seed: int, work: Path, overrides: dict[str, object] | None = None) -> Path:
    """A copy of `params` with another seed (and `overrides`), writing under `work`, reading the shared
    stages there."""
    raw = yaml.safe_load(params.read_text())
    raw["run"] |= {"seed": seed, "results_dir": str(work)}
    for key, value in (overrides or {}).items():
        section, name = key.split(".")
        raw[section][name] = value
    source = run_paths(params)
    run_dir = work / raw["run"]["name"]
    run_dir.mkdir(parents=True, exist_ok=True)
    for stage in SHARED:
        link = run_dir / stage
        if not link.is_symlink():
            link.symlink_to(source.root / stage, target_is_directory=True)
    out = work / "params.yaml"
    out.write_text(yaml.safe_dump(raw, sort_keys=False))
    return out


def is_fresh(paths: RunPaths) -> bool:
    """The seed's evaluation is newer than everything it read (a re-run of the DAG makes it stale)."""
    done = paths.eval / "summary.csv"
    inputs = [paths.split("eval"), paths.sft / "merged", paths.rm / "adapter", paths.ppo / "adapter"]
    return done.is_file() and all(p.exists() and p.stat().st_mtime < done.stat().st_mtime for p in inputs)


def summarize(seed: int, paths: RunPaths) -> dict:
    """The evaluation's comparison of PPO with SFT, as the stage wrote it."""
    summary = pd.read_csv(paths.eval / "summary.csv").set_index("policy")
    winrate = pd.read_csv(paths.eval / "winrate.csv").set_index("judge")
    by_category = pd.read_csv(paths.eval / "gold_by_category.csv").set_index("category")
    row = {"seed": seed}
    for column in ("reward_mean", "gold_mean", "kl_to_sft", "eos_fraction"):
        row |= {f"sft_{column}": summary.loc["sft", column], f"ppo_{column}": summary.loc["ppo", column]}
    for judge, name in (("reward_model", "rm"), ("gold", "gold")):
        row |= {f"winrate_{name}": winrate.loc[judge, "win_rate"], f"winrate_{name}_ci": [winrate.loc[judge, "ci_low"],
                                                                                            winrate.loc[judge, "ci_high"]]}
    row["gold_by_category"] = {c: {"sft": r["sft"], "ppo": r["ppo"]} for c, r in by_category.iterrows()}
    row["ppo_seconds"] = read_json(paths.stage_metrics("ppo"))["seconds"]
    return row


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", type=Path, default=REPO / "params.yaml")
    parser.add_argument("--seeds", type=int, nargs="+", help="default: 1 2 3, and with --set the DAG's own seed first")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="a ppo or eval param of the variant to study (repeatable)")
    parser.add_argument("--work", type=Path, default=REPO / "studies" / "work")
    parser.add_argument("--out", type=Path, help="default: studies/results/ppo_seeds[-<variant>].json")
    args = parser.parse_args(argv)
    try:
        config, paths = load_config(args.params), run_paths(args.params)
        overrides = parse_overrides(args.overrides)
    except (ConfigError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    variant = variant_name(overrides)
    seeds = args.seeds or ([config.run.seed] if overrides else []) + [1, 2, 3]
    out = args.out or RESULTS / ("ppo_seeds.json" if not overrides else f"ppo_seeds-{variant}.json")
    work = args.work if not overrides else args.work / variant
    missing = [stage for stage in (*SHARED, "eval") if not (paths.root / stage).is_dir()]
    if missing:
        print(f"error: the run of {args.params} is not finished ({', '.join(missing)} missing); run `dvc repro` first",
              file=sys.stderr)
        return 1
    if config.run.seed in seeds and not overrides:
        print(f"error: seed {config.run.seed} is the DAG's own run; pick others", file=sys.stderr)
        return 1
    rows = [] if overrides else [summarize(config.run.seed, paths)]
    for seed in seeds:
        seed_dir = (work / f"seed-{seed}").resolve()
        params = seed_params(args.params.resolve(), seed, seed_dir, overrides)
        try:
            seed_paths = run_paths(params)  # validates the params with the variant's values
        except ConfigError as exc:
            print(f"error: --set {variant}: {exc}", file=sys.stderr)
            return 2
        if is_fresh(seed_paths):
            print(f"seed {seed}: evaluated already, reused", flush=True)
        for verb in () if is_fresh(seed_paths) else ("ppo", "evaluate"):
            print(f"seed {seed}: {verb}", flush=True)
            subprocess.run([sys.executable, "-m", "qlora_rlhf", verb, "--params", str(params)], check=True, cwd=REPO)
        rows.append(summarize(seed, seed_paths))
    frame = pd.DataFrame(rows)
    result = {"params": shown(args.params), "overrides": overrides,
              "eval_prompts": read_json(seed_paths.stage_metrics("eval"))["eval_prompts"], "runs": rows,  # a variant may change it
              "ppo_beats_sft_on_gold": int((frame["ppo_gold_mean"] > frame["sft_gold_mean"]).sum()),
              "ppo_beats_sft_on_reward_model": int((frame["ppo_reward_mean"] > frame["sft_reward_mean"]).sum())}
    write_json(out, result)
    columns = ["seed", "sft_gold_mean", "ppo_gold_mean", "winrate_gold", "sft_reward_mean", "ppo_reward_mean",
               "winrate_rm", "ppo_kl_to_sft"]
    print(frame[columns].to_string(index=False, float_format=lambda v: f"{v:.3f}"))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
