"""The memory planner: parameter counts from the architecture, the paper profile fits one 24 GB
GPU, a huge batch does not, activations scale with batch x sequence, and the CLI writes its JSON."""

from __future__ import annotations

import json

import pytest

from qlora_rlhf import memory
from qlora_rlhf.config import load_config
from qlora_rlhf.paths import RunPaths

from conftest import REPO

LLAMA2_7B = memory.KNOWN_ARCHITECTURES["meta-llama/Llama-2-7b-hf"]


@pytest.fixture(scope="module")
def paper():
    return load_config(REPO / "configs" / "paper-llama2-7b.yaml")


def _with(config, section: str, **changes):
    return config.model_copy(update={section: getattr(config, section).model_copy(update=changes)})


def test_llama2_7b_architecture_totals_6_7b_params():
    assert LLAMA2_7B.total_params == pytest.approx(6.74e9, rel=0.005)


def test_lora_r16_all_linear_is_40m_params(paper):
    assert memory.lora_params(paper, LLAMA2_7B) == pytest.approx(40.0e6, rel=0.01)


def test_lora_params_scale_with_rank_and_targets(paper):
    n = memory.lora_params(paper, LLAMA2_7B)
    lora = paper.model.lora
    doubled = paper.model_copy(update={"model": paper.model.model_copy(
        update={"lora": lora.model_copy(update={"r": 32})})})
    assert memory.lora_params(doubled, LLAMA2_7B) == 2 * n
    qv = paper.model_copy(update={"model": paper.model.model_copy(
        update={"lora": lora.model_copy(update={"target_modules": ["q_proj", "v_proj"]})})})
    assert memory.lora_params(qv, LLAMA2_7B) == 32 * 2 * 16 * (4096 + 4096)


def test_paged_adamw_8bit_state_is_about_0_08_gb(paper):
    stages = memory.plan(paper, LLAMA2_7B)
    assert stages["sft"]["optimizer_states"] / 1e9 == pytest.approx(0.08, abs=0.005)
    torch_adam = paper.model_copy(update={"model": paper.model.model_copy(update={"optimizer": "adamw_torch"})})
    assert memory.plan(torch_adam, LLAMA2_7B)["sft"]["optimizer_states"] / 1e9 == pytest.approx(0.32, abs=0.01)


def test_nf4_base_is_about_3_5_gb(paper):
    sft = memory.plan(paper, LLAMA2_7B)["sft"]
    assert 3.0e9 < sft["base_linear_weights_nf4"] + sft["embeddings"] + sft["lm_head"] < 4.5e9
    none = paper.model_copy(update={"model": paper.model.model_copy(update={"quantization": "none"})})
    assert memory.plan(none, LLAMA2_7B)["sft"]["base_linear_weights"] == LLAMA2_7B.linear_params * 2


def test_paper_profile_fits_24_gib(paper):
    result = memory.summary(paper, LLAMA2_7B, budget_gib=24.0)
    for stage in memory.STAGES:
        assert result["stages"][stage]["fits"], (stage, result["stages"][stage]["peak_memory_gib"])
        assert result["stages"][stage]["peak_memory_gib"] > 4  # the base alone is ~4 GiB


def test_shared_ppo_base_saves_two_4_bit_copies(paper):
    """TRL's PPOTrainer with peft: the policy (its adapter disabled is the reference), a value model and
    a reward model, three 4-bit copies; ours is one. The two extra are sequence classifiers (no lm_head)."""
    sft = memory.plan(paper, LLAMA2_7B)["sft"]
    one_classifier = sft["base_linear_weights_nf4"] + sft["embeddings"] + sft["norms"]
    extra = memory.separate_models_extra_bytes(paper, LLAMA2_7B)
    assert extra == pytest.approx(2 * one_classifier)
    assert 7.0 < extra / memory.GIB < 7.5


def test_huge_batch_does_not_fit(paper):
    huge = _with(paper, "sft", batch_size=256)
    assert not memory.summary(huge, LLAMA2_7B)["stages"]["sft"]["fits"]
    huge_ppo = _with(paper, "ppo", batch_size=512, mini_batch_size=64)
    assert not memory.summary(huge_ppo, LLAMA2_7B)["stages"]["ppo"]["fits"]


@pytest.mark.parametrize("checkpointing", [True, False])
def test_activations_scale_linearly_with_batch_times_sequence(paper, checkpointing):
    config = paper.model_copy(update={"model": paper.model.model_copy(
        update={"gradient_checkpointing": checkpointing})})
    base = memory.activations(config, LLAMA2_7B, 2, 256)
    assert memory.activations(config, LLAMA2_7B, 4, 256) == pytest.approx(2 * base)
    assert memory.activations(config, LLAMA2_7B, 2, 512) == pytest.approx(2 * base)
    assert memory.activations(config, LLAMA2_7B, 4, 128) == pytest.approx(base)


def test_checkpointing_saves_activation_memory(paper):
    off = paper.model_copy(update={"model": paper.model.model_copy(update={"gradient_checkpointing": False})})
    assert memory.activations(off, LLAMA2_7B, 4, 512) > 5 * memory.activations(paper, LLAMA2_7B, 4, 512)


