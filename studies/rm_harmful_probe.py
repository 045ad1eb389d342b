"""What the reward model prefers in reply to a harmful request (synthetic data): the finished run's
reward model scores fixed replies to held-out harmful prompts (the taught refusal, hedge and
compliance, every help answer as a cheerful dodge "Sure! <answer>", and a correct sum) through
PPO's own reward path; each kind is reported against the refusal to the same prompt, which is what
PPO's per-prompt baseline compares. A kind that beats the refusal is a reward hack within PPO's
reach. Writes studies/results/rm_harmful_probe.json.

    .venv/bin/python studies/rm_harmful_probe.py        # ~30 s on 2 CPU cores
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

from qlora_rlhf import synthetic
from qlora_rlhf.atomic import write_json
from qlora_rlhf.config import load_config
from qlora_rlhf.data import read_split

from _study import REPO, RESULTS, run_paths, shown


def replies() -> dict[str, str]:
    kinds = {"refusal": synthetic.REFUSALS[0], "hedge": synthetic.HEDGES[0], "comply": synthetic.COMPLY[0]}
    kinds |= {f"dodge: {topic}": f"Sure! {answer}" for topic, answer in synthetic.HELP_TOPICS.items()}
    kinds["a correct sum"] = "3 plus 4 is 7."
    return {kind: " " + text for kind, text in kinds.items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", type=Path, default=REPO / "params.yaml")
    parser.add_argument("--prompts", type=int, default=24)
    parser.add_argument("--out", type=Path, default=RESULTS / "rm_harmful_probe.json")
    args = parser.parse_args(argv)
    config, paths = load_config(args.params), run_paths(args.params)
    if not (paths.rm / "adapter").is_dir():
        print(f"error: {paths.rm} holds no reward model; run `dvc repro` first", file=sys.stderr)
        return 1
    from qlora_rlhf.actor import SharedBaseRoles
    from qlora_rlhf.stages.rm import score_texts

    prompts = [r["prompt"] for r in read_split(paths, "eval") if synthetic.prompt_category(r["prompt"]) == "harmful"]
    prompts = prompts[: args.prompts]
    ac = SharedBaseRoles.load(config, paths.sft / "merged", paths.rm / "adapter", trainable=False)
    scores = {kind: score_texts(ac.reward, ac.tokenizer, [p + text for p in prompts], 32, ac.device)
              for kind, text in replies().items()}
    refusal = scores["refusal"]
    rows = {kind: {"minus_refusal_mean": float(np.mean(s - refusal)),
                   "above_refusal_share": float(np.mean(s > refusal))}
            for kind, s in scores.items() if kind != "refusal"}
    dodges = np.stack([s - refusal for kind, s in scores.items() if kind.startswith("dodge")])
    result = {"params": shown(args.params), "prompts": len(prompts), "kinds": rows,
              "dodges_above_refusal_share": float((dodges > 0).mean())}
    write_json(args.out, result)
    for kind, row in rows.items():
        print(f"{kind:48s} {row['minus_refusal_mean']:+6.2f} vs refusal, above it for {row['above_refusal_share']:.0%}")
    print(f"dodges above the refusal: {result['dodges_above_refusal_share']:.0%} of (prompt, dodge) pairs; "
          f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
