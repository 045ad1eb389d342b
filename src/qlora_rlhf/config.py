"""One typed, validated config built from params.yaml; every stage takes it explicitly.

Validation happens before any model or data is loaded: a bad value raises ConfigError with one
line per problem, each naming the dotted key and what is allowed.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator, model_validator

from .errors import ConfigError  # noqa: F401  (re-exported: callers import it from here)

EMBEDDED_MODEL = "embedded:smollm2-135m-instruct"




class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    @field_validator("*", mode="before")
    @classmethod
    def _no_bool_for_numbers(cls, value: object, info: ValidationInfo) -> object:
        # pydantic's lax mode reads true/false as 1/0: a YAML slip (seed: yes) must not pass silently
        if isinstance(value, bool) and cls.model_fields[info.field_name].annotation is not bool:
            raise ValueError("expected a number or text, not true/false")
        return value


class RunConfig(_Section):
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$", description="folder name under results/")
    seed: int = Field(ge=0)
    results_dir: str = "results"


class LoraConfig(_Section):
    r: int = Field(ge=1, le=1024)
    alpha: int = Field(ge=1)
    dropout: float = Field(ge=0.0, lt=1.0)
    target_modules: list[str] = Field(min_length=1)


class ModelConfig(_Section):
    name_or_path: str = Field(min_length=1, description=f"hub id, local directory, or {EMBEDDED_MODEL}")
    quantization: Literal["nf4", "none"]
    compute_dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        description="auto: bfloat16 where the hardware runs it natively, else float32 (precision.py)")
    lora: LoraConfig
    generation: Literal["auto", "dense", "peft"] = Field(
        default="auto", description="sample from a dense copy with the adapter merged, or from the NF4 model "
                                    "and its adapters as peft runs them; auto: dense in a 16-bit compute dtype, "
                                    "peft in float32 (generation.py)")
    gradient_checkpointing: bool
    optimizer: Literal["paged_adamw_8bit", "adamw_torch"]


class DataConfig(_Section):
    source: str = Field(min_length=1, description="synthetic, hub:<id>, a directory, or .jsonl/.jsonl.gz files")
    hub_data_dir: str | None = None
    synthetic_train_rows: int = Field(ge=1)
    synthetic_test_rows: int = Field(ge=1)
    sft_size: int = Field(ge=1)
    rm_size: int = Field(ge=1)
    ppo_size: int = Field(ge=1)
    eval_size: int = Field(ge=1)
    max_prompt_tokens: int = Field(ge=8)
    max_length: int = Field(ge=16)

    @model_validator(mode="after")
    def _prompt_fits(self) -> DataConfig:
        if self.max_prompt_tokens >= self.max_length:
            raise ValueError(f"data.max_prompt_tokens={self.max_prompt_tokens} must be smaller than "
                             f"data.max_length={self.max_length} (the response needs room)")
        if self.hub_data_dir is not None and not self.source.startswith("hub:"):
            raise ValueError(f"data.hub_data_dir={self.hub_data_dir!r} is only used with data.source: hub:<id> "
                             f"(data.source={self.source!r})")
        if self.source == "synthetic":
            need = self.sft_size + self.rm_size + self.ppo_size
            if need > self.synthetic_train_rows:
                raise ValueError(f"data.sft_size + data.rm_size + data.ppo_size = {need} is larger than "
                                 f"data.synthetic_train_rows={self.synthetic_train_rows}")
            if self.eval_size > self.synthetic_test_rows:
                raise ValueError(f"data.eval_size={self.eval_size} is larger than "
                                 f"data.synthetic_test_rows={self.synthetic_test_rows}")
        return self


class TrainConfig(_Section):
    """SFT and reward-model training share one shape of knobs."""

    max_steps: int = Field(ge=1)
    batch_size: int = Field(ge=1)
    gradient_accumulation_steps: int = Field(ge=1)
    learning_rate: float = Field(gt=0.0, lt=1.0)
    warmup_ratio: float = Field(ge=0.0, lt=1.0)
    save_steps: int = Field(ge=1)
    logging_steps: int = Field(ge=1)


class PPOConfig(_Section):
    steps: int = Field(ge=1)
    batch_size: int = Field(ge=1, description="episodes (sampled responses) per rollout")
    samples_per_prompt: int = Field(default=1, ge=1, description="responses per prompt; > 1 centers scores per prompt")
    mini_batch_size: int = Field(ge=1)
    ppo_epochs: int = Field(ge=1)
    learning_rate: float = Field(gt=0.0, lt=1.0)
    kl_coef: float = Field(ge=0.0, description="the KL penalty's coefficient; with adaptive control, its first value")
    kl_control: Literal["fixed", "adaptive"] = Field(
        description="adaptive: steer the coefficient towards the middle of the target band (Ziegler et al. 2019)")
    kl_target_low: float = Field(ge=0.0, description="the healthy range of KL to SFT (nats per response) ...")
    kl_target_high: float = Field(gt=0.0, description="... that adaptive control aims at and the figures shade")
    kl_horizon: int = Field(ge=1, description="adaptive control: episodes over which it closes a gap (TRL's horizon)")
    cliprange: float = Field(gt=0.0, lt=1.0)
    cliprange_value: float = Field(gt=0.0)
    vf_coef: float = Field(ge=0.0)
    gamma: float = Field(gt=0.0, le=1.0)
    lam: float = Field(ge=0.0, le=1.0)
    max_new_tokens: int = Field(ge=1)
    temperature: float = Field(gt=0.0)
    missing_eos_penalty: float = Field(ge=0.0)
    max_kl: float = Field(gt=0.0, description="stop when KL to the reference exceeds this")
    save_steps: int = Field(ge=1)
    eval_every: int = Field(ge=0, description="the held-out curve: a point every this many steps, at 0 and the last; "
                                              "0: no curve")
    eval_prompts: int = Field(ge=1, description="the held-out curve: the eval split's first this many prompts")
    eval_batch_size: int = Field(ge=1, description="the held-out curve: prompts per generate call")

    @model_validator(mode="after")
    def _batches(self) -> PPOConfig:
        if self.batch_size % self.mini_batch_size:
            raise ValueError(f"ppo.batch_size={self.batch_size} must be a multiple of "
                             f"ppo.mini_batch_size={self.mini_batch_size}")
        if self.kl_target_low >= self.kl_target_high:
            raise ValueError(f"ppo.kl_target_low={self.kl_target_low} must be smaller than "
                             f"ppo.kl_target_high={self.kl_target_high}")
        if self.batch_size % self.samples_per_prompt:
            raise ValueError(f"ppo.batch_size={self.batch_size} must be a multiple of "
                             f"ppo.samples_per_prompt={self.samples_per_prompt}")
        return self


class EvalConfig(_Section):
    num_prompts: int = Field(ge=1)
    batch_size: int = Field(ge=1)
    max_new_tokens: int = Field(ge=1)
    temperature: float = Field(gt=0.0)
    bootstrap_samples: int = Field(ge=100)
    num_sample_rows: int = Field(ge=0)


class BestOfNConfig(_Section):
    """Best-of-n from SFT (`best_of_n` stage), the reference frontier of Gao et al. (2022): per prompt,
    max(ns) SFT samples at eval.temperature and eval.max_new_tokens, and for each n the one the reward
    model ranks best among the first n, so every n shares one set of samples (n=1 is plain SFT)."""

    ns: list[int] = Field(min_length=1, description="the n of best-of-n, ascending; KL = log n - (n-1)/n")
    num_prompts: int = Field(ge=1, description="the first this many prompts of the eval split")
    batch_size: int = Field(ge=1, description="sequences (prompt x sample) per generate call")

    @field_validator("ns")
    @classmethod
    def _ascending(cls, ns: list[int]) -> list[int]:
        if any(n < 1 for n in ns) or ns != sorted(set(ns)):
            raise ValueError(f"expected distinct n >= 1 in ascending order, got {ns}")
        return ns


class SeedsConfig(_Section):
    """The seed study (`dvc repro seeds`): PPO and its evaluation again with each of these seeds on the
    run's own data, SFT and reward model; run.seed's run is its first row."""

    ppo: list[int] = Field(min_length=1, description="PPO seeds besides run.seed")

    @field_validator("ppo")
    @classmethod
    def _distinct(cls, seeds: list[int]) -> list[int]:
        if len(set(seeds)) != len(seeds) or any(s < 0 for s in seeds):
            raise ValueError(f"expected distinct seeds >= 0, got {seeds}")
        return seeds


class Config(_Section):
    run: RunConfig
    model: ModelConfig
    data: DataConfig
    sft: TrainConfig
    rm: TrainConfig
    ppo: PPOConfig
    eval: EvalConfig
    seeds: SeedsConfig
    best_of_n: BestOfNConfig

    @model_validator(mode="after")
    def _fits_data(self) -> Config:
        checks = [
            ("sft.batch_size", self.sft.batch_size, "data.sft_size", self.data.sft_size),
            ("rm.batch_size", self.rm.batch_size, "data.rm_size", self.data.rm_size),
            ("ppo.batch_size", self.ppo.batch_size, "data.ppo_size", self.data.ppo_size),
            ("eval.num_prompts", self.eval.num_prompts, "data.eval_size", self.data.eval_size),
            ("best_of_n.num_prompts", self.best_of_n.num_prompts, "data.eval_size", self.data.eval_size),
            ("ppo.eval_prompts", self.ppo.eval_prompts, "data.eval_size", self.data.eval_size),
        ]
        problems = [f"{key}={value} is larger than {data_key}={size}"
                    for key, value, data_key, size in checks if value > size]
        if self.ppo.max_new_tokens + self.data.max_prompt_tokens > self.data.max_length * 4:
            problems.append("ppo.max_new_tokens + data.max_prompt_tokens is unreasonably long for data.max_length")
        if self.run.seed in self.seeds.ppo:
            problems.append(f"seeds.ppo lists run.seed={self.run.seed}, whose run is the study's first row already")
        if problems:  # one line per problem
            raise ValueError("\n".join(problems))
        return self


def _format_errors(path: Path, error: ValidationError) -> str:
    lines = []
    for item in error.errors():
        key = ".".join(str(part) for part in item["loc"]) or "(top level)"
        message = item["msg"].removeprefix("Value error, ")
        if item["type"] == "value_error" and isinstance(item.get("input"), dict):
            # a check across keys: its message names the dotted keys itself, one line per problem
            lines += [f"  {line}" for line in message.splitlines()]
            continue
        if item["type"] == "extra_forbidden":
            message = "unknown key (check spelling; see params.yaml for the allowed keys)"
        elif item["type"] == "missing":
            message = "required key is missing"
        elif "input" in item and item["type"] not in {"model_type"}:
            message = f"{message} (got {item['input']!r})"
        lines.append(f"  {key}: {message}")
    return "\n".join([f"{path}: invalid params ({len(lines)} problem(s)):", *lines])


class _UniqueKeyLoader(yaml.SafeLoader):
    """SafeLoader that refuses a key given twice in one mapping (PyYAML keeps the last one silently)."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key!r} (given twice in one section)", key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def load_config(path: str | Path) -> Config:
    """Read and validate a params file; raises ConfigError with a readable message."""
    path = Path(path)
    if path.is_dir():
        raise ConfigError(f"{path}: is a folder, not a params file "
                          f"(pass the YAML file, e.g. --params {path / 'params.yaml'})")
    if not path.is_file():
        raise ConfigError(f"{path}: params file not found")
    try:
        raw = yaml.load(path.read_text(encoding="utf-8"), Loader=_UniqueKeyLoader)  # noqa: S506 (a SafeLoader)
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: cannot read the params file: {exc}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping of sections (run, model, data, sft, rm, ppo, eval)")
    try:
        return Config.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(_format_errors(path, exc)) from None


def check_runtime(config: Config) -> None:
    """Checks that need the installed packages, not only the params file: run right after load_config,
    before any data or model is touched."""
    needs_bnb = {"model.quantization": (config.model.quantization, "nf4", "none"),
                 "model.optimizer": (config.model.optimizer, "paged_adamw_8bit", "adamw_torch")}
    needs_bnb = {key: (value, fallback) for key, (value, wanted, fallback) in needs_bnb.items() if value == wanted}
    if not needs_bnb:
        return
    try:
        import bitsandbytes  # noqa: F401
    except Exception as exc:  # ImportError, or a broken install that fails while importing
        reason = f"{type(exc).__name__}: {exc}"
        problems = [f"  {key}: {value!r} needs bitsandbytes, which cannot be imported ({reason}); "
                    f"install bitsandbytes or set {key}: {fallback}" for key, (value, fallback) in needs_bnb.items()]
        raise ConfigError("\n".join([f"params cannot run here ({len(problems)} problem(s)):", *problems])) from None
