"""Is PPO's reward-model gain over SFT only longer replies? For the run of a params file and each seed of
its seed study, the evaluation's generations (one reply per held-out prompt and policy) give: each policy's
mean score, length and EOS share; the score's slope per token of reply (over SFT's and PPO's replies
together); PPO's raw gain over SFT, and its gain at equal length (the policy coefficient of
reward ~ 1 + length + [PPO], the length term shared), each with a 95 % bootstrap interval over prompts; and
the mean score per length quartile. A raw gain whose length-adjusted gain is near zero is a length hack.
Writes studies/results/reward_vs_length-<run.name>.json.

    .venv/bin/python studies/reward_vs_length.py --params configs/hh-harmless-cpu.yaml   # seconds
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import pandas as pd

from qlora_rlhf.atomic import write_json
from qlora_rlhf.config import load_config
from qlora_rlhf.paths import RunPaths

from _study import REPO, RESULTS, run_paths, shown

BOOTSTRAP = 2000


def gains(sft: pd.DataFrame, ppo: pd.DataFrame) -> tuple[float, float, float]:
    """(raw gain, gain at equal length, score slope per token) of PPO over SFT, one row per prompt each."""
    reward = np.concatenate([sft["reward"], ppo["reward"]])
    length = np.concatenate([sft["response_length"], ppo["response_length"]]).astype(float)
    is_ppo = np.r_[np.zeros(len(sft)), np.ones(len(ppo))]
    design = np.column_stack([np.ones_like(length), length, is_ppo])
    (_, slope, adjusted), *_ = np.linalg.lstsq(design, reward, rcond=None)
    return float(ppo["reward"].mean() - sft["reward"].mean()), float(adjusted), float(slope)


def interval(values: np.ndarray) -> list[float]:
    return [float(np.quantile(values, 0.025)), float(np.quantile(values, 0.975))]


def ci(bounds: list[float]) -> str:
    return f"[{bounds[0]:+.3f}, {bounds[1]:+.3f}]"


def one_seed(generations: pd.DataFrame, seed: int) -> dict:
    by_policy = {p: g.set_index("prompt").sort_index() for p, g in generations.groupby("policy")}
    sft, ppo = by_policy["sft"], by_policy["ppo"].loc[by_policy["sft"].index]  # paired by prompt
    raw, adjusted, slope = gains(sft, ppo)
    rng = np.random.default_rng(seed)
    boot = np.array([gains(sft.iloc[i], ppo.iloc[i]) for i in
                     (rng.integers(0, len(sft), len(sft)) for _ in range(BOOTSTRAP))])
    both = generations[generations["policy"].isin(["sft", "ppo"])]
    quartile = pd.qcut(both["response_length"], 4, duplicates="drop")
    by_quartile = both.groupby([quartile, "policy"], observed=True)["reward"].agg(["mean", "size"]).reset_index()
    return {
        "prompts": len(sft),
        "policies": {p: {"reward_mean": float(g["reward"].mean()), "length_mean": float(g["response_length"].mean()),
                         "eos_share": float(g["ends_with_eos"].mean())} for p, g in by_policy.items()},
        "reward_per_token": slope, "reward_per_token_ci": interval(boot[:, 2]),
        "gain": raw, "gain_ci": interval(boot[:, 0]),
        "gain_at_equal_length": adjusted, "gain_at_equal_length_ci": interval(boot[:, 1]),
        "reward_by_length_quartile": [{"lengths": str(r.response_length), "policy": r.policy,
                                       "reward_mean": float(r.mean), "replies": int(r.size)}
                                      for r in by_quartile.itertuples()],
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", type=Path, default=REPO / "params.yaml")
    args = parser.parse_args(argv)
    config, paths = load_config(args.params), run_paths(args.params)
    seeds = {}
    for seed in dict.fromkeys([config.run.seed, *config.seeds.ppo]):
        seed_paths = paths if seed == config.run.seed else RunPaths(paths.seeds / str(seed), paths.root)
        table = seed_paths.eval / "generations.csv"
        if not table.is_file():
            print(f"reward_vs_length: {shown(table)} is missing (run `dvc repro seeds` first); seed {seed} skipped",
                  file=sys.stderr)
            continue
        seeds[str(seed)] = one_seed(pd.read_csv(table), seed)
        s = seeds[str(seed)]
        lengths = {name: f"{s['policies'][name]['length_mean']:.1f}" for name in ("sft", "ppo")}
        print(f"seed {seed}: gain {s['gain']:+.3f} {ci(s['gain_ci'])}, at equal length "
              f"{s['gain_at_equal_length']:+.3f} {ci(s['gain_at_equal_length_ci'])}, "
              f"length {lengths['sft']} -> {lengths['ppo']}, {s['reward_per_token']:+.4f} per token")
    if not seeds:
        print("reward_vs_length: no evaluation found; run `make run` (or `dvc repro seeds`) first", file=sys.stderr)
        return 1
    out = RESULTS / f"reward_vs_length-{config.run.name}.json"
    write_json(out, {"params": shown(args.params), "run": shown(paths.root), "bootstrap_samples": BOOTSTRAP,
                     "seeds": seeds})
    print(f"wrote {shown(out)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
