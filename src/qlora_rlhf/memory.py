"""Expected peak memory of each stage (sft, rm, ppo) from the model's architecture and the params,
without downloading any weights: `qlora-rlhf plan-memory [--params ...] [--budget-gib 24]`.

The model is the design note's memory table, computed instead of copied (benchmarks/memory_vs_plan.py
measures the steps it predicts; docs/findings.md has how close). Every component is in bytes and a stage's
total is their sum. PPO's three phases (generation, rollout scoring, update) do not overlap in time, so its
table carries one negative entry, `phases_not_concurrent`, that removes all but the largest phase.
Assumptions, each matching how this project loads and trains models (qlora_rlhf.models, sft, reward, ppo):

- Quantized linear weights: NF4 with double quantization (NF4_DOUBLE_QUANT_BITS); lm_head is never quantized.
- peft's prepare_model_for_kbit_training upcasts every non-4-bit parameter (embeddings, lm_head, norms) to
  fp32, and bitsandbytes returns each layer's output in its input's dtype, so with NF4 the residual stream,
  the activations and the KV cache are fp32 even with a bf16 compute dtype. Without quantization everything
  is in the compute dtype.
- LoRA weights and gradients: SFT and RM cast them to the compute dtype (training.match_trainable_dtype), PPO
  keeps peft's fp32. The optimizer's states per parameter: OPTIMIZER_BYTES_PER_PARAM.
- Activations: what autograd saves per layer and token (layer_activation_bytes_per_token, read off
  torch.autograd.graph.saved_tensors_hooks). LoRA dropout is active in SFT only (RewardTrainer's
  disable_dropout, PPO's adapter has none). Without gradient checkpointing every layer keeps its tensors;
  with it each layer keeps its input and one layer is recomputed. Attention is SDPA.
- On a CPU dropout keeps a noise tensor of the input's dtype for backward, on CUDA a 1-byte mask: the plan
  is a GPU's unless asked for a CPU's (`plan-memory --device cpu`, as the embedded default runs).
- Logits are fp32. SFT: TRL's chunked_nll loss never builds the batch x seq x vocab logits (lm_head and
  cross-entropy a chunk of tokens at a time, under checkpointing); a chunk's backward holds the log-probs and
  their exp (kept for the entropy metric) and the log-probs' and logits' gradients. RM: a one-logit score head.
- PPO uses ONE shared 4-bit base (policy adapter + value head, reference = adapter disabled, reward model =
  a second adapter + score head), counted once. Generation keeps a KV cache over prompt + new tokens; with
  model.generation: dense it also holds a dense copy in the compute dtype (generation_phase). Rollout
  scoring keeps the policy's and the reference's logits over the response only; the update one
  mini-batch's response logits, their gradient and the log-softmax's copies.
- framework_overhead: a fixed allowance for the CUDA context and allocator slack (on a CPU, the interpreter
  and libraries). Not modelled: the C allocator's retention on a CPU (float32 stages keep freed blocks in
  glibc's heap, allocator.py, so their RSS stays at the heap's peak).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

from . import precision
from .atomic import write_json
from .config import EMBEDDED_MODEL, Config, ConfigError
from .paths import RunPaths

GIB = 1024**3
NF4_DOUBLE_QUANT_BITS = 4 + 8 / 64 + 32 / (64 * 256)  # 4.127 bits per quantized weight
OPTIMIZER_BYTES_PER_PARAM = {
    "paged_adamw_8bit": 2 * (1 + 4 / 256),  # two uint8 states + fp32 absmax per block of 256
    "adamw_torch": 8.0,  # two fp32 states
}
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
FRAMEWORK_OVERHEAD_BYTES = int(0.5 * GIB)
LINEAR_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
STAGES = ("sft", "rm", "ppo")


class PlanError(ConfigError):
    """The architecture of the configured model is unknown without a download (a ConfigError, so
    the CLI prints it as one line and exits 2)."""


@dataclass(frozen=True)
class Architecture:
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int
    tie_word_embeddings: bool

    @classmethod
    def from_config_dict(cls, cfg: dict) -> Architecture:
        heads = cfg["num_attention_heads"]
        return cls(
            hidden_size=cfg["hidden_size"], num_layers=cfg["num_hidden_layers"], num_heads=heads,
            num_kv_heads=cfg.get("num_key_value_heads") or heads,
            head_dim=cfg.get("head_dim") or cfg["hidden_size"] // heads,
            intermediate_size=cfg["intermediate_size"], vocab_size=cfg["vocab_size"],
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)))

    def linear_shapes(self) -> dict[str, tuple[int, int]]:
        """(in_features, out_features) of each linear module in one decoder layer."""
        h, q = self.hidden_size, self.num_heads * self.head_dim
        kv, i = self.num_kv_heads * self.head_dim, self.intermediate_size
        return {"q_proj": (h, q), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (q, h),
                "gate_proj": (h, i), "up_proj": (h, i), "down_proj": (i, h)}

    @property
    def linear_params(self) -> int:
        return self.num_layers * sum(a * b for a, b in self.linear_shapes().values())

    @property
    def embedding_params(self) -> int:
        return self.vocab_size * self.hidden_size

    @property
    def norm_params(self) -> int:
        return (2 * self.num_layers + 1) * self.hidden_size

    @property
    def total_params(self) -> int:
        lm_head = 0 if self.tie_word_embeddings else self.embedding_params
        return self.linear_params + self.embedding_params + lm_head + self.norm_params


# Known architectures, so planning needs no network (values from each model's config.json).
KNOWN_ARCHITECTURES = {
    EMBEDDED_MODEL: Architecture(576, 30, 9, 3, 64, 1536, 49152, True),  # SmolLM2-135M-Instruct
    "HuggingFaceTB/SmolLM2-135M-Instruct": Architecture(576, 30, 9, 3, 64, 1536, 49152, True),
    "meta-llama/Llama-2-7b-hf": Architecture(4096, 32, 32, 32, 128, 11008, 32000, False),
    "meta-llama/Llama-2-7b-chat-hf": Architecture(4096, 32, 32, 32, 128, 11008, 32000, False),
    "meta-llama/Llama-2-13b-hf": Architecture(5120, 40, 40, 40, 128, 13824, 32000, False),
    "mistralai/Mistral-7B-v0.1": Architecture(4096, 32, 32, 8, 128, 14336, 32000, False),
    "meta-llama/Meta-Llama-3-8B": Architecture(4096, 32, 32, 8, 128, 14336, 128256, False),
}


def architecture(config: Config, paths: RunPaths | None = None) -> Architecture:
    """From results/<run>/base/model/config.json when the base stage ran, a local model folder's
    config.json, the built-in table, or the hub cache (offline) -- never a download."""
    source = config.model.name_or_path
    candidates = []
    if paths is not None:
        candidates.append(paths.base_model / "model" / "config.json")
    candidates.append(Path(source) / "config.json")
    for path in candidates:
        if path.is_file():
            return Architecture.from_config_dict(json.loads(path.read_text()))
    if source in KNOWN_ARCHITECTURES:
        return KNOWN_ARCHITECTURES[source]
    try:
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache(source, "config.json")
        if isinstance(cached, str):
            return Architecture.from_config_dict(json.loads(Path(cached).read_text()))
    except Exception:  # noqa: BLE001 - an invalid repo id is just "unknown" here
        pass
    raise PlanError(
        f"model.name_or_path={source!r}: architecture unknown without a download; use a local folder with a "
        f"config.json, or one of: {', '.join(sorted(KNOWN_ARCHITECTURES))}")


def lora_params(config: Config, arch: Architecture) -> int:
    """Trainable LoRA parameters: r x (in + out) for every targeted linear module of every layer."""
    targets = set(config.model.lora.target_modules)
    if "all-linear" in targets:
        targets = set(LINEAR_MODULES)
    r = config.model.lora.r
    return arch.num_layers * sum(r * (a + b) for name, (a, b) in arch.linear_shapes().items() if name in targets)


def _weights(config: Config, arch: Architecture, lm_head: bool) -> dict[str, float]:
    """Frozen base weights as this project loads them for training (see the module docstring)."""
    nf4 = config.model.quantization == "nf4"
    cbytes = DTYPE_BYTES[config.model.compute_dtype]
    other = 4 if nf4 else cbytes  # prepare_model_for_kbit_training upcasts non-4-bit params to fp32
    linear = arch.linear_params * (NF4_DOUBLE_QUANT_BITS / 8 if nf4 else cbytes)
    head = arch.embedding_params * other if lm_head and not arch.tie_word_embeddings else 0
    out = {
        "base_linear_weights" + ("_nf4" if nf4 else ""): linear,
        "embeddings": arch.embedding_params * other,
        "lm_head": head,
        "norms": arch.norm_params * other,
    }
    if nf4:  # one linear layer de-quantized to the compute dtype at a time
        out["dequant_buffer"] = max(a * b for a, b in arch.linear_shapes().values()) * cbytes
    return out


def _act_bytes(config: Config) -> int:
    return 4 if config.model.quantization == "nf4" else DTYPE_BYTES[config.model.compute_dtype]


DEVICES = ("cuda", "cpu")


def _targets(config: Config) -> set[str]:
    targets = set(config.model.lora.target_modules)
    return set(LINEAR_MODULES) if "all-linear" in targets else targets & set(LINEAR_MODULES)


# Inputs that LoRA (without dropout or a dtype cast) keeps as new tensors: the normed hidden state read
# by q/k/v, the one read by gate/up, and the MLP product read by down. o_proj reads SDPA's output,
# which SDPA keeps anyway.
_SHARED_INPUTS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"), ("down_proj",))
# PPO's phases, which do not overlap in time, and their components.
PPO_PHASES = {"generation": ("kv_cache", "prefill_working_set", "dense_sampler_copy"),
              "scoring": ("rollout_logits", "rollout_hidden_states", "scoring_working_set"),
              "update": ("activations", "logits")}
SFT_LOSS_CHUNK_TOKENS = 256  # trl.trainer.sft_trainer._CHUNKED_LM_HEAD_CHUNK_SIZE
SFT_LOSS_CHUNK_COPIES = 4


def layer_activation_bytes_per_token(config: Config, arch: Architecture, *, dropout: bool, lora_bytes: int,
                                     device: str) -> float:
    """Bytes one decoder layer saves for backward per token. The frozen base linears (NF4 or not)
    save no activation; the RMSNorms keep their inputs; SDPA keeps q, k, v, its output and a
    logsumexp per head; the MLP keeps gate, up and SiLU(gate). Each LoRA module keeps its input
    (lora_A) and lora_A's output (lora_B): with dropout a fresh dropout output plus the dropout
    mask, without it the tensor the module reads (shared by q/k/v and by gate/up), or peft's copy
    of it cast to the adapter's dtype when that differs. Checked on SmolLM2 with
    torch.autograd.graph.saved_tensors_hooks: 17,347 fp32 elements per token and layer measured
    against 17,403 here with dropout (CPU), 10,128 against 10,107 without."""
    ab, r = _act_bytes(config), config.model.lora.r
    h, q, kvd = arch.hidden_size, arch.num_heads * arch.head_dim, arch.num_kv_heads * arch.head_dim
    shapes, targets = arch.linear_shapes(), _targets(config)
    base = (2 * h + 2 * q + 2 * kvd + 3 * arch.intermediate_size + arch.num_heads + 2) * ab
    inputs = sum(shapes[name][0] for name in targets)
    if dropout:  # CPU dropout keeps a noise tensor in the input's dtype, CUDA a bool mask
        kept = inputs * (lora_bytes + (lora_bytes if device == "cpu" else 1))
    elif lora_bytes != ab:
        kept = inputs * lora_bytes
    else:
        kept = sum(shapes[group[0]][0] for group in _SHARED_INPUTS if targets & set(group)) * ab
    return base + kept + len(targets) * r * lora_bytes


def activations(config: Config, arch: Architecture, sequences: int, tokens: int, *, dropout: bool | None = None,
                lora_bytes: int | None = None, device: str = "cuda") -> float:
    """Saved activations of one training forward+backward over `sequences` x `tokens` (defaults:
    SFT's, i.e. LoRA dropout as configured and the adapter in the compute dtype)."""
    ab = _act_bytes(config)
    per_layer = sequences * tokens * layer_activation_bytes_per_token(
        config, arch, dropout=config.model.lora.dropout > 0 if dropout is None else dropout,
        lora_bytes=DTYPE_BYTES[config.model.compute_dtype] if lora_bytes is None else lora_bytes,
        device=device)
    if config.model.gradient_checkpointing:
        kept = arch.num_layers * sequences * tokens * arch.hidden_size * ab
        return kept + 2 * per_layer
    return arch.num_layers * per_layer + per_layer  # all layers + the gradients of one at the peak


def logits(arch: Architecture, sequences: int, tokens: int, copies: int) -> float:
    return sequences * tokens * arch.vocab_size * 4 * copies


def sft_logits(arch: Architecture, sequences: int, tokens: int) -> float:
    """TRL's chunked cross-entropy: one chunk of at most 256 target tokens at a time, 4 copies."""
    return logits(arch, 1, min(SFT_LOSS_CHUNK_TOKENS, sequences * (tokens - 1)), SFT_LOSS_CHUNK_COPIES)


def working_set(config: Config, arch: Architecture, tokens: int, element_bytes: int | None = None) -> float:
    """One decoder layer's transient tensors in a no-grad forward: the MLP's gate, up, SiLU(gate) and
    their product (measured on SmolLM2: 3.6 x intermediate per token for the MLP, 4.4 for the layer)."""
    return tokens * 4 * arch.intermediate_size * (element_bytes or _act_bytes(config))


def kv_cache(config: Config, arch: Architecture, batch: int, tokens: int, element_bytes: int | None = None) -> float:
    return (2 * arch.num_layers * arch.num_kv_heads * arch.head_dim * tokens * batch
            * (element_bytes or _act_bytes(config)))


def generation_phase(config: Config, arch: Architecture) -> dict[str, float]:
    """PPO's sampling: the KV cache and the prefill's transient tensors, in the dtype the sampler
    computes in. A dense sampler (generation.py) is a whole copy of the model in the compute dtype,
    with the residual stream in that dtype too; peft's runs the NF4 model itself."""
    cfg, cbytes = config.ppo, DTYPE_BYTES[config.model.compute_dtype]
    dense = precision.generation_engine(config.model.generation, config.model.compute_dtype) == "dense"
    element = cbytes if dense else _act_bytes(config)
    phase = {"kv_cache": kv_cache(config, arch, cfg.batch_size, config.data.max_prompt_tokens + cfg.max_new_tokens,
                                  element),
             "prefill_working_set": working_set(config, arch, cfg.batch_size * config.data.max_prompt_tokens, element)}
    return phase | ({"dense_sampler_copy": arch.total_params * cbytes} if dense else {})


def _trainable(config: Config, trainable_params: int, param_bytes: int) -> dict[str, float]:
    return {
        "lora_weights": trainable_params * param_bytes,
        "lora_gradients": trainable_params * param_bytes,
        "optimizer_states": trainable_params * OPTIMIZER_BYTES_PER_PARAM[config.model.optimizer],
    }


def resolved_for(config: Config, device: str) -> Config:
    """The config with `model.compute_dtype: auto` replaced by what it means on `device` (precision.py)."""
    dtype = precision.resolve(config.model.compute_dtype, device).dtype
    return config.model_copy(update={"model": config.model.model_copy(update={"compute_dtype": dtype})})


def plan(config: Config, arch: Architecture, device: str = "cuda") -> dict[str, dict[str, float]]:
    """stage -> component -> bytes; a stage's expected peak is the sum of its components."""
    config = resolved_for(config, device)
    n_lora, h, cbytes = lora_params(config, arch), arch.hidden_size, DTYPE_BYTES[config.model.compute_dtype]
    seq = config.data.max_length
    sft = _weights(config, arch, lm_head=True) | _trainable(config, n_lora, cbytes) | {
        "activations": activations(config, arch, config.sft.batch_size, seq, device=device),
        "logits": sft_logits(arch, config.sft.batch_size, seq),
        "framework_overhead": FRAMEWORK_OVERHEAD_BYTES,
    }
    pairs = 2 * config.rm.batch_size  # chosen and rejected
    rm = _weights(config, arch, lm_head=False) | _trainable(config, n_lora + h, cbytes) | {
        "activations": activations(config, arch, pairs, seq, dropout=False, device=device),
        "framework_overhead": FRAMEWORK_OVERHEAD_BYTES,
    }
    cfg, act = config.ppo, _act_bytes(config)
    new, total_tokens = cfg.max_new_tokens, config.data.max_prompt_tokens + cfg.max_new_tokens
    phases = generation_phase(config, arch) | {  # then rollout scoring, update
        "rollout_logits": logits(arch, cfg.batch_size, new + 1, copies=2),  # policy and reference, response only
        "rollout_hidden_states": (arch.num_layers + 1) * cfg.batch_size * total_tokens * h * act,
        "scoring_working_set": working_set(config, arch, cfg.batch_size * total_tokens),
        "activations": activations(config, arch, cfg.mini_batch_size, total_tokens, dropout=False, lora_bytes=4,
                                   device=device),
        "logits": logits(arch, cfg.mini_batch_size, new + 1, 1) + logits(arch, cfg.mini_batch_size, new, 3),
    }
    peaks = [sum(phases.get(name, 0) for name in names) for names in PPO_PHASES.values()]
    ppo = _weights(config, arch, lm_head=True) | _trainable(config, n_lora, 4) | {
        "value_head": h * (2 * cbytes + OPTIMIZER_BYTES_PER_PARAM[config.model.optimizer]),  # weight, grad, states
        "reward_adapter_and_head": n_lora * 4 + h * cbytes,  # frozen second adapter (peft loads it in fp32)
    } | phases | {
        "phases_not_concurrent": max(peaks) - sum(peaks),
        "framework_overhead": FRAMEWORK_OVERHEAD_BYTES,
    }
    return {"sft": sft, "rm": rm, "ppo": ppo}


def separate_models_extra_bytes(config: Config, arch: Architecture) -> float:
    """What PPO would add in TRL's layout instead of one shared base: with peft, TRL's PPOTrainer takes
    the reference from the policy with its adapter disabled, as we do, but loads the value model and the
    reward model as their own 4-bit copies, three in all. Both are sequence classifiers: no lm_head."""
    frozen = _weights(config, arch, lm_head=False)
    frozen.pop("dequant_buffer", None)
    return 2 * sum(frozen.values())


def summary(config: Config, arch: Architecture, budget_gib: float = 24.0, device: str = "cuda") -> dict:
    config = resolved_for(config, device)
    stages = plan(config, arch, device)
    n_lora = lora_params(config, arch)
    return {
        "run": config.run.name,
        "model": config.model.name_or_path,
        "device": device,
        "budget_gib": budget_gib,
        "architecture": asdict(arch) | {"total_params": arch.total_params},
        "lora_params": n_lora,
        "lora_r": config.model.lora.r,
        "ppo_separate_models_extra_gib": separate_models_extra_bytes(config, arch) / GIB,
        "stages": {
            stage: {
                "components_bytes": {k: int(v) for k, v in parts.items()},
                "peak_memory_gib": sum(parts.values()) / GIB,
                "fits": sum(parts.values()) / GIB <= budget_gib,
            }
            for stage, parts in stages.items()
        },
    }


def format_table(result: dict) -> str:
    names = list(dict.fromkeys(k for s in result["stages"].values() for k in s["components_bytes"]))
    lines = [f"memory plan for {result['run']} ({result['model']}) on {result['device']}, "
             f"budget {result['budget_gib']:g} GiB",
             f"  {result['architecture']['total_params'] / 1e6:,.1f}M base params, "
             f"{result['lora_params'] / 1e6:,.2f}M LoRA params (r={result['lora_r']})",
             f"{'component (GiB)':<28}" + "".join(f"{s:>10}" for s in result["stages"])]
    lines.append("-" * len(lines[-1]))
    for name in names:
        cells = [result["stages"][s]["components_bytes"].get(name) for s in result["stages"]]
        lines.append(f"{name:<28}" + "".join(f"{'-' if c is None else f'{c / GIB:.3f}':>10}" for c in cells))
    lines.append("-" * len(lines[2]))
    lines.append(f"{'peak (sum)':<28}" + "".join(f"{s['peak_memory_gib']:>10.2f}" for s in result["stages"].values()))
    lines.append(f"{'fits':<28}" + "".join(f"{'yes' if s['fits'] else 'NO':>10}" for s in result["stages"].values()))
    lines.append(f"PPO with separate value and reward model copies (TRL's layout) would need "
                 f"{result['ppo_separate_models_extra_gib']:.2f} GiB more (one shared base instead).")
    return "\n".join(lines)


def run(config: Config, paths: RunPaths, budget_gib: float = 24.0, device: str = "cuda") -> dict:
    arch = architecture(config, paths)
    result = summary(config, arch, budget_gib, device)
    print(format_table(result))
    target = paths.root / "memory_plan.json"
    write_json(target, result)
    print(f"wrote {target}")
    return result
