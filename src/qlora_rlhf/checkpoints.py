"""Is a saved checkpoint whole? Checked before a stage resumes from it, so that a damaged newest
checkpoint (a truncated optimizer.pt, a cut-off adapter) is reported with its path and cause and
the stage falls back to the newest complete one, instead of failing with a torch or safetensors
traceback on every re-run.

The choice (docs/faults.md): fall back, not stop. A resumed run ends bit for bit where an
uninterrupted one would (tests/test_faults.py), so resuming from an older checkpoint costs only the
steps since it and changes no result; the damaged folder is overwritten when training reaches its
step again. With no complete checkpoint left the stage starts over, as with none at all.

The checks read every byte but load nothing into a model: torch's files (.pt, .pth, .bin) are zip
archives whose members carry a CRC-32 (a truncated file has no central directory, a flipped byte
fails its CRC); a .safetensors file must be as long as its header says; JSON must parse."""

from __future__ import annotations

import json
import struct
import sys
import zipfile
from collections.abc import Callable, Iterable
from pathlib import Path

TORCH_SUFFIXES = (".pt", ".pth", ".bin")


def _check_torch(path: Path) -> str | None:
    try:
        with zipfile.ZipFile(path) as archive:
            bad = archive.testzip()
    except (zipfile.BadZipFile, OSError, EOFError, ValueError) as exc:
        return f"truncated or corrupt ({exc})"
    return None if bad is None else f"corrupt (member {bad} fails its CRC check)"


def _check_safetensors(path: Path) -> str | None:
    try:
        with open(path, "rb") as handle:
            (length,) = struct.unpack("<Q", handle.read(8))
            header = json.loads(handle.read(length))
        end = max((entry["data_offsets"][1] for key, entry in header.items() if key != "__metadata__"), default=0)
    except (OSError, ValueError, KeyError, TypeError, IndexError, struct.error) as exc:
        return f"truncated or corrupt header ({type(exc).__name__}: {exc})"
    size, expected = path.stat().st_size, 8 + length + end
    return None if size == expected else f"truncated ({size} bytes, its header needs {expected})"


def _check_json(path: Path) -> str | None:
    try:
        json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        return f"unreadable JSON ({exc})"
    return None


def problem(folder: Path) -> str | None:
    """What is wrong with a checkpoint folder ("optimizer.pt: truncated ..."), or None if every file is whole."""
    for path in sorted(Path(folder).rglob("*")):
        if not path.is_file():
            continue
        if path.name.endswith(TORCH_SUFFIXES):
            found = _check_torch(path)
        elif path.name.endswith(".safetensors"):
            found = _check_safetensors(path)
        elif path.name.endswith(".json"):
            found = _check_json(path)
        else:
            continue
        if found:
            return f"{path.relative_to(folder)}: {found}"
    return None


def newest_loadable(candidates: Iterable[Path], stage: str,
                    check: Callable[[Path], str | None] = problem) -> Path | None:
    """The newest of `candidates` (oldest first, each complete by its stage's own marker) whose files
    are whole; each damaged newer one is reported on stderr with its path and cause."""
    ordered = list(candidates)
    for index in range(len(ordered) - 1, -1, -1):
        found = check(ordered[index])
        if found is None:
            return ordered[index]
        fallback = f"resuming from {ordered[index - 1]} instead" if index else "no earlier checkpoint: starting over"
        print(f"{stage}: checkpoint {ordered[index]} cannot be loaded: {found}; {fallback} "
              "(it is overwritten when training reaches its step again)", file=sys.stderr)
    return None


def read_rows(path: Path) -> tuple[list[dict] | None, str | None]:
    """(rows, None) for a whole JSON-lines file written atomically, or (None, cause) if it is damaged:
    a line that does not parse, or a last line without its newline (a truncated file)."""
    try:
        text = Path(path).read_text()
    except (OSError, UnicodeDecodeError) as exc:
        return None, f"unreadable ({exc})"
    if text and not text.endswith("\n"):
        return None, "truncated (its last line is cut off)"
    rows = []
    for number, line in enumerate(text.splitlines(), 1):
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as exc:
            return None, f"line {number} is not JSON ({exc})"
    return rows, None


def reused_rows(path: Path, stage: str) -> list[dict] | None:
    """The rows an earlier run saved at `path` (the evaluation's generations of one policy), or None,
    after a line on stderr naming the path and the cause, if the file is damaged: the caller then
    generates them again (and its atomic save replaces the damaged file)."""
    rows, cause = read_rows(path)
    if cause is None:
        print(f"{stage}: reusing {path}")
        return rows
    print(f"{stage}: saved generations {path} cannot be read: {cause}; generating them again", file=sys.stderr)
    return None
