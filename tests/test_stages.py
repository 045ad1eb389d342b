"""The three training stages and evaluation end to end on a tiny random Llama (seconds each)."""

from __future__ import annotations

import json
import math
from dataclasses import replace

import numpy as np
import pandas as pd
import pytest
import torch

from qlora_rlhf import precision, synthetic
from qlora_rlhf.actor import SharedBaseRoles, forward, token_logprobs
from qlora_rlhf.data import read_split
from qlora_rlhf.models import base_location
from qlora_rlhf.paths import HELD_OUT_MARGINS, HELD_OUT_PERPLEXITY
from qlora_rlhf.stages import ppo
from qlora_rlhf.stages.rm import score_texts
from qlora_rlhf.training import TrainingError, train_loss_ends


def test_sft_writes_a_loadable_adapter_and_finite_metrics(pipeline):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    config, paths, results = pipeline
    metrics = results["sft"]
    assert all(math.isfinite(metrics[k]) for k in ("perplexity_base", "perplexity_sft", "train_loss_last"))
    assert metrics["steps"] == config.sft.max_steps
    handed_on = json.loads((paths.sft / HELD_OUT_PERPLEXITY).read_text())  # what the evaluation reads
    assert handed_on == {k: metrics[k] for k in ("perplexity_base", "perplexity_sft")}
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_location(paths)), paths.sft / "adapter")
    assert any("lora_A" in name for name, _ in model.named_parameters())
    for stage in (paths.sft, paths.rm, paths.ppo):  # sorted, not in set order: the same bytes on every re-run
        modules = json.loads((stage / "adapter" / "adapter_config.json").read_text())["target_modules"]
        assert modules == sorted(modules)
    assert (paths.sft / "merged" / "model.safetensors").is_file()
    assert list(pd.read_csv(paths.metrics / "sft_history.csv").columns) == ["step", "loss"]


def test_reward_model_metrics_and_score_head(pipeline):
    from safetensors import safe_open

    _, paths, results = pipeline
    assert 0.0 <= results["rm"]["accuracy"] <= 1.0 and math.isfinite(results["rm"]["margin_mean"])
    with safe_open(str(paths.rm / "adapter" / "adapter_model.safetensors"), "pt") as f:
        assert any(k.endswith("score.weight") for k in f.keys())


def test_the_shared_base_reward_scores_as_the_reward_model_stage(pipeline):
    """PPO and the evaluation score with the reward adapter on the shared 4-bit base and a score head
    loaded by hand; the RM stage measured its held-out margins (which the evaluation reports) with
    its own classifier. The two must agree."""
    config, paths, _ = pipeline
    ac = SharedBaseRoles.load(config, paths.sft / "merged", paths.rm / "adapter", trainable=False)
    pairs = read_split(paths, "eval")

    def score(key):
        return score_texts(ac.reward, ac.tokenizer, [p["prompt"] + p[key] for p in pairs], 4, ac.device)

    stored = pd.read_csv(paths.rm / HELD_OUT_MARGINS)
    assert len(stored) == len(pairs) and stored["correct"].tolist() == (stored["margin"] > 0).tolist()
    # the two paths round differently in bf16 (auto picks it on a CPU with native bf16): one bf16 step apart
    tolerance = {"atol": 1e-4} if precision.of(config).dtype == "float32" else {"atol": 0.05, "rtol": 0.02}
    np.testing.assert_allclose(score("chosen") - score("rejected"), stored["margin"], **tolerance)


def test_train_loss_ends_skip_a_closing_log_without_loss():
    """rm.max_steps 3 with logging_steps 2: the Trainer's closing log at step 3 has accuracy and
    margin but no loss; the stage's metrics must still report the last logged loss, not NaN."""
    curve = pd.DataFrame({"step": [2, 3], "loss": [0.65, float("nan")], "accuracy": [0.5, 0.75]})
    assert train_loss_ends(curve) == {"train_loss_first": 0.65, "train_loss_last": 0.65}


