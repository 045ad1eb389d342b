"""Measured peak memory of an SFT, a reward-model and a PPO step against qlora_rlhf.memory.plan.

Each stage runs in a fresh process through the code the stage itself uses: the model from
qlora_rlhf.models.load_model, TRL's SFTTrainer / RewardTrainer with the stage's own
TrainingArguments (qlora_rlhf.training.trainer_args), and for PPO the project's SharedBaseRoles with
qlora_rlhf.stages.ppo.rollout (generation + reference/reward/value scoring) and qlora_rlhf.stages.ppo.update.
Inputs are the planner's worst case: every sequence exactly data.max_length tokens, every PPO
prompt data.max_prompt_tokens tokens and every response ppo.max_new_tokens tokens (EOS held back).

CPU: the kernel's resident-set high-water mark (VmHWM, reset through /proc/self/clear_refs just
before the steps) minus the RSS after the imports, against the plan's stage total minus its fixed
framework overhead. GPU: torch.cuda.max_memory_allocated against the same. With --llama7b (CUDA
only) the three stages of the paper profile on a random-weights model shaped like Llama-2-7B.

    python benchmarks/memory_vs_plan.py                                # params.yaml's model and batches
    python benchmarks/memory_vs_plan.py --tiny --steps 1 --out memory_vs_plan-smoke   # smoke run
    python benchmarks/memory_vs_plan.py --llama7b --out memory_vs_plan-llama2-7b   # CUDA only: ~14 GB disk
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

from _common import (
    REPO,
    dumps,
    in_fresh_process,
    model_dir,
    peak_rss,
    random_llama2_7b,
    reset_peak_rss,
    rss,
    with_overrides,
    write,
)

GIB = 1024**3
STAGES = ("sft", "rm", "ppo")


class PeakRSS:
    """Fallback where VmHWM cannot be reset: samples this process's RSS every 5 ms in a thread."""

    def __init__(self, interval: float = 0.005):
        self.interval, self.peak = interval, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, rss())
            time.sleep(self.interval)

    def __enter__(self):
        self.peak = rss()
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss())


class Peak:
    """Peak memory of a block: torch.cuda.max_memory_allocated on a GPU, else the peak RSS."""

    def __enter__(self):
        self.cuda = torch.cuda.is_available()
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        elif not reset_peak_rss():
            self.sampler = PeakRSS().__enter__()
        return self

    def __exit__(self, *exc):
        if self.cuda:
            torch.cuda.synchronize()
            self.bytes = torch.cuda.max_memory_allocated()
        elif hasattr(self, "sampler"):
            self.sampler.__exit__(*exc)
            self.bytes = self.sampler.peak
        else:
            self.bytes = peak_rss()


def _baseline() -> int:
    """What the planner leaves out (framework_overhead): allocated CUDA bytes, or the RSS after imports."""
    import gc

    gc.collect()
    return torch.cuda.memory_allocated() if torch.cuda.is_available() else rss()


def _measure(run_steps, load, baseline: int) -> dict:
    """load() -> state; run_steps(state) -> {phase: Peak}; bytes above the baseline."""
    state = load()
    loaded = _baseline() - baseline
    phases = run_steps(state)
    out = {"baseline_bytes": baseline, "after_load_bytes": loaded,
           "measure": "torch.cuda.max_memory_allocated" if torch.cuda.is_available()
           else "peak RSS (VmHWM) above the RSS after imports",
           "malloc_env": {k: v for k, v in os.environ.items() if k.startswith("MALLOC_")}}
    out |= {f"{name}_peak_bytes": peak.bytes - baseline for name, peak in phases.items()}
    out["peak_bytes"] = max(peak.bytes for peak in phases.values()) - baseline
    return out


def _token_rows(n: int, length: int, vocab: int, seed: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, vocab, (n, length), generator=g).tolist()


def _stage_config(config: dict, stage: str, steps: int, work: Path):
    """The params, with `steps` optimizer steps and no checkpoint inside them, and the TrainingArguments
    the stage builds from them (qlora_rlhf.training.trainer_args) in a scratch folder."""
    from qlora_rlhf.config import Config
    from qlora_rlhf.paths import RunPaths
    from qlora_rlhf.training import trainer_args

    config = with_overrides(Config.model_validate(config), **{stage: {"max_steps": steps, "save_steps": steps + 1}})
    return config, trainer_args(config, RunPaths(work), stage)


