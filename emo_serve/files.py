"""Writing files so that a failure leaves nothing half-written: temp path, fsync, rename, and an
fsync of the directory (without it a crash right after the rename may lose the rename itself).

Every temporary name is `.<target>.<random>.tmp` beside its target, so `sweep_temporaries` can
remove what a killed process left behind.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def atomic_write_text(path: str | os.PathLike[str], text: str) -> None:
    """UTF-8 text, written atomically (see `atomic_write_bytes`)."""
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> None:
    """Write to a temp file in the same directory, fsync, then rename over `path`."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp makes it private; the result is an ordinary file
        os.replace(tmp, target)
        fsync_dir(target.parent)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


@contextmanager
def staged_dir(out_dir: str | Path) -> Iterator[Path]:
    """A temporary directory next to `out_dir`, renamed to it only if the block succeeds."""
    out = Path(out_dir)
    if out.exists():
        raise FileExistsError(f"{out}: already exists")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    try:
        yield tmp
        tmp.chmod(0o755)  # mkdtemp makes it private; the result is an ordinary directory
        tmp.rename(out)
        fsync_dir(out.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def fsync_dir(path: str | os.PathLike[str]) -> None:
    """Make a rename or a new entry in `path` durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def temporary_path(target: str | os.PathLike[str], tag: str) -> Path:
    """A fresh temporary name beside `target`, in the swept pattern (for staging a directory)."""
    target = Path(target)
    return target.parent / f".{target.name}.{tag}.tmp"


def sweep_temporaries(directory: str | os.PathLike[str]) -> list[Path]:
    """Remove the temporary files and directories (`.*.tmp`) left in `directory` by a process
    that died mid-write; only call this while nothing is writing there (at start-up)."""
    removed = []
    for entry in Path(directory).glob(".*.tmp"):
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)
        removed.append(entry)
    return removed