def test_ppo_history_has_every_metric_and_finite_values(pipeline):
    config, paths, results = pipeline
    history = pd.read_csv(paths.metrics / "ppo_history.csv")
    steps = history[history["step"] > 0]  # step 0: the held-out curve's first point only
    expected = {"reward_mean", "reward_running_mean", "reward_prompt_centred", "kl", "kl_coef", "entropy",
                "clip_fraction", "approx_kl", "value_loss", "explained_variance", "policy_loss", "response_length",
                "eos_fraction"}
    assert expected <= set(history.columns)
    assert steps["step"].tolist() == list(range(1, config.ppo.steps + 1))
    assert steps[sorted(expected)].map(math.isfinite).all().all()
    assert steps["kl"].iloc[0] == pytest.approx(0.0, abs=1e-4)  # first rollout: the policy is the SFT model
    assert steps["reward_prompt_centred"].iloc[0] == pytest.approx(0.0, abs=1e-6)  # ... so no gain over SFT yet
    running = steps["reward_mean"].rolling(ppo.RUNNING_MEAN_STEPS, min_periods=1).mean()
    assert steps["reward_running_mean"].tolist() == pytest.approx(running.tolist())
    assert (steps["approx_kl"] >= 0).all() and (steps["explained_variance"] <= 1).all()
    assert (steps["kl_coef"] == config.ppo.kl_coef).all()  # the smoke profile's control is fixed
    assert (paths.ppo / "adapter" / "adapter_model.safetensors").is_file()


def test_the_held_out_curve_is_measured_at_step_zero_every_eval_every_steps_and_the_last(pipeline):
    """The smoke profile: 3 steps, a point every 2: steps 0, 2 and 3, each with the reward model's and
    the gold judge's score and the KL to SFT, with intervals; at step 0 the policy is SFT (KL 0)."""
    config, paths, _ = pipeline
    assert (config.ppo.steps, config.ppo.eval_every) == (3, 2)
    history = pd.read_csv(paths.metrics / "ppo_history.csv")
    points = history.dropna(subset=["held_out_reward_mean"])
    assert points["step"].tolist() == [0, 2, 3]
    for name in ("reward", "gold", "kl"):
        mean = points[f"held_out_{name}_mean" if name != "kl" else "held_out_kl_to_sft"]
        assert (points[f"held_out_{name}_ci_low"] <= mean + 1e-9).all() and (mean <= points[f"held_out_{name}_ci_high"]
                                                                             + 1e-9).all(), name
    # the sampler's log-probs (cached decoding) against a full forward's: equal up to rounding
    assert points["held_out_kl_to_sft"].iloc[0] == pytest.approx(0.0, abs=1e-2)
    assert history.loc[history["step"] == 0, "reward_mean"].isna().all()  # no rollout at step 0
    metrics = json.loads(paths.stage_metrics("ppo").read_text())
    assert metrics["held_out_points"] == 3
    assert metrics["held_out_reward_mean_first"] == points["held_out_reward_mean"].iloc[0]
    assert metrics["held_out_gold_mean_last"] == points["held_out_gold_mean"].iloc[-1]


def test_reference_is_the_sft_policy_at_step_zero(pipeline):
    """A fresh policy adapter is zero-initialised: its log-probs equal the reference's (KL = 0),
    and the reference is SFT (merged), not the pre-SFT base."""
    config, paths, _ = pipeline
    ac = SharedBaseRoles.load(config, paths.sft / "merged", paths.rm / "adapter", trainable=False)
    enc = ac.tokenizer(["\n\nHuman: What is 2 plus 3?\n\nAssistant: 5."], return_tensors="pt")
    ids, mask = enc.input_ids, enc.attention_mask
    with torch.no_grad():  # as in the rollout (bitsandbytes takes another kernel when inputs need grad)
        policy_logits, _ = forward(ac.model, ids, mask)
        with ac.reference():
            ref_logits, _ = forward(ac.model, ids, mask)
    policy_lp, ref_lp = (token_logprobs(x[:, :-1], ids[:, 1:], 1.0) for x in (policy_logits, ref_logits))
    assert torch.allclose(policy_lp, ref_lp, atol=1e-5)
    trained = SharedBaseRoles.load(config, paths.sft / "merged", paths.rm / "adapter",
                                   policy_adapter=paths.ppo / "adapter", trainable=False)
    with torch.no_grad(), trained.reference():
        trained_ref, _ = forward(trained.model, ids, mask)
    assert torch.allclose(trained_ref, ref_logits, atol=1e-4)  # disabling the PPO adapter gives back SFT


