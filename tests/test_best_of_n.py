"""Best-of-n from SFT: the analytic KL, the selection (the reward model's best among the first n of one
shared set of samples), and the stage on the tiny model."""

from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest

from qlora_rlhf.config import Config, ConfigError, load_config
from qlora_rlhf.stages.best_of_n import SAMPLES, TABLE, analytic_kl, frontier, select_best

from conftest import smoke_params


def test_analytic_kl_is_log_n_minus_n_minus_one_over_n():
    assert analytic_kl(1) == 0.0  # n=1 is SFT itself
    assert analytic_kl(2) == pytest.approx(math.log(2) - 0.5)
    assert analytic_kl(16) == pytest.approx(2.772588722 - 0.9375)
    kls = [analytic_kl(n) for n in range(1, 65)]
    assert all(b > a for a, b in zip(kls, kls[1:]))  # more samples, further from SFT
    with pytest.raises(ValueError):
        analytic_kl(0)


def test_selection_is_the_argmax_among_the_first_n_samples():
    scores = np.array([[0.1, 0.9, 0.3, 2.0],    # the best sample comes late: n=4 finds it, n=2 stops at 0.9
                       [5.0, 1.0, 1.0, 1.0],    # the first sample is best: every n keeps it
                       [0.0, 0.0, 0.0, 0.0]])   # all tied: the first one
    picks = select_best(scores, [1, 2, 4])
    assert picks[1].tolist() == [0, 0, 0]  # n=1: the first sample, plain SFT
    assert picks[2].tolist() == [1, 0, 0]
    assert picks[4].tolist() == [3, 0, 0]
    rng = np.random.default_rng(0)
    scores = rng.normal(size=(50, 16))
    picks = select_best(scores, [1, 2, 4, 8, 16])
    best = {n: scores[np.arange(50), picks[n]] for n in picks}
    for n in picks:  # shared samples: each n's pick is the maximum of the same row's first n
        np.testing.assert_array_equal(best[n], scores[:, :n].max(1))
        assert (picks[n] < n).all()
    for a, b in zip([1, 2, 4, 8], [2, 4, 8, 16]):  # hence never worse with more samples, prompt by prompt
        assert (best[b] >= best[a]).all()
    with pytest.raises(ValueError):
        select_best(scores, [32])


def test_frontier_table_and_marked_picks():
    rng = np.random.default_rng(1)
    prompts, per_prompt = 6, 4
    samples = pd.DataFrame([{"prompt_index": i, "sample": j, "prompt": f"p{i}", "response": f"r{i}.{j}",
                             "reward": rng.normal(), "gold": float(rng.random() < 0.5), "response_length": 3 + j,
                             "ends_with_eos": j % 2 == 0} for i in range(prompts) for j in range(per_prompt)])
    table, marked = frontier(samples.sample(frac=1, random_state=0), [1, 2, 4], 200, 0)  # any row order
    assert table["n"].tolist() == [1, 2, 4] and (table["prompts"] == prompts).all()
    np.testing.assert_allclose(table["kl"], [analytic_kl(n) for n in (1, 2, 4)])
    np.testing.assert_allclose(table["sqrt_kl"], np.sqrt(table["kl"]))
    for n, row in zip((1, 2, 4), table.itertuples()):
        chosen = marked[marked[f"best_of_{n}"]]
        assert chosen["prompt_index"].tolist() == list(range(prompts))  # one pick per prompt
        expected = samples[samples["sample"] < n].loc[lambda f: f.groupby("prompt_index")["reward"].idxmax()]
        assert chosen["response"].tolist() == expected.sort_values("prompt_index")["response"].tolist()
        assert row.reward_mean == pytest.approx(chosen["reward"].mean())
        assert row.gold_mean == pytest.approx(chosen["gold"].mean())
        assert row.reward_ci_low <= row.reward_mean <= row.reward_ci_high
        assert row.response_length == pytest.approx(chosen["response_length"].mean())
    assert marked.loc[marked["best_of_1"], "sample"].eq(0).all()
    no_gold, _ = frontier(samples.assign(gold=None), [1, 2], 200, 0)  # real prompts: no gold judge
    assert not any(c.startswith("gold") for c in no_gold.columns)


