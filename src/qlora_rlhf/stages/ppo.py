"""Stage 3, PPO: our own loop on the equations of TRL's PPOTrainer (trl.experimental.ppo), because
that trainer needs separate 4-bit copies for policy, value and reward models, cannot resume, and
has no non-finite guard. Here one 4-bit base serves every role (see actor.py).

Per step: sample responses for a batch of prompts; score them with the frozen reward model
(minus a penalty when no EOS was generated); with `samples_per_prompt` k > 1, each prompt is
sampled k times and its scores are centered on the mean of its other samples (RLOO's baseline),
so that how hard a prompt is no longer drowns the signal of how good a response is; per-token
reward = -kl_coef · (log π − log π_ref), plus the score on the last token (kl_coef fixed, or steered
after each step towards the target band's middle by `KLController`); GAE advantages
(whitened); then `ppo_epochs` passes of the clipped policy loss + vf_coef · clipped value loss
over mini-batches. Padding is found by position (everything after the first EOS), never by token id,
and padded positions are selected out before any arithmetic. docs/ppo.md lists where this loop departs
from TRL's and why; tests/test_ppo_equations.py checks the equations against trl's own code.
"""

from __future__ import annotations

import random
import shutil
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..actor import POLICY, ActorCritic, response_mask, token_logprobs
from ..atomic import atomic_dir, read_json, write_json
from ..checkpoints import newest_loadable
from ..config import Config, PPOConfig
from ..data import read_split
from ..paths import RunPaths
from ..preemption import SigtermFlag, stopped
from ..training import (History, Timer, TrainingError, check_finite, checkpoints_for, require, save_adapter, seed_everything,
                       write_metrics)

KEEP_CHECKPOINTS = 2


def masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over positions where mask is 1. A selection, not a product: a padded position's value may be
    non-finite (an overflowed log-prob), and 0 * inf is NaN."""
    return torch.where(mask.bool(), values, 0.0).sum() / mask.sum().clamp(min=1)


def masked_whiten(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Zero mean, unit variance over the masked positions (population variance; TRL's uses Bessel's
    correction, a factor sqrt(n / (n - 1)) apart, docs/ppo.md); 0 at padded positions."""
    mean = masked_mean(values, mask)
    var = masked_mean((values - mean) ** 2, mask)
    return torch.where(mask.bool(), (values - mean) * torch.rsqrt(var + 1e-8), 0.0)


def gae(rewards: torch.Tensor, values: torch.Tensor, gamma: float, lam: float) -> torch.Tensor:
    advantages, last = torch.zeros_like(rewards), torch.zeros_like(rewards[:, 0])
    for t in reversed(range(rewards.shape[1])):
        next_value = values[:, t + 1] if t + 1 < rewards.shape[1] else torch.zeros_like(last)
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        last = delta + gamma * lam * last
        advantages[:, t] = last
    return advantages


def batch_prompts(prompts: list[str], step: int, size: int, seed: int) -> list[str]:
    """Deterministic per step (so a resumed run sees the same batches): walk a per-epoch shuffle."""
    start = (step - 1) * size
    orders: dict[int, list[int]] = {}  # one shuffle per epoch that the batch touches (at most two)
    batch = []
    for index in range(start, start + size):
        epoch, offset = divmod(index, len(prompts))
        if epoch not in orders:
            orders[epoch] = list(range(len(prompts)))
            random.Random(seed * 1000 + epoch).shuffle(orders[epoch])
        batch.append(prompts[orders[epoch][offset]])
    return batch


