"""params validation: every bad value raises ConfigError naming the dotted key, before any work starts;
and every shipped profile (params.yaml, configs/*.yaml but the *.expected.yaml figure sheets) is valid offline."""

from __future__ import annotations

import os
import subprocess
import sys

import pydantic
import pytest
import yaml

from qlora_rlhf.config import Config, ConfigError, check_runtime, load_config

from conftest import REPO


def _problems(path) -> list[str]:
    with pytest.raises(ConfigError) as info:
        load_config(path)
    header, *lines = str(info.value).splitlines()
    assert str(path) in header and "Traceback" not in str(info.value)
    return lines


PARAMS_FILES = ["params.yaml"] + sorted(str(p.relative_to(REPO)) for p in (REPO / "configs").glob("*.yaml")
                                        if not p.name.endswith(".expected.yaml"))  # expected results, not params


@pytest.fixture
def offline(monkeypatch):
    for name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.setenv(name, "1")


@pytest.mark.usefixtures("offline")
@pytest.mark.parametrize("name", PARAMS_FILES)
def test_shipped_params_files_are_valid(name):
    config = load_config(REPO / name)
    assert isinstance(config, Config) and config.run.name


def test_profiles_have_distinct_run_names():
    names = [load_config(REPO / name).run.name for name in PARAMS_FILES]
    assert "configs/smoke.yaml" in PARAMS_FILES and len(set(names)) == len(names)  # one results folder each


def test_paper_profile_matches_the_design_note():
    c = load_config(REPO / "configs" / "paper-llama2-7b.yaml")
    assert c.run.name == "paper-llama2-7b"
    assert c.model.name_or_path == "meta-llama/Llama-2-7b-hf"
    assert (c.model.quantization, c.model.compute_dtype, c.model.optimizer) == ("nf4", "bfloat16", "paged_adamw_8bit")
    assert c.model.gradient_checkpointing and c.model.lora.r == 16 and c.model.lora.alpha == 32
    assert set(c.model.lora.target_modules) == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                                "down_proj"}
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
    result = subprocess.run([sys.executable, "-m", "qlora_rlhf", "validate", "--params",
                             "configs/paper-llama2-7b.yaml"], cwd=REPO, env=env, capture_output=True, text=True,
                            timeout=120)
    if result.returncode == 0:
        assert "valid" in result.stdout
    else:
        assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
        assert "'meta-llama/Llama-2-7b-hf' is not in the local Hugging Face cache" in result.stderr
        assert "HF_HUB_OFFLINE is set" in result.stderr


def test_write_params_fixture_is_valid(write_params):
    config = load_config(write_params())
    assert config.data.sft_size == 32 and config.model.quantization == "nf4"


@pytest.mark.parametrize(
    ("key", "value", "words"),
    [
        ("sft.batch_size", "four", "valid integer"),
        ("sft.batch_size", 4.5, "fractional"),
        ("run.seed", True, "not true/false"),
        ("sft.learning_rate", "fast", "valid number"),
        ("model.name_or_path", 12, "valid string"),
        ("model.lora.target_modules", "q_proj", "valid list"),
        ("model.gradient_checkpointing", "maybe", "valid boolean"),
        ("model.quantization", "int8", "'nf4' or 'none'"),
        ("model.optimizer", "sgd", "paged_adamw_8bit"),
        ("run", "smoke", "valid dictionary"),
    ],
)
def test_wrong_type_names_the_key(write_params, key, value, words):
    lines = _problems(write_params(**{key: value}))
    assert len(lines) == 1
    assert lines[0].strip().startswith(f"{key}:") and words in lines[0], lines


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("run.seed", -1),
        ("run.name", "../escape"),
        ("sft.batch_size", 0),
        ("sft.learning_rate", 0.0),
        ("rm.learning_rate", 3.0),
        ("model.lora.r", 0),
        ("model.lora.dropout", 1.0),
        ("ppo.gamma", 1.5),
        ("ppo.cliprange", 0.0),
        ("data.max_length", 8),
        ("eval.bootstrap_samples", 10),
        ("model.lora.target_modules", []),
    ],
)
def test_out_of_range_names_the_key(write_params, key, value):
    lines = _problems(write_params(**{key: value}))
    assert any(line.strip().startswith(f"{key}:") for line in lines), lines
    assert repr(value) in "\n".join(lines)  # says what it got


def test_unknown_keys_top_level_and_nested(tmp_path, write_params):
    params = yaml.safe_load(write_params().read_text())
    params["trainer"] = {"x": 1}
    params["sft"]["batchsize"] = 4
    params["model"]["lora"]["rank"] = 8
    path = tmp_path / "typos.yaml"
    path.write_text(yaml.safe_dump(params))
    lines = _problems(path)
    joined = "\n".join(lines)
    for key in ("trainer", "sft.batchsize", "model.lora.rank"):
        assert f"  {key}: unknown key" in joined
    assert len(lines) == 3  # one line per problem