def test_params_are_validated(tmp_path):
    def config(**overrides) -> Config:
        return Config.model_validate(smoke_params("unused", tmp_path, **overrides))

    assert config().best_of_n.ns == [1, 2, 4]
    for ns in ([4, 2, 1], [1, 1, 2], [0, 1], []):
        with pytest.raises(ValueError, match="best_of_n.ns"):
            load_config(_write(tmp_path, smoke_params("unused", tmp_path, **{"best_of_n.ns": ns})))
    with pytest.raises(ConfigError, match="best_of_n.num_prompts=999 is larger than data.eval_size"):
        load_config(_write(tmp_path, smoke_params("unused", tmp_path, **{"best_of_n.num_prompts": 999})))


def _write(tmp_path, params: dict):
    import yaml

    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(params))
    return path


@pytest.fixture(scope="module")
def best_of_n_run(pipeline):
    from qlora_rlhf.stages import best_of_n

    config, paths, _ = pipeline
    return config, paths, best_of_n.run(config, paths)


def test_stage_on_the_tiny_model_selects_and_places_each_n_correctly(best_of_n_run):
    from qlora_rlhf.data import read_split

    config, paths, metrics = best_of_n_run
    cfg, out = config.best_of_n, paths.best_of_n
    table, samples = pd.read_csv(out / TABLE), pd.read_csv(out / SAMPLES, keep_default_na=False)
    ns, per_prompt = cfg.ns, max(cfg.ns)
    assert table["n"].tolist() == ns
    np.testing.assert_allclose(table["kl"], [math.log(n) - (n - 1) / n for n in ns])
    np.testing.assert_allclose(table["sqrt_kl"] ** 2, table["kl"])
    # every prompt of the eval split's prefix, max(ns) samples each
    prompts = [r["prompt"] for r in read_split(paths, "eval")[: cfg.num_prompts]]
    assert len(samples) == cfg.num_prompts * per_prompt
    by_prompt = samples.groupby("prompt_index")
    assert sorted(by_prompt.groups) == list(range(cfg.num_prompts))
    assert all(sorted(f["sample"]) == list(range(per_prompt)) for _, f in by_prompt)
    assert [by_prompt.get_group(i)["prompt"].iloc[0] for i in range(cfg.num_prompts)] == prompts
    # the pick of each n is the reward model's best among that prompt's first n samples
    reward = samples.pivot(index="prompt_index", columns="sample", values="reward").to_numpy()
    for n, row in zip(ns, table.itertuples()):
        picked = samples[samples[f"best_of_{n}"]].sort_values("prompt_index")
        assert picked["prompt_index"].tolist() == list(range(cfg.num_prompts))
        np.testing.assert_allclose(picked["reward"], reward[:, :n].max(1))
        assert (picked["sample"] < n).all()
        assert row.reward_mean == pytest.approx(picked["reward"].mean())
        assert row.gold_mean == pytest.approx(picked["gold"].astype(float).mean())  # synthetic prompts: judged
        assert metrics[f"best_of_{n}_reward_mean"] == pytest.approx(row.reward_mean)
    assert samples.loc[samples["best_of_1"], "sample"].eq(0).all()  # n=1: plain SFT
    assert table["reward_mean"].is_monotonic_increasing  # shared samples: more candidates never score lower
    stored = json.loads(paths.stage_metrics("best_of_n").read_text())
    assert stored["samples"] == len(samples) and stored["compute_dtype"] in ("float32", "bfloat16")


def test_stage_samples_sft_reproducibly(best_of_n_run):
    """A second run draws the same SFT samples (run.seed seeds them), so the stage's outputs are
    stable for DVC and for the paper."""
    from qlora_rlhf.stages import best_of_n

    config, paths, first = best_of_n_run
    before = (paths.best_of_n / SAMPLES).read_text()
    assert best_of_n.run(config, paths) == first
    assert (paths.best_of_n / SAMPLES).read_text() == before
    assert not [p for p in paths.best_of_n.parent.iterdir() if p.name.startswith(".best_of_n")]  # atomic
