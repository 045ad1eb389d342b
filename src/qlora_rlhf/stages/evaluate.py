"""Evaluation stage: on held-out prompts, sample from the base, SFT and PPO policies; score each
response with the reward model and (synthetic data) the gold judge. Tables as CSV (the paper stage typesets them):
perplexity, reward-model accuracy, mean reward with 95 % bootstrap intervals, KL(policy‖SFT),
win rate of PPO over SFT under both judges, response length, and sample generations.

Held-out perplexity of the base and SFT models and the reward model's held-out margins were measured
by the SFT and RM stages on the whole eval split (sft/held_out_perplexity.json,
rm/held_out_margins.csv); they are read, not recomputed (a fifth of this
stage's time), and the PPO policy's perplexity is measured here on the same rows, the same way.

For a seed of the seed study (`--seed`, results/<run>/seeds/<seed>/) only PPO is evaluated: the base
and SFT policies are the run's own, so their generations are read from the run's evaluation and every
seed is compared with the same SFT samples.

`run` reads as the stage's three parts, each a function: `generate` (one policy's responses),
`score` (their reward-model and gold scores and KL to SFT), both in held_out.py because PPO's
held-out curve draws and scores its points the same way, and `summarise` (the tables)."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd

from ..actor import SharedBaseRoles
from ..atomic import atomic_dir, atomic_file, read_json
from ..checkpoints import reused_rows
from ..config import Config
from ..data import read_split
from ..held_out import Sampling, generate, score, summary
from ..models import base_location, load_model
from ..paths import HELD_OUT_MARGINS, HELD_OUT_PERPLEXITY, RunPaths
from ..stats import POLICIES, bootstrap_ci, win_rate, wins
from ..synthetic import prompt_category
from ..tokens import prompt_ids
from ..training import TrainingError, checkpoints_for, completion_perplexity, require, seed_everything, write_metrics


def run(config: Config, paths: RunPaths) -> dict:
    seed_everything(config)
    roles = SharedBaseRoles.load(config, require(paths.sft / "merged", "sft"), require(paths.rm / "adapter", "rm"),
                                 policy_adapter=require(paths.ppo / "adapter", "ppo"), trainable=False)
    roles.model.eval()  # no adapter's dropout in any forward (the reward adapter keeps the RM's)
    # A seed's run evaluates PPO only: its base and SFT rows are the run's own.
    run_generations = paths.main.eval / "generations.csv" if paths.shared_root else None
    base = None if run_generations else load_model(base_location(paths), config, roles.tokenizer.pad_token_id,
                                                   kind="causal", trainable=False)
    split = read_split(paths, "eval")
    held_out = split[: config.eval.num_prompts]
    sample_prompts = [r["prompt"] for r in held_out[: config.eval.num_sample_rows]]
    # Batches of similar prompt length: left padding then costs ~5 % of the prompt tokens, not ~30 %.
    prompts = [r["prompt"] for r in sorted(held_out, key=lambda r: len(prompt_ids(roles.tokenizer, r["prompt"])))]
    saved = checkpoints_for(paths, "evaluate", _rollout_config(config), _rollout_inputs(paths))

    rows = []
    for policy in POLICIES:
        if run_generations is not None and policy != "ppo":
            rows += rows_of_the_run(run_generations, policy, prompts)
            continue
        policy_rows = load_saved(saved, policy)
        if policy_rows is None:
            drawn = generate(policy, roles, base, prompts, Sampling.of_eval(config.eval, config.run.seed))
            policy_rows = score(policy, roles, drawn, config.eval.temperature)
            save(saved, policy, policy_rows)
        rows += policy_rows
    generations = pd.DataFrame(rows)
    perplexity = perplexities(paths, roles, split, saved)
    rm_pairs = pd.read_csv(require(paths.rm / HELD_OUT_MARGINS, "rm"))
    if generations["gold"].notna().any():  # synthetic prompts: where the reward model errs, by kind of question
        rm_pairs["category"] = [prompt_category(r["prompt"]) for r in split[: len(rm_pairs)]]

    tables = summarise(generations, rm_pairs, perplexity, sample_prompts, config.eval.bootstrap_samples,
                       config.run.seed)
    with atomic_dir(paths.eval) as out:
        for name, frame in tables.items():
            frame.to_csv(out / f"{name}.csv", index=False)  # the paper stage typesets them from these
        generations.to_csv(out / "generations.csv", index=False)
        rm_pairs.to_csv(out / "rm_pairs.csv", index=False)
    metrics = eval_metrics(tables["summary"], tables["winrate"], rm_pairs, len(prompts))
    write_metrics(paths, "eval", {k: (None if v != v else v) for k, v in metrics.items()}, config)
    print(tables["summary"].to_string(index=False, float_format="{:.3f}".format))
    return metrics


def rows_of_the_run(generations_csv: Path, policy: str, prompts: list[str]) -> list[dict]:
    """A seed's base or SFT rows: those of the run's own evaluation, so every seed is compared with the
    same SFT samples."""
    frame = pd.read_csv(require(generations_csv, "evaluate"))
    frame["response"] = frame["response"].fillna("")  # an empty reply reads as NaN
    frame = frame[frame["policy"] == policy]
    if frame["prompt"].tolist() != prompts:
        raise TrainingError(f"{generations_csv} was evaluated on other prompts; re-run the evaluate stage")
    return frame.to_dict("records")


def perplexities(paths: RunPaths, roles: SharedBaseRoles, split: list[dict], saved: Path) -> dict[str, float]:
    """Held-out perplexity on the chosen responses: base and SFT as the SFT stage measured them, PPO's here."""
    measured_by_sft = read_json(require(paths.sft / HELD_OUT_PERPLEXITY, "sft"))
    ppo = load_saved(saved, "ppo_perplexity")
    if ppo is None:
        ppo = [{"perplexity": completion_perplexity(roles.model, roles.tokenizer, [r["prompt"] for r in split],
                                                    [r["chosen"] for r in split])}]
        save(saved, "ppo_perplexity", ppo)
    return {"base": measured_by_sft["perplexity_base"], "sft": measured_by_sft["perplexity_sft"],
            "ppo": ppo[0]["perplexity"]}


