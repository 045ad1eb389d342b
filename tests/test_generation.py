"""The dense sampler (model.generation: dense, generation.py) draws from the policy's own distribution:
its per-token log-probs match peft's NF4 model in every role, and sampling leaves the policy as it was."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from qlora_rlhf import precision
from qlora_rlhf.actor import POLICY, SharedBaseRoles, forward, token_logprobs
from qlora_rlhf.config import Config
from qlora_rlhf.generation import dense_copy, sampling_model
from qlora_rlhf.memory import KNOWN_ARCHITECTURES, plan

PROMPTS = ["\n\nHuman: What is 2 plus 3?\n\nAssistant:", "\n\nHuman: Name a colour.\n\nAssistant:",
           "\n\nHuman: Hi?\n\nAssistant:"]


def _actor(pipeline, dtype: str) -> SharedBaseRoles:
    """The pipeline's SFT + RM with a fresh policy adapter made non-trivial (LoRA's B starts at zero,
    which would make the merged update vanish and the test pass for the wrong reason)."""
    config, paths, _ = pipeline
    config = config.model_copy(update={"model": config.model.model_copy(update={"compute_dtype": dtype})})
    ac = SharedBaseRoles.load(config, paths.sft / "merged", paths.rm / "adapter", trainable=True)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in ac.model.named_parameters():
            if f"lora_B.{POLICY}." in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.05)
    return ac


def _sequences(ac: SharedBaseRoles):
    torch.manual_seed(3)
    drawn = replace(ac, engine="peft").sample(PROMPTS, 8, 1.0)  # from the NF4 model itself
    return drawn.ids, drawn.mask, drawn.response, drawn.response_mask, drawn.prompt_len - 1


def _logprobs(model, ids, mask, response, start) -> torch.Tensor:
    with torch.no_grad():
        logits, _ = forward(model, ids, mask, logits_from=start)
    return token_logprobs(logits[:, :-1], response, 1.0)


def _role_gaps(ac: SharedBaseRoles, dtype: torch.dtype) -> dict[str, float]:
    """Largest |log-prob difference| between the dense copy and peft's model, per role, on real tokens."""
    ids, mask, response, resp_mask, start = _sequences(ac)
    gaps = {}
    for role, context in (("policy", ac.adapter(POLICY)), ("reference", ac.reference()),
                          ("reward", ac.adapter("reward"))):
        with context:
            own = _logprobs(ac.model, ids, mask, response, start)
            dense = _logprobs(dense_copy(ac.model, dtype), ids, mask, response, start)
        gaps[role] = (own - dense).abs()[resp_mask.bool()].max().item()
    return gaps


def test_dense_copy_matches_every_role_in_float32(pipeline):
    """In float32 the dense copy is the same function up to rounding: the policy (adapter merged), the
    reference (adapters disabled) and a second adapter, each as peft computes it."""
    ac = _actor(pipeline, "float32")
    gaps = _role_gaps(ac, torch.float32)
    assert max(gaps.values()) < 1e-3, gaps
    ids, mask, response, resp_mask, start = _sequences(ac)
    with ac.reference():
        sft = _logprobs(ac.model, ids, mask, response, start)
    policy = _logprobs(ac.model, ids, mask, response, start)
    assert (policy - sft).abs()[resp_mask.bool()].max() > 10 * max(gaps.values())  # the adapter matters


def test_dense_copy_in_bfloat16_stays_within_bfloat16s_own_rounding(pipeline):
    """In bfloat16 neither path is exact; the dense copy must be no further from the float32 function
    than peft's own bfloat16 path is (the stated tolerance: twice its error, plus 0.01 nats)."""
    exact = _actor(pipeline, "float32")
    ids, mask, response, resp_mask, start = _sequences(exact)
    reference = _logprobs(exact.model, ids, mask, response, start)
    half = _actor(pipeline, "bfloat16")
    peft_error = (_logprobs(half.model, ids, mask, response, start) - reference).abs()[resp_mask.bool()].max().item()
    dense = dense_copy(half.model, torch.bfloat16)
    dense_error = (_logprobs(dense, ids, mask, response, start) - reference).abs()[resp_mask.bool()].max().item()
    assert dense_error <= 2 * peft_error + 0.01, (dense_error, peft_error)


def test_dense_sampler_draws_the_policys_tokens_and_leaves_it_unchanged(pipeline):
    """Same seed, same tokens from either engine (float32); the policy's weights, adapters and trainable
    flags are untouched by making and dropping a dense copy."""
    ac = _actor(pipeline, "float32")
    before = {name: param.detach().clone() for name, param in ac.model.named_parameters()}
    trainable = {name for name, param in ac.model.named_parameters() if param.requires_grad}
    drawn = {}
    for engine in ("peft", "dense"):
        ac.engine = engine
        torch.manual_seed(11)
        drawn[engine] = ac.sample(PROMPTS, 8, 0.7).response
    assert torch.equal(drawn["peft"], drawn["dense"])
    assert all(torch.equal(before[name], param) for name, param in ac.model.named_parameters())
    assert trainable == {name for name, param in ac.model.named_parameters() if param.requires_grad}


def test_dense_copy_of_a_plain_nf4_model(pipeline, tiny_model_dir):
    """The evaluation's base policy is an NF4 model without peft: its copy de-quantizes it."""
    from qlora_rlhf.models import load_model, load_tokenizer

    config, _, _ = pipeline
    config = config.model_copy(update={"model": config.model.model_copy(update={"compute_dtype": "float32"})})
    tok = load_tokenizer(tiny_model_dir)
    base = load_model(tiny_model_dir, config, tok.pad_token_id, trainable=False)
    ids = torch.tensor([tok("\n\nHuman: Hello there\n\nAssistant: Hi").input_ids])
    mask = torch.ones_like(ids)
    with sampling_model(base, "dense", torch.float32) as dense:
        assert dense is not base
        gap = (forward(base, ids, mask)[0] - forward(dense, ids, mask)[0]).abs().max().item()
    assert gap < 1e-3
    with sampling_model(base, "peft", torch.float32) as same:
        assert same is base


@pytest.mark.parametrize("engine", ["dense", "peft"])
def test_memory_plan_counts_the_dense_copy_in_generation(engine):
    from conftest import smoke_params

    params = smoke_params("meta-llama/Llama-2-7b-hf", "results", **{"model.generation": engine,
                                                                     "model.compute_dtype": "bfloat16"})
    config = Config.model_validate(params)
    arch = KNOWN_ARCHITECTURES["meta-llama/Llama-2-7b-hf"]
    ppo = plan(config, arch)["ppo"]
    if engine == "dense":
        assert ppo["dense_sampler_copy"] == arch.total_params * 2
    else:
        assert "dense_sampler_copy" not in ppo


def test_auto_samples_densely_in_16_bit_and_through_peft_in_float32():
    engine = precision.generation_engine
    assert engine("auto", "bfloat16") == "dense" and engine("auto", "float16") == "dense"
    assert engine("auto", "float32") == "peft"
    assert engine("dense", "float32") == "dense" and engine("peft", "bfloat16") == "peft"
