"""Atomic outputs: write beside the target, then rename, so a killed run never leaves a
half-written file or folder that looks finished. Append-only logs (JSON lines) survive a kill too:
a line cut off mid-write spoils only itself."""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from .errors import SaveError  # noqa: F401  (re-exported: callers import it from here)

# errno values that mean "this folder cannot take the write": a full disk or quota, a read-only mount,
# no permission, a file too large for the file system
WRITE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.EFBIG}
# The libraries that write model files do not raise OSError: safetensors (Rust) raises SafetensorError
# "... (os error 28)", and torch.save's zip writer a RuntimeError that gives no errno at all.
_RUST_OS_ERROR = re.compile(r"os error (\d+)")
_TORCH_SHORT_WRITE = ("PytorchStreamWriter failed", "unexpected pos", "inline_container")
_LOW_SPACE = 64 * 1024**2


def _free(folder: Path) -> int | None:
    for candidate in (Path(folder), *Path(folder).parents):
        try:
            return shutil.disk_usage(candidate).free
        except OSError:
            continue
    return None


def _size(n: int) -> str:
    return f"{n / 1024**2:.1f} MB" if n >= 1024**2 else f"{n / 1024:.0f} KB"


def write_failure(exc: BaseException, folder: Path | None = None) -> str | None:
    """The cause, in words, when `exc` is a failed write (a full disk, a read-only folder, no
    permission), whichever library raised it; None for any other error. `folder`: where the write
    went, to tell a full disk apart from another failure of torch's zip writer, which names none."""
    if isinstance(exc, SaveError):
        return None  # already says what failed
    if isinstance(exc, OSError) and exc.errno in WRITE_ERRNOS:
        return os.strerror(exc.errno)
    text = str(exc)
    found = _RUST_OS_ERROR.search(text)
    if found and int(found.group(1)) in WRITE_ERRNOS:
        return os.strerror(int(found.group(1)))
    if isinstance(exc, RuntimeError) and any(marker in text for marker in _TORCH_SHORT_WRITE):
        free = _free(folder) if folder is not None else None
        if free is not None and free < _LOW_SPACE:
            return f"{os.strerror(errno.ENOSPC)} ({_size(free)} free there)"
        return f"the write stopped short ({text.splitlines()[0].strip()})"
    return None


def save_error(exc: BaseException, target: Path,
               kept: str = "the previous output is left as it was") -> SaveError | None:
    """The one-line SaveError for a failed write to `target`, or None if `exc` is not one."""
    cause = write_failure(exc, Path(target).parent)
    return None if cause is None else SaveError(f"could not write {target}: {cause}; {kept}")


def _default_mode(directory: bool) -> int:
    """The permissions a plain mkdir/open would give (mkdtemp/mkstemp make 0700/0600)."""
    umask = os.umask(0)
    os.umask(umask)
    return (0o777 if directory else 0o666) & ~umask


@contextmanager
def atomic_dir(target: Path) -> Iterator[Path]:
    """Yield a temporary folder next to `target`; on success it replaces `target` in one rename."""
    target = Path(target)
    old = target.with_name(f".{target.name}.old")
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        if old.exists() and not target.exists():  # a run killed between the two renames: put it back
            old.rename(target)
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    except OSError as exc:
        raise save_error(exc, target) or exc from None
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
    except BaseException as exc:
        shutil.rmtree(tmp, ignore_errors=True)  # first: it frees the space a full disk lacked
        error = save_error(exc, target) if isinstance(exc, Exception) else None
        if error is None and isinstance(exc, OSError) and not isinstance(exc, SaveError):
            error = SaveError(f"could not write {target}: {exc}; the previous output is left as it was")
        if error is not None:
            raise error from exc
        raise


@contextmanager
def atomic_file(target: Path, mode: str = "w") -> Iterator:
    target = Path(target)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.tmp-", dir=target.parent)
    except OSError as exc:
        raise save_error(exc, target) or exc from None
    try:
        with os.fdopen(fd, mode) as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, _default_mode(directory=False))
        os.replace(tmp, target)
    except BaseException as exc:
        Path(tmp).unlink(missing_ok=True)
        error = save_error(exc, target) if isinstance(exc, Exception) else None
        if error is None and isinstance(exc, OSError) and not isinstance(exc, SaveError):
            error = SaveError(f"could not write {target}: {exc}; the previous output is left as it was")
        if error is not None:
            raise error from exc
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
