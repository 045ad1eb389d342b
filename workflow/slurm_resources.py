"""The per-rule SLURM resources of workflow/profiles/slurm/config.yaml, derived, not guessed:

    python workflow/slurm_resources.py [configs/paper-llama2-7b.yaml]   # prints the derivation and the YAML

- GPU stages (sft, rm, ppo, evaluate, best_of_n, and each seed's ppo_seed_N / evaluate_seed_N) ask for one GPU
  (gres gpu:1). Host memory (mem_mb): the memory planner's peak for the stage (`qlora-rlhf
  plan-memory`; what the job moves to the GPU passes through host memory as it loads), SFT's merge of
  the adapter into the full bf16 weights on the CPU (training.merge_adapter), and HOST_LIBRARIES_GIB
  for the interpreter, torch's and CUDA's host-side libraries and the tokenised data. The evaluation
  generates like PPO's rollouts (one 4-bit base, a batch of prompts), so it gets PPO's planned peak.
- Runtime: the measured seconds per step on a GPU at the paper's shapes
  (benchmarks/results/throughput-llama2-7b.json: a random Llama-2-7B in NF4, the paper's batches)
  times the profile's steps, times SAFETY. SFT and RM steps there are micro-batches (times
  gradient_accumulation_steps); PPO's is a whole step. The evaluation's time is its generated tokens
  (base, SFT and PPO for the run's; PPO only for a seed's, which reuses the others) at the measured
  rollout generation rate; best-of-n's is its max(ns) samples per prompt at the same rate.
  SAFETY covers a GPU slower than the H100 measured and what the benchmark
  leaves out (data loading, logging, checkpoints, scoring); a job that still runs out of time is
  resubmitted (the profile's `retries`) and training resumes from its last checkpoint.
- CPU stages (data, base, figures, paper, seeds) ask for no GPU (an empty gres, over the default's)
  and a small fixed budget: they read and write tables and text, and take seconds to minutes.
- default-resources (any rule not named, e.g. a seed added to seeds.ppo later) is PPO's budget, the
  largest GPU one, so that no model stage lands on a node without a GPU.
- Preemption notice (`slurm_extra: --signal=TERM@<seconds>` in default-resources, so every rule gets
  it): SLURM sends SIGTERM that long before the time limit, and the stage must finish the step in
  progress and save a checkpoint in it (preemption.py). Seconds: SAFETY x (the longest measured step,
  PPO's, + one checkpoint save), rounded up to whole minutes (SLURM's signal timer has a resolution of
  a minute). A save writes the trainable params and the optimizer state: CHECKPOINT_BYTES_PER_PARAM
  per LoRA param (fp32 weights + AdamW's two fp32 moments, an upper bound for the 8-bit optimizer),
  at WRITE_MB_PER_S, an assumed write speed of a shared file system (not measured here).
  `--signal=TERM@`, not `B:TERM@`: the stage runs in a job step (the executor's `srun`), and `B:` would
  signal only the batch shell.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "workflow"))
from dag import load_stages  # noqa: E402

PAPER = ROOT / "configs" / "paper-llama2-7b.yaml"
MEASURED = ROOT / "benchmarks" / "results" / "throughput-llama2-7b.json"
SAFETY = 2
HOST_LIBRARIES_GIB = 2
GPU = "gpu:1"
CPU_STAGES = {  # mem_mb, runtime (minutes): tables and text only
    "data": (8192, 60),      # downloads and tokenises hh-rlhf
    "base": (2048, 30),
    "figures": (4096, 30),
    "paper": (2048, 30),     # latexmk
    "seeds": (4096, 30),
}
GIB = 1024**3
CHECKPOINT_BYTES_PER_PARAM = 4 + 8
WRITE_MB_PER_S = 100


def _mib(gib: float) -> int:
    return int(math.ceil(gib)) * 1024  # whole GiB, in MiB as SLURM's --mem reads it


def _minutes(seconds: float) -> int:
    return int(math.ceil(SAFETY * seconds / 1800)) * 30  # half hours


def derive(params_path: Path = PAPER, measured_path: Path = MEASURED) -> dict:
    """{"default": resources, "rules": {rule name: resources}, "why": {rule name: text}}."""
    from qlora_rlhf.config import load_config
    from qlora_rlhf.memory import GIB as PLAN_GIB
    from qlora_rlhf.memory import architecture, lora_params, plan

    config = load_config(params_path)
    arch = architecture(config)
    peak = {stage: sum(parts.values()) / PLAN_GIB for stage, parts in plan(config, arch).items()}
    merge = arch.total_params * 2 / GIB
    measured = json.loads(Path(measured_path).read_text())
    gen_rate = measured["ppo"]["generated_tokens_per_second"]

    def gpu(mem_gib: float, seconds: float) -> dict:
        return {"gres": GPU, "mem_mb": _mib(mem_gib + HOST_LIBRARIES_GIB), "runtime": _minutes(seconds)}

    def evaluate(policies: int) -> float:
        return policies * config.eval.num_prompts * config.eval.max_new_tokens / gen_rate

    sft_s = measured["sft"]["seconds_per_step"] * config.sft.max_steps * config.sft.gradient_accumulation_steps
    rm_s = measured["rm"]["seconds_per_step"] * config.rm.max_steps * config.rm.gradient_accumulation_steps
    ppo_s = measured["ppo"]["seconds_per_step"] * config.ppo.steps
    kinds = {
        "sft": (gpu(max(peak["sft"], merge), sft_s),
                f"plan {peak['sft']:.1f} GiB, bf16 merge {merge:.1f} GiB; {sft_s / 3600:.2f} h measured"),
        "rm": (gpu(peak["rm"], rm_s), f"plan {peak['rm']:.1f} GiB; {rm_s / 3600:.2f} h measured"),
        "ppo": (gpu(peak["ppo"], ppo_s), f"plan {peak['ppo']:.1f} GiB; {ppo_s / 3600:.2f} h measured"),
        "evaluate": (gpu(peak["ppo"], evaluate(3)),
                     f"PPO's plan {peak['ppo']:.1f} GiB; 3 policies' tokens {evaluate(3) / 3600:.2f} h"),
        "evaluate_seed": (gpu(peak["ppo"], evaluate(1)),
                          f"PPO's plan {peak['ppo']:.1f} GiB; 1 policy's tokens {evaluate(1) / 3600:.2f} h"),
    }
    bon_s = config.best_of_n.num_prompts * max(config.best_of_n.ns) * config.eval.max_new_tokens / gen_rate
    kinds["best_of_n"] = (gpu(peak["ppo"], bon_s),  # samples SFT as the evaluation does, then scores them
                          f"PPO's plan {peak['ppo']:.1f} GiB; {max(config.best_of_n.ns)} samples per prompt "
                          f"{bon_s / 3600:.2f} h")
    kinds["ppo_seed"] = kinds["ppo"]
    for name, (mem, minutes) in CPU_STAGES.items():
        kinds[name] = ({"gres": "", "mem_mb": mem, "runtime": minutes}, "CPU only: no GPU")
    rules, why = {}, {}
    for stage in load_stages(ROOT / "dvc.yaml", yaml.safe_load(Path(params_path).read_text())).values():
        kind = stage.name.split("@")[0]
        if kind not in kinds:
            raise KeyError(f"dvc.yaml stage {kind!r} has no SLURM resources in workflow/slurm_resources.py")
        rules[stage.rule_name], why[stage.rule_name] = kinds[kind]
    step_s = max(sft_s / config.sft.max_steps, rm_s / config.rm.max_steps, ppo_s / config.ppo.steps)
    save_s = lora_params(config, arch) * CHECKPOINT_BYTES_PER_PARAM / (WRITE_MB_PER_S * 1e6)
    notice = int(math.ceil(SAFETY * (step_s + save_s) / 60)) * 60
    signal = {"slurm_extra": f"--signal=TERM@{notice}"}
    signal_why = (f"SIGTERM {notice} s before the time limit: {SAFETY} x (a {step_s:.1f} s step + a {save_s:.1f} s "
                  f"checkpoint save), whole minutes")
    return {"default": kinds["ppo"][0] | signal, "rules": rules, "why": why, "signal_why": signal_why}


def profile_block(derived: dict) -> str:
    """The default-resources and set-resources sections of the profile, with the reason per rule."""
    why = {"slurm_extra": f"  # {derived['signal_why']}"}
    lines = ["default-resources:"] + [f"  {k}: {_yaml_scalar(v)}{why.get(k, '')}"
                                      for k, v in derived["default"].items()]
    lines.append("set-resources:")
    for rule, res in derived["rules"].items():
        body = ", ".join(f"{k}: {_yaml_scalar(v)}" for k, v in res.items())
        lines.append(f"  {rule}: {{{body}}}  # {derived['why'][rule]}")
    return "\n".join(lines)


def _yaml_scalar(value) -> str:
    return f'"{value}"' if isinstance(value, str) else str(value)


if __name__ == "__main__":
    print(profile_block(derive(Path(sys.argv[1]) if len(sys.argv) > 1 else PAPER)))
