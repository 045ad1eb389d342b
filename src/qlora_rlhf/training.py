"""What the three training stages share: seeds, the DVCLive + CSV history logger, resumable
checkpoints, held-out perplexity, the non-finite guard and merging an adapter into its base."""

from __future__ import annotations

import hashlib
import json
import math
import shutil
import time
from pathlib import Path

import pandas as pd
import torch
from tqdm.auto import tqdm
from transformers import TrainerCallback, set_seed

from . import distributed, precision
from .atomic import append_jsonl, atomic_file, read_json, read_jsonl, write_failure, write_json
from .checkpoints import newest_loadable
from .config import Config
from .errors import SaveError, TrainingError  # noqa: F401  (re-exported)
from .paths import RunPaths
from .preemption import PreemptionCallback, SigtermFlag, stopped
from .timings import write_timings
from .tokens import dialogue_ids


def check_finite(step: int, **values: float) -> None:
    bad = {k: v for k, v in values.items() if not math.isfinite(v)}
    if bad:
        names = ", ".join(f"{k}={v}" for k, v in bad.items())
        raise TrainingError(f"step {step}: non-finite {names}; stopped, the last good checkpoint is kept")


def seed_everything(config: Config) -> None:
    set_seed(config.run.seed, deterministic=not torch.cuda.is_available())
    torch.use_deterministic_algorithms(not torch.cuda.is_available(), warn_only=True)


def require(path: Path, stage: str) -> Path:
    if not Path(path).exists():
        raise TrainingError(f"{path} is missing: run the {stage} stage first")
    return path


class History:
    """Per-step metrics appended to checkpoints/<stage>/history.jsonl (survives a kill) and to
    DVCLive; `write_csv` turns them into the stage's plot file.

    DVCLive's own files are rebuilt from history.jsonl on every start rather than resumed: DVCLive
    rewrites metrics.json in place, so a kill mid-write leaves JSON that its resume cannot parse."""

    def __init__(self, paths: RunPaths, stage: str):
        from dvclive import Live

        self.file = paths.checkpoints(stage) / "history.jsonl"
        self.file.parent.mkdir(parents=True, exist_ok=True)
        self.live = Live(dir=str(paths.dvclive(stage)), resume=False, save_dvc_exp=False, dvcyaml=None)
        for row in self.rows().to_dict("records"):
            self._to_live(int(row.pop("step")), {k: v for k, v in row.items() if pd.notna(v)})

    def log(self, step: int, metrics: dict[str, float]) -> None:
        append_jsonl(self.file, {"step": step} | {k: float(v) for k, v in metrics.items()})
        self._to_live(step, metrics)

    def _to_live(self, step: int, metrics: dict[str, float]) -> None:
        self.live.step = step
        for key, value in metrics.items():
            self.live.log_metric(key, float(value))
        self.live.next_step()

    def rows(self) -> pd.DataFrame:
        rows = read_jsonl(self.file)
        if not rows:
            return pd.DataFrame(columns=["step"])
        return pd.DataFrame(rows).groupby("step", as_index=False).last()  # a resumed run re-logs steps: keep the latest

    def write_csv(self, target: Path) -> pd.DataFrame:
        frame = self.rows()
        with atomic_file(target) as handle:
            frame.to_csv(handle, index=False)
        self.live.end()
        return frame


def train_loss_ends(curve: pd.DataFrame) -> dict[str, float]:
    """First and last logged training loss. Rows without one are skipped: when max_steps is not a
    multiple of logging_steps, RewardTrainer's closing log carries accuracy and margin but no loss."""
    loss = curve["loss"].dropna()
    return {"train_loss_first": float(loss.iloc[0]), "train_loss_last": float(loss.iloc[-1])}


