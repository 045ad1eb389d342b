"""A tiny random Llama (2 layers, 64 wide) saved with a real tokenizer: the model that the tests and the
benchmarks' smoke runs train in seconds. Its numbers mean nothing; the code paths are the real ones."""

from __future__ import annotations

from pathlib import Path


def save_tiny_llama(out: Path, tokenizer, seed: int = 0) -> Path:
    """Write the model and `tokenizer` to `out` (created); returns `out`."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    LlamaForCausalLM(cfg).save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    return out
