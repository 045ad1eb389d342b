"""`SharedBaseRoles`: one 4-bit base serving all four PPO roles, with named adapters instead of model copies:

- policy:    merged SFT weights + the "policy" LoRA adapter (trainable) + a value head on its trunk;
- reference: the same weights with adapters disabled, i.e. the SFT policy (the KL anchor);
- reward:    the same weights + the "reward" LoRA adapter from the rm stage + its score head.

A 7B model then costs one NF4 copy instead of three: TRL's PPOTrainer with peft takes the reference
from the policy with its adapter disabled too, but loads the value and reward models as their own
4-bit copies (docs/memory.md). The evaluation stage uses the same object to generate with SFT and
PPO and to score with the reward model. Token ids are laid out as in training (tokens.py).

What PPO and the evaluation call: `sample` (the one way to draw responses, through model.generation's
engine), `score_response` (log-probs and values aligned with the response tokens, so callers do no index
arithmetic) and `reward` (the reward model's score of whole sequences).
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import torch
from safetensors import safe_open
from torch import nn

from .config import Config
from .generation import sampling_model
from .models import compute_dtype, load_model, lora_config
from .tokens import left_pad, positions, prompt_ids

POLICY, REWARD = "policy", "reward"


def _score_head(rm_adapter: Path, hidden: int, dtype: torch.dtype, device) -> nn.Linear:
    with safe_open(str(rm_adapter / "adapter_model.safetensors"), "pt") as f:
        key = next(k for k in f.keys() if k.endswith("score.weight"))
        weight = f.get_tensor(key)
    head = nn.Linear(hidden, 1, bias=False, dtype=dtype, device=device)
    head.weight.data.copy_(weight.to(dtype))
    return head.requires_grad_(False)


@dataclass
class Samples:
    """Responses drawn for a batch of prompts, laid out for the forwards that score them: each row is
    the prompt, left-padded, then the response, padded after its first EOS."""

    ids: torch.Tensor  # (batch, prompt_len + response length)
    mask: torch.Tensor  # attention mask: real prompt tokens, and response tokens through the first EOS
    prompt_len: int  # ids[:, prompt_len:] is the response
    response_mask: torch.Tensor  # mask[:, prompt_len:], by position (see `response_mask`)
    has_eos: torch.Tensor  # (batch,) bool: the response ended with an EOS, not at max_new_tokens
    logprobs: torch.Tensor | None = None  # with sample(logprobs=True): each response token's log-prob under the
    #                                       distribution that drew it (the sampler's own logits; 0-weight on padding)

    @property
    def response(self) -> torch.Tensor:
        return self.ids[:, self.prompt_len :]


class ResponseScores(NamedTuple):
    """One role's forward over prompt + response, aligned with the response: entry t belongs to the t-th
    response token (the output at the position just before it)."""

    logprobs: torch.Tensor  # (batch, response): log-prob of each response token at the sampling temperature
    values: torch.Tensor  # (batch, response): the value head's estimate before each response token, float32
    logits: torch.Tensor  # (batch, response, vocab): float32, divided by the temperature (entropy)


@dataclass
class SharedBaseRoles:
    """Policy (with its value head), reference and reward model on one 4-bit base; the active role is
    the adapter state of `model`: the policy adapter by default, none inside `reference()`, the
    reward adapter inside `reward()`."""

    model: object  # peft PeftModel over the 4-bit causal LM
    value_head: nn.Linear
    reward_head: nn.Linear
    tokenizer: object
    engine: str = "peft"  # what samples are drawn from: model.generation (generation.py)

    @classmethod
    def load(cls, config: Config, sft_model: Path, rm_adapter: Path, policy_adapter: Path | None = None,
             trainable: bool = True) -> SharedBaseRoles:
        from peft import LoraConfig as PeftLora
        from peft import PeftModel, get_peft_model

        from .models import load_tokenizer

        tokenizer = load_tokenizer(sft_model)
        base = load_model(sft_model, config, tokenizer.pad_token_id, kind="causal", trainable=trainable)
        if policy_adapter is not None:
            model = PeftModel.from_pretrained(base, str(policy_adapter), adapter_name=POLICY, is_trainable=trainable)
        else:
            cfg: PeftLora = lora_config(config)
            cfg.lora_dropout = 0.0  # PPO's ratio needs the same function at rollout and update
            model = get_peft_model(base, cfg, adapter_name=POLICY)
        # The reward adapter was trained on a sequence-classification model with the same trunk;
        # its score head is not part of a causal LM, so it is loaded by hand.
        model.load_adapter(str(rm_adapter), adapter_name=REWARD, is_trainable=False)
        model.set_adapter(POLICY)
        hidden, dtype = base.config.hidden_size, compute_dtype(config)
        device = next(model.parameters()).device
        reward_head = _score_head(rm_adapter, hidden, dtype, device)
        # The value head starts at zero: the reward head reads the reward adapter's hidden states, not the
        # policy's, so copying it gives noise, not a baseline. With lam=1 the first advantages are then the
        # (whitened) returns themselves, and the baseline is learned from there. It is trained, so it is
        # float32 like the LoRA weights, whatever the compute dtype.
        value_head = nn.Linear(hidden, 1, bias=False, dtype=torch.float32, device=device)
        nn.init.zeros_(value_head.weight)
        return cls(model, value_head, reward_head, tokenizer, config.model.generation)

    @property
    def device(self):
        return self.value_head.weight.device

    @property
    def compute_dtype(self) -> torch.dtype:
        return self.reward_head.weight.dtype  # the frozen head is in the compute dtype (load)

    def policy_parameters(self) -> list[nn.Parameter]:
        return [p for n, p in self.model.named_parameters() if f".{POLICY}." in n] + list(self.value_head.parameters())

    # ------------------------------------------------------------ role switches
    @contextmanager
    def reference(self):
        with self.model.disable_adapter():
            yield

    @contextmanager
    def adapter(self, name: str):
        self.model.set_adapter(name)
        try:
            yield
        finally:
            self.model.set_adapter(POLICY)
            for param in self.policy_parameters():  # set_adapter toggles requires_grad; keep the policy trainable
                param.requires_grad_(True)

    # ------------------------------------------------------------ sampling and scoring
    @torch.no_grad()
    def sample(self, prompts: list[str], max_new_tokens: int, temperature: float, logprobs: bool = False,
               model=None) -> Samples:
        """Sample one response per prompt from the active role (the policy unless inside `reference()`), or
        from `model` (the evaluation's separate base model), drawn through model.generation's engine:
        the model itself or its dense copy (generation.py). Queries are the prompts' ids as SFT trained on
        them (tokens.prompt_ids: BOS first where the tokenizer adds one). With `logprobs`, each token's
        log-prob under the sampling distribution, taken from generate's own logits (no second forward)."""
        with sampling_model(self.model if model is None else model, self.engine, self.compute_dtype) as sampler:
            return _draw(sampler, self.tokenizer, prompts, max_new_tokens, temperature, logprobs)

    def score_response(self, ids: torch.Tensor, mask: torch.Tensor, prompt_len: int,
                       temperature: float) -> ResponseScores:
        """The active role's log-probs of the response tokens ids[:, prompt_len:] and the value head's
        values before each, from one forward over the whole sequence (with gradients unless the caller
        turns them off). The position before a token predicts it, so the outputs from position
        prompt_len - 1 to the next-to-last line up with the response; logits are computed there only."""
        start = prompt_len - 1
        logits, hidden = forward(self.model, ids, mask, logits_from=start)
        logits = logits[:, :-1].float() / temperature
        values = self.value_head(hidden[:, start:-1].to(self.value_head.weight.dtype)).squeeze(-1)
        return ResponseScores(_logprobs_of(logits, ids[:, prompt_len:]), values, logits)

    @torch.no_grad()
    def reward(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Reward-model score at the last real token of each sequence."""
        with self.adapter(REWARD):
            _, hidden = forward(self.model, ids, mask, logits_from=None)
        last = mask.shape[1] - 1 - mask.flip(1).float().argmax(1)
        return self.reward_head(hidden[torch.arange(len(ids)), last].to(self.reward_head.weight.dtype))[:, 0].float()


def forward(model, ids: torch.Tensor, mask: torch.Tensor, logits_from: int | None = 0):
    """Logits and final hidden states over left-padded sequences (positions count real tokens only).
    Logits are computed from position `logits_from` on (None: the last position only): PPO and the
    evaluation need them over the response alone, and the vocabulary projection is a fifth of a small
    model's forward. No KV cache: a scoring forward would otherwise build one as large as generation's
    (6 GiB at Llama-2-7B's PPO shape)."""
    keep = 0 if logits_from == 0 else 1 if logits_from is None else ids.shape[1] - logits_from
    out = model(input_ids=ids, attention_mask=mask, position_ids=positions(mask), output_hidden_states=True,
                use_cache=False, logits_to_keep=keep)
    return out.logits, out.hidden_states[-1]


def _draw(model, tokenizer, prompts: list[str], max_new_tokens: int, temperature: float, logprobs: bool) -> Samples:
    """`SharedBaseRoles.sample` on the model that samples: generate, truncate after EOS, lay out."""
    device = next(model.parameters()).device
    query, query_mask = left_pad([prompt_ids(tokenizer, p) for p in prompts], tokenizer.pad_token_id, device)
    model.eval()
    out = model.generate(input_ids=query, attention_mask=query_mask, max_new_tokens=max_new_tokens, do_sample=True,
                         temperature=temperature, top_k=0, top_p=1.0, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id, return_dict_in_generate=True, output_logits=logprobs)
    drawn = out.sequences[:, query.shape[1] :]
    response = truncate_after_eos(drawn, tokenizer.eos_token_id, tokenizer.pad_token_id)
    resp_mask = response_mask(response, tokenizer.eos_token_id)
    own = None
    if logprobs:
        # one step at a time: a stacked copy of the logits would be batch x new tokens x vocabulary floats
        own = torch.stack([token_logprobs(step, drawn[:, i], temperature) for i, step in enumerate(out.logits)], 1)
    return Samples(ids=torch.cat([query, response], 1), mask=torch.cat([query_mask, resp_mask], 1),
                   prompt_len=query.shape[1], response_mask=resp_mask,
                   has_eos=(response == tokenizer.eos_token_id).any(1), logprobs=own)


def _after_first_eos(response: torch.Tensor, eos_id: int) -> torch.Tensor:
    is_eos = response == eos_id
    return (is_eos.cumsum(1) - is_eos.long()) > 0


def truncate_after_eos(response: torch.Tensor, eos_id: int, pad_id: int) -> torch.Tensor:
    """Keep tokens up to and including the first EOS; pad the rest."""
    return response.masked_fill(_after_first_eos(response, eos_id), pad_id)


def response_mask(response: torch.Tensor, eos_id: int) -> torch.Tensor:
    """1 for real response tokens (every position through the first EOS), 0 after it. By position, not
    by token id: a sampled token may carry the pad id, and masking it would leave a hole and move the
    score position. Generation pads only after EOS, so the pad id is not needed."""
    return (~_after_first_eos(response, eos_id)).long()


def token_logprobs(logits: torch.Tensor, tokens: torch.Tensor, temperature: float) -> torch.Tensor:
    """Log-prob of each token under softmax(logits / temperature), in float32."""
    return _logprobs_of(logits.float() / temperature, tokens)


def _logprobs_of(scaled_logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    return torch.log_softmax(scaled_logits, dim=-1).gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