def rollout_prompts(prompts: list[str], step: int, cfg: PPOConfig, seed: int) -> list[str]:
    """`batch_size` prompts for one step: batch_size / k distinct ones, each repeated k times in a row."""
    k = cfg.samples_per_prompt
    return [p for p in batch_prompts(prompts, step, cfg.batch_size // k, seed) for _ in range(k)]


def leave_one_out(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Each score minus the mean of the other k - 1 scores of its prompt (consecutive groups of k)."""
    if k == 1:
        return scores
    groups = scores.view(-1, k)
    return (groups - (groups.sum(1, keepdim=True) - groups) / (k - 1)).flatten()


def sequence_scores(scores: torch.Tensor, has_eos: torch.Tensor, cfg: PPOConfig) -> torch.Tensor:
    """The reward model's scores minus `missing_eos_penalty` where no EOS was sampled, then centered on
    each prompt's other samples (`leave_one_out`)."""
    return leave_one_out(scores - cfg.missing_eos_penalty * (~has_eos).float(), cfg.samples_per_prompt)


def token_rewards(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, scores: torch.Tensor, resp_mask: torch.Tensor,
                  kl_coef: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(per-token rewards, per-token KL): -kl_coef * (log pi - log pi_ref) on every real response token
    (TRL's k1 estimator), 0 on padding, plus each sequence's score on its last real token."""
    kl_tokens = torch.where(resp_mask.bool(), logprobs - ref_logprobs, 0.0)
    rewards = -kl_coef * kl_tokens
    last = (resp_mask.sum(1) - 1).clamp(min=0).long()
    rewards[torch.arange(len(rewards)), last] += scores
    return rewards, kl_tokens


def advantages_and_returns(rewards: torch.Tensor, values: torch.Tensor, resp_mask: torch.Tensor, gamma: float,
                           lam: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(whitened GAE advantages, returns = raw advantages + values), 0 advantage on padding."""
    raw = gae(rewards, values, gamma, lam) * resp_mask
    return masked_whiten(raw, resp_mask), raw + values


def policy_loss(new_logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
                cliprange: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(clipped policy loss, fraction of tokens clipped). The log-ratio is zeroed at padded positions
    before the exp, so a padded log-prob (whatever its value) never reaches the ratio or its gradient."""
    ratio = torch.exp(torch.where(mask.bool(), new_logprobs - old_logprobs, 0.0))
    pg1, pg2 = -advantages * ratio, -advantages * ratio.clamp(1 - cliprange, 1 + cliprange)
    return masked_mean(torch.max(pg1, pg2), mask), masked_mean((pg2 > pg1).float(), mask).detach()


def value_loss(vpred: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor,
               cliprange_value: float) -> torch.Tensor:
    """0.5 * masked mean of max((v - R)^2, (v_clipped - R)^2), v_clipped within cliprange_value of the rollout's value.
    A padded prediction is replaced before any arithmetic: masking only the mean would still send
    0 * inf = NaN back through the square in the backward pass."""
    vpred = torch.where(mask.bool(), vpred, old_values)
    vclipped = old_values + (vpred - old_values).clamp(-cliprange_value, cliprange_value)
    return 0.5 * masked_mean(torch.max((vpred - returns) ** 2, (vclipped - returns) ** 2), mask)


class KLController:
    """The KL penalty's coefficient. Fixed, or adaptive as in Ziegler et al. (2019) and TRL's classic
    AdaptiveKLController: after each step, multiply it by 1 + e * n / horizon, with e the step's KL
    relative to the target, minus 1, clipped to +-0.2, and n the step's episodes. The target is the
    middle of [kl_target_low, kl_target_high], the band the figures shade."""

    def __init__(self, cfg: PPOConfig, value: float | None = None):
        self.cfg, self.value = cfg, cfg.kl_coef if value is None else value

    @property
    def target(self) -> float:
        return (self.cfg.kl_target_low + self.cfg.kl_target_high) / 2

    def update(self, kl: float, episodes: int) -> None:
        if self.cfg.kl_control == "adaptive":
            error = min(max(kl / self.target - 1.0, -0.2), 0.2)
            self.value *= 1.0 + error * episodes / self.cfg.kl_horizon


def make_optimizer(config: Config, params):
    if config.model.optimizer == "paged_adamw_8bit":
        import bitsandbytes as bnb

        return bnb.optim.PagedAdamW8bit(params, lr=config.ppo.learning_rate)
    return torch.optim.AdamW(params, lr=config.ppo.learning_rate)


def rollout(ac: ActorCritic, prompts: list[str], cfg: PPOConfig, kl_coef: float | None = None) -> dict[str, torch.Tensor]:
    """Sample, score and compute advantages for one step; kl_coef: the controller's value (default ppo.kl_coef)."""
    kl_coef = cfg.kl_coef if kl_coef is None else kl_coef
    tok = ac.tokenizer
    # Every rollout forward without dropout: the previous update left the model in train mode, and the
    # reward adapter keeps the RM's LoRA dropout (a dense sampler's generate would not reset the mode).
    ac.model.eval()
    query, query_mask, response = ac.generate(prompts, cfg.max_new_tokens, cfg.temperature)
    resp_mask = response_mask(response, tok.eos_token_id)
    ids, mask = torch.cat([query, response], 1), torch.cat([query_mask, resp_mask], 1)
    start = query.shape[1] - 1
    with torch.no_grad():
        logits, hidden = ac.forward(ids, mask, logits_from=start)
        logprobs = token_logprobs(logits[:, :-1], response, cfg.temperature)
        values = torch.where(resp_mask.bool(), ac.values(hidden[:, start:-1]), 0.0)
        with ac.reference():
            ref_logits, _ = ac.forward(ids, mask, logits_from=start)
        ref_logprobs = token_logprobs(ref_logits[:, :-1], response, cfg.temperature)
        scores = ac.reward(ids, mask)
    has_eos = (response == tok.eos_token_id).any(1)
    rewards, kl_tokens = token_rewards(logprobs, ref_logprobs, sequence_scores(scores, has_eos, cfg), resp_mask, kl_coef)
    advantages, returns = advantages_and_returns(rewards, values, resp_mask, cfg.gamma, cfg.lam)
    return dict(ids=ids, mask=mask, response=response, resp_mask=resp_mask.float(), logprobs=logprobs,
                values=values, returns=returns, advantages=advantages,
                scores=scores, has_eos=has_eos, kl=kl_tokens.sum(1), start=torch.tensor(start))


def update(ac: ActorCritic, optimizer, batch: dict, cfg: PPOConfig) -> dict[str, float]:
    stats: dict[str, list[float]] = {"policy_loss": [], "value_loss": [], "clip_fraction": [], "entropy": []}
    start, size = int(batch["start"]), len(batch["ids"])
    ac.model.train()
    for _ in range(cfg.ppo_epochs):
        for mb in torch.randperm(size).split(cfg.mini_batch_size):
            logits, hidden = ac.forward(batch["ids"][mb], batch["mask"][mb], logits_from=start)
            logits = logits[:, :-1].float() / cfg.temperature
            new_logprobs = torch.log_softmax(logits, -1).gather(-1, batch["response"][mb].unsqueeze(-1)).squeeze(-1)
            vpred = ac.values(hidden[:, start:-1])
            m = batch["resp_mask"][mb]
            pg_loss, clip_fraction = policy_loss(new_logprobs, batch["logprobs"][mb], batch["advantages"][mb], m, cfg.cliprange)
            vf_loss = value_loss(vpred, batch["values"][mb], batch["returns"][mb], m, cfg.cliprange_value)
            loss = pg_loss + cfg.vf_coef * vf_loss
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(ac.policy_parameters(), 1.0)
            optimizer.step()
            with torch.no_grad():
                probs = torch.softmax(logits, -1)
                entropy = torch.logsumexp(logits, -1) - (probs * logits).sum(-1)
                stats["entropy"].append(masked_mean(entropy, m).item())
                stats["clip_fraction"].append(clip_fraction.item())
            stats["policy_loss"].append(pg_loss.item())
            stats["value_loss"].append(vf_loss.item())
    return {k: sum(v) / len(v) for k, v in stats.items()}


# ------------------------------------------------------------------ checkpoints
def latest_checkpoint(root: Path) -> Path | None:
    done = sorted(p for p in root.glob("step-*") if (p / "state.json").is_file())
    return newest_loadable(done, "ppo")  # a damaged newest one is reported and skipped (checkpoints.py)


def save_policy(ac: ActorCritic, out: Path) -> None:
    """The policy adapter as a plain peft folder (loadable on results/<run>/sft/merged) + value head."""
    save_adapter(ac.model, out / "_peft", selected_adapters=[POLICY])
    (out / "_peft" / POLICY).rename(out / "adapter")
    shutil.rmtree(out / "_peft")
    torch.save(ac.value_head.state_dict(), out / "value_head.pt")


def save_checkpoint(ac: ActorCritic, optimizer, kl: KLController, step: int, root: Path) -> None:
    with atomic_dir(root / f"step-{step:06d}") as out:
        save_policy(ac, out)
        torch.save(optimizer.state_dict(), out / "optimizer.pt")
        write_json(out / "state.json", {"step": step, "kl_coef": kl.value})
    for old in sorted(root.glob("step-*"))[:-KEEP_CHECKPOINTS]:
        shutil.rmtree(old, ignore_errors=True)


def run(config: Config, paths: RunPaths) -> dict:
    cfg = config.ppo
    seed_everything(config)
    sft_model, rm_adapter = require(paths.sft / "merged", "sft"), require(paths.rm / "adapter", "rm")
    prompts = [r["prompt"] for r in read_split(paths, "ppo")]
    root = checkpoints_for(paths, "ppo", config, [paths.split("ppo"), paths.sft / "adapter" / "adapter_model.safetensors",
                                                  rm_adapter / "adapter_model.safetensors"])
    resume = latest_checkpoint(root)
    ac = ActorCritic.load(config, sft_model, rm_adapter, policy_adapter=resume / "adapter" if resume else None)
    optimizer = make_optimizer(config, ac.policy_parameters())
    start, kl = 0, KLController(cfg)
    if resume:
        ac.value_head.load_state_dict(torch.load(resume / "value_head.pt"))
        optimizer.load_state_dict(torch.load(resume / "optimizer.pt"))
        state = read_json(resume / "state.json")
        start, kl = state["step"], KLController(cfg, state.get("kl_coef"))
        print(f"ppo: resuming from {resume} (step {start})")
    history, step = History(paths, "ppo"), start
    with SigtermFlag() as sigterm, Timer(root, start) as timer:  # SIGTERM: finish the step, save it, stop
        for step in tqdm(range(start + 1, cfg.steps + 1), initial=start, total=cfg.steps, desc="ppo", unit="step"):
            torch.manual_seed(config.run.seed * 1000 + step)  # same samples after a resume
            batch = rollout(ac, rollout_prompts(prompts, step, cfg, config.run.seed), cfg, kl.value)
            losses = update(ac, optimizer, batch, cfg)
            metrics = losses | {
                "reward_mean": batch["scores"].mean().item(), "kl": batch["kl"].mean().item(), "kl_coef": kl.value,
                "response_length": batch["resp_mask"].sum(1).mean().item(),
                "eos_fraction": batch["has_eos"].float().mean().item(),
            }
            check_finite(step, **metrics)
            if metrics["kl"] > cfg.max_kl:
                raise TrainingError(f"step {step}: KL to the reference {metrics['kl']:.2f} exceeds ppo.max_kl="
                                    f"{cfg.max_kl}; stopped, the last good checkpoint is kept in {root}")
            history.log(step, metrics)
            kl.update(metrics["kl"], cfg.batch_size)
            timer.step_done(step)
            if step % cfg.save_steps == 0 or step == cfg.steps or sigterm.received:
                save_checkpoint(ac, optimizer, kl, step, root)
            if sigterm.received:
                break
    if sigterm.received:
        raise stopped("ppo", step, latest_checkpoint(root))
    with atomic_dir(paths.ppo) as out:
        save_policy(ac, out)
    curve = history.write_csv(paths.metrics / "ppo_history.csv")
    summary = {
        "reward_mean_first": float(curve["reward_mean"].iloc[0]), "reward_mean_last": float(curve["reward_mean"].iloc[-1]),
        "kl_last": float(curve["kl"].iloc[-1]), "kl_coef_last": float(curve["kl_coef"].iloc[-1]),
        "steps": cfg.steps, "seconds": round(timer.seconds, 1),
    }
    write_metrics(paths, "ppo", summary, config)
    print(f"ppo: reward {summary['reward_mean_first']:.3f} -> {summary['reward_mean_last']:.3f}, KL {summary['kl_last']:.3f}")
    return summary
