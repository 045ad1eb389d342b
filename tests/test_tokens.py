"""One token layout for every stage (tokens.py): the ids that TRL's SFTTrainer and RewardTrainer build
in training are the ids that the reward model's held-out scoring, PPO's rollouts and the held-out
perplexity use, for a tokenizer that adds no special tokens (SmolLM2) and for one that puts BOS first
(Llama-2 style: SmolLM2's tokenizer with a BOS post-processor)."""

from __future__ import annotations

import math
from contextlib import nullcontext
from types import SimpleNamespace

import pytest
import torch
import yaml
from torch import nn

from qlora_rlhf.actor import SharedBaseRoles
from qlora_rlhf.config import PPOConfig
from qlora_rlhf.models import load_tokenizer
from qlora_rlhf.stages import ppo
from qlora_rlhf.stages.rm import pairwise, score_texts
from qlora_rlhf.tokens import dialogue_ids, prompt_ids, sequence_ids
from qlora_rlhf.training import completion_perplexity

from conftest import REPO

ROWS = [  # real hh-rlhf shapes: one turn, several turns, a reply that is a single token
    {"prompt": "\n\nHuman: What is 2 plus 3?\n\nAssistant:", "chosen": " 5.", "rejected": " I won't answer that."},
    {"prompt": "\n\nHuman: Hi!\n\nAssistant: Hello, how can I help?\n\nHuman: Tell me a joke about cats.\n\nAssistant:",
     "chosen": " Why did the cat sit on the computer? To keep an eye on the mouse.", "rejected": " No."},
    {"prompt": "\n\nHuman: Say yes.\n\nAssistant:", "chosen": " Yes", "rejected": " Maybe, maybe not; it depends."},
]


def _tokenizer(tokenizer_dir, bos: bool):
    tok = load_tokenizer(tokenizer_dir)
    if bos:
        from tokenizers.processors import TemplateProcessing

        tok._tokenizer.post_processor = TemplateProcessing(
            single=f"{tok.bos_token} $A", pair=f"{tok.bos_token} $A {tok.bos_token} $B",
            special_tokens=[(tok.bos_token, tok.bos_token_id)])
    assert (tok("Hi").input_ids[0] == tok.bos_token_id) == bos
    return tok


@pytest.fixture(params=[False, True], ids=["smollm2", "bos-first"])
def tok(request, tokenizer_dir):
    return _tokenizer(tokenizer_dir, request.param)


def _sft_dataset(tiny_model_dir, tok, tmp_path):
    from datasets import Dataset
    from transformers import AutoModelForCausalLM
    from trl import SFTConfig, SFTTrainer

    rows = [{"prompt": r["prompt"], "completion": r["chosen"]} for r in ROWS]
    args = SFTConfig(output_dir=str(tmp_path / "sft"), completion_only_loss=True, packing=False, max_length=256,
                     report_to="none", use_cpu=True)
    trainer = SFTTrainer(model=AutoModelForCausalLM.from_pretrained(tiny_model_dir), args=args,
                         train_dataset=Dataset.from_list(rows), processing_class=tok)
    return trainer.train_dataset


def _rm_dataset(tiny_model_dir, tok, tmp_path):
    from datasets import Dataset
    from transformers import AutoModelForSequenceClassification
    from trl import RewardConfig, RewardTrainer

    model = AutoModelForSequenceClassification.from_pretrained(tiny_model_dir, num_labels=1)
    args = RewardConfig(output_dir=str(tmp_path / "rm"), max_length=256, report_to="none", use_cpu=True)
    trainer = RewardTrainer(model=model, args=args, train_dataset=Dataset.from_list(ROWS), processing_class=tok)
    return model, trainer.train_dataset


def test_sft_training_ids_are_the_layout_and_perplexity_scores_them(tiny_model_dir, tok, tmp_path):
    """SFTTrainer's ids and loss mask are tokens.dialogue_ids; completion_perplexity counts exactly the
    tokens SFT's loss counts, on those ids."""
    from transformers import AutoModelForCausalLM

    trained = _sft_dataset(tiny_model_dir, tok, tmp_path)
    for row, ids, labels in zip(ROWS, trained["input_ids"], trained["labels"]):
        ours, n_prompt = dialogue_ids(tok, row["prompt"], row["chosen"])
        assert ids == ours and ids[-1] == tok.eos_token_id and ids[-2] != tok.eos_token_id  # EOS once, at the end
        assert ids[:n_prompt] == prompt_ids(tok, row["prompt"])
        assert labels == [-100] * n_prompt + ids[n_prompt:]

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    total_nll, total_tokens = 0.0, 0
    with torch.no_grad():
        for ids, labels in zip(trained["input_ids"], trained["labels"]):
            logp = torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0, :-1].float(), -1)
            target = torch.tensor(labels[1:])
            counted = target != -100
            total_nll -= logp[counted].gather(-1, target[counted, None]).sum().item()
            total_tokens += int(counted.sum())
    measured = completion_perplexity(model, tok, [r["prompt"] for r in ROWS], [r["chosen"] for r in ROWS], batch_size=2)
    assert measured == pytest.approx(math.exp(total_nll / total_tokens), rel=1e-4)


