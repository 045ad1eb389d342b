"""Overhead of each training stage over a bare script with identical settings (not over TRL's own
PPOTrainer, which needs separate 4-bit models and so is not the same run): the stage's own
run() (qlora_rlhf.stages.sft / rm / ppo) against
- SFT: a bare TRL SFTTrainer script, RM: a bare TRL RewardTrainer script, each with the stage's
  model (load_model: NF4 + LoRA), data split, TrainingArguments (training.trainer_args), seed and
  LoRA dtype, but no checkpoint, no history/DVCLive, no held-out evaluation, no merge;
- PPO: a bare loop of the same equations (ppo.rollout: sample, score, KL-penalized rewards, GAE;
  then ppo.policy_loss + vf_coef * ppo.value_loss over ppo_epochs x mini-batches) on the same
  SharedBaseRoles and optimizer, without checkpoints, history, statistics, the non-finite / max-KL
  guards or tqdm.

Every run is a fresh process in a scratch folder (the params' data and base model are reused when
the data and base stages have run, else built there). Reported per stage, stage / bare, in wall
and in CPU seconds (the CPU seconds stay comparable when other work shares the machine): the
training loop (the stage's own Timer around Trainer.train() / its PPO loop against the bare
script's), the whole run (run() against the whole bare script, model loading included), and the
whole run extrapolated to the params' step count (fixed + per-step costs, approximate); plus a
breakdown of the stage's extra work (held-out evaluation, merge, DVCLive set-up, checkpoints).

    python benchmarks/overhead_vs_bare.py --steps 3                 # params.yaml's embedded default
    python benchmarks/overhead_vs_bare.py --tiny --steps 2 --out overhead_vs_bare-smoke
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
import time
from pathlib import Path

from _common import dumps, in_fresh_process, load_average, model_dir, peak_rss, with_overrides, write

STAGES = ("sft", "rm", "ppo")
# The stage functions timed one by one for the breakdown (what the bare scripts do not do).
STAGE_PARTS = {"sft": ("load_model", "completion_perplexity", "merge_adapter", "History"),
               "rm": ("load_model", "pairwise", "History"),
               "ppo": ("Checkpoints.save", "save_policy", "History")}


class Clock:
    """Wall and CPU seconds (all threads of this process): under a shared machine's load the CPU
    seconds stay comparable where the wall seconds do not."""

    def __enter__(self):
        self.wall, self.cpu = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc):
        self.wall, self.cpu = time.perf_counter() - self.wall, time.process_time() - self.cpu

    start, stop = __enter__, __exit__

    def dict(self, prefix: str) -> dict:
        return {f"{prefix}_seconds": self.wall, f"{prefix}_cpu_seconds": self.cpu}


def timed(module, name: str, clocks: dict):
    """Wrap module.<name> (a function, a class, or a class's method: "Class.method") so each call adds
    its wall/CPU seconds to clocks[name] (a breakdown of where the stage spends its time; the stage's
    behaviour is unchanged)."""
    owner_path, _, attribute = name.rpartition(".")
    owner = getattr(module, owner_path) if owner_path else module
    original = getattr(owner, attribute)

    def wrapper(*args, **kwargs):
        with Clock() as clock:
            result = original(*args, **kwargs)
        total = clocks.setdefault(name, {"seconds": 0.0, "cpu_seconds": 0.0, "calls": 0})
        total["seconds"] += clock.wall
        total["cpu_seconds"] += clock.cpu
        total["calls"] += 1
        return result

    setattr(owner, attribute, wrapper)


def _setup(dump: dict, root: str):
    from qlora_rlhf.config import Config
    from qlora_rlhf.paths import RunPaths

    return Config.model_validate(dump), RunPaths(Path(root))


def stage_run(stage: str, dump: dict, root: str) -> dict:
    """The stage itself: qlora_rlhf.<module>.run(config, paths), as the CLI calls it."""
    import importlib

    import pandas as pd

    module = importlib.import_module(f"qlora_rlhf.stages.{stage}")
    config, paths = _setup(dump, root)
    parts: dict = {}
    for name in STAGE_PARTS[stage]:
        timed(module, name, parts)

    from qlora_rlhf import training

    class LoopTimer(training.Timer):  # the stage's own Timer around Trainer.train() / the PPO loop, with CPU time
        def __enter__(self):
            self.cpu = time.process_time()
            return super().__enter__()

        def __exit__(self, *exc):
            super().__exit__(*exc)
            parts["loop"] = {"seconds": self.seconds, "cpu_seconds": time.process_time() - self.cpu}

    training.Timer = LoopTimer  # SFT and RM: around Trainer.train() in training.train_resumably
    if stage == "ppo":
        module.Timer = LoopTimer
    with Clock() as total:
        metrics = module.run(config, paths)
    loop = parts.pop("loop")
    key = {"sft": "loss", "rm": "loss", "ppo": "reward_mean"}[stage]
    curve = [round(float(v), 4) for v in pd.read_csv(paths.metrics / f"{stage}_history.csv")[key]]
    return (total.dict("total") | {"loop_seconds": loop["seconds"], "loop_cpu_seconds": loop["cpu_seconds"]}
            | {"steps": metrics["steps"], "parts": parts, f"{key}_curve": curve, "peak_rss_gib": peak_rss() / 1024**3})


def _bare_trainer(stage: str, dump: dict, root: str) -> dict:
    """A bare TRL script: the stage's model, data and TrainingArguments; no checkpoints, callbacks,
    evaluation or merge; the adapter saved at the end."""
    from datasets import Dataset

    from qlora_rlhf.data import read_split
    from qlora_rlhf.models import base_location, load_model, load_tokenizer, lora_config
    from qlora_rlhf.training import match_trainable_dtype, seed_everything, trainer_args

    config, paths = _setup(dump, root)
    total = Clock().start()
    seed_everything(config)
    source = base_location(paths) if stage == "sft" else paths.sft / "merged"
    tokenizer = load_tokenizer(source)
    train = Dataset.from_list(read_split(paths, stage))
    args = trainer_args(config, paths, stage) | {"output_dir": str(paths.root / f"bare-{stage}"), "save_strategy": "no"}
    if stage == "sft":
        from trl import SFTConfig, SFTTrainer

        model = load_model(source, config, tokenizer.pad_token_id, kind="causal")
        trainer = SFTTrainer(model=model, args=SFTConfig(**args, completion_only_loss=True, packing=False),
                             train_dataset=train, processing_class=tokenizer, peft_config=lora_config(config))
    else:
        from trl import RewardConfig, RewardTrainer

        model = load_model(source, config, tokenizer.pad_token_id, kind="score")
        trainer = RewardTrainer(model=model, args=RewardConfig(**args, disable_dropout=True), train_dataset=train,
                                processing_class=tokenizer, peft_config=lora_config(config, task_type="SEQ_CLS"))
    match_trainable_dtype(trainer.model, config)
    with Clock() as loop:
        trainer.train()
    trainer.save_model(str(paths.root / f"bare-{stage}"))
    total.stop()
    curve = [round(row["loss"], 4) for row in trainer.state.log_history if "loss" in row]
    return total.dict("total") | loop.dict("loop") | {"steps": trainer.state.global_step, "loss_curve": curve,
                                                       "peak_rss_gib": peak_rss() / 1024**3}


def bare_sft(dump: dict, root: str) -> dict:
    return _bare_trainer("sft", dump, root)


def bare_rm(dump: dict, root: str) -> dict:
    return _bare_trainer("rm", dump, root)


def bare_ppo(dump: dict, root: str) -> dict:
    """PPO's equations in a bare loop on the stage's models, prompts, seeds and optimizer: the stage's
    rollout, losses and response-aligned forward, none of its bookkeeping."""
    import torch

    from qlora_rlhf.actor import SharedBaseRoles
    from qlora_rlhf.data import read_split
    from qlora_rlhf.stages import ppo
    from qlora_rlhf.training import seed_everything

    config, paths = _setup(dump, root)
    cfg = config.ppo
    total = Clock().start()
    seed_everything(config)
    prompts = [r["prompt"] for r in read_split(paths, "ppo")]
    roles = SharedBaseRoles.load(config, paths.sft / "merged", paths.rm / "adapter")
    optimizer = ppo.make_optimizer(config, roles.policy_parameters())
    rewards = []
    loop = Clock().start()
    for step in range(1, cfg.steps + 1):
        torch.manual_seed(config.run.seed * 1000 + step)
        batch = ppo.rollout(roles, ppo.rollout_prompts(prompts, step, cfg, config.run.seed), cfg)
        rewards.append(round(batch.scores.mean().item(), 4))
        roles.model.train()
        for _ in range(cfg.ppo_epochs):
            for index in torch.randperm(len(batch)).split(cfg.mini_batch_size):
                mb = batch[index]
                new = roles.score_response(mb.ids, mb.mask, mb.prompt_len, cfg.temperature)
                policy_loss, _ = ppo.policy_loss(new.logprobs, mb.logprobs, mb.advantages, mb.response_mask,
                                                 cfg.cliprange)
                value_loss = ppo.value_loss(new.values, mb.values, mb.returns, mb.response_mask, cfg.cliprange_value)
                optimizer.zero_grad(set_to_none=True)
                (policy_loss + cfg.vf_coef * value_loss).backward()
                torch.nn.utils.clip_grad_norm_(roles.policy_parameters(), 1.0)
                optimizer.step()
    loop.stop()
    roles.model.save_pretrained(paths.root / "bare-ppo")
    total.stop()
    return total.dict("total") | loop.dict("loop") | {"steps": cfg.steps, "reward_mean_curve": rewards,
                                                       "peak_rss_gib": peak_rss() / 1024**3}


BARE = {"sft": bare_sft, "rm": bare_rm, "ppo": bare_ppo}


def prepare(config, tmp: Path, reuse: bool) -> Path:
    """A scratch run folder holding the data splits and the base model: the params' own when the data
    and base stages have run (data copied, model linked), else built with the package's stages."""
    from qlora_rlhf.paths import RunPaths
    from qlora_rlhf.stages import base, data

    own, shared = RunPaths.of(config), RunPaths(tmp / "shared")
    if reuse and own.manifest.is_file() and (own.base_model / "base.json").is_file():
        shutil.copytree(own.data, shared.data)
        shared.base_model.mkdir(parents=True)
        shutil.copy(own.base_model / "base.json", shared.base_model / "base.json")
        if (own.base_model / "model").exists():
            (shared.base_model / "model").symlink_to((own.base_model / "model").resolve())
    else:
        data.run(config, shared)
        base.run(config, shared)
    return shared.root


def run_dir(tmp: Path, name: str, shared: Path, inputs: dict[str, Path]) -> Path:
    """A fresh run folder: the shared data and base, plus earlier stages' outputs as links."""
    root = tmp / name
    root.mkdir()
    for sub in ("data", "base"):
        (root / sub).symlink_to(shared / sub)
    for sub, target in inputs.items():
        (root / sub).symlink_to(target)
    return root


def ratios(stage_runs: list[dict], bare_runs: list[dict], steps: int, full_steps: int) -> dict:
    """stage / bare of the medians, for wall and CPU seconds: the training loop, the whole run, and
    the whole run extrapolated to the params' step count (fixed costs + loop / steps x full_steps;
    approximate: a short run checkpoints more often per step than the full one)."""
    def med(runs, key):
        return statistics.median(r[key] for r in runs)

    out = {}
    for clock in ("", "_cpu"):
        loop, total = f"loop{clock}_seconds", f"total{clock}_seconds"

        def full(runs, total=total, loop=loop):
            return med(runs, total) - med(runs, loop) + med(runs, loop) / steps * full_steps

        out |= {f"loop{clock}_ratio": med(stage_runs, loop) / med(bare_runs, loop),
                f"end_to_end{clock}_ratio": med(stage_runs, total) / med(bare_runs, total),
                f"end_to_end{clock}_ratio_at_{full_steps}_steps": full(stage_runs) / full(bare_runs)}
    return out


BASELINES = {"sft": "a bare TRL SFTTrainer script", "rm": "a bare TRL RewardTrainer script",
             "ppo": "a bare loop of the same PPO equations (not TRL's PPOTrainer)"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--tiny", action="store_true", help="a 2-layer random Llama (smoke run)")
    parser.add_argument("--steps", type=int, default=3, help="optimizer steps of SFT and RM, PPO steps")
    parser.add_argument("--repeats", type=int, default=1, help="stage/bare pairs per stage (medians reported)")
    parser.add_argument("--stages", default=",".join(STAGES))
    parser.add_argument("--keep", help="keep the scratch runs in this folder")
    parser.add_argument("--out", default="overhead_vs_bare")
    args = parser.parse_args()
    stages = [s for s in args.stages.split(",") if s]

    from qlora_rlhf.config import load_config

    params = load_config(args.params)
    config = with_overrides(params, sft={"max_steps": args.steps}, rm={"max_steps": args.steps},
                            ppo={"steps": args.steps})
    if args.tiny:
        config = with_overrides(config, model={"name_or_path": str(model_dir(config, None, True))})
    full = {"sft": params.sft.max_steps, "rm": params.rm.max_steps, "ppo": params.ppo.steps}
    dump = config.model_dump(mode="json")
    results = {"baselines": BASELINES, "params": args.params, "model": config.model.name_or_path, "steps": args.steps,
               "repeats": args.repeats, "load_average_start": load_average(), "stages": {}}
    tmp = Path(args.keep or tempfile.mkdtemp(prefix="overhead-vs-bare-"))
    tmp.mkdir(parents=True, exist_ok=True)
    try:
        shared = prepare(config, tmp, reuse=not args.tiny)
        outputs: dict[str, Path] = {}
        for stage in stages:
            needs = {"rm": ["sft"], "ppo": ["sft", "rm"]}.get(stage, [])
            missing = [n for n in needs if n not in outputs]
            if missing:
                parser.error(f"--stages: {stage} needs the output of {', '.join(missing)} from this run")
            runs = {"stage": [], "bare": []}
            for repeat in range(args.repeats):
                inputs = {n: outputs[n] for n in needs}
                for kind in ("bare", "stage") if repeat % 2 == 0 else ("stage", "bare"):
                    root = run_dir(tmp, f"{stage}-{kind}-{repeat}", shared, inputs)
                    load = load_average()
                    result = (in_fresh_process(stage_run, stage, dump, str(root)) if kind == "stage"
                              else in_fresh_process(BARE[stage], dump, str(root)))
                    runs[kind].append(result | {"load_average_before": load})
                    print(f"{stage} {kind}: loop {result['loop_seconds']:.1f} s "
                          f"({result['loop_cpu_seconds']:.1f} s CPU), "
                          f"total {result['total_seconds']:.1f} s ({result['total_cpu_seconds']:.1f} s CPU)",
                          flush=True)
                    if kind == "stage":
                        outputs.setdefault(stage, root / {"sft": "sft", "rm": "rm", "ppo": "ppo"}[stage])
            r = ratios(runs["stage"], runs["bare"], args.steps, full[stage])
            results["stages"][stage] = r | {"loop_cpu_within_5_percent": r["loop_cpu_ratio"] <= 1.05} | runs
            print(f"{stage}: stage/bare loop {r['loop_ratio']:.3f} wall, {r['loop_cpu_ratio']:.3f} CPU; whole run "
                  f"{r['end_to_end_ratio']:.3f} wall, {r['end_to_end_cpu_ratio']:.3f} CPU "
                  f"({r[f'end_to_end_cpu_ratio_at_{full[stage]}_steps']:.3f} CPU at {full[stage]} steps)", flush=True)
    finally:
        if not args.keep:
            shutil.rmtree(tmp, ignore_errors=True)
    results["load_average_end"] = load_average()
    print(dumps({s: {k: v for k, v in r.items() if k not in ("stage", "bare")} for s, r in results["stages"].items()}))
    write(args.out, results)


if __name__ == "__main__":
    main()
