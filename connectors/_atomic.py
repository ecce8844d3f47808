"""Atomic file replacement shared by the file-based connectors."""

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