def test_reward_training_ids_are_the_layout_and_held_out_scoring_uses_them(tiny_model_dir, tok, tmp_path):
    """RewardTrainer's chosen/rejected ids are tokens.sequence_ids; score_texts hands those ids to the
    scorer, and pairwise's margins equal the classifier's scores of each training sequence alone."""
    model, trained = _rm_dataset(tiny_model_dir, tok, tmp_path)
    for row, chosen, rejected in zip(ROWS, trained["chosen_ids"], trained["rejected_ids"]):
        assert (chosen == dialogue_ids(tok, row["prompt"], row["chosen"])[0]
                == sequence_ids(tok, row["prompt"] + row["chosen"]))
        assert rejected == dialogue_ids(tok, row["prompt"], row["rejected"])[0]

    seen = {}

    def record(ids, mask):
        for row, keep in zip(ids, mask.bool()):
            seen[len(seen)] = row[keep].tolist()
        return torch.zeros(len(ids))

    score_texts(record, tok, [r["prompt"] + r["chosen"] for r in ROWS], 2, "cpu")
    assert sorted(seen.values()) == sorted(trained["chosen_ids"])

    model.eval()
    with torch.no_grad():
        alone = [model(input_ids=torch.tensor([c])).logits[0, 0] - model(input_ids=torch.tensor([r])).logits[0, 0]
                 for c, r in zip(trained["chosen_ids"], trained["rejected_ids"])]
    torch.testing.assert_close(torch.tensor(pairwise(model, tok, ROWS, batch_size=2)).float(), torch.stack(alone),
                               atol=1e-4, rtol=1e-4)


class Scripted(nn.Module):
    """A stand-in for the shared 4-bit peft model: `generate` appends planned responses (padded after
    EOS, as transformers pads finished rows); a forward records its inputs and returns each token's id
    as the first hidden feature, so a head reading (1, 0, ...) returns the id of the token it scored."""

    def __init__(self, responses: list[list[int]], pad_id: int, vocab: int, hidden: int = 4):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(1))
        self.responses, self.pad_id, self.vocab, self.hidden, self.calls = responses, pad_id, vocab, hidden, []

    def generate(self, input_ids, attention_mask, max_new_tokens, **_):
        width = max(len(r) for r in self.responses)
        response = torch.tensor([r + [self.pad_id] * (width - len(r)) for r in self.responses])
        return SimpleNamespace(sequences=torch.cat([input_ids, response], 1))

    def forward(self, input_ids, attention_mask, position_ids, logits_to_keep, **_):
        self.calls.append(SimpleNamespace(ids=input_ids, mask=attention_mask, positions=position_ids))
        batch, width = input_ids.shape
        hidden = torch.zeros(batch, width, self.hidden)
        hidden[..., 0] = input_ids.float()
        return SimpleNamespace(logits=torch.zeros(batch, logits_to_keep or width, self.vocab), hidden_states=(hidden,))

    def disable_adapter(self):
        return nullcontext()

    def set_adapter(self, name):
        pass


def test_ppo_rollouts_lay_out_query_and_response_as_sft_trained_them(tiny_model_dir, tok, tmp_path):
    """A rollout whose policy samples exactly SFT's completion tokens: the query ids, and the query +
    response ids that the policy, the reference and the reward model see (real tokens only, at positions
    0..n-1), are SFT's training ids, and the reward reads the sequence's EOS."""
    trained = _sft_dataset(tiny_model_dir, tok, tmp_path)
    prompts = [r["prompt"] for r in ROWS]
    n_prompts = [len(prompt_ids(tok, p)) for p in prompts]
    responses = [ids[n:] for ids, n in zip(trained["input_ids"], n_prompts)]
    model = Scripted(responses, tok.pad_token_id, len(tok))
    head = nn.Linear(model.hidden, 1, bias=False)
    nn.init.zeros_(head.weight)
    head.weight.data[0, 0] = 1.0
    ac = SharedBaseRoles(model, nn.Linear(model.hidden, 1, bias=False), head.requires_grad_(False), tok)
    smoke = yaml.safe_load((REPO / "configs" / "smoke.yaml").read_text())["ppo"]
    cfg = PPOConfig(**(smoke | dict(batch_size=len(ROWS), samples_per_prompt=1, mini_batch_size=len(ROWS),
                                    max_new_tokens=max(map(len, responses)))))
    batch = ppo.rollout(ac, prompts, cfg)

    assert len(model.calls) == 3  # policy, reference, reward
    for call in model.calls:
        for ids, mask, pos, expected in zip(call.ids, call.mask.bool(), call.positions, trained["input_ids"]):
            assert ids[mask].tolist() == expected
            assert pos[mask].tolist() == list(range(len(expected)))
    assert batch.response_mask.sum(1).tolist() == [len(r) for r in responses]
    assert batch.scores.tolist() == [tok.eos_token_id] * len(ROWS)  # scored at the last real token, the EOS
