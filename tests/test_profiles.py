"""Every shipped profile is a valid params file, checked offline: params.yaml and every
configs/*.yaml except the *.expected.yaml figure sheets."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import yaml

from qlora_rlhf.config import load_config

from conftest import REPO

PROFILES = [REPO / "params.yaml"] + sorted(
    p for p in (REPO / "configs").glob("*.yaml") if not p.name.endswith(".expected.yaml"))


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")


@pytest.mark.parametrize("path", PROFILES, ids=lambda p: str(p.relative_to(REPO)))
def test_profile_validates(path):
    config = load_config(path)
    assert config.run.name


def test_run_names_are_distinct():
    names = [load_config(p).run.name for p in PROFILES if p.parent.name == "configs"] + [load_config(REPO / "params.yaml").run.name]
    assert len(names) == len(set(names)), names


def test_paper_profile_matches_the_design_note():
    c = load_config(REPO / "configs" / "paper-llama2-7b.yaml")
    assert c.run.name == "paper-llama2-7b"
    assert c.model.name_or_path == "meta-llama/Llama-2-7b-hf"
    assert (c.model.quantization, c.model.compute_dtype, c.model.optimizer) == ("nf4", "bfloat16", "paged_adamw_8bit")
    assert c.model.gradient_checkpointing and c.model.lora.r == 16 and c.model.lora.alpha == 32
    assert set(c.model.lora.target_modules) == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    assert c.data.source == "hub:Anthropic/hh-rlhf"
    assert (c.data.sft_size, c.data.rm_size, c.data.ppo_size, c.data.max_length) == (20000, 50000, 20000, 512)
    assert c.ppo.steps == 1000 and (c.ppo.kl_target_low, c.ppo.kl_target_high) == (0.1, 0.3)
    assert c.ppo.kl_control == "adaptive"  # as TRL's classic PPOTrainer ran it
    # about one epoch of SFT and RM data
    for train, size in ((c.sft, c.data.sft_size), (c.rm, c.data.rm_size)):
        epochs = train.max_steps * train.batch_size * train.gradient_accumulation_steps / size
        assert 0.8 <= epochs <= 1.2, epochs


def test_expected_figures_sheet_names_the_note_targets():
    expected = yaml.safe_load((REPO / "configs" / "paper-llama2-7b.expected.yaml").read_text())
    assert expected["sft"]["perplexity"] == {"min": 3.3, "max": 4.5}
    assert expected["rm"]["accuracy"]["min"] == 0.70
    assert expected["ppo"]["kl_to_reference"] == {"min": 0.1, "max": 0.3}
    assert expected["every_stage"]["peak_memory_gb"]["max"] == 24


def test_cli_validate_is_offline():
    """Offline, validate asks no server: the paper's hub model and data set are found in the local cache
    (valid), or one line each says they are not there (exit 2), in seconds (preflight.py, issue 35)."""
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    result = subprocess.run([sys.executable, "-m", "qlora_rlhf", "validate", "--params", "configs/paper-llama2-7b.yaml"],
                            cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    if result.returncode == 0:
        assert "valid" in result.stdout
    else:
        assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
        assert "'meta-llama/Llama-2-7b-hf' is not in the local Hugging Face cache" in result.stderr
        assert "HF_HUB_OFFLINE is set" in result.stderr