def test_missing_keys_are_all_reported(tmp_path, write_params):
    params = yaml.safe_load(write_params().read_text())
    del params["eval"]
    del params["ppo"]["kl_coef"]
    del params["model"]["lora"]["alpha"]
    path = tmp_path / "missing.yaml"
    path.write_text(yaml.safe_dump(params))
    lines = _problems(path)
    for key in ("eval", "ppo.kl_coef", "model.lora.alpha"):
        assert f"  {key}: required key is missing" in lines


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        ({"sft.batch_size": 64}, "sft.batch_size=64 is larger than data.sft_size=32"),
        ({"rm.batch_size": 33}, "rm.batch_size=33 is larger than data.rm_size=32"),
        ({"eval.num_prompts": 9}, "eval.num_prompts=9 is larger than data.eval_size=8"),
        ({"ppo.eval_prompts": 9}, "ppo.eval_prompts=9 is larger than data.eval_size=8"),
        ({"ppo.batch_size": 6, "ppo.mini_batch_size": 4},
         "ppo.batch_size=6 must be a multiple of ppo.mini_batch_size=4"),
        ({"ppo.batch_size": 6, "ppo.mini_batch_size": 2, "ppo.samples_per_prompt": 4},
         "ppo.batch_size=6 must be a multiple of ppo.samples_per_prompt=4"),
        ({"data.max_prompt_tokens": 128}, "data.max_prompt_tokens=128 must be smaller than data.max_length=128"),
        ({"ppo.kl_target_low": 0.5}, "ppo.kl_target_low=0.5 must be smaller than ppo.kl_target_high=0.3"),
        ({"data.sft_size": 300, "data.rm_size": 200},
         "data.sft_size + data.rm_size + data.ppo_size = 516 is larger than data.synthetic_train_rows=400"),
        ({"data.eval_size": 101, "eval.num_prompts": 8},
         "data.eval_size=101 is larger than data.synthetic_test_rows=100"),
        ({"data.hub_data_dir": "helpful-base"}, "data.hub_data_dir='helpful-base' is only used with data.source: hub:"),
    ],
)
def test_impossible_combinations(write_params, overrides, expected):
    lines = _problems(write_params(**overrides))
    assert any(line.strip().startswith(expected) for line in lines), lines
    assert not any("{" in line for line in lines), "the whole section must not be dumped into the message"


def test_several_cross_key_problems_one_line_each(write_params):
    lines = _problems(write_params(**{"sft.batch_size": 64, "rm.batch_size": 64}))
    assert len(lines) == 2
    assert lines[0].strip().startswith("sft.batch_size=64") and lines[1].strip().startswith("rm.batch_size=64")


def test_invalid_yaml(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text("run:\n  name: [unclosed\n  seed: 1\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(path)


def test_duplicate_key_is_refused(tmp_path, write_params):
    text = write_params().read_text().replace("sft:\n", "sft:\n  batch_size: 2\n", 1)
    path = tmp_path / "dup.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match="duplicate key 'batch_size'"):
        load_config(path)


@pytest.mark.parametrize("content", ["", "- a\n- b\n", "just text\n"])
def test_not_a_mapping(tmp_path, content):
    path = tmp_path / "odd.yaml"
    path.write_text(content)
    with pytest.raises(ConfigError, match="expected a mapping of sections"):
        load_config(path)


def test_missing_file_and_folder(tmp_path):
    with pytest.raises(ConfigError, match="params file not found"):
        load_config(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="is a folder, not a params file"):  # issue 35: says it is a folder
        load_config(tmp_path)


def test_undecodable_params_file(tmp_path):
    path = tmp_path / "latin1.yaml"
    path.write_bytes(b"run:\n  name: caf\xe9\n")
    with pytest.raises(ConfigError, match="cannot read the params file"):
        load_config(path)


def test_config_is_frozen(write_params):
    config = load_config(write_params())
    with pytest.raises(pydantic.ValidationError):
        config.sft.batch_size = 1  # type: ignore[misc]


def test_check_runtime_nf4_needs_bitsandbytes(write_params, monkeypatch):
    config = load_config(write_params())
    check_runtime(config)  # installed here: passes
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # `import bitsandbytes` now raises ImportError
    with pytest.raises(ConfigError) as info:
        check_runtime(config)
    lines = str(info.value).splitlines()
    assert any(line.strip().startswith("model.quantization: 'nf4' needs bitsandbytes") for line in lines)
    assert any(line.strip().startswith("model.optimizer: 'paged_adamw_8bit' needs bitsandbytes") for line in lines)


def test_check_runtime_without_bitsandbytes_needs(write_params, monkeypatch):
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)
    config = load_config(write_params(**{"model.quantization": "none", "model.optimizer": "adamw_torch"}))
    check_runtime(config)  # nothing needs bitsandbytes: no error
