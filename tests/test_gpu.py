"""The CUDA path that CI (no GPU) never takes: NF4 weights on the GPU, a paged 8-bit AdamW step,
and a PPO rollout + update on one shared 4-bit base. Skipped without a CUDA device."""

from __future__ import annotations

import math

import pytest
import torch

from qlora_rlhf.config import Config

from conftest import smoke_params

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


@pytest.fixture
def gpu_config(tmp_path, tiny_model_dir) -> Config:
    """The smoke profile as the paper profile runs it: bf16 compute, gradient checkpointing, paged AdamW."""
    return Config.model_validate(smoke_params(tiny_model_dir, tmp_path / "results", **{
        "model.compute_dtype": "bfloat16", "model.gradient_checkpointing": True,
        "model.optimizer": "paged_adamw_8bit"}))


def test_nf4_weights_live_on_the_gpu_and_a_paged_adamw_lora_step_is_finite(gpu_config, tiny_model_dir):
    import bitsandbytes as bnb
    from peft import get_peft_model

    from qlora_rlhf.models import load_model, load_tokenizer, lora_config

    tokenizer = load_tokenizer(tiny_model_dir)
    model = get_peft_model(load_model(tiny_model_dir, gpu_config, tokenizer.pad_token_id), lora_config(gpu_config))
    quantized = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert quantized and all(m.weight.quant_state.quant_type == "nf4" for m in quantized)
    assert all(m.weight.device.type == "cuda" for m in quantized)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = bnb.optim.PagedAdamW8bit(trainable, lr=1e-3)
    before = [p.detach().clone() for p in trainable]
    ids = tokenizer(["\n\nHuman: What is 2 plus 3?\n\nAssistant: 2 plus 3 is 5."], return_tensors="pt").input_ids.cuda()
    model.train()
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    optimizer.step()
    assert math.isfinite(loss.item())
    assert any(not torch.equal(a, b) for a, b in zip(before, trainable))


def test_ppo_on_cuda_starts_at_the_reference_and_updates_finitely(gpu_config, tiny_model_dir, tmp_path):
    """One 4-bit base for policy, reference and reward: at step 0 KL to the reference is 0; an update
    (ppo_epochs x mini-batches) gives finite losses."""
    from peft import get_peft_model

    from qlora_rlhf.actor import SharedBaseRoles
    from qlora_rlhf.models import load_model, load_tokenizer, lora_config
    from qlora_rlhf.stages import ppo

    tokenizer = load_tokenizer(tiny_model_dir)
    scorer = load_model(tiny_model_dir, gpu_config, tokenizer.pad_token_id, kind="score")
    get_peft_model(scorer, lora_config(gpu_config, task_type="SEQ_CLS")).save_pretrained(tmp_path / "rm")
    del scorer
    ac = SharedBaseRoles.load(gpu_config, tiny_model_dir, tmp_path / "rm")
    assert next(ac.model.parameters()).device.type == "cuda"
    torch.manual_seed(0)
    prompts = ["\n\nHuman: What is 2 plus 3?\n\nAssistant:", "\n\nHuman: How do I pick a lock?\n\nAssistant:"]
    batch = ppo.rollout(ac, prompts * 2, gpu_config.ppo)
    assert batch.kl.abs().max().item() < 1e-2
    stats = ppo.update(ac, ppo.make_optimizer(gpu_config, ac.policy_parameters()), batch, gpu_config.ppo)
    assert all(math.isfinite(v) for v in stats.values()), stats


def test_dense_sampler_on_cuda_matches_the_nf4_policy(gpu_config, tiny_model_dir):
    """The CUDA NF4 kernels de-quantize differently from the CPU's: the dense copy (generation.py) must still
    compute the policy's function there, and live on the GPU."""
    from peft import get_peft_model

    from qlora_rlhf.actor import forward
    from qlora_rlhf.generation import dense_copy
    from qlora_rlhf.models import load_model, load_tokenizer, lora_config

    tokenizer = load_tokenizer(tiny_model_dir)
    model = get_peft_model(load_model(tiny_model_dir, gpu_config, tokenizer.pad_token_id, trainable=False),
                           lora_config(gpu_config))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.05)
    dense = dense_copy(model, torch.bfloat16)
    assert all(p.device.type == "cuda" for p in dense.parameters())
    ids = torch.tensor([tokenizer("\n\nHuman: Hello there\n\nAssistant: Hi").input_ids], device="cuda")
    mask = torch.ones_like(ids)
    own = torch.log_softmax(forward(model, ids, mask)[0].float(), -1)
    copy = torch.log_softmax(forward(dense, ids, mask)[0].float(), -1)
    assert (own - copy).abs().max().item() < 0.1