class HistoryCallback(TrainerCallback):
    """Sends the Trainer's training logs (loss, accuracy, ...) to a History, and stops on a non-finite
    loss. `history` is None in all but the writing process of a distributed run: the logged loss is
    already averaged over processes, so every process checks it and stops at the same step."""

    def __init__(self, history: History | None, keys: tuple[str, ...]):
        self.history, self.keys = history, keys

    def on_log(self, args, state, control, logs=None, **kwargs):
        picked = {k: v for k, v in (logs or {}).items() if k in self.keys}
        if "loss" in picked:
            check_finite(state.global_step, loss=picked["loss"])
        if picked and self.history is not None:
            self.history.log(state.global_step, picked)


def trainer_checkpoint_to_resume(folder: Path, max_steps: int, stage: str = "training") -> str | None:
    """The newest complete Trainer checkpoint before `max_steps`: trainer_state.json is written last
    (and not atomically), so a checkpoint cut off by a kill, even in that file, is skipped; and a
    finished run's final checkpoint is not resumed, because Trainer checks `max_steps` only after a
    step and would train one step more (a re-run of a finished stage must give the same model).
    A complete one whose files are damaged is reported and the one before it taken (checkpoints.py)."""
    done = {checkpoint_step(p): p for p in Path(folder).glob("checkpoint-*")
            if _readable_json(p / "trainer_state.json")}
    resumable = [done[step] for step in sorted(done) if step < max_steps]
    chosen = newest_loadable(resumable, stage)
    return str(chosen) if chosen else None


def _readable_json(path: Path) -> bool:
    try:
        read_json(path)
    except (OSError, ValueError):
        return False
    return True


def checkpoint_step(checkpoint: str | Path | None) -> int:
    """The step of a Trainer checkpoint folder (checkpoint-N); 0 for none."""
    return int(Path(checkpoint).name.split("-")[-1]) if checkpoint else 0


def train_resumably(trainer, config: Config, paths: RunPaths, stage: str) -> float:
    """`trainer.train()` with the trainable params in the compute dtype, resumed from the stage's last
    complete checkpoint if there is one; returns the training seconds, counted across resumes (Timer).
    A SIGTERM during training saves a checkpoint after the current step and raises Preempted (preemption.py)."""
    folder, max_steps = paths.checkpoints(stage), getattr(config, stage).max_steps
    resume = trainer_checkpoint_to_resume(folder, max_steps, stage)
    if resume and trainer.args.should_save:
        print(f"{stage}: resuming from {resume} (step {checkpoint_step(resume)})")
    timer = Timer(folder, checkpoint_step(resume), record=trainer.args.should_save)
    match_trainable_dtype(trainer.model, config)
    trainer.add_callback(TrainableDtypeCallback(config))
    trainer.add_callback(TimerCallback(timer))
    if trainer.args.world_size > 1 and trainer.args.should_save:
        args = trainer.args
        print(f"{stage}: {args.world_size} processes, each {args.per_device_train_batch_size} samples x "
              f"{args.gradient_accumulation_steps} accumulation steps: "
              f"{batch_metrics(trainer)['effective_batch']} per step")
    with SigtermFlag() as sigterm, timer:
        preemption = PreemptionCallback(sigterm)
        trainer.add_callback(preemption)
        try:
            trainer.train(resume_from_checkpoint=resume)
        except Exception as exc:
            error = checkpoint_write_error(exc, folder, trainer.state.global_step)
            if error is not None:
                raise error from exc
            raise
    if preemption.stopped_at is not None or sigterm.received:
        # the checkpoint a re-run resumes from: the one just saved, or before it if training had reached max_steps
        raise stopped(stage, trainer.state.global_step, trainer_checkpoint_to_resume(folder, max_steps, stage))
    return timer.seconds