# ------------------------------------------------------------------ summarise
def summarise(generations: pd.DataFrame, rm_pairs: pd.DataFrame, perplexity: dict[str, float],
              sample_prompts: list[str], samples: int, seed: int) -> dict[str, pd.DataFrame]:
    """The stage's tables, by file name; the gold tables only where the data has a gold judge. The gold
    judge answers for its own (synthetic) prompts only, for every policy alike; on real prompts there is
    none, and the tables and metrics leave its columns out instead of filling NaN."""
    has_gold = bool(generations["gold"].notna().any())
    tables = {"summary": summary_table(generations, perplexity, has_gold, samples, seed),
              "winrate": winrate_table(generations, samples, seed),
              "samples": samples_table(generations, sample_prompts)}
    if has_gold:
        tables["gold_by_category"] = gold_by_category(generations)
        tables["rm_by_category"] = rm_by_category(rm_pairs)
    return tables


def summary_table(generations: pd.DataFrame, perplexity: dict[str, float], has_gold: bool, samples: int,
                  seed: int) -> pd.DataFrame:
    """Per policy: perplexity, then held_out.summary's means and intervals."""
    return pd.DataFrame([{"policy": name, "perplexity": perplexity[name]} | summary(frame, has_gold, samples, seed)
                         for name, frame in generations.groupby("policy", sort=False)])


def winrate_table(generations: pd.DataFrame, samples: int, seed: int) -> pd.DataFrame:
    """PPO's win rate over SFT, prompt by prompt, under each judge that scored both, with a 95 % bootstrap interval."""
    by_policy = {name: frame.reset_index(drop=True) for name, frame in generations.groupby("policy")}
    rows = []
    for judge, column in (("reward_model", "reward"), ("gold", "gold")):
        ppo, sft = by_policy["ppo"][column].astype(float), by_policy["sft"][column].astype(float)
        keep = ppo.notna() & sft.notna()
        if keep.any():
            low, high = bootstrap_ci(wins(ppo[keep], sft[keep]), samples, seed)
            rows.append({"judge": judge, "win_rate": win_rate(ppo[keep], sft[keep]), "ci_low": low, "ci_high": high,
                         "prompts": int(keep.sum())})
    return pd.DataFrame(rows)


