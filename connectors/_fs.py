"""Filesystem helpers shared by the directory-backed connectors (files, parquet)."""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable
from typing import BinaryIO

#: Prefix of in-progress files; no finished file's name starts with a dot.
TMP_PREFIX = ".tmp-"


def atomic_write(directory: str, name: str, write: Callable[[BinaryIO], None], *,
                 fsync: bool = True, missing_dir: Callable[[], Exception]) -> None:
    """Write ``directory/name`` so readers see the old file or the whole new one, never a part:
    ``write`` fills a temporary file in the same directory, which is fsynced and renamed."""
    tmp = os.path.join(directory, f"{TMP_PREFIX}{uuid.uuid4().hex}")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    except FileNotFoundError:
        raise missing_dir() from None
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            if fsync:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, os.path.join(directory, name))
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def store_directory(directory: str | os.PathLike[str], owner: str) -> str:
    """The absolute path of a connector's directory; refuses a path that is a plain file."""
    path = os.path.abspath(os.fspath(directory))
    if os.path.exists(path) and not os.path.isdir(path):
        raise NotADirectoryError(f"{owner}: {path!r} is not a directory")
    return path


def missing_directory(directory: str, owner: str) -> FileNotFoundError:
    return FileNotFoundError(f"{owner} directory {directory!r} does not exist "
                             "(removed or unmounted?)")


def ensure_directory(directory: str, owner: str, create: bool) -> None:
    """Create ``directory`` if absent and ``create``; else raise if it is missing."""
    if os.path.isdir(directory):
        return
    if not create:
        raise missing_directory(directory, owner)
    os.makedirs(directory, exist_ok=True)
