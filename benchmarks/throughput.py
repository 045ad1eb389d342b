"""Throughput of the three training stages on one machine: tokens/s of an SFT step and of a
reward-model step, PPO episodes/s and the share of a PPO step spent generating, with MFU where
the device's peak is known.

It times the same model set-up the stages use (qlora_rlhf.models.load_model: NF4 + LoRA via peft,
gradient checkpointing, the configured optimizer) on random token ids of a fixed length, not the
TRL trainers / PPO loop themselves (no data loading, logging or checkpointing), so it is an upper
bound on the stages' speed. A PPO "episode" here = one prompt: sample max_new_tokens, score the
sequence with the reference (adapter off) and the reward model, then one forward/backward of the
policy on it.

MFU = tokens/s x FLOPs per token / peak bf16 FLOP/s. N = the matmul parameters (every linear layer
and the lm_head projection). A trained token costs 4N (forward 2N, backward to the activations 2N:
the 4-bit base gets no weight gradient; LoRA's FLOPs are under 1 % and left out) plus attention,
12·L·d·s (PaLM's convention: QK^T and AV over the whole sequence, forward + backward, causal mask not
discounted); gradient checkpointing's recomputation is not counted (model FLOPs, not hardware FLOPs).
A generated token costs 2N + 4·L·d·c, with c its context length (on average prompt + new/2).

    python benchmarks/throughput.py                     # params.yaml's model (run the base stage first)
    python benchmarks/throughput.py --tiny --steps 1 --out throughput-smoke   # smoke run on a 2-layer random Llama
    python benchmarks/throughput.py --llama7b --out throughput-llama2-7b   # CUDA: paper profile, random 7B
    python benchmarks/throughput.py --params configs/paper-llama2-7b.yaml --model /path/to/llama --peak-tflops 165
"""

from __future__ import annotations

import argparse
import time

import torch

from _common import REPO, default_peak_tflops, dumps, model_dir, random_llama2_7b, with_overrides, write


def _sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def make_optimizer(config, params):
    params = [p for p in params if p.requires_grad]
    if config.model.optimizer == "paged_adamw_8bit":
        import bitsandbytes as bnb

        return bnb.optim.PagedAdamW8bit(params, lr=1e-5)
    return torch.optim.AdamW(params, lr=1e-5)


def timed(fn, steps: int, warmup: int) -> float:
    for _ in range(warmup):
        fn()
    _sync()
    start = time.perf_counter()
    for _ in range(steps):
        fn()
    _sync()
    return (time.perf_counter() - start) / steps


def architecture(path):
    import json

    from qlora_rlhf.memory import Architecture

    return Architecture.from_config_dict(json.loads((path / "config.json").read_text()))


def matmul_params(arch) -> int:
    return arch.linear_params + arch.vocab_size * arch.hidden_size


def train_flops_per_token(arch, seq: int) -> float:
    """4N + 12·L·d·s: see the module docstring."""
    return 4 * matmul_params(arch) + 12 * arch.num_layers * arch.num_heads * arch.head_dim * seq


