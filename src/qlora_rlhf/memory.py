"""Expected peak memory of each stage (sft, rm, ppo) from the model's architecture and the params,
without downloading any weights: `qlora-rlhf plan-memory [--params ...] [--budget-gib 24]`.

The model is the design note's memory table, computed instead of copied. Every component is in
bytes; a stage's total is the plain sum of its components, so the PPO total adds generation's
KV cache to training's activations (as the note's table does) although the two phases do not
overlap: for PPO the total is an upper bound. Assumptions, each matching how this project loads
models (qlora_rlhf.models.load_model):

- Quantized linear weights: NF4 with double quantization = 4 bits + an 8-bit absmax per block of
  64 + an fp32 constant per 256 blocks = 4.127 bits per parameter. lm_head is never quantized.
- peft's prepare_model_for_kbit_training upcasts every non-4-bit parameter (embeddings, lm_head,
  norms) to fp32, and bitsandbytes returns each layer's output in its input's dtype, so with NF4
  the residual stream, the activations and the KV cache are fp32 (4 bytes) even with a bf16
  compute dtype. Without quantization everything is in the compute dtype.
- LoRA weights and their gradients are fp32 (peft's autocast_adapter_dtype); paged AdamW 8-bit
  keeps two 8-bit states per parameter (+ an fp32 absmax per 256), adamw_torch two fp32 states.
- Activations with gradient checkpointing: each layer's input hidden state is kept, one layer's
  activations are recomputed during backward (counted twice: the tensors and their gradients at
  the peak), and the logits batch x seq x vocab are fp32 (x2 for SFT: logits and their gradient;
  x3 for PPO: logits, log-probabilities/entropy, gradient). Without checkpointing every layer
  keeps its activations. Attention is SDPA (no seq x seq matrix kept).
- PPO uses ONE shared 4-bit base: the policy is a trainable LoRA adapter plus a value head, the
  reference is the same base with the adapter disabled, the reward model is a second (frozen)
  named LoRA adapter plus a score head. Base weights are counted once. The value head runs a
  second forward over the backbone (TRL's policy-and-value wrapper), counted as its own
  activations. Generation keeps a KV cache of 2 x layers x kv_heads x head_dim x (prompt + new
  tokens) x batch, plus the stacked per-step logits; the rollout scoring pass keeps full logits.
- framework_overhead: a fixed 0.5 GiB for the CUDA context and allocator slack (or, on a CPU, the
  interpreter and libraries). Benchmarks that read torch.cuda.max_memory_allocated leave it out.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

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
        h, q, kv, i = self.hidden_size, self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim, self.intermediate_size
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


def layer_activation_elements_per_token(arch: Architecture) -> int:
    """Saved-for-backward elements of one decoder layer per token: norm outputs, q/k/v, attention
    output, the MLP's gate/up/act/product, the LoRA dropout copies of each module's input, residuals."""
    h, kvd, i = arch.hidden_size, arch.num_kv_heads * arch.head_dim, arch.intermediate_size
    attention = 2 * h + h + 2 * kvd + h + 4 * h  # norm in/out, q, k, v, attn out, LoRA input copies (q,k,v,o)
    mlp = 2 * h + 4 * i + 2 * h + i  # norm in/out, gate, up, act, product, LoRA copies (gate, up | down)
    return attention + mlp


def activations(config: Config, arch: Architecture, sequences: int, tokens: int) -> float:
    """Hidden-state activations of one training forward+backward over `sequences` x `tokens`."""
    ab = _act_bytes(config)
    per_layer = layer_activation_elements_per_token(arch) * sequences * tokens * ab
    if config.model.gradient_checkpointing:
        kept = arch.num_layers * sequences * tokens * arch.hidden_size * ab
        return kept + 2 * per_layer
    return arch.num_layers * per_layer + per_layer  # all layers + the gradients of one at the peak


def logits(arch: Architecture, sequences: int, tokens: int, copies: int) -> float:
    return sequences * tokens * arch.vocab_size * 4 * copies


def kv_cache(config: Config, arch: Architecture, batch: int, tokens: int) -> float:
    return 2 * arch.num_layers * arch.num_kv_heads * arch.head_dim * tokens * batch * _act_bytes(config)


def _trainable(config: Config, trainable_params: int) -> dict[str, float]:
    return {
        "lora_weights": trainable_params * 4,
        "lora_gradients": trainable_params * 4,
        "optimizer_states": trainable_params * OPTIMIZER_BYTES_PER_PARAM[config.model.optimizer],
    }


def plan(config: Config, arch: Architecture) -> dict[str, dict[str, float]]:
    """stage -> component -> bytes; a stage's expected peak is the sum of its components."""
    n_lora, h = lora_params(config, arch), arch.hidden_size
    seq = config.data.max_length
    sft = _weights(config, arch, lm_head=True) | _trainable(config, n_lora) | {
        "activations": activations(config, arch, config.sft.batch_size, seq),
        "logits": logits(arch, config.sft.batch_size, seq, copies=2),
        "framework_overhead": FRAMEWORK_OVERHEAD_BYTES,
    }
    pairs = 2 * config.rm.batch_size  # chosen and rejected
    rm = _weights(config, arch, lm_head=False) | _trainable(config, n_lora + h) | {
        "activations": activations(config, arch, pairs, seq),
        "framework_overhead": FRAMEWORK_OVERHEAD_BYTES,
    }
    ppo_cfg = config.ppo
    total_tokens = config.data.max_prompt_tokens + ppo_cfg.max_new_tokens
    mini = ppo_cfg.mini_batch_size
    ppo = _weights(config, arch, lm_head=True) | _trainable(config, n_lora + h + 1) | {
        "reward_adapter_and_head": (n_lora + h) * 4,  # frozen second adapter on the same base
        "activations": activations(config, arch, mini, total_tokens),
        "value_forward_activations": activations(config, arch, mini, total_tokens),
        "logits": logits(arch, mini, total_tokens, copies=3),
        "kv_cache": kv_cache(config, arch, ppo_cfg.batch_size, total_tokens),
        "rollout_logits": logits(arch, ppo_cfg.batch_size, ppo_cfg.max_new_tokens + total_tokens, copies=1),
        "framework_overhead": FRAMEWORK_OVERHEAD_BYTES,
    }
    return {"sft": sft, "rm": rm, "ppo": ppo}


def separate_models_extra_bytes(config: Config, arch: Architecture) -> float:
    """What PPO would add by loading reference, reward and value models as their own 4-bit copies
    (TRL's default layout: policy, reference, reward model, value model) instead of one shared base."""
    frozen = _weights(config, arch, lm_head=True)
    frozen.pop("dequant_buffer", None)
    return 3 * sum(frozen.values())


def summary(config: Config, arch: Architecture, budget_gib: float = 24.0) -> dict:
    stages = plan(config, arch)
    n_lora = lora_params(config, arch)
    return {
        "run": config.run.name,
        "model": config.model.name_or_path,
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
    lines = [f"memory plan for {result['run']} ({result['model']}), budget {result['budget_gib']:g} GiB",
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
    lines.append(f"PPO with separate reference/reward/value copies would need "
                 f"{result['ppo_separate_models_extra_gib']:.2f} GiB more (one shared base instead).")
    return "\n".join(lines)


def run(config: Config, paths: RunPaths, budget_gib: float = 24.0) -> dict:
    arch = architecture(config, paths)
    result = summary(config, arch, budget_gib)
    print(format_table(result))
    target = paths.root / "memory_plan.json"
    write_json(target, result)
    print(f"wrote {target}")
    return result
