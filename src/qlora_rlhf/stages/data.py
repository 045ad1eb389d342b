"""The data stage: results/<run>/data, the sft / rm / ppo subsets and the eval split as JSONL (chosen
by data.py: prompt-disjoint, deterministic), and manifest.json with each subset's size and sha256 and
every dropped row counted by reason."""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from pathlib import Path

from ..atomic import atomic_dir, write_json
from ..config import Config
from ..data import clean, load_source, make_subsets, token_length_filter
from ..errors import DataError
from ..hh import Pair
from ..models import load_tokenizer
from ..paths import RunPaths


def run(config: Config, paths: RunPaths) -> dict:
    tokenizer = load_tokenizer(config.model.name_or_path)  # lengths are counted in the model's tokens
    manifest = write_subsets(config, paths, tokenizer)
    sizes = ", ".join(f"{name}={info['rows']}" for name, info in manifest["subsets"].items())
    dropped = {split: sum(c.values()) for split, c in manifest["dropped"].items()}
    print(f"data: wrote {paths.data} ({sizes}); dropped rows: {dropped}")
    return manifest


def write_subsets(config: Config, paths: RunPaths, tokenizer=None) -> dict:
    """Write the subsets and manifest (prompts and dialogues too long in `tokenizer`'s tokens dropped; none
    without one); returns the manifest."""
    dropped: dict[str, Counter] = {"train": Counter(), "test": Counter()}
    raw = load_source(config, dropped)
    too_long = (token_length_filter(tokenizer, config.data.max_prompt_tokens, config.data.max_length)
                if tokenizer is not None else (lambda pair: False))
    cleaned = {split: clean(rows, dropped[split], too_long) for split, rows in raw.items()}
    if not cleaned.get("train"):
        reasons = ", ".join(f"{k}={v}" for k, v in sorted(dropped["train"].items())) or "no rows at all"
        raise DataError(f"no usable training row in data.source={config.data.source!r} (dropped: {reasons})")
    subsets = make_subsets(config, cleaned["train"], cleaned.get("test"))
    prompt_sets = {name: {p.prompt for p in pairs} for name, pairs in subsets.items()}
    names = sorted(prompt_sets)
    manifest = {
        "source": config.data.source, "hub_data_dir": config.data.hub_data_dir, "seed": config.run.seed,
        "rows_read": {split: len(rows) + dropped[split]["broken_json"] + dropped[split]["undecodable_text"]
                      for split, rows in raw.items()},
        "rows_usable": {split: len(pairs) for split, pairs in cleaned.items()},
        "dropped": {split: dict(sorted(counts.items())) for split, counts in dropped.items() if split in raw},
        "held_out_from": "test" if cleaned.get("test") else "train",
        "prompt_overlap": {f"{a}&{b}": len(prompt_sets[a] & prompt_sets[b])
                           for i, a in enumerate(names) for b in names[i + 1 :]},
        "subsets": {},
    }
    with atomic_dir(paths.data) as out:
        for name, pairs in subsets.items():
            digest = _write_jsonl(out / f"{name}.jsonl", _records(name, pairs))
            manifest["subsets"][name] = {"rows": len(pairs), "sha256": digest}
        write_json(out / "manifest.json", manifest)
    return manifest


def _records(name: str, pairs: list[Pair]) -> list[dict[str, str]]:
    if name == "sft":
        return [{"prompt": p.prompt, "completion": p.chosen} for p in pairs]
    if name == "ppo":
        return [{"prompt": p.prompt} for p in pairs]
    return [{"prompt": p.prompt, "chosen": p.chosen, "rejected": p.rejected} for p in pairs]


def _write_jsonl(path: Path, records: list[dict[str, str]]) -> str:
    payload = "".join(json.dumps(r, ensure_ascii=False, sort_keys=True) + "\n" for r in records).encode()
    path.write_bytes(payload)
    return hashlib.sha256(payload).hexdigest()
