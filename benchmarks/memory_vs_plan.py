"""Measured peak memory of one training step against qlora_rlhf.memory.plan.

CPU: peak resident set size (a psutil sampling thread, every 5 ms) above the RSS after the imports,
compared with the plan's SFT total minus its fixed framework overhead. GPU:
torch.cuda.max_memory_allocated, compared with the same. With --llama7b (CUDA only) it also
builds a random-weights model shaped like Llama-2-7B (from LlamaConfig, no download), saves it,
loads it in NF4 through qlora_rlhf.models.load_model and measures an SFT step of the paper profile.

    python benchmarks/memory_vs_plan.py                         # params.yaml's model, its batch and length
    python benchmarks/memory_vs_plan.py --tiny --batch 2 --seq 32   # smoke run
    python benchmarks/memory_vs_plan.py --llama7b               # on a CUDA GPU: needs ~14 GB disk, ~5 min
"""

from __future__ import annotations

import argparse
import tempfile
import threading
import time
from pathlib import Path

import psutil
import torch

from _common import REPO, dumps, model_dir, with_overrides, write

GIB = 1024**3


class PeakRSS:
    """Samples this process's RSS in a thread; .peak is the highest value seen."""

    def __init__(self, interval: float = 0.005):
        self.process, self.interval, self.peak = psutil.Process(), interval, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, self.process.memory_info().rss)
            time.sleep(self.interval)

    def __enter__(self):
        self.peak = self.process.memory_info().rss
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.process.memory_info().rss)


def sft_step_peak(config, path: Path, steps: int) -> dict:
    """Load the model as the SFT stage does and run `steps` SFT steps; peak bytes above baseline."""
    from peft import get_peft_model

    from qlora_rlhf.models import device, load_model, load_tokenizer, lora_config
    from throughput import make_optimizer

    dev, cuda = device(), torch.cuda.is_available()
    tokenizer = load_tokenizer(path) if (path / "tokenizer_config.json").is_file() else None
    pad = tokenizer.pad_token_id if tokenizer is not None else 0
    baseline_rss = psutil.Process().memory_info().rss
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    with PeakRSS() as rss:
        model = get_peft_model(load_model(path, config, pad, kind="causal"), lora_config(config))
        opt = make_optimizer(config, model.parameters())
        model.train()
        vocab = model.config.vocab_size
        b, s = config.sft.batch_size, config.data.max_length
        loaded = torch.cuda.memory_allocated() if cuda else psutil.Process().memory_info().rss - baseline_rss
        for _ in range(steps):
            x = torch.randint(3, vocab, (b, s), device=dev)
            model(input_ids=x, labels=x).loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
    out = {"batch": config.sft.batch_size, "seq": config.data.max_length, "after_load_bytes": loaded}
    if cuda:
        out |= {"measure": "torch.cuda.max_memory_allocated", "peak_bytes": torch.cuda.max_memory_allocated()}
    else:
        out |= {"measure": "peak RSS above the post-import baseline", "peak_bytes": rss.peak - baseline_rss}
    del model, opt
    return out


def compare(config, arch, measured: dict) -> dict:
    from qlora_rlhf import memory

    sft = memory.plan(config, arch)["sft"]
    planned = sum(sft.values()) - sft["framework_overhead"]
    static = sum(v for k, v in sft.items() if k not in {"activations", "logits", "framework_overhead"})
    return measured | {"planned_bytes": planned, "planned_static_bytes": static,
                       "measured_over_planned": measured["peak_bytes"] / planned,
                       "planned_components_gib": {k: v / GIB for k, v in sft.items()}}


def random_llama2_7b(out: Path) -> Path:
    """Random weights in Llama-2-7B's shape, bf16, saved as safetensors (no download)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                      num_key_value_heads=32, vocab_size=32000, max_position_embeddings=4096,
                      tie_word_embeddings=False, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    with torch.device("meta"):
        model = LlamaForCausalLM(cfg)
    model.to_empty(device="cpu")
    model.to(torch.bfloat16)
    with torch.no_grad():
        for name, param in model.named_parameters():
            param.fill_(1.0) if "norm" in name else param.normal_(0.0, 0.02)
    model.save_pretrained(out, safe_serialization=True)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--model", help="model folder (default: results/<run>/base/model)")
    parser.add_argument("--tiny", action="store_true", help="a 2-layer random Llama (smoke run)")
    parser.add_argument("--batch", type=int)
    parser.add_argument("--seq", type=int)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--llama7b", action="store_true", help="also measure a random Llama-2-7B in NF4 (CUDA only)")
    parser.add_argument("--out", default="memory_vs_plan")
    args = parser.parse_args()

    from qlora_rlhf.config import load_config
    from qlora_rlhf.memory import Architecture

    config = load_config(args.params)
    seq = args.seq or config.data.max_length
    config = with_overrides(config, sft={"batch_size": args.batch},
                            data={"max_length": seq, "max_prompt_tokens": min(config.data.max_prompt_tokens, seq - 1)})
    path = model_dir(config, args.model, args.tiny)
    arch = Architecture.from_config_dict(__import__("json").loads((path / "config.json").read_text()))
    results = {"params": args.params, "model": str(path),
               "default": compare(config, arch, sft_step_peak(config, path, args.steps))}
    print("default", dumps(results["default"]))

    if args.llama7b:
        if not torch.cuda.is_available():
            results["llama2_7b"] = {"skipped": "no CUDA device"}
            print("llama2_7b: skipped (no CUDA device)")
        else:
            paper = load_config(REPO / "configs" / "paper-llama2-7b.yaml")
            paper = with_overrides(paper, sft={"batch_size": args.batch},
                                   data={"max_length": args.seq} if args.seq else {})
            with tempfile.TemporaryDirectory(prefix="llama2-7b-random-") as tmp:
                path7 = random_llama2_7b(Path(tmp))
                arch7 = Architecture.from_config_dict(__import__("json").loads((path7 / "config.json").read_text()))
                results["llama2_7b"] = compare(paper, arch7, sft_step_peak(paper, path7, args.steps))
            print("llama2_7b", dumps(results["llama2_7b"]))
    write(args.out, results)


if __name__ == "__main__":
    main()