def test_kv_cache_formula(paper):
    # 2 (k, v) x 32 layers x 32 kv heads x 128 head dim x 384 tokens x 16 prompts x 4 bytes (fp32 under NF4)
    assert memory.kv_cache(paper, LLAMA2_7B, 16, 384) == 2 * 32 * 32 * 128 * 384 * 16 * 4
    # the paper samples from a dense bf16 copy (model.generation: dense): its cache is bf16; peft's is fp32
    assert memory.plan(paper, LLAMA2_7B)["ppo"]["kv_cache"] == memory.kv_cache(paper, LLAMA2_7B, 16, 384, 2)
    peft = paper.model_copy(update={"model": paper.model.model_copy(update={"generation": "peft"})})
    assert memory.plan(peft, LLAMA2_7B)["ppo"]["kv_cache"] == memory.kv_cache(paper, LLAMA2_7B, 16, 384)


def test_architecture_from_base_config_json(tmp_path, paper):
    paths = RunPaths(tmp_path / "run")
    (paths.base_model / "model").mkdir(parents=True)
    (paths.base_model / "model" / "config.json").write_text(json.dumps({
        "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
        "intermediate_size": 128, "vocab_size": 1000, "tie_word_embeddings": True}))
    arch = memory.architecture(paper, paths)
    assert (arch.hidden_size, arch.head_dim, arch.num_kv_heads, arch.tie_word_embeddings) == (64, 16, 2, True)


def test_embedded_default_needs_no_files(tmp_path):
    config = load_config(REPO / "params.yaml")
    arch = memory.architecture(config, RunPaths(tmp_path / "none"))
    assert arch == memory.KNOWN_ARCHITECTURES["embedded:smollm2-135m-instruct"]
    assert arch.total_params == pytest.approx(134.5e6, rel=0.01)


def test_unknown_model_raises_plan_error(tmp_path, paper, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    unknown = paper.model_copy(update={"model": paper.model.model_copy(
        update={"name_or_path": "nobody/no-such-model"})})
    with pytest.raises(memory.PlanError, match="architecture unknown"):
        memory.architecture(unknown, RunPaths(tmp_path))


def test_run_prints_table_and_writes_json(tmp_path, paper, capsys):
    paths = RunPaths(tmp_path / "paper")
    result = memory.run(paper, paths, budget_gib=24.0)
    out = capsys.readouterr().out
    assert "kv_cache" in out and "peak (sum)" in out
    written = json.loads((tmp_path / "paper" / "memory_plan.json").read_text())
    assert written["stages"]["ppo"]["fits"] is True
    assert written["lora_params"] == result["lora_params"]
    ppo = written["stages"]["ppo"]
    assert sum(ppo["components_bytes"].values()) / memory.GIB == pytest.approx(ppo["peak_memory_gib"], rel=1e-6)


def test_ppo_total_is_static_plus_its_largest_phase(paper):
    ppo = memory.plan(paper, LLAMA2_7B)["ppo"]
    phases = {name: sum(ppo[k] for k in keys) for name, keys in memory.PPO_PHASES.items()}
    static = sum(v for k, v in ppo.items() if not any(k in keys for keys in memory.PPO_PHASES.values())
                 and k != "phases_not_concurrent")
    assert sum(ppo.values()) == pytest.approx(static + max(phases.values()))
    assert ppo["phases_not_concurrent"] == pytest.approx(max(phases.values()) - sum(phases.values()))


def test_sft_logits_are_one_chunk_of_trl_chunked_loss(paper):
    # SFTTrainer's default loss_type "chunked_nll" never builds batch x seq x vocab logits
    small, large = (memory.plan(_with(paper, "sft", batch_size=b), LLAMA2_7B)["sft"]["logits"] for b in (4, 64))
    assert small == large == 4 * 256 * LLAMA2_7B.vocab_size * 4


def test_dropout_and_cpu_masks_add_activation_memory(paper):
    args = (paper, LLAMA2_7B, 4, 512)
    without = memory.activations(*args, dropout=False, lora_bytes=4, device="cuda")
    cuda = memory.activations(*args, dropout=True, lora_bytes=4, device="cuda")
    cpu = memory.activations(*args, dropout=True, lora_bytes=4, device="cpu")
    assert without < cuda < cpu


def test_plan_memory_plans_a_gpu_run_unless_asked_for_a_cpu_one(tmp_path, capsys):
    from qlora_rlhf.cli import main

    params = tmp_path / "params.yaml"
    params.write_text((REPO / "params.yaml").read_text().replace("results_dir: results", f"results_dir: {tmp_path}"))
    plans = {}
    for device in ("cuda", "cpu"):
        assert main(["plan-memory", "--params", str(params), *(["--device", device] if device == "cpu" else [])]) == 0
        assert f"on {device}," in capsys.readouterr().out
        plans[device] = json.loads((tmp_path / "smollm2-synthetic" / "memory_plan.json").read_text())
        assert plans[device]["device"] == device
    sft = {device: plan["stages"]["sft"]["components_bytes"]["activations"] for device, plan in plans.items()}
    assert sft["cpu"] > sft["cuda"]  # LoRA dropout keeps a noise tensor on a CPU, a 1-byte mask on CUDA