def checkpoint_write_error(exc: Exception, folder: Path, step: int) -> SaveError | None:
    """A failed write during training (a checkpoint's save, the history log) as one SaveError naming
    the path and the cause. Trainer writes checkpoint-N in place, trainer_state.json last, so a save cut
    short leaves a folder without it: removed here (it frees what space it took), the complete ones are
    kept and a re-run resumes from the newest."""
    cause = write_failure(exc, Path(folder))
    # an OSError names its file, or is a log line's write (no name: the folder); a library's error is the save's
    path = getattr(exc, "filename", None) or (folder if isinstance(exc, OSError)
                                              else Path(folder) / f"checkpoint-{step}")
    if cause is None:
        return None
    partial = Path(folder) / f"checkpoint-{step}"
    if partial.is_dir() and not _readable_json(partial / "trainer_state.json"):
        shutil.rmtree(partial, ignore_errors=True)
    return SaveError(f"could not write {path}: {cause}; the previous checkpoints are left as they were")


class TrainableDtypeCallback(TrainerCallback):
    """match_trainable_dtype again once a resume has loaded its checkpoint: Trainer loads the adapter
    through peft's load_adapter, which casts bf16 LoRA weights up to float32, so a resumed bf16 run
    trained on in float32 and ended with another model than an uninterrupted run."""

    def __init__(self, config: Config):
        self.config = config

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        match_trainable_dtype(model, self.config)


def trainer_args(config: Config, paths: RunPaths, stage: str) -> dict:
    """TrainingArguments shared by the SFT and reward stages; the batch shared out over the launched
    processes with the params' effective batch kept (distributed.split_batch)."""
    train = getattr(config, stage)
    batch = distributed.split_batch(stage, train.batch_size, train.gradient_accumulation_steps)
    return dict(
        output_dir=str(paths.checkpoints(stage)), max_steps=train.max_steps,
        per_device_train_batch_size=batch.per_process_batch, gradient_accumulation_steps=batch.accumulation,
        learning_rate=train.learning_rate, warmup_steps=round(train.warmup_ratio * train.max_steps),
        lr_scheduler_type="cosine",
        logging_steps=train.logging_steps, save_steps=train.save_steps, save_total_limit=2, save_strategy="steps",
        optim=config.model.optimizer, activation_checkpointing=config.model.gradient_checkpointing,
        bf16=precision.of(config).dtype == "bfloat16", fp16=precision.of(config).dtype == "float16",
        seed=config.run.seed, data_seed=config.run.seed, report_to="none", max_length=config.data.max_length,
        dataloader_num_workers=0, remove_unused_columns=True, use_cpu=not torch.cuda.is_available(),
    )


def batch_metrics(trainer) -> dict[str, int]:
    """The batch the Trainer ran with, from its own arguments: what a multi-process run must keep equal."""
    args = trainer.args
    per_step = args.per_device_train_batch_size * args.gradient_accumulation_steps
    return {"effective_batch": per_step * args.world_size, "processes": args.world_size}


@torch.no_grad()
def completion_perplexity(model, tokenizer, prompts: list[str], completions: list[str], batch_size: int = 8) -> float:
    """exp(mean NLL) over completion tokens (EOS included), prompts masked out, as SFT's loss counts it,
    on ids laid out as SFTTrainer laid them out (tokens.dialogue_ids), padded on the right as it did.
    Batches hold pairs of similar length, and logits are computed only from the first completion token
    of the batch on: the vocabulary projection and its float32 softmax would otherwise cover prompts too."""
    model.eval()
    device = next(model.parameters()).device
    pairs = []
    for prompt, completion in zip(prompts, completions):
        ids, n_prompt = dialogue_ids(tokenizer, prompt, completion)
        pairs.append((ids[:n_prompt], ids[n_prompt:]))
    pairs.sort(key=lambda pc: len(pc[0]) + len(pc[1]))
    total_nll, total_tokens = 0.0, 0
    for start in tqdm(range(0, len(pairs), batch_size), desc="held-out perplexity", unit="batch"):
        batch = pairs[start : start + batch_size]
        width = max(len(p) + len(c) for p, c in batch)
        first = min(len(p) for p, _ in batch) - 1  # the first position that predicts a completion token
        ids = torch.tensor([p + c + [tokenizer.pad_token_id] * (width - len(p) - len(c)) for p, c in batch],
                           device=device)
        labels = torch.tensor([[-100] * len(p) + c + [-100] * (width - len(p) - len(c)) for p, c in batch],
                              device=device)
        mask = (torch.arange(width, device=device)[None]
                < torch.tensor([len(p) + len(c) for p, c in batch], device=device)[:, None])
        keep = torch.arange(first, width - 1, device=device)
        logits = model(input_ids=ids, attention_mask=mask.long(), use_cache=False, logits_to_keep=keep).logits.float()
        target = labels[:, first + 1 :]
        nll = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.size(-1)), target.reshape(-1),
                                                ignore_index=-100, reduction="sum")
        total_nll += nll.item()
        total_tokens += int((target != -100).sum())
    return math.exp(total_nll / max(total_tokens, 1))


