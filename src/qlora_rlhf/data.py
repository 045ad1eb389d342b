"""Preference data: read hh-rlhf rows from a source, drop and count malformed ones, and choose
deterministic, prompt-disjoint subsets (sft / rm / ppo) plus a held-out eval split; `read_split` is
how every stage reads them back. The data stage that writes them and the manifest is stages/data.py."""

from __future__ import annotations

import gzip
import hashlib
import json
import random
import zlib
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

from . import synthetic
from .config import Config
from .errors import DataError  # noqa: F401  (re-exported: callers import it from here)
from .hh import Pair, parse_row
from .paths import RunPaths


# ------------------------------------------------------------------ sources
def _read_jsonl(path: Path, dropped: Counter) -> Iterator[object]:
    opener = gzip.open if path.name.endswith(".gz") else open
    try:
        with opener(path, "rb") as handle:
            for raw in handle:
                if not raw.strip():
                    continue
                try:
                    text = raw.decode("utf-8-sig")  # -sig: a BOM at the start of a file is not broken JSON
                except UnicodeDecodeError:
                    dropped["undecodable_text"] += 1
                    continue
                try:
                    yield json.loads(text)
                except json.JSONDecodeError:
                    dropped["broken_json"] += 1
    except (EOFError, gzip.BadGzipFile, zlib.error):  # a truncated or corrupt .gz: keep what was read
        dropped["truncated_file"] += 1
    except OSError as exc:  # missing, unreadable, a folder: nothing a re-run can fix by itself
        raise DataError(f"cannot read data file {path}: {exc}") from None


def _split_files(directory: Path) -> dict[str, list[Path]]:
    files = sorted(p for p in directory.rglob("*") if p.name.endswith((".jsonl", ".jsonl.gz")))
    splits = {"train": [p for p in files if p.name.startswith("train")],
              "test": [p for p in files if p.name.startswith("test")]}
    if not splits["train"] and not splits["test"]:
        splits["train"] = files
    return splits


def load_source(config: Config, dropped: dict[str, Counter]) -> dict[str, list[object]]:
    """Raw rows per split ("train", and "test" where the source has one)."""
    source, seed = config.data.source, config.run.seed
    if source == "synthetic":
        return {"train": synthetic.generate(config.data.synthetic_train_rows, seed),
                "test": synthetic.generate(config.data.synthetic_test_rows, seed + 1)}
    if source.startswith("hub:"):
        import datasets  # only the hub path needs it

        loaded = datasets.load_dataset(source.removeprefix("hub:"), data_dir=config.data.hub_data_dir)
        return {split: list(loaded[split]) for split in ("train", "test") if split in loaded}
    paths = [Path(p) for p in source.split(",")]
    missing = [str(p) for p in paths if not p.exists()]
    if missing:
        raise DataError(f"data.source: not found: {', '.join(missing)} "
                        "(use synthetic, hub:<id>, a folder or .jsonl files)")
    splits: dict[str, list[Path]] = {"train": [], "test": []}
    for path in paths:
        for split, files in (_split_files(path) if path.is_dir() else {"train": [path]}).items():
            splits[split] += files
    return {split: [row for f in files for row in _read_jsonl(f, dropped[split])]
            for split, files in splits.items() if files}


# ------------------------------------------------------------------ cleaning
def clean(rows: Iterable[object], dropped: Counter, too_long: Callable[[Pair], bool]) -> list[Pair]:
    """Parse rows, dropping (and counting by reason) malformed, too long and duplicate ones."""
    pairs, seen = [], set()
    for row in rows:
        try:
            pair = parse_row(row)
        except ValueError as exc:
            dropped[str(exc)] += 1
            continue
        if pair.prompt in seen:
            dropped["duplicate_prompt"] += 1
            continue
        if too_long(pair):
            dropped["too_long"] += 1
            continue
        seen.add(pair.prompt)
        pairs.append(pair)
    return pairs


def token_length_filter(tokenizer, max_prompt_tokens: int, max_length: int) -> Callable[[Pair], bool]:
    def too_long(pair: Pair) -> bool:
        lengths = [len(tokenizer(t).input_ids)
                   for t in (pair.prompt, pair.prompt + pair.chosen, pair.prompt + pair.rejected)]
        return lengths[0] > max_prompt_tokens or max(lengths[1:]) + 1 > max_length  # +1 for EOS
    return too_long


# ------------------------------------------------------------------ subsets
def make_subsets(config: Config, train: list[Pair], test: list[Pair] | None) -> dict[str, list[Pair]]:
    sizes = {"sft": config.data.sft_size, "rm": config.data.rm_size, "ppo": config.data.ppo_size}
    order = list(train)
    random.Random(config.run.seed).shuffle(order)
    need = sum(sizes.values()) + (0 if test else config.data.eval_size)
    if len(order) < need:
        raise DataError(
            f"the source has {len(order)} usable training prompts but data.sft_size + data.rm_size + data.ppo_size"
            f"{'' if test else ' + data.eval_size (no test split: held out from train)'} = {need}; "
            "lower the sizes or give more data")
    subsets, start = {}, 0
    for name, size in sizes.items():
        subsets[name] = order[start : start + size]
        start += size
    if test:
        train_prompts = {p.prompt for p in order[:start]}
        held_out = [p for p in test if p.prompt not in train_prompts]
        held_out.sort(key=lambda p: hashlib.sha256(p.prompt.encode()).hexdigest())
        random.Random(config.run.seed + 1).shuffle(held_out)
    else:
        held_out = order[start:]
    if len(held_out) < config.data.eval_size:
        raise DataError(f"only {len(held_out)} held-out evaluation prompts "
                        f"but data.eval_size = {config.data.eval_size}")
    subsets["eval"] = held_out[: config.data.eval_size]
    return subsets


def read_split(paths: RunPaths, name: str) -> list[dict[str, str]]:
    try:
        with open(paths.split(name)) as handle:
            return [json.loads(line) for line in handle]
    except FileNotFoundError:
        raise DataError(f"{paths.split(name)} is missing: run the data stage first") from None
