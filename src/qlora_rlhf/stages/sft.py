"""Stage 1, SFT: TRL SFTTrainer on the chosen dialogues, loss on the assistant completion only,
NF4 base + LoRA, the configured optimizer (paged AdamW 8-bit by default), gradient checkpointing
when model.gradient_checkpointing is on. Writes the LoRA adapter, the merged SFT model the later
stages start from, the held-out perplexity of the base and of the merged SFT model (in sft/, for
the evaluation, and in the metrics) and the loss curve; its training time goes to timings/sft.json."""

from __future__ import annotations

from datasets import Dataset

from .. import distributed
from ..atomic import atomic_dir, write_json
from ..config import Config
from ..data import read_split
from ..models import base_location, load_model, load_tokenizer, lora_config
from ..paths import HELD_OUT_PERPLEXITY, RunPaths
from ..training import (
    History,
    HistoryCallback,
    batch_metrics,
    checkpoints_for,
    completion_perplexity,
    merge_adapter,
    require,
    save_adapter,
    seed_everything,
    train_loss_ends,
    train_resumably,
    trainer_args,
    write_metrics,
)


def run(config: Config, paths: RunPaths) -> dict:
    from trl import SFTConfig, SFTTrainer

    seed_everything(config)
    # checks the batch split
    args = SFTConfig(**trainer_args(config, paths, "sft"), completion_only_loss=True, packing=False)
    main = distributed.is_main()  # under `accelerate launch`: the one process that measures and writes
    base = base_location(paths)
    tokenizer = load_tokenizer(base)
    require(paths.split("sft"), "data")
    train = Dataset.from_list(read_split(paths, "sft"))
    held_out = read_split(paths, "eval")
    prompts, chosen = [r["prompt"] for r in held_out], [r["chosen"] for r in held_out]

    model = load_model(base, config, tokenizer.pad_token_id, kind="causal")
    perplexity_base = completion_perplexity(model, tokenizer, prompts, chosen) if main else None
    with args.main_process_first(local=False, desc="checkpoint folder"):  # emptied by one process, before any reads it
        if main:
            checkpoints_for(paths, "sft", config, [paths.split("sft")])
    history = History(paths, "sft") if main else None
    trainer = SFTTrainer(model=model, args=args, train_dataset=train, processing_class=tokenizer,
                         peft_config=lora_config(config), callbacks=[HistoryCallback(history, ("loss",))])
    seconds = train_resumably(trainer, config, paths, "sft")
    if not main:
        return {}

    with atomic_dir(paths.sft) as out:
        save_adapter(trainer.model, out / "adapter")
        tokenizer.save_pretrained(out / "adapter")
        merge_adapter(base, out / "adapter", out / "merged", config, tokenizer)
        # Every later stage starts from the merged weights, re-quantized to NF4, so that is the model
        # measured (the evaluation reports this number for its SFT policy); it scores a little worse
        # than the adapter on the original 4-bit base, as QLoRA merges do.
        merged = load_model(out / "merged", config, tokenizer.pad_token_id, trainable=False)
        perplexity_sft = completion_perplexity(merged, tokenizer, prompts, chosen)
        perplexity = {"perplexity_base": perplexity_base, "perplexity_sft": perplexity_sft}
        write_json(out / HELD_OUT_PERPLEXITY, perplexity)
    curve = history.write_csv(paths.metrics / "sft_history.csv")
    metrics = {
        **perplexity, **train_loss_ends(curve),
        "steps": int(trainer.state.global_step), **batch_metrics(trainer),
    }
    write_metrics(paths, "sft", metrics, config, seconds=seconds)
    print(f"sft: held-out perplexity {perplexity_base:.2f} -> {perplexity_sft:.2f}; adapter in {paths.sft}")
    return metrics
