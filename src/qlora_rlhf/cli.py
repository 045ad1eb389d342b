"""`qlora-rlhf <verb> [--params params.yaml]`: one verb per stage of the DAG, plus `validate`.

Every verb validates the params file before touching any model or data; errors that a user can
fix print one clear message and exit non-zero, without a stack trace."""

from __future__ import annotations

import argparse
import importlib
import sys

from .config import ConfigError, check_runtime, load_config
from .errors import UserError
from .paths import RunPaths

# verb -> (module, help); each module has run(config, paths)
STAGES = {
    "data": ("qlora_rlhf.stages.data", "build disjoint sft/rm/ppo subsets, eval split and manifest"),
    "base": ("qlora_rlhf.stages.base", "prepare the base model directory (converts the embedded GGUF once)"),
    "sft": ("qlora_rlhf.sft", "supervised fine-tuning on chosen dialogues (QLoRA)"),
    "rm": ("qlora_rlhf.reward", "reward model on preference pairs, warm-started from SFT"),
    "ppo": ("qlora_rlhf.ppo", "PPO against the frozen reward model with a KL anchor to SFT"),
    "evaluate": ("qlora_rlhf.evaluate", "tables: perplexity, RM accuracy, reward/KL/win rate of base vs SFT vs PPO"),
    "figures": ("qlora_rlhf.figures", "seaborn figures from metrics and tables"),
    "paper": ("qlora_rlhf.paper", "LaTeX macros and tables from the results; the PDF where latexmk exists"),
    "plan-memory": ("qlora_rlhf.memory", "expected peak memory per stage for a params file"),
}
# The verbs that load a model check that the installed packages can run the params; the others skip
# importing bitsandbytes (and torch with it), 4 s of each data, figures and paper run.
NEEDS_RUNTIME = {"validate", "base", "sft", "rm", "ppo", "evaluate"}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="qlora-rlhf", description=__doc__.splitlines()[0])
    verbs = parser.add_subparsers(dest="verb", required=True)
    verbs.add_parser("validate", help="validate a params file and exit").add_argument("--params", default="params.yaml")
    for verb, (_, help_text) in STAGES.items():
        sub = verbs.add_parser(verb, help=help_text)
        sub.add_argument("--params", default="params.yaml")
        if verb == "plan-memory":
            sub.add_argument("--budget-gib", type=float, default=24.0)
    args = parser.parse_args(argv)
    try:
        config = load_config(args.params)
        if args.verb in NEEDS_RUNTIME:
            check_runtime(config)
        if args.verb == "validate":
            print(f"{args.params}: valid (run {config.run.name!r})")
            return 0
        module = importlib.import_module(STAGES[args.verb][0])
        extra = {"budget_gib": args.budget_gib} if args.verb == "plan-memory" else {}
        module.run(config, RunPaths.of(config), **extra)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2 if isinstance(exc, ConfigError) else 1
    except KeyboardInterrupt:
        print("interrupted: completed checkpoints are kept; re-run the same command to resume", file=sys.stderr)
        return 130
    return 0