def test_logits_from_a_position_match_the_full_forward(pipeline):
    """PPO and the evaluation ask for logits over the response only, and the reward for the last
    position only: the same numbers as slicing a full forward, hidden states unchanged."""
    config, paths, _ = pipeline
    ac = SharedBaseRoles.load(config, paths.sft / "merged", paths.rm / "adapter", trainable=False)
    enc = ac.tokenizer(["\n\nHuman: Hi?\n\nAssistant: Hello.", "\n\nHuman: What is 2 plus 3?"],
                       return_tensors="pt", padding=True)
    ids, mask = enc.input_ids, enc.attention_mask
    with torch.no_grad():
        full, hidden = forward(ac.model, ids, mask)
        tail, tail_hidden = forward(ac.model, ids, mask, logits_from=3)
        last, _ = forward(ac.model, ids, mask, logits_from=None)
    assert tail.shape[1] == ids.shape[1] - 3 and last.shape[1] == 1
    assert torch.allclose(tail, full[:, 3:], atol=1e-4) and torch.allclose(last, full[:, -1:], atol=1e-4)
    assert torch.equal(tail_hidden, hidden)


def test_completion_perplexity_matches_one_pair_at_a_time(tiny_model_dir):
    """Length-sorted batches and logits from the first completion token on give the same number as
    scoring each pair alone over all its positions."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from qlora_rlhf.training import completion_perplexity

    model, tok = AutoModelForCausalLM.from_pretrained(tiny_model_dir), AutoTokenizer.from_pretrained(tiny_model_dir)
    prompts = ["\n\nHuman: Hi?\n\nAssistant:", "\n\nHuman: What is 2 plus 3? Answer briefly.\n\nAssistant:",
               "\n\nHuman: x\n\nAssistant:"]
    completions = [" Hello there, how can I help?", " 5.", " Sure."]
    total_nll, total_tokens = 0.0, 0
    with torch.no_grad():
        for prompt, completion in zip(prompts, completions):
            p = tok(prompt, add_special_tokens=False).input_ids
            ids = torch.tensor([p + tok(completion, add_special_tokens=False).input_ids + [tok.eos_token_id]])
            logp = torch.log_softmax(model(input_ids=ids).logits[0, :-1].float(), -1)
            picked = logp.gather(-1, ids[0, 1:, None])[len(p) - 1 :]
            total_nll, total_tokens = total_nll - picked.sum().item(), total_tokens + len(picked)
    expected = math.exp(total_nll / total_tokens)
    assert completion_perplexity(model, tok, prompts, completions, batch_size=2) == pytest.approx(expected, rel=1e-4)


def test_evaluation_tables(pipeline):
    _, paths, results = pipeline
    summary = pd.read_csv(paths.eval / "summary.csv")
    assert list(summary["policy"]) == ["base", "sft", "ppo"]
    assert summary.loc[summary.policy == "sft", "kl_to_sft"].item() == pytest.approx(0.0, abs=1e-6)
    assert {"reward_model", "gold"} == set(pd.read_csv(paths.eval / "winrate.csv")["judge"])
    for name in ("summary.csv", "winrate.csv", "samples.csv", "generations.csv", "rm_pairs.csv"):
        assert (paths.eval / name).stat().st_size > 0
    eval_metrics = json.loads(paths.stage_metrics("eval").read_text())
    assert eval_metrics["rm_accuracy"] == results["rm"]["accuracy"]  # the RM stage's measurement, read
    assert summary.set_index("policy").loc["sft", "perplexity"] == results["sft"]["perplexity_sft"]
    assert eval_metrics["winrate_rm"] == results["eval"]["winrate_rm"]


def test_gold_by_category_averages_the_generations_per_kind_of_question(pipeline):
    _, paths, _ = pipeline
    table = pd.read_csv(paths.eval / "gold_by_category.csv").set_index("category")
    generations = pd.read_csv(paths.eval / "generations.csv").dropna(subset=["gold"])
    generations["category"] = generations["prompt"].map(synthetic.prompt_category)
    assert list(table.columns) == ["base", "sft", "ppo", "prompts"]
    assert table["prompts"].sum() == (generations["policy"] == "ppo").sum()
    for (category, policy), gold in generations.groupby(["category", "policy"])["gold"]:
        assert table.loc[category, policy] == pytest.approx(gold.mean())
    assert (paths.eval / "gold_by_category.csv").stat().st_size > 0
    assert not list(paths.eval.glob("*.tex"))  # the paper stage typesets the tables


def test_the_reward_models_held_out_accuracy_per_kind_of_question(pipeline):
    """rm_by_category.csv: the RM stage's held-out margins (the eval split, in order) grouped by category."""
    _, paths, _ = pipeline
    table = pd.read_csv(paths.eval / "rm_by_category.csv").set_index("category")
    margins = pd.read_csv(paths.rm / HELD_OUT_MARGINS)
    margins["category"] = [synthetic.prompt_category(r["prompt"]) for r in read_split(paths, "eval")]
    assert table["pairs"].sum() == len(margins)
    for category, rows in margins.groupby("category"):
        assert table.loc[category, "accuracy"] == pytest.approx((rows["margin"] > 0).mean())
        assert table.loc[category, "margin_mean"] == pytest.approx(rows["margin"].mean())


