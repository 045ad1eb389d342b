"""Best-of-n from SFT, the reference frontier PPO is judged against (Gao et al. 2022): for each of the
eval split's first `best_of_n.num_prompts` prompts, max(`best_of_n.ns`) replies are sampled from SFT
(the policy with its adapters disabled, as the evaluation samples SFT) at eval.temperature and
eval.max_new_tokens; the reward model scores each, and for each n the reply it ranks best among the
first n samples is kept. Every n shares the one set of samples, so the curve is monotone in the
reward model's score by construction and n=1 is plain SFT.

Each n sits at the analytic KL(best-of-n || SFT) = log n - (n-1)/n nats per reply (Stiennon et al.
2020, Gao et al. 2022; Beirami et al. 2024 show it bounds the true KL from above), the same unit as
the evaluation's KL of PPO to SFT, so both go on Gao et al.'s axes: score against sqrt(KL).

It reads SFT, the reward model and the eval split only (no PPO), so it runs once per run, not per
seed. Writes results/<run>/best_of_n/ atomically:

- best_of_n.csv  one row per n: KL, sqrt(KL), mean reward-model and (synthetic prompts) gold score of
                 the picks with 95 % bootstrap intervals over prompts, their length and EOS share
- samples.csv    every sample: prompt, sample index, reply, reward, gold, and `best_of_<n>` marking
                 the pick of each n
- metrics/best_of_n.json  the table's means per n (DVC's metrics)
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from ..actor import SharedBaseRoles
from ..atomic import atomic_dir
from ..config import Config
from ..data import read_split
from ..paths import RunPaths
from ..stats import bootstrap_ci
from ..synthetic import gold_score
from ..tokens import prompt_ids
from ..training import require, seed_everything, write_metrics

TABLE, SAMPLES = "best_of_n.csv", "samples.csv"


def analytic_kl(n: int) -> float:
    """KL(best-of-n || base) in nats for n independent samples: log n - (n-1)/n (0 at n=1)."""
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    return math.log(n) - (n - 1) / n


def select_best(scores: np.ndarray, ns: list[int]) -> dict[int, np.ndarray]:
    """For each n, the column index (sample) of each row's (prompt's) highest score among its first n
    samples. One set of samples serves every n; a tie goes to the earlier sample (np.argmax)."""
    scores = np.asarray(scores, dtype=float)
    if scores.ndim != 2 or max(ns) > scores.shape[1]:
        raise ValueError(f"need a (prompts, >= {max(ns)}) score matrix, got shape {scores.shape}")
    return {n: np.argmax(scores[:, :n], axis=1) for n in ns}


@torch.no_grad()
def draw(ac: SharedBaseRoles, prompts: list[str], per_prompt: int, config: Config) -> pd.DataFrame:
    """`per_prompt` SFT samples of each prompt, scored by the reward model and the gold judge. Batches
    hold (prompt, sample) pairs prompt by prompt, so a batch has few prompt lengths and little padding."""
    tok, cfg, size = ac.tokenizer, config.eval, config.best_of_n.batch_size
    jobs = [(i, j) for i in range(len(prompts)) for j in range(per_prompt)]
    torch.manual_seed(config.run.seed)
    rows = []
    for start in tqdm(range(0, len(jobs), size), desc="best-of-n: sample SFT", unit="batch"):
        batch = jobs[start : start + size]
        texts = [prompts[i] for i, _ in batch]
        with ac.reference():  # SFT: the policy with its adapters off
            drawn = ac.sample(texts, cfg.max_new_tokens, cfg.temperature)
        response, resp_mask = drawn.response, drawn.response_mask
        scores = ac.reward(drawn.ids, drawn.mask)
        for k, (i, j) in enumerate(batch):
            text = tok.decode(response[k][resp_mask[k].bool()], skip_special_tokens=True)
            rows.append({"prompt_index": i, "sample": j, "prompt": texts[k], "response": text,
                         "reward": scores[k].item(), "gold": gold_score(texts[k], text),
                         "response_length": int(resp_mask[k].sum()),
                         "ends_with_eos": bool(drawn.has_eos[k])})
    return pd.DataFrame(rows)


def frontier(samples: pd.DataFrame, ns: list[int], bootstrap_samples: int,
             seed: int) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The table (one row per n) and the samples with a `best_of_<n>` column marking each n's picks."""
    samples = samples.sort_values(["prompt_index", "sample"]).reset_index(drop=True)

    def matrix(column: str) -> np.ndarray:
        return samples.pivot(index="prompt_index", columns="sample", values=column).to_numpy(dtype=float)

    reward, gold = matrix("reward"), matrix("gold")
    length, eos = matrix("response_length"), matrix("ends_with_eos")
    picks = select_best(reward, ns)
    rows_of = np.arange(len(reward))
    has_gold = bool(np.isfinite(gold).any())  # real prompts have no gold judge: no gold columns
    table = []
    for n in ns:
        pick = picks[n]
        chosen = reward[rows_of, pick]
        low, high = bootstrap_ci(chosen, bootstrap_samples, seed)
        row = {"n": n, "kl": analytic_kl(n), "sqrt_kl": math.sqrt(analytic_kl(n)),
               "reward_mean": chosen.mean(), "reward_ci_low": low, "reward_ci_high": high}
        if has_gold:
            judged = gold[rows_of, pick]
            judged = judged[np.isfinite(judged)]
            low, high = bootstrap_ci(judged, bootstrap_samples, seed)
            row |= {"gold_mean": judged.mean(), "gold_ci_low": low, "gold_ci_high": high}
        table.append(row | {"response_length": length[rows_of, pick].mean(),
                            "eos_fraction": eos[rows_of, pick].mean(), "prompts": len(reward)})
        samples[f"best_of_{n}"] = samples["sample"].to_numpy() == pick[samples["prompt_index"].to_numpy()]
    return pd.DataFrame(table), samples


def run(config: Config, paths: RunPaths) -> dict:
    seed_everything(config)
    cfg = config.best_of_n
    # No PPO adapter: a fresh policy adapter is never used, SFT is sampled with every adapter off.
    ac = SharedBaseRoles.load(config, require(paths.sft / "merged", "sft"), require(paths.rm / "adapter", "rm"),
                          trainable=False)
    ac.model.eval()
    held_out = read_split(paths, "eval")[: cfg.num_prompts]  # a prefix: eval's first prompts too
    order = sorted(range(len(held_out)), key=lambda i: len(prompt_ids(ac.tokenizer, held_out[i]["prompt"])))
    drawn = draw(ac, [held_out[i]["prompt"] for i in order], max(cfg.ns), config)
    drawn["prompt_index"] = [order[i] for i in drawn["prompt_index"]]  # back to the split's order
    table, samples = frontier(drawn, cfg.ns, config.eval.bootstrap_samples, config.run.seed)
    with atomic_dir(paths.best_of_n) as out:
        table.to_csv(out / TABLE, index=False)
        samples.to_csv(out / SAMPLES, index=False)
    metrics = {f"best_of_{int(r['n'])}_{key}": float(r[key]) for r in table.to_dict("records")
               for key in ("kl", "reward_mean", "gold_mean") if key in r}
    metrics |= {"prompts": len(held_out), "samples": len(samples)}
    write_metrics(paths, "best_of_n", metrics, config)
    print(table.to_string(index=False, float_format=lambda v: f"{v:.3f}"))
    return metrics
