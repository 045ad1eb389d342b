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
seed is compared with the same SFT samples."""

from __future__ import annotations

import json
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from ..actor import ActorCritic, forward, response_mask, sample, token_logprobs
from ..atomic import atomic_dir, atomic_file, read_json
from ..checkpoints import reused_rows
from ..config import Config
from ..data import read_split
from ..models import base_location, load_model
from ..paths import HELD_OUT_MARGINS, HELD_OUT_PERPLEXITY, RunPaths
from ..stats import bootstrap_ci
from ..synthetic import gold_score, prompt_category
from ..tokens import prompt_ids
from ..training import TrainingError, checkpoints_for, completion_perplexity, require, seed_everything, write_metrics


@torch.no_grad()
def sequence_logprob(model, ids, mask, response, start: int, temperature: float) -> torch.Tensor:
    logits, _ = forward(model, ids, mask, logits_from=start)
    resp_mask = (mask[:, start + 1 :]).float()
    return (token_logprobs(logits[:, :-1], response, temperature) * resp_mask).sum(1)


@torch.no_grad()
def rollouts(name: str, model, role, ac: ActorCritic, prompts: list[str], config: Config) -> pd.DataFrame:
    """Generate with one policy (`model` inside the context `role()`, sampled through model.generation's
    engine); score with the reward model; KL to SFT from the sampled tokens' log-probs under the
    distribution they were drawn from and under SFT (0 by definition for SFT itself)."""
    tok, cfg, rows = ac.tokenizer, config.eval, []
    is_sft = role == ac.reference
    torch.manual_seed(config.run.seed)  # the same sampling noise for every policy
    for start in tqdm(range(0, len(prompts), cfg.batch_size), desc=f"evaluate {name}", unit="batch"):
        batch = prompts[start : start + cfg.batch_size]
        with role(), ac.sampler(model) as sampler:
            query, query_mask, response, own = sample(sampler, tok, batch, cfg.max_new_tokens, cfg.temperature, logprobs=True)
        resp_mask = response_mask(response, tok.eos_token_id)
        ids, mask = torch.cat([query, response], 1), torch.cat([query_mask, resp_mask], 1)
        kl = torch.zeros(len(batch))
        if not is_sft:
            with ac.reference():
                sft = sequence_logprob(ac.model, ids, mask, response, query.shape[1] - 1, cfg.temperature)
            kl = (own * resp_mask).sum(1) - sft
        scores = ac.reward(ids, mask)
        for i, prompt in enumerate(batch):
            text = tok.decode(response[i][resp_mask[i].bool()], skip_special_tokens=True)
            rows.append({"policy": name, "prompt": prompt, "response": text, "reward": scores[i].item(),
                         "gold": gold_score(prompt, text), "kl_to_sft": kl[i].item(),
                         "response_length": int(resp_mask[i].sum()),
                         "ends_with_eos": bool((response[i] == tok.eos_token_id).any())})
    return pd.DataFrame(rows)


def gold_by_category(generations: pd.DataFrame) -> pd.DataFrame:
    """Mean gold score per kind of question (rows) and policy (columns): where a gain comes from."""
    judged = generations.dropna(subset=["gold"]).assign(category=lambda f: f["prompt"].map(prompt_category))
    if judged.empty:  # real prompts: no gold judge, and no table (the stage writes none)
        return pd.DataFrame(columns=["category", *dict.fromkeys(generations["policy"]), "prompts"])
    table = judged.pivot_table(index="category", columns="policy", values="gold", aggfunc="mean")
    table = table[list(dict.fromkeys(judged["policy"]))]  # the policies in evaluation order
    prompts = judged[judged["policy"] == judged["policy"].iloc[0]].groupby("category").size().rename("prompts")
    return table.join(prompts).reset_index()


def _rollout_inputs(paths: RunPaths) -> list[Path]:
    """What the generations depend on besides the params: the eval split and the trained adapters
    (the merged SFT model and the base are fixed by these and by model.name_or_path)."""
    adapters = sorted(f for stage in (paths.sft, paths.rm, paths.ppo)
                      for f in (stage / "adapter").rglob("*") if f.is_file())
    return [paths.split("eval"), *adapters]


def _rollout_config(config: Config) -> Config:
    """The params the rollouts depend on: the bootstrap and the number of sample rows shown only
    change the tables, so changing them keeps the saved generations."""
    return config.model_copy(update={"eval": config.eval.model_copy(update={"bootstrap_samples": 0, "num_sample_rows": 0})})


def cached(folder: Path, name: str, make) -> list[dict]:
    """The records saved as folder/<name>.jsonl by an earlier run with the same params and inputs
    (checkpoints_for empties the folder otherwise); else make() them and save them atomically, so that
    a crash or kill later in the evaluation keeps every policy already generated."""
    path = folder / f"{name}.jsonl"
    rows = reused_rows(path, "evaluate") if path.is_file() else None  # damaged: reported, generated again
    if rows is not None:
        return rows
    rows = make()
    with atomic_file(path) as handle:
        handle.writelines(json.dumps(row) + "\n" for row in rows)
    return rows


def run(config: Config, paths: RunPaths) -> dict:
    seed_everything(config)
    sft_model = require(paths.sft / "merged", "sft")
    ac = ActorCritic.load(config, sft_model, require(paths.rm / "adapter", "rm"),
                          policy_adapter=require(paths.ppo / "adapter", "ppo"), trainable=False)
    ac.model.eval()  # no adapter's dropout in any forward (the reward adapter keeps the RM's)
    tok = ac.tokenizer
    evaluated_by_run = paths.main.eval / "generations.csv" if paths.shared_root else None
    base = None if evaluated_by_run else load_model(base_location(paths), config, tok.pad_token_id, kind="causal",
                                                    trainable=False)
    split = read_split(paths, "eval")
    held_out = split[: config.eval.num_prompts]
    sample_prompts = [r["prompt"] for r in held_out[: config.eval.num_sample_rows]]
    # Batches of similar prompt length: left padding then costs ~5 % of the prompt tokens, not ~30 %.
    held_out.sort(key=lambda r: len(prompt_ids(tok, r["prompt"])))
    prompts = [r["prompt"] for r in held_out]
    roles = {"base": (base, nullcontext), "sft": (ac.model, ac.reference), "ppo": (ac.model, nullcontext)}
    saved = checkpoints_for(paths, "evaluate", _rollout_config(config), _rollout_inputs(paths))

    run_generations = (pd.read_csv(require(evaluated_by_run, "evaluate")).assign(
        response=lambda f: f["response"].fillna("")) if evaluated_by_run else None)  # an empty reply reads as NaN

    def policy_rows(name: str, model, role) -> list[dict]:
        if run_generations is not None and name != "ppo":
            frame = run_generations[run_generations["policy"] == name]
            if frame["prompt"].tolist() != prompts:
                raise TrainingError(f"{evaluated_by_run} was evaluated on other prompts; re-run the evaluate stage")
            return frame.to_dict("records")
        return cached(saved, name, lambda: rollouts(name, model, role, ac, prompts, config).to_dict("records"))

    generations = pd.DataFrame([row for name, (model, role) in roles.items() for row in policy_rows(name, model, role)])

    measured_by_sft = read_json(require(paths.sft / HELD_OUT_PERPLEXITY, "sft"))
    perplexity = {"base": measured_by_sft["perplexity_base"], "sft": measured_by_sft["perplexity_sft"],
                  "ppo": cached(saved, "ppo_perplexity", lambda: [{"perplexity": completion_perplexity(
                      ac.model, tok, [r["prompt"] for r in split], [r["chosen"] for r in split])}])[0]["perplexity"]}
    rm_pairs = pd.read_csv(require(paths.rm / HELD_OUT_MARGINS, "rm"))

    samples, seed = config.eval.bootstrap_samples, config.run.seed
    # The gold judge answers for its own (synthetic) prompts only, for every policy alike; on real
    # prompts there is none, and the tables and metrics leave its columns out instead of filling NaN.
    has_gold = bool(generations["gold"].notna().any())
    summary = []
    for name, frame in generations.groupby("policy", sort=False):
        reward_ci = bootstrap_ci(frame["reward"].to_numpy(dtype=float), samples, seed)
        row = {"policy": name, "perplexity": perplexity[name], "reward_mean": frame["reward"].mean(),
               "reward_ci_low": reward_ci[0], "reward_ci_high": reward_ci[1]}
        if has_gold:
            gold = frame["gold"].dropna().to_numpy(dtype=float)
            gold_ci = bootstrap_ci(gold, samples, seed)
            row |= {"gold_mean": gold.mean(), "gold_ci_low": gold_ci[0], "gold_ci_high": gold_ci[1]}
        summary.append(row | {"kl_to_sft": frame["kl_to_sft"].mean(), "response_length": frame["response_length"].mean(),
                              "eos_fraction": frame["ends_with_eos"].astype(float).mean()})
    summary = pd.DataFrame(summary)

    by_policy = {name: frame.reset_index(drop=True) for name, frame in generations.groupby("policy")}
    winrate = []
    for judge, column in (("reward_model", "reward"), ("gold", "gold")):
        ppo, sft = by_policy["ppo"][column].astype(float), by_policy["sft"][column].astype(float)
        keep = ppo.notna() & sft.notna()
        if keep.any():
            wins = np.where(ppo[keep] > sft[keep], 1.0, np.where(ppo[keep] == sft[keep], 0.5, 0.0))
            low, high = bootstrap_ci(wins, samples, seed)
            winrate.append({"judge": judge, "win_rate": wins.mean(), "ci_low": low, "ci_high": high, "prompts": int(keep.sum())})
    winrate = pd.DataFrame(winrate)
    by_category = gold_by_category(generations)
    shown = generations[generations["prompt"].isin(sample_prompts)]
    samples_table = shown.pivot_table(index="prompt", columns="policy", values="response", aggfunc="first").reset_index()

    with atomic_dir(paths.eval) as out:
        tables = {"summary": summary, "winrate": winrate, "samples": samples_table}
        if has_gold:
            tables["gold_by_category"] = by_category
        for name, frame in tables.items():
            frame.to_csv(out / f"{name}.csv", index=False)  # the paper stage typesets them from these
        generations.to_csv(out / "generations.csv", index=False)
        rm_pairs.to_csv(out / "rm_pairs.csv", index=False)
    row = summary.set_index("policy")
    metrics = {f"{p}_{k}": float(row.loc[p, c]) for p in row.index
               for k, c in (("perplexity", "perplexity"), ("reward_mean", "reward_mean"), ("gold_mean", "gold_mean"),
                            ("kl_to_sft", "kl_to_sft"), ("response_length", "response_length")) if c in row.columns}
    metrics |= {"rm_accuracy": float(rm_pairs["correct"].mean()), "rm_margin_mean": float(rm_pairs["margin"].mean()),
                "eval_prompts": len(prompts)}
    metrics |= {f"winrate_{'rm' if r.judge == 'reward_model' else r.judge}": float(r.win_rate) for r in winrate.itertuples()}
    write_metrics(paths, "eval", {k: (None if v != v else v) for k, v in metrics.items()}, config)
    print(summary.to_string(index=False, float_format=lambda v: f"{v:.3f}"))
    return metrics
