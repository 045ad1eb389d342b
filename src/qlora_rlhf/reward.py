"""Stage 2, reward model: TRL RewardTrainer warm-started from the merged SFT model, LoRA
(sequence classification) + a one-logit score head, loss -log σ(r_chosen − r_rejected).
Writes the reward adapter (with its score head) and held-out pairwise accuracy and margin."""

from __future__ import annotations

import torch
from datasets import Dataset

from .atomic import atomic_dir
from .config import Config
from .data import read_split
from .models import load_model, load_tokenizer, lora_config
from .paths import RunPaths
from .training import (History, HistoryCallback, Timer, checkpoints_for, match_trainable_dtype, last_checkpoint, require, seed_everything, trainer_args,
                       write_metrics)


@torch.no_grad()
def score_texts(model, tokenizer, texts: list[str], batch_size: int = 8) -> list[float]:
    """Reward-model scores of whole dialogues (EOS appended, as in training)."""
    model.eval()
    device = next(model.parameters()).device
    scores: list[float] = []
    for start in range(0, len(texts), batch_size):
        batch = [t + tokenizer.eos_token for t in texts[start : start + batch_size]]
        enc = tokenizer(batch, return_tensors="pt", padding=True, add_special_tokens=False).to(device)
        scores += model(**enc, use_cache=False).logits[:, 0].float().tolist()
    return scores


def pairwise(model, tokenizer, pairs: list[dict[str, str]]) -> tuple[list[float], list[float]]:
    chosen = score_texts(model, tokenizer, [p["prompt"] + p["chosen"] for p in pairs])
    rejected = score_texts(model, tokenizer, [p["prompt"] + p["rejected"] for p in pairs])
    return chosen, rejected


def run(config: Config, paths: RunPaths) -> dict:
    from trl import RewardConfig, RewardTrainer

    seed_everything(config)
    sft_model = require(paths.sft / "merged", "sft")
    require(paths.split("rm"), "data")
    tokenizer = load_tokenizer(sft_model)
    train = Dataset.from_list(read_split(paths, "rm"))
    held_out = read_split(paths, "eval")

    model = load_model(sft_model, config, tokenizer.pad_token_id, kind="score")
    checkpoints_for(paths, "rm", config, [paths.split("rm"), paths.sft / "adapter" / "adapter_model.safetensors"])
    history = History(paths, "rm")
    args = RewardConfig(**trainer_args(config, paths, "rm"), disable_dropout=True)
    trainer = RewardTrainer(model=model, args=args, train_dataset=train, processing_class=tokenizer,
                            peft_config=lora_config(config, task_type="SEQ_CLS"),
                            callbacks=[HistoryCallback(history, ("loss", "accuracy", "margin"))])
    match_trainable_dtype(trainer.model, config)
    with Timer() as timer:
        trainer.train(resume_from_checkpoint=last_checkpoint(paths.checkpoints("rm")))
    chosen, rejected = pairwise(trainer.model, tokenizer, held_out)
    margins = [c - r for c, r in zip(chosen, rejected)]

    with atomic_dir(paths.rm) as out:
        trainer.model.save_pretrained(out / "adapter")
        tokenizer.save_pretrained(out / "adapter")
    curve = history.write_csv(paths.metrics / "rm_history.csv")
    metrics = {
        "accuracy": sum(m > 0 for m in margins) / len(margins), "margin_mean": sum(margins) / len(margins),
        "train_loss_first": float(curve["loss"].iloc[0]), "train_loss_last": float(curve["loss"].iloc[-1]),
        "steps": int(trainer.state.global_step), "seconds": round(timer.seconds, 1), "eval_pairs": len(margins),
    }
    write_metrics(paths, "rm", metrics)
    print(f"rm: held-out accuracy {metrics['accuracy']:.3f}, mean margin {metrics['margin_mean']:.3f}")
    return metrics
