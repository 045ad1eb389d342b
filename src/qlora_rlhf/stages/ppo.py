"""Stage 3, PPO: our own loop on the equations of TRL's PPOTrainer (trl.experimental.ppo), because
that trainer needs separate 4-bit copies for policy, value and reward models, cannot resume, and
has no non-finite guard. Here one 4-bit base serves every role (actor.SharedBaseRoles).

`run` is the setup, then the loop; each step is one `rollout` and one `update`, whose numbered
sections follow the maths:

  1. sample a response to each of `batch_size` prompts from the policy (with `samples_per_prompt`
     k > 1, batch_size / k prompts, each k times);
  2. score each sequence with the frozen reward model, minus `missing_eos_penalty` where no EOS was
     sampled, and with k > 1 centred on the mean of the prompt's other samples (RLOO's baseline), so
     that how hard a prompt is no longer drowns the signal of how good a response is;
  3. KL: log π − log π_ref of each sampled token, both from forwards over the sampled sequence;
  4. per-token rewards: −kl_coef · KL, plus the score on the last real token (kl_coef fixed, or steered
     after each step towards the target band's middle by `KLController`);
  5. advantages: GAE with γ and λ, whitened, and returns;
  6. `ppo_epochs` passes over mini-batches: the clipped policy loss + vf_coef · clipped value loss.

Padding is found by position (everything after the first EOS), never by token id, and padded positions
are selected out before any arithmetic. The helpers follow in the order the loop uses them; the
plumbing (optimizer, checkpoints, history, timer, SIGTERM) comes last. docs/ppo.md lists where this
loop departs from TRL's and why; tests/test_ppo_equations.py checks the equations against trl's code.
"""

from __future__ import annotations

import random
import shutil
from contextlib import ExitStack
from dataclasses import dataclass, fields
from pathlib import Path

import pandas as pd
import torch
from tqdm.auto import tqdm

from .. import model_card
from ..actor import POLICY, SharedBaseRoles
from ..atomic import atomic_dir, read_json, write_json
from ..checkpoints import newest_loadable
from ..config import Config, PPOConfig
from ..data import read_split
from ..held_out import Sampling, generate, score, summary
from ..paths import RunPaths
from ..preemption import SigtermFlag, stopped
from ..tokens import prompt_ids
from ..training import (
    History,
    Timer,
    TrainingError,
    check_finite,
    checkpoints_for,
    require,
    save_adapter,
    seed_everything,
    write_metrics,
)

KEEP_CHECKPOINTS = 2
BOOTSTRAP_SAMPLES = 1000  # the held-out curve's intervals (eval.bootstrap_samples is the evaluation's, not read here)


def run(config: Config, paths: RunPaths) -> dict:
    cfg, seed = config.ppo, config.run.seed
    # ---- setup: prompts, the roles on one base, the optimizer; a killed run's state if there is one
    seed_everything(config)
    sft_model, rm_adapter = require(paths.sft / "merged", "sft"), require(paths.rm / "adapter", "rm")
    prompts = [r["prompt"] for r in read_split(paths, "ppo")]
    checkpoints = Checkpoints(config, paths)  # emptied first when the params or inputs changed
    resumed = checkpoints.latest()
    roles = SharedBaseRoles.load(config, sft_model, rm_adapter, policy_adapter=resumed / "adapter" if resumed else None)
    optimizer = make_optimizer(config, roles.policy_parameters())
    start, kl = checkpoints.restore(resumed, roles, optimizer, cfg)  # (0, KLController(cfg)) without one

    curve = HeldOutCurve(config, paths, roles)

    # ---- the loop: one rollout and one update per step; the held-out curve at step 0 and when due
    with Bookkeeping(paths, checkpoints, start, cfg) as book:
        if start == 0 and curve.due(0):
            book.history.log(0, curve.measure(roles))  # SFT itself: the policy's LoRA update starts at zero
        for step in book.steps():
            torch.manual_seed(seed * 1000 + step)  # same samples after a resume
            batch = rollout(roles, rollout_prompts(prompts, step, cfg, seed), cfg, kl.value)
            stats = update(roles, optimizer, batch, cfg)
            metrics = step_metrics(batch, stats, kl.value, cfg.samples_per_prompt, book.recent("reward_mean"))
            guard(step, metrics, cfg, checkpoints.root)
            kl.update(metrics["kl"], cfg.batch_size)
            if curve.due(step):
                metrics |= curve.measure(roles)
            book.log(step, metrics)
            if book.checkpoint_due(step):
                checkpoints.save(step, roles, optimizer, kl)
    return write_results(config, paths, roles, book)


