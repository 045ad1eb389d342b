"""Atomic outputs: write beside the target, then rename, so a killed run never leaves a
half-written file or folder that looks finished. Append-only logs (JSON lines) survive a kill too:
a line cut off mid-write spoils only itself."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from .errors import SaveError  # noqa: F401  (re-exported: callers import it from here)




def _default_mode(directory: bool) -> int:
    """The permissions a plain mkdir/open would give (mkdtemp/mkstemp make 0700/0600)."""
    umask = os.umask(0)
    os.umask(umask)
    return (0o777 if directory else 0o666) & ~umask


@contextmanager
def atomic_dir(target: Path) -> Iterator[Path]:
    """Yield a temporary folder next to `target`; on success it replaces `target` in one rename."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    old = target.with_name(f".{target.name}.old")
    if old.exists() and not target.exists():  # a run killed between the two renames: put it back
        old.rename(target)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        yield tmp
        tmp.chmod(_default_mode(directory=True))
        if old.exists():
            shutil.rmtree(old)
        if target.exists():
            target.rename(old)
        try:
            tmp.rename(target)
        except OSError:
            if old.exists() and not target.exists():
                old.rename(target)
            raise
        shutil.rmtree(old, ignore_errors=True)
    except OSError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        raise SaveError(f"could not write {target}: {exc}; the previous output is left as it was") from exc
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


@contextmanager
def atomic_file(target: Path, mode: str = "w") -> Iterator:
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.tmp-", dir=target.parent)
    try:
        with os.fdopen(fd, mode) as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, _default_mode(directory=False))
        os.replace(tmp, target)
    except OSError as exc:
        Path(tmp).unlink(missing_ok=True)
        raise SaveError(f"could not write {target}: {exc}; the previous output is left as it was") from exc
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json(target: Path, payload: object) -> None:
    with atomic_file(target) as handle:
        json.dump(payload, handle, indent=2, sort_keys=True)
        handle.write("\n")


def read_json(path: Path) -> object:
    return json.loads(Path(path).read_text())


def append_jsonl(path: Path, row: dict) -> None:
    """Append one JSON line; a last line cut off by a kill is closed first, so the new row stays whole."""
    with open(path, "a+b") as handle:
        torn = False
        if handle.tell():
            handle.seek(-1, os.SEEK_END)
            torn = handle.read(1) != b"\n"
        handle.write((b"\n" if torn else b"") + json.dumps(row).encode() + b"\n")


def read_jsonl(path: Path) -> list[dict]:
    """The rows of a JSON-lines file, skipping a line cut off by a kill; none if there is no file."""
    rows = []
    for line in Path(path).read_text().splitlines() if Path(path).is_file() else []:
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return rows
