"""Where samples are drawn from (`model.generation`): the policy as peft runs it, or a dense copy of it
(`auto`: the copy in a 16-bit compute dtype, peft's path in float32; precision.generation_engine).
Sampling itself has one entry point, `actor.SharedBaseRoles.sample`, which draws through `sampling_model`.

- `peft`: the NF4 model with its LoRA modules. Every decoding step de-quantizes every 4-bit weight
  again (bitsandbytes' fast 4-bit kernel serves a single token only) and adds each LoRA module's
  product in Python: per-token costs that dominate sampling a few dozen tokens.
- `dense`: the same function as one plain model in the compute dtype, made for each call to
  `sampling_model`: each 4-bit weight de-quantized once, and the LoRA update of whatever adapters are
  active at that moment (none inside the reference role's `disable_adapter()`) merged into it, read
  from peft's own state as its forward reads it. The copy lives only while its samples are drawn,
  then its memory is returned (the plan counts it in PPO's generation phase, memory.py).

Both sample the same distribution: in float32 the per-token log-probs agree to rounding; in a 16-bit
compute dtype they differ as much as two orders of the same additions do (tests/test_generation.py).
Whatever draws the samples, PPO's ratio and the KL to the reference are computed from the policy's
own forward passes (ppo.rollout), never from the sampler's logits.
"""

from __future__ import annotations

from contextlib import contextmanager
from itertools import chain

import torch
from torch import nn

from . import precision


def _dequantized(layer: nn.Module) -> torch.Tensor:
    """A base linear layer's weight as a float32 matrix (bitsandbytes' NF4 de-quantized, or a plain copy)."""
    import bitsandbytes as bnb

    if isinstance(layer, bnb.nn.Linear4bit):
        return bnb.functional.dequantize_4bit(layer.weight.data, layer.weight.quant_state).float()
    return layer.weight.detach().float()


def _dense_linear_weights(model: nn.Module) -> dict[str, torch.Tensor]:
    """'<module>.weight' -> dense float32 weight for every 4-bit or LoRA-wrapped linear layer of the
    plain transformers model, the active adapters' updates merged as peft's forward would add them."""
    import bitsandbytes as bnb
    from peft.tuners.lora import LoraLayer

    weights = {}
    for name, module in model.named_modules():
        if isinstance(module, LoraLayer):
            weight = _dequantized(module.get_base_layer())
            if not module.disable_adapters and not module.merged:
                for adapter in module.active_adapters:
                    if adapter in module.lora_A:
                        if adapter in module.lora_variant:  # DoRA and kin rescale the weight, not a plain sum
                            raise NotImplementedError(f"model.generation=dense merges plain LoRA only ({adapter!r})")
                        weight = weight + module.get_delta_weight(adapter).float()
            weights[f"{name}.weight"] = weight
        elif isinstance(module, bnb.nn.Linear4bit) and not name.endswith(".base_layer"):
            weights[f"{name}.weight"] = _dequantized(module)
    return weights


def dense_copy(model: nn.Module, dtype: torch.dtype) -> nn.Module:
    """A plain transformers model in `dtype` computing what `model` (peft-wrapped or not, NF4 or not)
    computes in its present adapter state. Parameters it needs no change to are shared, not copied."""
    from peft import PeftModel

    inner = model.get_base_model() if isinstance(model, PeftModel) else model
    config = inner.config.__class__.from_dict(inner.config.to_dict())
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    with torch.device("meta"):
        dense = type(inner)._from_config(config, dtype=dtype)
    source = {name.replace(".base_layer.", "."): tensor
              for name, tensor in chain(inner.named_parameters(remove_duplicate=False),
                                        inner.named_buffers(remove_duplicate=False)) if ".lora_" not in name}
    source |= _dense_linear_weights(inner)
    converted: dict[int, torch.Tensor] = {}  # tied weights stay one tensor
    for name, _ in chain(dense.named_parameters(remove_duplicate=False), dense.named_buffers(remove_duplicate=False)):
        owner, _, leaf = name.rpartition(".")
        module, tensor = dense.get_submodule(owner), source[name]  # alive in `source`: its id stays its own
        if leaf in module._parameters:
            if id(tensor) not in converted:
                converted[id(tensor)] = tensor.detach().to(dtype) if tensor.is_floating_point() else tensor.detach()
            module._parameters[leaf] = nn.Parameter(converted[id(tensor)], requires_grad=False)
        else:  # buffers (rotary frequencies) keep their own dtype
            module._buffers[leaf] = tensor
    dense.generation_config = inner.generation_config
    return dense.eval()


@contextmanager
def sampling_model(model: nn.Module, engine: str, dtype: torch.dtype):
    """The model to call `generate` on: `model` itself (`peft`), or its dense copy (`dense`), released
    on exit so that a GPU has the memory back before the next phase. `engine` may be `auto`, resolved for
    `dtype` by precision.generation_engine (the one rule)."""
    if precision.generation_engine(engine, str(dtype).removeprefix("torch.")) == "peft":
        yield model
        return
    from .models import contiguous_lm_head_input

    with torch.no_grad():
        dense = dense_copy(model, dtype)
    contiguous_lm_head_input(dense)
    try:
        yield dense
    finally:
        del dense
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
