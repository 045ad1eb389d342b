"""Stage 2, reward model: TRL RewardTrainer warm-started from the merged SFT model, LoRA
(sequence classification) + a one-logit score head, loss -log σ(r_chosen − r_rejected).
Writes the reward adapter (with its score head), each held-out pair's margin (the evaluation's
reward-model table reads them) and held-out pairwise accuracy and mean margin."""

from __future__ import annotations

import numpy as np
import pandas as pd
import torch
from datasets import Dataset
from tqdm.auto import tqdm

from .. import distributed
from ..atomic import atomic_dir
from ..config import Config
from ..data import read_split
from ..models import load_model, load_tokenizer, lora_config
from ..paths import HELD_OUT_MARGINS, RunPaths
from ..tokens import left_pad, positions, sequence_ids
from ..training import (
    History,
    HistoryCallback,
    batch_metrics,
    checkpoints_for,
    require,
    save_adapter,
    seed_everything,
    train_loss_ends,
    train_resumably,
    trainer_args,
    write_metrics,
)


@torch.no_grad()
def score_texts(score_batch, tokenizer, texts: list[str], batch_size: int, device) -> np.ndarray:
    """Reward-model scores of whole dialogues, laid out as RewardTrainer trained on them (tokens.sequence_ids:
    special tokens as the tokenizer adds them, EOS appended), in batches of similar length (less
    padding), returned in the given order. `score_batch(input_ids, attention_mask)` scores one
    left-padded batch: the RM stage's classifier here, PPO's shared-base reward in evaluation."""
    ids = [sequence_ids(tokenizer, t) for t in texts]
    order, scores = np.argsort([len(i) for i in ids], kind="stable"), np.empty(len(texts))
    for start in tqdm(range(0, len(order), batch_size), desc="reward-model scores", unit="batch"):
        picked = order[start : start + batch_size]
        batch, mask = left_pad([ids[i] for i in picked], tokenizer.pad_token_id, device)
        scores[picked] = score_batch(batch, mask).float().cpu().numpy()
    return scores


def pairwise(model, tokenizer, pairs: list[dict[str, str]], batch_size: int = 8) -> np.ndarray:
    """Margins r(chosen) - r(rejected) of the sequence-classification reward model."""
    model.eval()

    def score_batch(ids, mask):  # position ids as in training, where RewardTrainer padded on the right
        return model(input_ids=ids, attention_mask=mask, position_ids=positions(mask), use_cache=False).logits[:, 0]

    device = next(model.parameters()).device
    chosen = score_texts(score_batch, tokenizer, [p["prompt"] + p["chosen"] for p in pairs], batch_size, device)
    rejected = score_texts(score_batch, tokenizer, [p["prompt"] + p["rejected"] for p in pairs], batch_size, device)
    return chosen - rejected


def run(config: Config, paths: RunPaths) -> dict:
    from trl import RewardConfig, RewardTrainer

    seed_everything(config)
    args = RewardConfig(**trainer_args(config, paths, "rm"), disable_dropout=True)  # checks the batch split
    main = distributed.is_main()  # under `accelerate launch`: the one process that measures and writes
    sft_model = require(paths.sft / "merged", "sft")
    require(paths.split("rm"), "data")
    tokenizer = load_tokenizer(sft_model)
    train = Dataset.from_list(read_split(paths, "rm"))
    held_out = read_split(paths, "eval")

    model = load_model(sft_model, config, tokenizer.pad_token_id, kind="score")
    with args.main_process_first(local=False, desc="checkpoint folder"):  # emptied by one process, before any reads it
        if main:
            checkpoints_for(paths, "rm", config,
                            [paths.split("rm"), paths.sft / "adapter" / "adapter_model.safetensors"])
    history = History(paths, "rm") if main else None
    trainer = RewardTrainer(model=model, args=args, train_dataset=train, processing_class=tokenizer,
                            peft_config=lora_config(config, task_type="SEQ_CLS"),
                            callbacks=[HistoryCallback(history, ("loss", "accuracy", "margin"))])
    seconds = train_resumably(trainer, config, paths, "rm")
    if not main:
        return {}
    margins = pairwise(trainer.model, tokenizer, held_out)

    with atomic_dir(paths.rm) as out:
        save_adapter(trainer.model, out / "adapter")
        tokenizer.save_pretrained(out / "adapter")
        pd.DataFrame({"margin": margins, "correct": margins > 0}).to_csv(out / HELD_OUT_MARGINS, index=False)
    curve = history.write_csv(paths.metrics / "rm_history.csv")
    metrics = {
        "accuracy": float((margins > 0).mean()), "margin_mean": float(margins.mean()),
        **train_loss_ends(curve),
        "steps": int(trainer.state.global_step), "eval_pairs": len(margins),
        **batch_metrics(trainer),
    }
    write_metrics(paths, "rm", metrics, config, seconds=seconds)
    print(f"rm: held-out accuracy {metrics['accuracy']:.3f}, mean margin {metrics['margin_mean']:.3f}")
    return metrics
