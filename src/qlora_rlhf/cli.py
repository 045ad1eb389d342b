"""`qlora-rlhf <verb> [--params params.yaml]`: one verb per stage of the DAG, plus `validate`.

Every verb validates the params file before touching any model or data; errors that a user can
fix print one clear message and exit non-zero, without a stack trace. Relative paths in the params
file are the project root's (paths.project_root): a verb runs there, from whichever folder it was
started, and without --params it reads the project's params.yaml. A stage verb holds the lock of
the results folder it writes for as long as it runs (lock.py)."""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from contextlib import ExitStack
from pathlib import Path
from typing import NamedTuple

from . import allocator, distributed, lock, precision, preflight, warmup
from .atomic import write_failure
from .config import Config, ConfigError, check_runtime, load_config
from .errors import Preempted, UserError
from .memory import DEVICES
from .paths import RunPaths, check_results_dir, project_root


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
    "evaluate": Verb("qlora_rlhf.stages.evaluate", True,
                     "tables: perplexity, RM accuracy, reward/KL/win rate of base vs SFT vs PPO"),
    "best_of_n": Verb("qlora_rlhf.stages.best_of_n", True,
                      "best-of-n from SFT under the reward model at KL log n - (n-1)/n"),
    "figures": Verb("qlora_rlhf.stages.figures", False, "seaborn figures from metrics and tables"),
    "paper": Verb("qlora_rlhf.stages.paper", False,
                  "LaTeX macros, tables and the PDF from the results (needs latexmk)"),
    "seeds": Verb("qlora_rlhf.stages.seeds", False,
                  "the seed study: across-seed table, figure and the paper with its section"),
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


DEFAULT_PARAMS = "params.yaml"
# (model, data source) checks of preflight.py; the data stage reports a missing source itself (DataError)
PREFLIGHT = {"validate": (True, True), "data": (True, False), "base": (True, False)}
UNLOCKED = ("validate", "plan-memory")  # the verbs that write nothing


def params_file(given: str | None) -> str:
    """--params as given; without it params.yaml here, else the project root's (a verb started in docs/)."""
    if given is not None or Path(DEFAULT_PARAMS).is_file():
        return given or DEFAULT_PARAMS
    root = project_root()
    if (root / DEFAULT_PARAMS).is_file():
        return str(root / DEFAULT_PARAMS)
    raise ConfigError(f"{DEFAULT_PARAMS}: params file not found in {Path.cwd()}: run from the project root "
                      "(the folder with dvc.yaml) or pass --params")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="qlora-rlhf", description=__doc__.splitlines()[0])
    verbs = parser.add_subparsers(dest="verb", required=True)
    params_help = "the params file (default: params.yaml here, else the project root's)"
    verbs.add_parser("validate", help="validate a params file and exit").add_argument("--params", help=params_help)
    for name, verb in STAGES.items():
        sub = verbs.add_parser(name, help=verb.help)
        sub.add_argument("--params", help=params_help)
        if name in SEEDED:
            sub.add_argument("--seed", type=int, help="a seed of seeds.ppo: its run, under results/<run>/seeds/<seed>/")
        if name == "plan-memory":
            sub.add_argument("--budget-gib", type=float, default=24.0)
            sub.add_argument("--device", choices=DEVICES, default="cuda",
                             help="plan a GPU run (default) or a CPU run such as the embedded default's")
    args = parser.parse_args(argv)
    started_in, written = Path.cwd(), Path.cwd()
    try:
        with ExitStack() as held:
            params = params_file(args.params)
            config = load_config(params)
            root = project_root(Path(params))
            check_results_dir(config, root)
            if root != started_in:
                os.chdir(root)  # relative paths are the project root's, as under dvc repro
                held.callback(os.chdir, started_in)
            seed = getattr(args, "seed", None)
            paths, config = RunPaths.of(config, seed), with_seed(config, seed)
            written = root / paths.root  # absolute: the except clauses below run back in started_in
            if args.verb not in UNLOCKED and distributed.is_main():  # one writer per results folder, from here on
                held.enter_context(lock.exclusive(paths.root))
            if args.verb in PREFLIGHT:
                preflight.check(config, *PREFLIGHT[args.verb])
            if args.verb == "validate" or STAGES[args.verb].loads_model:
                check_runtime(config)
                chosen = precision.of(config)
                print(f"{args.verb}: {precision.describe(chosen)}")
            if args.verb == "validate":
                print(f"{params}: valid (run {config.run.name!r})")
                return 0
            if STAGES[args.verb].loads_model:
                allocator.keep_freed_memory()  # before the first large tensor (allocator.py)
                warmup.vector_math()  # before the first forward: its first cos could be inexact (warmup.py)
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
    except Exception as exc:  # a write that failed below the stages' own SaveError (a log line, a library's file)
        cause = write_failure(exc, written)
        if cause is None:
            raise
        print(f"error: could not write {getattr(exc, 'filename', None) or written}: {cause}; "
              "the previous outputs and checkpoints are left as they were", file=sys.stderr)
        return 1
    return 0