# ------------------------------------------------------------------ the step's prompts
def rollout_prompts(prompts: list[str], step: int, cfg: PPOConfig, seed: int) -> list[str]:
    """`batch_size` prompts for one step: batch_size / k distinct ones, each repeated k times in a row."""
    k = cfg.samples_per_prompt
    return [p for p in batch_prompts(prompts, step, cfg.batch_size // k, seed) for _ in range(k)]


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


# ------------------------------------------------------------------ rollout: steps 1-5
@dataclass
class Rollout:
    """One step's experience. Per-token tensors are (batch, response tokens), 0 after the first EOS."""

    ids: torch.Tensor  # prompt + response ids, laid out as actor.Samples
    mask: torch.Tensor  # their attention mask
    prompt_len: int  # ids[:, prompt_len:] is the response
    response_mask: torch.Tensor  # float: 1 on real response tokens
    logprobs: torch.Tensor  # log π of each sampled token when it was sampled (the ratio's denominator)
    values: torch.Tensor  # the value head's estimates (the value loss's clipping anchor)
    advantages: torch.Tensor  # whitened GAE
    returns: torch.Tensor  # raw GAE + values (the value loss's target)
    scores: torch.Tensor  # (batch,) the reward model's score, before the EOS penalty and centering
    has_eos: torch.Tensor  # (batch,) bool
    kl: torch.Tensor  # (batch,) sum over the response of log π − log π_ref

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, index: torch.Tensor) -> Rollout:
        """The sequences at `index`: a mini-batch."""
        return Rollout(**{f.name: getattr(self, f.name) if f.name == "prompt_len" else getattr(self, f.name)[index]
                          for f in fields(self)})


def rollout(roles: SharedBaseRoles, prompts: list[str], cfg: PPOConfig, kl_coef: float | None = None) -> Rollout:
    """Steps 1-5 for one batch of prompts; kl_coef: the controller's value (default ppo.kl_coef)."""
    kl_coef = cfg.kl_coef if kl_coef is None else kl_coef
    # Every rollout forward without dropout: the previous update left the model in train mode, and the
    # reward adapter keeps the RM's LoRA dropout (a dense sampler's generate would not reset the mode).
    roles.model.eval()

    # 1. Sample: one response per prompt from the policy, through model.generation's engine.
    sample = roles.sample(prompts, cfg.max_new_tokens, cfg.temperature)
    resp_mask = sample.response_mask
    with torch.no_grad():
        # 2. Score: the reward model reads each whole sequence; then the missing-EOS penalty and the
        #    leave-one-out centering.
        raw_scores = roles.reward(sample.ids, sample.mask)
        scores = sequence_scores(raw_scores, sample.has_eos, cfg)
        # 3. KL: the sampled tokens' log-probs under the policy (a forward over the sampled sequence, the
        #    same function the update runs, not the sampler's logits) and under the reference (SFT).
        policy = roles.score_response(sample.ids, sample.mask, sample.prompt_len, cfg.temperature)
        with roles.reference():
            reference = roles.score_response(sample.ids, sample.mask, sample.prompt_len, cfg.temperature)

    # 4. Rewards: −kl_coef · KL on every response token, plus the score on the last real one.
    rewards, kl_tokens = token_rewards(policy.logprobs, reference.logprobs, scores, resp_mask, kl_coef)

    # 5. Advantages and returns: GAE over the value head's estimates, whitened over real tokens.
    values = torch.where(resp_mask.bool(), policy.values, 0.0)
    advantages, returns = advantages_and_returns(rewards, values, resp_mask, cfg.gamma, cfg.lam)

    return Rollout(ids=sample.ids, mask=sample.mask, prompt_len=sample.prompt_len, response_mask=resp_mask.float(),
                   logprobs=policy.logprobs, values=values, advantages=advantages, returns=returns,
                   scores=raw_scores, has_eos=sample.has_eos, kl=kl_tokens.sum(1))


def sequence_scores(scores: torch.Tensor, has_eos: torch.Tensor, cfg: PPOConfig) -> torch.Tensor:
    """The reward model's scores minus `missing_eos_penalty` where no EOS was sampled, then centered on
    each prompt's other samples (`leave_one_out`)."""
    return leave_one_out(scores - cfg.missing_eos_penalty * (~has_eos).float(), cfg.samples_per_prompt)


def leave_one_out(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Each score minus the mean of the other k - 1 scores of its prompt (consecutive groups of k)."""
    if k == 1:
        return scores
    groups = scores.view(-1, k)
    return (groups - (groups.sum(1, keepdim=True) - groups) / (k - 1)).flatten()


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


def gae(rewards: torch.Tensor, values: torch.Tensor, gamma: float, lam: float) -> torch.Tensor:
    advantages, last = torch.zeros_like(rewards), torch.zeros_like(rewards[:, 0])
    for t in reversed(range(rewards.shape[1])):
        next_value = values[:, t + 1] if t + 1 < rewards.shape[1] else torch.zeros_like(last)
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        last = delta + gamma * lam * last
        advantages[:, t] = last
    return advantages


def masked_whiten(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Zero mean, unit variance over the masked positions (population variance; TRL's uses Bessel's
    correction, a factor sqrt(n / (n - 1)) apart, docs/ppo.md); 0 at padded positions."""
    mean = masked_mean(values, mask)
    var = masked_mean((values - mean) ** 2, mask)
    return torch.where(mask.bool(), (values - mean) * torch.rsqrt(var + 1e-8), 0.0)


def masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over positions where mask is 1. A selection, not a product: a padded position's value may be
    non-finite (an overflowed log-prob), and 0 * inf is NaN."""
    return torch.where(mask.bool(), values, 0.0).sum() / mask.sum().clamp(min=1)


# ------------------------------------------------------------------ update: step 6
def update(roles: SharedBaseRoles, optimizer, batch: Rollout, cfg: PPOConfig) -> dict[str, float]:
    """Step 6; returns the mean over mini-batches of the losses, the clip fraction, the approximate KL
    between the rollout's policy and the one being updated, and the entropy."""
    stats: dict[str, list[float]] = {"policy_loss": [], "value_loss": [], "clip_fraction": [], "approx_kl": [],
                                     "entropy": []}
    roles.model.train()
    # 6. `ppo_epochs` passes over the rollout, each in shuffled mini-batches of `mini_batch_size` sequences,
    #    one optimizer step per mini-batch.
    for _ in range(cfg.ppo_epochs):
        for index in torch.randperm(len(batch)).split(cfg.mini_batch_size):
            mb = batch[index]
            # 6a. The policy's log-probs and values now, over the rollout's own sequences.
            new = roles.score_response(mb.ids, mb.mask, mb.prompt_len, cfg.temperature)
            # 6b. Clipped policy loss + vf_coef · clipped value loss.
            pg_loss, clip_fraction = policy_loss(new.logprobs, mb.logprobs, mb.advantages, mb.response_mask,
                                                 cfg.cliprange)
            vf_loss = value_loss(new.values, mb.values, mb.returns, mb.response_mask, cfg.cliprange_value)
            loss = pg_loss + cfg.vf_coef * vf_loss
            # 6c. One step, the gradient's global norm clipped to 1 (docs/ppo.md: TRL clips none).
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(roles.policy_parameters(), 1.0)
            optimizer.step()
            with torch.no_grad():
                stats["entropy"].append(masked_mean(entropy(new.logits), mb.response_mask).item())
                stats["clip_fraction"].append(clip_fraction.item())
                stats["approx_kl"].append(approx_kl(new.logprobs, mb.logprobs, mb.response_mask).item())
            stats["policy_loss"].append(pg_loss.item())
            stats["value_loss"].append(vf_loss.item())
    return {k: sum(v) / len(v) for k, v in stats.items()}


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


def approx_kl(new_logprobs: torch.Tensor, old_logprobs: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """KL(π_old ‖ π_new) per token, estimated as cleanrl's PPO does (Schulman's k3: (r − 1) − log r with
    r = π_new / π_old, unbiased and never negative): how far one update moved the policy, as against
    the KL to SFT that the reward penalises."""
    log_ratio = torch.where(mask.bool(), new_logprobs - old_logprobs, 0.0)
    return masked_mean(torch.expm1(log_ratio) - log_ratio, mask)


def entropy(logits: torch.Tensor) -> torch.Tensor:
    """Entropy of softmax(logits) at each position."""
    probs = torch.softmax(logits, -1)
    return torch.logsumexp(logits, -1) - (probs * logits).sum(-1)


# ------------------------------------------------------------------ after the update
RUNNING_MEAN_STEPS = 5  # the raw batch mean's running mean: this many steps, the current one included


def step_metrics(batch: Rollout, stats: dict[str, float], kl_coef: float, k: int,
                 earlier_rewards: list[float]) -> dict[str, float]:
    """What the history records for a step: the update's means, then the rollout's. reward_mean is the
    reward model's raw score (before the EOS penalty and the centering) averaged over a batch of few
    prompts, so it swings with how hard the step's prompts are; three series show learning instead:

    - reward_running_mean: the mean of reward_mean over the last RUNNING_MEAN_STEPS steps;
    - reward_prompt_centred: each prompt's mean score minus SFT's expected score on the same prompt,
      estimated from the same k samples by self-normalised importance weights π_ref / π = exp(−KL of
      the sequence); prompt difficulty cancels, and it is 0 at step 1, where the policy is SFT
      (NaN with samples_per_prompt 1, where one sample cannot tell its prompt from its reply);
    - the held-out curve (HeldOutCurve), on fixed prompts.

    explained_variance is the value head's (cleanrl, TRL): 1 − Var(returns − values) / Var(returns)
    over real tokens; 1 is a perfect critic, 0 or below no better than a constant."""
    reward = batch.scores.mean().item()
    recent = [*earlier_rewards[-(RUNNING_MEAN_STEPS - 1):], reward]
    return stats | {
        "reward_mean": reward, "reward_running_mean": sum(recent) / len(recent),
        "reward_prompt_centred": prompt_centred(batch.scores, batch.kl, k),
        "kl": batch.kl.mean().item(), "kl_coef": kl_coef,
        "explained_variance": explained_variance(batch.values, batch.returns, batch.response_mask),
        "response_length": batch.response_mask.sum(1).mean().item(),
        "eos_fraction": batch.has_eos.float().mean().item(),
    }


def prompt_centred(scores: torch.Tensor, kl: torch.Tensor, k: int) -> float:
    """Mean over prompts (consecutive groups of k) of the group's mean score minus its self-normalised
    importance-weighted mean, weights exp(−kl): an estimate of the policy's gain over SFT on these prompts."""
    if k == 1:
        return float("nan")
    groups, weights = scores.view(-1, k).double(), torch.softmax(-kl.view(-1, k).double(), dim=1)
    return (groups.mean(1) - (weights * groups).sum(1)).mean().item()


def explained_variance(values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor) -> float:
    real = mask.bool()
    target, predicted = returns[real].double(), values[real].double()
    spread = target.var(unbiased=False)
    return float("nan") if spread == 0 else (1 - (target - predicted).var(unbiased=False) / spread).item()


def guard(step: int, metrics: dict[str, float], cfg: PPOConfig, root: Path) -> None:
    """Stop on a non-finite metric or a KL above ppo.max_kl, before the step is logged or saved."""
    check_finite(step, **metrics)
    if metrics["kl"] > cfg.max_kl:
        raise TrainingError(f"step {step}: KL to the reference {metrics['kl']:.2f} exceeds ppo.max_kl="
                            f"{cfg.max_kl}; stopped, the last good checkpoint is kept in {root}")


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


# ------------------------------------------------------------------ the held-out curve
class HeldOutCurve:
    """PPO's learning curve on fixed prompts: the eval split's first `ppo.eval_prompts` (held out from
    PPO's own split), sampled from the policy at ppo.temperature and ppo.max_new_tokens with the same
    noise every time (run.seed), at step 0 and every `ppo.eval_every` steps and the last (0: never).
    Each point is the evaluation's measurement (held_out.py): the reward model's score, the gold score
    where the data has a judge, and the KL to SFT, each with a 95 % bootstrap interval over prompts.
    The points are history columns `held_out_*` (history.jsonl, DVCLive, ppo_history.csv), so a
    resumed run keeps those before its checkpoint; measuring forks the RNG, so the training run's own
    samples are the same with the curve as without it."""

    PREFIX = "held_out_"

    def __init__(self, config: Config, paths: RunPaths, roles: SharedBaseRoles):
        self.cfg, self.sampling = config.ppo, Sampling.of_ppo(config.ppo, config.run.seed)
        held_out = [r["prompt"] for r in read_split(paths, "eval")[: config.ppo.eval_prompts]]
        self.prompts = sorted(held_out, key=lambda p: len(prompt_ids(roles.tokenizer, p)))  # little padding

    def due(self, step: int) -> bool:
        every = self.cfg.eval_every
        return every > 0 and (step % every == 0 or step == self.cfg.steps)

    def measure(self, roles: SharedBaseRoles) -> dict[str, float]:
        roles.model.eval()  # no dropout (the update left train mode on)
        with torch.random.fork_rng():
            drawn = generate("ppo", roles, None, self.prompts, self.sampling, desc="ppo: held-out curve")
            rows = pd.DataFrame(score("ppo", roles, drawn, self.sampling.temperature))
        point = summary(rows, bool(rows["gold"].notna().any()), BOOTSTRAP_SAMPLES, self.sampling.seed)
        return {self.PREFIX + key: float(value) for key, value in point.items()}

    @classmethod
    def ends(cls, history: pd.DataFrame) -> dict[str, float]:
        """The curve's first and last points (metrics/ppo.json, the paper's PPO row); {} without a curve."""
        columns = [c for c in history.columns if c.startswith(cls.PREFIX)]
        points = history.dropna(subset=[cls.PREFIX + "reward_mean"]) if columns else history.iloc[:0]
        if points.empty:
            return {}
        return {f"{column}_{end}": float(points[column].iloc[at]) for column in columns
                for end, at in (("first", 0), ("last", -1))} | {"held_out_points": len(points)}


def write_results(config: Config, paths: RunPaths, roles: SharedBaseRoles, book: Bookkeeping) -> dict:
    """The final policy (results/<run>/ppo), the history's plot file and the stage's metrics."""
    with atomic_dir(paths.ppo) as out:
        save_policy(roles, out)
        model_card.write(out / "adapter", config, paths, book.history.rows().query("step > 0"))  # the Hub's card
    history = book.history.write_csv(paths.metrics / "ppo_history.csv")
    steps = history[history["step"] > 0]  # step 0 holds the held-out curve's first point only
    summary = {
        "reward_mean_first": float(steps["reward_mean"].iloc[0]),
        "reward_mean_last": float(steps["reward_mean"].iloc[-1]),
        "kl_last": float(steps["kl"].iloc[-1]), "kl_coef_last": float(steps["kl_coef"].iloc[-1]),
        "steps": config.ppo.steps,
    } | HeldOutCurve.ends(history)
    write_metrics(paths, "ppo", summary, config, seconds=book.timer.seconds)
    print(f"ppo: reward {summary['reward_mean_first']:.3f} -> {summary['reward_mean_last']:.3f}, "
          f"KL {summary['kl_last']:.3f}")
    return summary


# ------------------------------------------------------------------ plumbing
def make_optimizer(config: Config, params):
    if config.model.optimizer == "paged_adamw_8bit":
        import bitsandbytes as bnb

        return bnb.optim.PagedAdamW8bit(params, lr=config.ppo.learning_rate)
    return torch.optim.AdamW(params, lr=config.ppo.learning_rate)


def save_policy(roles: SharedBaseRoles, out: Path) -> None:
    """The policy adapter as a plain peft folder (loadable on results/<run>/sft/merged) + value head."""
    save_adapter(roles.model, out / "_peft", selected_adapters=[POLICY])
    (out / "_peft" / POLICY).rename(out / "adapter")
    shutil.rmtree(out / "_peft")
    torch.save(roles.value_head.state_dict(), out / "value_head.pt")


class Checkpoints:
    """PPO's checkpoints, checkpoints/ppo/step-NNNNNN/: the policy adapter and value head (`save_policy`),
    the optimizer's state and state.json (the step and the KL coefficient), written atomically; the
    newest KEEP_CHECKPOINTS are kept. (The SFT and RM stages resume from the Trainer's own checkpoint-N
    folders instead: training.trainer_checkpoint_to_resume.)"""

    def __init__(self, config: Config, paths: RunPaths):
        self.root = checkpoints_for(paths, "ppo", config, [paths.split("ppo"), paths.split("eval"),
                                                           paths.sft / "adapter" / "adapter_model.safetensors",
                                                           paths.rm / "adapter" / "adapter_model.safetensors"])

    def latest(self) -> Path | None:
        """The newest complete checkpoint (state.json is written inside the atomic folder), or None."""
        done = sorted(p for p in self.root.glob("step-*") if (p / "state.json").is_file())
        return newest_loadable(done, "ppo")  # a damaged newest one is reported and skipped (checkpoints.py)

    def save(self, step: int, roles: SharedBaseRoles, optimizer, kl: KLController) -> None:
        with atomic_dir(self.root / f"step-{step:06d}") as out:
            save_policy(roles, out)
            torch.save(optimizer.state_dict(), out / "optimizer.pt")
            write_json(out / "state.json", {"step": step, "kl_coef": kl.value})
        for old in sorted(self.root.glob("step-*"))[:-KEEP_CHECKPOINTS]:
            shutil.rmtree(old, ignore_errors=True)

    @staticmethod
    def restore(folder: Path | None, roles: SharedBaseRoles, optimizer, cfg: PPOConfig) -> tuple[int, KLController]:
        """(the step to continue after, the KL controller): a checkpoint's value head, optimizer state,
        step and KL coefficient loaded (its policy adapter was loaded with the roles); (0, a fresh
        controller) without one."""
        if folder is None:
            return 0, KLController(cfg)
        roles.value_head.load_state_dict(torch.load(folder / "value_head.pt"))
        optimizer.load_state_dict(torch.load(folder / "optimizer.pt"))
        state = read_json(folder / "state.json")
        print(f"ppo: resuming from {folder} (step {state['step']})")
        return state["step"], KLController(cfg, state.get("kl_coef"))


class Bookkeeping:
    """What the loop records around the algorithm: the steps left and their progress bar, the history
    (history.jsonl and DVCLive), the training seconds across resumes (Timer), and SIGTERM, SLURM's notice:
    the step in progress finishes and is checkpointed, and the stage stops with Preempted (exit 143), to
    be resumed by the same command."""

    def __init__(self, paths: RunPaths, checkpoints: Checkpoints, start: int, cfg: PPOConfig):
        self.checkpoints, self.start, self.cfg, self.step = checkpoints, start, cfg, start
        self.history = History(paths, "ppo")

    def __enter__(self) -> Bookkeeping:
        self._contexts = ExitStack()
        self.sigterm = self._contexts.enter_context(SigtermFlag())
        self.timer = self._contexts.enter_context(Timer(self.checkpoints.root, self.start))
        return self

    def __exit__(self, *exc) -> None:
        self._contexts.close()  # the previous SIGTERM handler back, the timer stopped
        if exc[0] is None and self.sigterm.received:
            raise stopped("ppo", self.step, self.checkpoints.latest())

    def steps(self):
        """The steps after `start` up to ppo.steps; none after the one during which SIGTERM arrived."""
        cfg = self.cfg
        for step in tqdm(range(self.start + 1, cfg.steps + 1), initial=self.start, total=cfg.steps, desc="ppo",
                         unit="step"):
            self.step = step
            yield step
            if self.sigterm.received:
                return

    def recent(self, column: str) -> list[float]:
        """`column`'s logged values of the steps before the current one, oldest first (a resumed run's
        included, a step being redone not)."""
        rows = self.history.rows()
        if column not in rows:
            return []
        return rows[(rows["step"] > 0) & (rows["step"] < self.step)][column].dropna().tolist()

    def log(self, step: int, metrics: dict[str, float]) -> None:
        self.history.log(step, metrics)
        self.timer.step_done(step)  # before the step's checkpoint exists (Timer)

    def checkpoint_due(self, step: int) -> bool:
        return step % self.cfg.save_steps == 0 or step == self.cfg.steps or self.sigterm.received