def merge_adapter(base_path: str, adapter_path: Path, out: Path, config: Config, tokenizer,
                  kind: str = "causal") -> None:
    """Merge a LoRA adapter into full-precision base weights (the standard QLoRA hand-off), so the
    next stage can load it in 4-bit as its new base."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    cls = AutoModelForCausalLM if kind == "causal" else AutoModelForSequenceClassification
    dtype = torch.bfloat16 if precision.of(config).dtype != "float32" else torch.float32
    model = cls.from_pretrained(base_path, dtype=dtype, pad_token_id=tokenizer.pad_token_id, device_map={"": "cpu"})
    merged = PeftModel.from_pretrained(model, str(adapter_path)).merge_and_unload()
    merged.to(torch.bfloat16).save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)


def save_adapter(model, out: Path, **kwargs) -> None:
    """`save_pretrained` of a peft model with adapter_config.json's module lists sorted. peft writes
    them in set order, which follows Python's per-process string hashing: the same weights would get a
    new DVC hash on every re-run of a stage, and every later stage would look changed."""
    model.save_pretrained(out, **kwargs)
    for path in Path(out).rglob("adapter_config.json"):
        adapter = json.loads(path.read_text())
        for key in ("target_modules", "modules_to_save"):
            if isinstance(adapter.get(key), list):
                adapter[key] = sorted(adapter[key])
        path.write_text(json.dumps(adapter, indent=2, sort_keys=True))


# PPO's `steps` (constant learning rate) can grow and resume; SFT/RM's `max_steps` stays fingerprinted
# because their cosine schedule and warmup are computed from it.
UNFINGERPRINTED = ("steps", "save_steps", "logging_steps", "max_kl")
# The DAG's one definition, in the project root, where DVC and Snakemake run every stage (as the paper
# stage finds paper/ there).
DVC_YAML = Path("dvc.yaml")


def declared_params(stage: str, dvc_yaml: Path = DVC_YAML) -> list[str] | None:
    """The params keys dvc.yaml declares for `stage` (a `foreach` stage's, for its items), or None
    where there is no dvc.yaml with that stage (a stage verb run outside the project)."""
    import yaml

    try:
        spec = yaml.safe_load(Path(dvc_yaml).read_text())["stages"][stage]
    except (OSError, KeyError, TypeError, yaml.YAMLError):
        return None
    keys = (spec.get("do", spec) if "foreach" in spec else spec).get("params") or []
    return [key for key in keys if isinstance(key, str)]


def fingerprint_params(config: Config, stage: str) -> dict:
    """What a stage's checkpoints depend on among the params: the values of the keys that dvc.yaml
    declares for the stage (so an edit that reruns the stage under DVC starts its training over, and one
    that does not, such as `eval` or `seeds` for PPO, keeps its checkpoints), minus the keys that only
    lengthen a run or change its guard or logging. Outside a project (no dvc.yaml), the whole config."""
    params = config.model_dump(mode="json")
    keys = declared_params(stage)
    if keys is not None:
        picked: dict = {}
        for key in keys:
            *parents, leaf = key.split(".")
            source, target = params, picked
            for part in parents:
                source, target = source[part], target.setdefault(part, {})
            target[leaf] = source[leaf]
        params = picked
    # lengthening a run or changing its guard or logging does not alter the earlier steps
    for section in params.values():
        if isinstance(section, dict):
            for key in UNFINGERPRINTED:
                section.pop(key, None)
    # `auto` resumed on another kind of machine starts over
    params.setdefault("model", {})["compute_dtype"] = precision.of(config).dtype
    return params


def checkpoints_for(paths: RunPaths, stage: str, config: Config, inputs: list[Path]) -> Path:
    """The stage's checkpoint folder, emptied first when its checkpoints come from other params
    (fingerprint_params) or other inputs: re-running after a kill resumes, re-running after a change
    starts over (the folder is not a DVC output, so DVC does not clear it)."""
    root = paths.checkpoints(stage)
    digest = hashlib.sha256(json.dumps(fingerprint_params(config, stage), sort_keys=True).encode())
    for path in inputs:
        digest.update(path.read_bytes())
    stamp = root / "fingerprint"
    if root.exists() and (not stamp.is_file() or stamp.read_text() != digest.hexdigest()):
        print(f"{stage}: params or inputs changed since the checkpoints in {root} were written; starting over")
        shutil.rmtree(root)
    root.mkdir(parents=True, exist_ok=True)
    with atomic_file(stamp) as handle:  # a torn stamp would not crash, but it would throw the checkpoints away
        handle.write(digest.hexdigest())
    return root


class Timer:
    """Seconds spent in a training loop, carried across a resume. After each step (and so before any
    checkpoint of that step exists) `step_done` appends the running total to checkpoints/<stage>/
    seconds.jsonl; a run resumed from step N starts from step N's total. Steps lost to a kill, after
    the last checkpoint, are not counted: `seconds` is the time of the steps that made the outputs (it
    goes to timings/<stage>.json, never into a DVC output: write_metrics)."""

    def __init__(self, checkpoints: Path, resumed_step: int = 0, record: bool = True):
        self.file = Path(checkpoints) / "seconds.jsonl"
        self.before, self.record = 0.0, record  # record: False in all but one process of a distributed run
        if resumed_step:
            # the latest run's, for a re-run step
            totals = {row["step"]: row["seconds"] for row in read_jsonl(self.file)}
            self.before = totals.get(resumed_step, 0.0)
        elif record:  # a fresh start: totals left by an earlier run are stale
            self.file.unlink(missing_ok=True)

    def __enter__(self):
        self.start = time.perf_counter()
        return self

    def __exit__(self, *exc):
        self.seconds = self.elapsed()

    def elapsed(self) -> float:
        return self.before + time.perf_counter() - self.start

    def step_done(self, step: int) -> None:
        if self.record:
            append_jsonl(self.file, {"step": step, "seconds": round(self.elapsed(), 2)})


class TimerCallback(TrainerCallback):
    """Records a Trainer's steps in a Timer (on_step_end runs before the step's checkpoint is saved)."""

    def __init__(self, timer: Timer):
        self.timer = timer

    def on_step_end(self, args, state, control, **kwargs):
        self.timer.step_done(state.global_step)


def write_metrics(paths: RunPaths, stage: str, metrics: dict, config: Config, seconds: float | None = None) -> None:
    """The stage's metrics file, with the compute dtype the stage ran in (`auto` differs across machines).
    It is a DVC output, so it holds results only; the training loop's `seconds`, which differ on every
    run, go to timings/<stage>.json, which DVC does not hash (timings.py)."""
    write_json(paths.stage_metrics(stage), metrics | {"compute_dtype": precision.of(config).dtype})
    if seconds is not None:
        write_timings(paths, stage, seconds)


def match_trainable_dtype(model, config: Config) -> None:
    """TRL casts a quantized model's trainable params (LoRA, score head) to bf16 (the QLoRA paper's
    choice); keep them in the configured compute dtype so fp32 CPU runs don't mix dtypes."""
    dtype = precision.of(config).torch_dtype
    for param in model.parameters():
        if param.requires_grad and param.dtype != dtype:
            param.data = param.data.to(dtype)