def generate_flops_per_token(arch, context: float) -> float:
    return 2 * matmul_params(arch) + 4 * arch.num_layers * arch.num_heads * arch.head_dim * context


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--model", help="model folder (default: results/<run>/base/model)")
    parser.add_argument("--tiny", action="store_true", help="a 2-layer random Llama (smoke run)")
    parser.add_argument("--batch", type=int, help="sequences per SFT step / pairs per RM step (default: params)")
    parser.add_argument("--seq", type=int, help="tokens per sequence (default: data.max_length)")
    parser.add_argument("--ppo-prompts", type=int, help="prompts per PPO step (default: ppo.batch_size)")
    parser.add_argument("--prompt-len", type=int, help="default: data.max_prompt_tokens")
    parser.add_argument("--new-tokens", type=int, help="default: ppo.max_new_tokens")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--llama7b", action="store_true",
                        help="the paper profile on random weights in Llama-2-7B's shape (CUDA; ~14 GB disk)")
    parser.add_argument("--tokenizer", help="with --llama7b: a tokenizer folder (default: the embedded model's)")
    parser.add_argument("--peak-tflops", type=float, help="device peak bf16 TFLOP/s for MFU (default: known GPUs)")
    parser.add_argument("--generation", choices=["dense", "peft"],
                        help="what PPO samples from (default: the params' model.generation; generation.py)")
    parser.add_argument("--out", default="throughput")
    args = parser.parse_args()

    from peft import get_peft_model

    from qlora_rlhf import precision
    from qlora_rlhf.config import load_config
    from qlora_rlhf.generation import sampling_model
    from qlora_rlhf.models import compute_dtype, device, load_model, load_tokenizer, lora_config

    if args.llama7b and not torch.cuda.is_available():
        raise SystemExit("--llama7b needs a CUDA device")
    params = REPO / "configs" / "paper-llama2-7b.yaml" if args.llama7b else args.params
    config = load_config(params)
    seq = args.seq or config.data.max_length
    config = with_overrides(config, data={"max_length": seq},
                            model={"generation": args.generation or config.model.generation})
    path = random_llama2_7b(tokenizer=args.tokenizer) if args.llama7b else model_dir(config, args.model, args.tiny)
    arch = architecture(path)
    tokenizer = load_tokenizer(path)
    pad, dev = tokenizer.pad_token_id, device()
    torch.manual_seed(config.run.seed)
    vocab = min(len(tokenizer), arch.vocab_size)
    peak = args.peak_tflops or default_peak_tflops()

    def ids(batch: int, length: int) -> torch.Tensor:
        return torch.randint(3, vocab, (batch, length), device=dev)

    def mfu(tokens_per_second: float, flops_per_token: float) -> float | None:
        return None if peak is None else tokens_per_second * flops_per_token / (peak * 1e12)

    results = {"params": str(params), "model": "random weights in Llama-2-7B's shape" if args.llama7b else str(path),
               "seq": seq, "peak_tflops": peak, "gradient_checkpointing": config.model.gradient_checkpointing,
               "quantization": config.model.quantization, "compute_dtype": precision.of(config).dtype,
               "generation": config.model.generation}

    # ---- SFT step: causal LM loss on B x S tokens
    b_sft = args.batch or config.sft.batch_size
    policy = get_peft_model(load_model(path, config, pad, kind="causal"), lora_config(config))
    opt = make_optimizer(config, policy.parameters())
    policy.train()

    def sft_step():
        x = ids(b_sft, seq)
        policy(input_ids=x, labels=x).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    seconds = timed(sft_step, args.steps, args.warmup)
    tps = b_sft * seq / seconds
    results["sft"] = {"batch": b_sft, "seconds_per_step": seconds, "tokens_per_second": tps,
                      "mfu": mfu(tps, train_flops_per_token(arch, seq))}
    print("sft", dumps(results["sft"]))

    # ---- RM step: Bradley-Terry loss on B pairs (2B sequences)
    b_rm = args.batch or config.rm.batch_size
    scorer = get_peft_model(load_model(path, config, pad, kind="score"), lora_config(config, task_type="SEQ_CLS"))
    rm_opt = make_optimizer(config, scorer.parameters())
    scorer.train()

    def rm_step():
        rewards = scorer(input_ids=ids(2 * b_rm, seq)).logits.squeeze(-1).float()
        (-torch.nn.functional.logsigmoid(rewards[:b_rm] - rewards[b_rm:]).mean()).backward()
        rm_opt.step()
        rm_opt.zero_grad(set_to_none=True)

    seconds = timed(rm_step, args.steps, args.warmup)
    tps = 2 * b_rm * seq / seconds
    results["rm"] = {"pairs": b_rm, "seconds_per_step": seconds, "tokens_per_second": tps,
                     "pairs_per_second": b_rm / seconds, "mfu": mfu(tps, train_flops_per_token(arch, seq))}
    print("rm", dumps(results["rm"]))

    # ---- PPO step: generate, score (reference = adapter off, reward model), one policy update
    prompts = args.ppo_prompts or config.ppo.batch_size
    prompt_len = args.prompt_len or config.data.max_prompt_tokens
    new = args.new_tokens or config.ppo.max_new_tokens
    clock = {"generate": 0.0, "score": 0.0, "train": 0.0}
    decoding = [0.0]  # generate() alone, without making the dense copy

    def ppo_step():
        t0 = time.perf_counter()
        policy.eval()
        with torch.no_grad(), sampling_model(policy, config.model.generation, compute_dtype(config)) as sampler:
            query = ids(prompts, prompt_len)
            _sync()
            started = time.perf_counter()
            seqs = sampler.generate(input_ids=query, attention_mask=torch.ones_like(query), max_new_tokens=new,
                                    min_new_tokens=new, do_sample=True, temperature=config.ppo.temperature,
                                    pad_token_id=pad, use_cache=True)
            _sync()
            decoding[0] += time.perf_counter() - started
        with torch.no_grad():
            t1 = time.perf_counter()
            with policy.disable_adapter():
                policy(input_ids=seqs).logits.float().log_softmax(-1)
            scorer.eval()
            scorer(input_ids=seqs).logits.float()
            _sync()
        t2 = time.perf_counter()
        policy.train()
        policy(input_ids=seqs, labels=seqs).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        _sync()
        t3 = time.perf_counter()
        for key, value in zip(clock, (t1 - t0, t2 - t1, t3 - t2)):
            clock[key] += value

    timed(ppo_step, args.warmup, 0)  # warm-up, discarded
    clock, decoding[0] = dict.fromkeys(clock, 0.0), 0.0
    seconds = timed(ppo_step, args.steps, 0)
    total = sum(clock.values())
    gen_tps = prompts * new / (clock["generate"] / args.steps)
    results["ppo"] = {
        "prompts": prompts, "prompt_tokens": prompt_len, "new_tokens": new, "seconds_per_step": seconds,
        "episodes_per_second": prompts / seconds, "generation_share": clock["generate"] / total,
        "scoring_share": clock["score"] / total, "training_share": clock["train"] / total,
        "generated_tokens_per_second": gen_tps, "generate_seconds_per_step": clock["generate"] / args.steps,
        "decoding_seconds_per_step": decoding[0] / args.steps,  # generate() itself, without the dense copy's making
        "generation_mfu": mfu(gen_tps, generate_flops_per_token(arch, prompt_len + new / 2))}
    print("ppo", dumps(results["ppo"]))
    results["matmul_params"] = matmul_params(arch)
    write(args.out, results)


if __name__ == "__main__":
    main()