def _trainer_step(make_trainer) -> dict:
    """Peak of trainer.train() for the trainer that make_trainer() builds (model loading excluded)."""
    def run(trainer):
        with Peak() as peak:
            trainer.train()
        return {"train": peak}

    return _measure(run, make_trainer, _baseline())


def sft_step(config: dict, path: str, steps: int, work: str) -> dict:
    """As qlora_rlhf.stages.sft.run trains: SFTTrainer, completion-only loss, LoRA via peft_config."""
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    from qlora_rlhf.models import load_model, load_tokenizer, lora_config
    from qlora_rlhf.training import match_trainable_dtype

    config, args = _stage_config(config, "sft", steps, Path(work))
    tokenizer = load_tokenizer(path)
    b, s = config.sft.batch_size * config.sft.gradient_accumulation_steps, config.data.max_length
    ids = _token_rows(b * steps, s, min(len(tokenizer), _vocab(path)), config.run.seed)
    train = Dataset.from_dict({"input_ids": ids, "completion_mask": [[0] * (s // 2) + [1] * (s - s // 2)] * len(ids)})

    def load():
        model = load_model(path, config, tokenizer.pad_token_id, kind="causal")
        trainer = SFTTrainer(model=model, args=SFTConfig(**args, completion_only_loss=True, packing=False),
                             train_dataset=train, processing_class=tokenizer, peft_config=lora_config(config))
        match_trainable_dtype(trainer.model, config)
        return trainer

    return _trainer_step(load)


def rm_step(config: dict, path: str, steps: int, work: str) -> dict:
    """As qlora_rlhf.stages.rm.run trains: RewardTrainer on (chosen, rejected) pairs, LoRA + score head."""
    from datasets import Dataset
    from trl import RewardConfig, RewardTrainer

    from qlora_rlhf.models import load_model, load_tokenizer, lora_config
    from qlora_rlhf.training import match_trainable_dtype

    config, args = _stage_config(config, "rm", steps, Path(work))
    tokenizer = load_tokenizer(path)
    b, s = config.rm.batch_size * config.rm.gradient_accumulation_steps, config.data.max_length
    vocab = min(len(tokenizer), _vocab(path))
    train = Dataset.from_dict({"chosen_ids": _token_rows(b * steps, s, vocab, config.run.seed),
                               "rejected_ids": _token_rows(b * steps, s, vocab, config.run.seed + 1)})

    def load():
        model = load_model(path, config, tokenizer.pad_token_id, kind="score")
        trainer = RewardTrainer(model=model, args=RewardConfig(**args, disable_dropout=True), train_dataset=train,
                                processing_class=tokenizer, peft_config=lora_config(config, task_type="SEQ_CLS"))
        match_trainable_dtype(trainer.model, config)
        return trainer

    return _trainer_step(load)


def untrained_reward_adapter(config: dict, path: str, out: str) -> str:
    """A reward-stage adapter (LoRA + score head) as rm.run saves it, untrained: PPO's input."""
    from peft import get_peft_model

    from qlora_rlhf.config import Config
    from qlora_rlhf.models import load_model, load_tokenizer, lora_config

    config = Config.model_validate(config)
    tokenizer = load_tokenizer(path)
    model = get_peft_model(load_model(path, config, tokenizer.pad_token_id, kind="score"),
                           lora_config(config, task_type="SEQ_CLS"))
    model.save_pretrained(out)
    return out


def fixed_length_prompt(tokenizer, length: int) -> str:
    """A prompt that tokenizes to exactly `length` tokens (ids below 1200, valid for --llama7b's vocab)."""
    ids = tokenizer(" ".join(["the"] * length), add_special_tokens=False).input_ids[:length]
    text = tokenizer.decode(ids)
    got = len(tokenizer(text, add_special_tokens=False).input_ids)
    if got != length:
        raise RuntimeError(f"prompt of {got} tokens, wanted {length}")
    return text


def ppo_step(config: dict, path: str, steps: int, rm_adapter: str) -> dict:
    """As qlora_rlhf.stages.ppo.run steps: SharedBaseRoles (one 4-bit base, policy/reference/reward roles),
    rollout (sample, score, GAE) then update (ppo_epochs x mini-batches), each phase's peak."""
    from qlora_rlhf.actor import SharedBaseRoles
    from qlora_rlhf.config import Config
    from qlora_rlhf.stages import ppo

    config = Config.model_validate(config)
    cfg = config.ppo

    def load():
        ac = SharedBaseRoles.load(config, Path(path), Path(rm_adapter))
        # the planner's worst case: no response ends early (EOS is held back until max_new_tokens)
        ac.model.get_base_model().generation_config.min_new_tokens = cfg.max_new_tokens
        prompts = [fixed_length_prompt(ac.tokenizer, config.data.max_prompt_tokens)] * cfg.batch_size
        return ac, ppo.make_optimizer(config, ac.policy_parameters()), prompts

    def run(state):
        ac, optimizer, prompts = state
        with Peak() as generation:  # generation alone: the rollout's peak is max(generation, scoring)
            ac.sample(prompts, cfg.max_new_tokens, cfg.temperature)
        rollout, update = [], []
        for step in range(1, steps + 1):
            torch.manual_seed(config.run.seed * 1000 + step)  # as ppo.run seeds each step
            with Peak() as peak:
                batch = ppo.rollout(ac, prompts, cfg)
            rollout.append(peak)
            with Peak() as peak:
                ppo.update(ac, optimizer, batch, cfg)
            update.append(peak)
        assert batch.response_mask.shape[1] == cfg.max_new_tokens and bool(batch.response_mask.all())
        return {"generation": generation, "rollout": max(rollout, key=lambda p: p.bytes),
                "update": max(update, key=lambda p: p.bytes)}

    return _measure(run, load, _baseline())


def _vocab(path) -> int:
    return json.loads((Path(path) / "config.json").read_text())["vocab_size"]


# ------------------------------------------------------------------ planner side
def planned(config, arch, stage: str, device: str) -> dict:
    """The plan's components for `stage`; the figure compared is their sum minus framework_overhead
    (not in the measured bytes). For PPO also the rollout (generation, then scoring) and update phases."""
    from qlora_rlhf import memory

    parts = memory.plan(config, arch, device=device)[stage]
    out = {"planned_bytes": sum(parts.values()) - parts["framework_overhead"],
           "planned_components_gib": {k: round(v / GIB, 4) for k, v in parts.items()}}
    if stage == "ppo":
        size = {name: sum(parts.get(k, 0) for k in keys) for name, keys in memory.PPO_PHASES.items()}
        static = out["planned_bytes"] - sum(size.values()) - parts["phases_not_concurrent"]
        out["planned_phase_bytes"] = {"generation": static + size["generation"],
                                      "rollout": static + max(size["generation"], size["scoring"]),
                                      "update": static + size["update"]}
    return out


# How the CPU measurement sees memory: "allocated" makes glibc mmap every block of 64 KiB or more
# and unmap it when freed, so the RSS follows the bytes allocated (the CPU analogue of
# torch.cuda.max_memory_allocated); "rss" is the default allocator, whose freed heap memory stays
# resident and is what `top` shows.
ALLOCATORS = {"allocated": {"MALLOC_MMAP_THRESHOLD_": "65536"}, "rss": {}}


def _in_process_with(allocator: str, fn, *args):
    saved = {k: os.environ.pop(k) for k in list(os.environ) if k.startswith("MALLOC_")}
    os.environ.update(ALLOCATORS[allocator])
    try:
        return in_fresh_process(fn, *args)
    finally:
        for key in ALLOCATORS[allocator]:
            os.environ.pop(key, None)
        os.environ.update(saved)


def measure_all(config, path: Path, stages, steps: int, ppo_steps: int, allocators) -> dict:
    from qlora_rlhf.memory import Architecture

    arch = Architecture.from_config_dict(json.loads((path / "config.json").read_text()))
    device = "cuda" if torch.cuda.is_available() else "cpu"
    allocators = ["cuda"] if device == "cuda" else allocators
    dump = config.model_dump(mode="json")
    sizes = {"sft": {"batch": config.sft.batch_size, "seq": config.data.max_length},
             "rm": {"pairs": config.rm.batch_size, "seq": config.data.max_length},
             "ppo": {"prompts": config.ppo.batch_size, "mini_batch": config.ppo.mini_batch_size,
                     "ppo_epochs": config.ppo.ppo_epochs, "prompt_tokens": config.data.max_prompt_tokens,
                     "new_tokens": config.ppo.max_new_tokens}}
    results = {}
    with tempfile.TemporaryDirectory(prefix="memory-vs-plan-") as tmp:
        for stage in stages:
            plan = planned(config, arch, stage, device)
            n = ppo_steps if stage == "ppo" else steps
            results[stage] = sizes[stage] | {"steps": n, "planned_gib": plan["planned_bytes"] / GIB} | plan
            if stage == "ppo":
                adapter = in_fresh_process(untrained_reward_adapter, dump, str(path), f"{tmp}/rm-adapter")
            for allocator in allocators:
                fn, args = ((ppo_step, (dump, str(path), n, adapter)) if stage == "ppo" else
                            (sft_step if stage == "sft" else rm_step, (dump, str(path), n, f"{tmp}/{stage}")))
                measured = (in_fresh_process(fn, *args) if allocator == "cuda"
                            else _in_process_with(allocator, fn, *args))
                error = plan["planned_bytes"] / measured["peak_bytes"] - 1
                results[stage][allocator] = {"measured_gib": measured["peak_bytes"] / GIB, "planner_error": error,
                                             "within_15_percent": abs(error) <= 0.15} | measured
                print(f"{stage}: planned {plan['planned_bytes'] / GIB:.3f} GiB, measured ({allocator}) "
                      f"{measured['peak_bytes'] / GIB:.3f} GiB, planner error {100 * error:+.1f} %", flush=True)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--model", help="model folder (default: results/<run>/base/model)")
    parser.add_argument("--tiny", action="store_true", help="a 2-layer random Llama (smoke run)")
    parser.add_argument("--stages", default=",".join(STAGES), help="comma-separated subset of sft,rm,ppo")
    parser.add_argument("--batch", type=int,
                        help="sequences per SFT step, pairs per RM step, prompts per PPO step")
    parser.add_argument("--seq", type=int, help="data.max_length (PPO prompts: data.max_prompt_tokens)")
    parser.add_argument("--steps", type=int, default=2,
                        help="optimizer steps of SFT and RM (the 2nd has optimizer states)")
    parser.add_argument("--ppo-steps", type=int, default=1,
                        help="PPO steps (one = rollout + ppo_epochs x mini-batch updates; states exist after the 1st)")
    parser.add_argument("--allocators", default="allocated,rss",
                        help="CPU: allocated (RSS with glibc unmapping freed blocks), rss (default glibc), or both")
    parser.add_argument("--llama7b", action="store_true",
                        help="instead of params.yaml: the paper profile on a random Llama-2-7B (CUDA only)")
    parser.add_argument("--tokenizer", help="with --llama7b: a tokenizer folder (default: the embedded model's)")
    parser.add_argument("--out", default="memory_vs_plan")
    args = parser.parse_args()
    stages = [s for s in args.stages.split(",") if s]
    if set(stages) - set(STAGES):
        parser.error(f"--stages: unknown {sorted(set(stages) - set(STAGES))}")
    allocators = [a for a in args.allocators.split(",") if a]
    if not allocators or set(allocators) - set(ALLOCATORS):
        parser.error(f"--allocators: a comma-separated subset of {', '.join(ALLOCATORS)}")

    from qlora_rlhf.config import load_config

    def sized(config):
        seq = args.seq or config.data.max_length
        mini = min(args.batch or config.ppo.batch_size, config.ppo.mini_batch_size)
        return with_overrides(config, sft={"batch_size": args.batch}, rm={"batch_size": args.batch},
                              ppo={"batch_size": args.batch, "mini_batch_size": mini},
                              data={"max_length": seq,
                                    "max_prompt_tokens": min(config.data.max_prompt_tokens, seq - 1)})

    if args.llama7b:
        if not torch.cuda.is_available():
            sys.exit("--llama7b needs a CUDA device")
        paper = sized(load_config(REPO / "configs" / "paper-llama2-7b.yaml"))
        model7 = random_llama2_7b(tokenizer=args.tokenizer)
        results = {"params": "configs/paper-llama2-7b.yaml", "model": "random weights in Llama-2-7B's shape",
                   "device": "cuda", "compute_dtype": paper.model.compute_dtype, "optimizer": paper.model.optimizer,
                   "gradient_checkpointing": paper.model.gradient_checkpointing,
                   "llama2_7b": measure_all(paper, model7, stages, args.steps, args.ppo_steps, [])}
        print("llama2_7b", dumps(results["llama2_7b"]))
    else:
        config = sized(load_config(args.params))
        path = model_dir(config, args.model, args.tiny)
        results = {"params": args.params, "model": str(path),
                   "device": "cuda" if torch.cuda.is_available() else "cpu",
                   "compute_dtype": config.model.compute_dtype, "optimizer": config.model.optimizer,
                   "gradient_checkpointing": config.model.gradient_checkpointing,
                   "default": measure_all(config, path, stages, args.steps, args.ppo_steps, allocators)}
        print("default", dumps(results["default"]))
    write(args.out, results)


if __name__ == "__main__":
    main()