def samples_table(generations: pd.DataFrame, sample_prompts: list[str]) -> pd.DataFrame:
    """The responses of every policy to the first eval.num_sample_rows prompts, a row per prompt."""
    shown = generations[generations["prompt"].isin(sample_prompts)]
    return shown.pivot_table(index="prompt", columns="policy", values="response", aggfunc="first").reset_index()


def gold_by_category(generations: pd.DataFrame) -> pd.DataFrame:
    """Mean gold score per kind of question (rows) and policy (columns): where a gain comes from."""
    judged = generations.dropna(subset=["gold"])
    judged = judged.assign(category=judged["prompt"].map(prompt_category))
    if judged.empty:  # real prompts: no gold judge, and no table (the stage writes none)
        return pd.DataFrame(columns=["category", *dict.fromkeys(generations["policy"]), "prompts"])
    table = judged.pivot_table(index="category", columns="policy", values="gold", aggfunc="mean")
    table = table[list(dict.fromkeys(judged["policy"]))]  # the policies in evaluation order
    prompts = judged[judged["policy"] == judged["policy"].iloc[0]].groupby("category").size().rename("prompts")
    return table.join(prompts).reset_index()


def rm_by_category(rm_pairs: pd.DataFrame) -> pd.DataFrame:
    """The reward model's held-out pairwise accuracy and mean margin per kind of question: a category
    it cannot rank is one PPO cannot learn, whatever its settings (its blind spots)."""
    grouped = rm_pairs.groupby("category")
    return pd.DataFrame({"accuracy": grouped["correct"].mean(), "margin_mean": grouped["margin"].mean(),
                         "pairs": grouped.size()}).reset_index()


def eval_metrics(summary: pd.DataFrame, winrate: pd.DataFrame, rm_pairs: pd.DataFrame, prompts: int) -> dict:
    """metrics/eval.json: each policy's means, the reward model's held-out accuracy, the win rates."""
    row = summary.set_index("policy")
    metrics = {f"{p}_{k}": float(row.loc[p, k]) for p in row.index
               for k in ("perplexity", "reward_mean", "gold_mean", "kl_to_sft", "response_length") if k in row.columns}
    metrics |= {"rm_accuracy": float(rm_pairs["correct"].mean()), "rm_margin_mean": float(rm_pairs["margin"].mean()),
                "eval_prompts": prompts}
    metrics |= {f"winrate_{'rm' if r.judge == 'reward_model' else r.judge}": float(r.win_rate)
                for r in winrate.itertuples()}
    return metrics


# ------------------------------------------------------------------ generations kept across a kill
def _rollout_inputs(paths: RunPaths) -> list[Path]:
    """What the generations depend on besides the params: the eval split and the trained adapters
    (the merged SFT model and the base are fixed by these and by model.name_or_path)."""
    adapters = sorted(f for stage in (paths.sft, paths.rm, paths.ppo)
                      for f in (stage / "adapter").rglob("*") if f.is_file())
    return [paths.split("eval"), *adapters]


def _rollout_config(config: Config) -> Config:
    """The params the rollouts depend on: the bootstrap and the number of sample rows shown only
    change the tables, so changing them keeps the saved generations."""
    return config.model_copy(update={"eval": config.eval.model_copy(update={"bootstrap_samples": 0,
                                                                            "num_sample_rows": 0})})


def load_saved(folder: Path, name: str) -> list[dict] | None:
    """The records saved as folder/<name>.jsonl by an earlier run with the same params and inputs
    (checkpoints_for empties the folder otherwise), or None; a damaged file is reported and made again."""
    path = folder / f"{name}.jsonl"
    return reused_rows(path, "evaluate") if path.is_file() else None


def save(folder: Path, name: str, rows: list[dict]) -> None:
    """Saved atomically as soon as made, so that a crash or kill later in the evaluation keeps every
    policy already generated."""
    with atomic_file(folder / f"{name}.jsonl") as handle:
        handle.writelines(json.dumps(row) + "\n" for row in rows)