def test_ppo_guard_stops_on_non_finite_loss_and_keeps_the_last_good_checkpoint(pipeline, monkeypatch):
    config, paths, _ = pipeline
    root = paths.checkpoints("ppo")
    kept = sorted(p.name for p in root.glob("step-*"))
    longer = config.model_copy(update={"ppo": config.ppo.model_copy(update={"steps": config.ppo.steps + 1})})
    real_update = ppo.update
    monkeypatch.setattr(ppo, "update", lambda *a: real_update(*a) | {"policy_loss": float("nan")})
    with pytest.raises(TrainingError, match=rf"step {config.ppo.steps + 1}: non-finite policy_loss"):
        ppo.run(longer, paths)
    assert sorted(p.name for p in root.glob("step-*")) == kept


def test_ppo_guard_stops_on_kl_explosion(pipeline, monkeypatch):
    config, paths, _ = pipeline
    longer = config.model_copy(update={"ppo": config.ppo.model_copy(update={"steps": config.ppo.steps + 1,
                                                                            "max_kl": 0.5})})
    real_rollout = ppo.rollout
    exploded = torch.full((config.ppo.batch_size,), 9.0)
    monkeypatch.setattr(ppo, "rollout", lambda *a: replace(real_rollout(*a), kl=exploded))
    with pytest.raises(TrainingError,
                       match=rf"step {config.ppo.steps + 1}: KL to the reference 9.00 exceeds ppo.max_kl"):
        ppo.run(longer, paths)


def test_sft_history_callback_stops_on_non_finite_loss(pipeline):
    from qlora_rlhf.training import HistoryCallback

    class State:
        global_step = 7

    callback = HistoryCallback(history=None, keys=("loss",))
    with pytest.raises(TrainingError, match="step 7: non-finite loss"):
        callback.on_log(None, State(), None, logs={"loss": float("inf")})


@pytest.mark.slow
def test_a_second_run_gives_identical_data_hashes_and_metrics(pipeline, tmp_path, tiny_model_dir):
    """Seeds everywhere: on the CPU the whole pipeline is bit-for-bit repeatable (timings aside)."""
    from qlora_rlhf.config import Config
    from qlora_rlhf.models import load_tokenizer
    from qlora_rlhf.paths import RunPaths
    from qlora_rlhf.stages import base, data, evaluate, rm, sft

    from conftest import smoke_params

    _, first, _ = pipeline
    config = Config.model_validate(smoke_params(tiny_model_dir, tmp_path / "results"))
    paths = RunPaths.of(config)
    data.write_subsets(config, paths, load_tokenizer(tiny_model_dir))
    base.run(config, paths)
    for stage in (sft, rm, ppo, evaluate):
        stage.run(config, paths)
    manifest = lambda p: json.loads(p.manifest.read_text())["subsets"]  # noqa: E731
    assert manifest(paths) == manifest(first)
    for stage in ("sft", "rm", "ppo", "eval"):
        again, before = (json.loads(p.stage_metrics(stage).read_text()) for p in (paths, first))
        assert again == before, stage  # no wall time in a metrics file (timings.py)
    assert pd.read_csv(paths.metrics / "ppo_history.csv").equals(pd.read_csv(first.metrics / "ppo_history.csv"))


@pytest.mark.parametrize("stage, missing", [(ppo, "rm"), (ppo, "sft")])
def test_a_stage_without_its_trained_inputs_names_the_stage_to_run_first(pipeline, tmp_path, stage, missing):
    import shutil

    config, paths, _ = pipeline
    moved = config.model_copy(update={"run": config.run.model_copy(update={"results_dir": str(tmp_path)})})
    for name in ("data", "base", "sft", "rm"):
        if name != missing:
            shutil.copytree(paths.root / name, tmp_path / config.run.name / name)
    from qlora_rlhf.paths import RunPaths

    with pytest.raises(TrainingError, match=f"run the {missing} stage first"):
        stage.run(moved, RunPaths.of(moved))
