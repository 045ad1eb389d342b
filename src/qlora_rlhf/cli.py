"""`qlora-rlhf <verb> [--params params.yaml]`: one verb per stage of the DAG, plus `validate`.

Every verb validates the params file before touching any model or data; errors that a user can
fix print one clear message and exit non-zero, without a stack trace."""

from __future__ import annotations

import argparse
import importlib
import sys
from typing import NamedTuple

from . import allocator, precision
from .config import Config, ConfigError, check_runtime, load_config
from .errors import Preempted, UserError
from .memory import DEVICES
from .paths import RunPaths


class Verb(NamedTuple):
    module: str  # has run(config, paths)
    loads_model: bool  # then it first checks that the installed packages can run the params
    help: str


# Only the verbs that load a model import bitsandbytes (and torch with it) for that check: 4 s of
# each data, figures and paper run.
STAGES = {
    "data": Verb("qlora_rlhf.stages.data", False, "build disjoint sft/rm/ppo subsets, eval split and manifest"),
    "base": Verb("qlora_rlhf.stages.base", True, "prepare the base model directory (converts the embedded GGUF once)"),
    "sft": Verb("qlora_rlhf.stages.sft", True, "supervised fine-tuning on chosen dialogues (QLoRA)"),
    "rm": Verb("qlora_rlhf.stages.rm", True, "reward model on preference pairs, warm-started from SFT"),
    "ppo": Verb("qlora_rlhf.stages.ppo", True, "PPO against the frozen reward model with a KL anchor to SFT"),
    "evaluate": Verb("qlora_rlhf.stages.evaluate", True, "tables: perplexity, RM accuracy, reward/KL/win rate of base vs SFT vs PPO"),
    "best_of_n": Verb("qlora_rlhf.stages.best_of_n", True, "best-of-n from SFT under the reward model at KL log n - (n-1)/n"),
    "figures": Verb("qlora_rlhf.stages.figures", False, "seaborn figures from metrics and tables"),
    "paper": Verb("qlora_rlhf.stages.paper", False, "LaTeX macros, tables and the PDF from the results (needs latexmk)"),
    "seeds": Verb("qlora_rlhf.stages.seeds", False, "the seed study: across-seed table, figure and the paper with its section"),
    "plan-memory": Verb("qlora_rlhf.memory", False, "expected peak memory per stage for a params file"),
}


SEEDED = ("ppo", "evaluate")  # the verbs that the seed study runs once per seed


def with_seed(config: Config, seed: int | None) -> Config:
    """The config of one run of the seed study: run.seed replaced (its PPO's prompt order and noise)."""
    if seed is None or seed == config.run.seed:
        return config
    if seed not in config.seeds.ppo:
        raise ConfigError(f"--seed {seed}: not one of seeds.ppo={config.seeds.ppo} or run.seed={config.run.seed}")
    return config.model_copy(update={"run": config.run.model_copy(update={"seed": seed})})


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="qlora-rlhf", description=__doc__.splitlines()[0])
    verbs = parser.add_subparsers(dest="verb", required=True)
    verbs.add_parser("validate", help="validate a params file and exit").add_argument("--params", default="params.yaml")
    for name, verb in STAGES.items():
        sub = verbs.add_parser(name, help=verb.help)
        sub.add_argument("--params", default="params.yaml")
        if name in SEEDED:
            sub.add_argument("--seed", type=int, help="a seed of seeds.ppo: its run, under results/<run>/seeds/<seed>/")
        if name == "plan-memory":
            sub.add_argument("--budget-gib", type=float, default=24.0)
            sub.add_argument("--device", choices=DEVICES, default="cuda",
                             help="plan a GPU run (default) or a CPU run such as the embedded default's")
    args = parser.parse_args(argv)
    try:
        config = load_config(args.params)
        seed = getattr(args, "seed", None)
        paths, config = RunPaths.of(config, seed), with_seed(config, seed)
        if args.verb == "validate" or STAGES[args.verb].loads_model:
            check_runtime(config)
            chosen = precision.of(config)
            print(f"{args.verb}: {precision.describe(chosen)}")
        if args.verb == "validate":
            print(f"{args.params}: valid (run {config.run.name!r})")
            return 0
        if STAGES[args.verb].loads_model:
            allocator.keep_freed_memory()  # before the first large tensor (allocator.py)
        module = importlib.import_module(STAGES[args.verb].module)
        extra = {"budget_gib": args.budget_gib, "device": args.device} if args.verb == "plan-memory" else {}
        module.run(config, paths, **extra)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2 if isinstance(exc, ConfigError) else 1
    except Preempted as exc:
        print(f"preempted: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("interrupted: completed checkpoints are kept; re-run the same command to resume", file=sys.stderr)
        return 130
    return 0
