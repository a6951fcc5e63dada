"""Atomic writes and the on-disk cache: nothing half-written is ever read back."""

from __future__ import annotations

import contextlib
import ctypes
import errno
import functools
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any


def cache_dir() -> Path:
    """Where converted parents and token arrays are kept (`NAS_CACHE`, else ~/.cache/nas)."""
    return Path(os.environ.get("NAS_CACHE") or Path.home() / ".cache" / "nas")


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary file path beside `path`; on success it replaces `path` in one rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


@contextlib.contextmanager
def atomic_dir(path: str | Path) -> Iterator[Path]:
    """Yield a temporary directory beside `path`; on success it becomes `path`, replacing any old one in one step
    (on Linux: elsewhere see `_install`), so a reader finds the old folder or the new one, whole, and never neither."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}."))
    try:
        yield tmp
        _install(tmp, path)
    finally:
        if tmp.exists():  # the folder just written (on failure) or the one it replaced
            shutil.rmtree(tmp)


@contextlib.contextmanager
def first_dir(path: str | Path) -> Iterator[Path]:
    """Yield a temporary directory beside `path` that becomes `path` in one rename unless another process put its
    own there first, which is then kept (and this one discarded): for a cache entry that several tasks may build
    at once, each building the same thing."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}."))
    try:
        yield tmp
        try:
            os.rename(tmp, path)  # (replaces an empty folder; fails on one with files)
        except OSError as e:
            if e.errno not in (errno.ENOTEMPTY, errno.EEXIST):
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)


def _install(new: Path, path: Path) -> None:
    """Move `new` to `path`; whatever was at `path` is left at `new` (for the caller to remove)."""
    if not path.exists():  # nothing to replace: one rename puts it there
        os.rename(new, path)
    elif not _exchange(new, path):
        # Without renameat2 (or on a filesystem without it) the old folder moves aside first: between the two renames
        # `path` is missing.
        aside = new.with_name(f"{new.name}.old")
        os.rename(path, aside)
        os.rename(new, path)
        os.rename(aside, new)


_RENAME_EXCHANGE = 2  # linux/fs.h
_AT_FDCWD = -100


@functools.cache
def _renameat2():
    return getattr(ctypes.CDLL(None, use_errno=True), "renameat2", None)  # glibc >= 2.28; not on macOS


def _exchange(a: Path, b: Path) -> bool:
    """Swap two existing paths in one step (Linux renameat2 RENAME_EXCHANGE); False where the C library, kernel or
    filesystem cannot."""
    if _renameat2() is None:
        return False
    if _renameat2()(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), str(b))


def write_json(path: str | Path, data: Any) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n")
