"""The PPO adapter's model card (qlora_rlhf.model_card): Hub front matter, the data's hashes, the params and
metrics, and a base-model path that still resolves after the results folder has moved."""

from __future__ import annotations

import json
import shutil
from contextlib import chdir

import pytest
import yaml

from qlora_rlhf import model_card
from qlora_rlhf.atomic import write_json
from qlora_rlhf.config import EMBEDDED_MODEL, Config
from qlora_rlhf.paths import RunPaths

from conftest import smoke_params

SHA = "ab" * 32


def front_matter(text: str) -> dict:
    assert text.startswith("---\n")
    return yaml.safe_load(text.split("---\n")[1])


@pytest.fixture
def adapter_run(tmp_path, tiny_model_dir, monkeypatch):
    """A run's folders as the PPO stage leaves them (relative paths, from the project root), with a LoRA
    adapter on the tiny model standing in for the SFT model; returns (config, paths, peft model)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from qlora_rlhf.training import save_adapter

    project = tmp_path / "project"
    project.mkdir()
    monkeypatch.chdir(project)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    config = Config.model_validate(smoke_params(tiny_model_dir, "results"))
    paths = RunPaths.of(config)
    shutil.copytree(tiny_model_dir, paths.sft / "merged")
    write_json(paths.manifest, {"subsets": {"sft": {"rows": 32, "sha256": SHA}, "ppo": {"rows": 16, "sha256": SHA}}})
    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(str(paths.sft / "merged"), dtype=torch.float32)
    model = get_peft_model(base, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    save_adapter(model, paths.ppo / "adapter")
    return config, paths, model.eval()


def history():
    import pandas as pd

    return pd.DataFrame({"step": [2, 1], "reward_mean": [0.25, 0.125], "kl": [0.5, 0.0], "kl_coef": [0.05, 0.05]})


def test_card_front_matter_data_params_metrics(adapter_run):
    config, paths, _ = adapter_run
    adapter = paths.ppo / "adapter"
    text = model_card.write(adapter, config, paths, history()).read_text()
    front = front_matter(text)
    assert front["library_name"] == "peft" and "ppo" in front["tags"]
    assert "base_model" not in front and "datasets" not in front  # a local base and synthetic data: no Hub ids
    assert f"| sft | 32 | `{SHA}` |" in text and f"| ppo | 16 | `{SHA}` |" in text
    assert f"kl_coef: {config.ppo.kl_coef}" in text and f"seed: {config.run.seed}" in text
    assert "| reward_mean | 0.125 | 0.25 |" in text and "| kl | 0 | 0.5 |" in text  # first and last step
    assert "AutoPeftModelForCausalLM.from_pretrained" in text
    assert model_card.write(adapter, config, paths, history()).read_text() == text  # a re-run writes the same bytes


def test_front_matter_names_hub_models_and_data(adapter_run):
    config, paths, _ = adapter_run
    hub = config.model_copy(update={
        "model": config.model.model_copy(update={"name_or_path": EMBEDDED_MODEL}),
        "data": config.data.model_copy(update={"source": "hub:Anthropic/hh-rlhf"})})
    front = front_matter(model_card.write(paths.ppo / "adapter", hub, paths, history()).read_text())
    assert front["base_model"] == model_card.EMBEDDED_HUB_ID and front["datasets"] == ["Anthropic/hh-rlhf"]
    assert model_card.hub_id("meta-llama/Llama-2-7b-hf") == "meta-llama/Llama-2-7b-hf"
    assert model_card.hub_id(str(paths.sft / "merged")) is None


def test_base_model_path_resolves_after_the_results_move(adapter_run, tmp_path, monkeypatch):
    import torch
    from peft import AutoPeftModelForCausalLM

    config, paths, model = adapter_run
    adapter = paths.ppo / "adapter"
    model_card.write(adapter, config, paths, history())
    base = json.loads((adapter / "adapter_config.json").read_text())["base_model_name_or_path"]
    assert base == "../../sft/merged"
    ids = torch.tensor([[1, 5, 9, 13, 17]])
    with torch.no_grad():
        expected = model(input_ids=ids).logits
    shutil.move("results", tmp_path / "pulled")  # as a reviewer's copy of the results folder, elsewhere
    monkeypatch.chdir(tmp_path)
    with chdir(tmp_path / "pulled" / config.run.name / "ppo" / "adapter"):  # as the card says
        loaded = AutoPeftModelForCausalLM.from_pretrained(".", dtype=torch.float32).eval()
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=ids).logits, expected)
