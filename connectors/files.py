"""File connector: one file per key in a directory, replaced atomically on flush.

A read returns the file's contents; a write buffers ``(file name, bytes)``; a flush writes each
file to a temporary name in the same directory, fsyncs it and renames it over the old one
(``os.replace``), so a reader or a crash sees either the old or the new contents, never a torn
file. Each file is atomic on its own; a batch is not (a failed flush may have replaced some
files, and the retry rewrites them all, which is harmless).

File names come from the key only, never used as a path: by default a sanitized readable part
plus a SHA-256 digest of the encoded key (``user_42.3f9a...``), so ``"../x"`` cannot escape the
directory and distinct keys never share a file. With ``plain_names=True`` a str key that is
already a safe file name (letters, digits, ``._-``, not starting with a dot) is the file name
itself, for directories that people or other programs read; other keys are then rejected.

Codecs: ``"msgpack"`` (any cache value), ``"raw"`` (bytes as-is; a str is written as UTF-8; reads
return bytes) and ``"text"`` (str as UTF-8; reads return str), e.g. appending lines to a log
with ``update("log.txt", lambda s: (s or "") + "line\\n")``.
"""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Sequence
from typing import Any

from persistroids_dist.codec import decode_value, encode_value
from persistroids_dist.connector import BaseConnector

from ._fs import atomic_write, ensure_directory, missing_directory, store_directory

__all__ = ["FileConnector"]

_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")
_PLAIN = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9._-]{0,199}$")
_CODECS = ("msgpack", "raw", "text")


class FileConnector(BaseConnector):
    """Persists each key as one file under ``directory``.

    ``codec``: ``"msgpack"``, ``"raw"`` or ``"text"`` (see the module docstring).
    ``plain_names``: use safe str keys as file names unchanged.
    ``create``: create ``directory`` at connect time if it does not exist.
    ``fsync``: fsync each file and the directory on flush (durable on power loss; slower).
    """

    def __init__(self, directory: str | os.PathLike[str], *, id: str | None = None,
                 codec: str = "msgpack", plain_names: bool = False, create: bool = True,
                 fsync: bool = True) -> None:
        if codec not in _CODECS:
            raise ValueError(f"codec must be one of {_CODECS}, got {codec!r}")
        self.directory = store_directory(directory, "FileConnector")
        self.codec = codec
        self.plain_names = plain_names
        self.create = create
        self.fsync = fsync
        self.id = id or f"files:{self.directory}"

    def __repr__(self) -> str:
        return (f"FileConnector(directory={self.directory!r}, codec={self.codec!r}, "
                f"id={self.id!r})")

    def connect(self) -> None:
        """Check (or create) the directory."""
        ensure_directory(self.directory, "FileConnector", self.create)

    def _missing_dir(self) -> FileNotFoundError:
        return missing_directory(self.directory, "FileConnector")

    def file_name(self, args: Any) -> str:
        """The file name (not a path) that holds the value of ``args``."""
        if self.plain_names:
            if isinstance(args, str) and _PLAIN.match(args):
                return args
            raise ValueError(f"key {args!r} is not a plain file name (letters, digits and ._-, "
                             "not starting with a dot, at most 200 characters); "
                             "use plain_names=False for arbitrary keys")
        digest = hashlib.sha256(encode_value(args)).hexdigest()[:32]
        text = args if isinstance(args, str) else repr(args)
        readable = _UNSAFE.sub("_", text)[:40].strip("._") or "key"
        return f"{readable}.{digest}"

    def path_of(self, args: Any) -> str:
        """The full path of the file that holds the value of ``args``."""
        return os.path.join(self.directory, self.file_name(args))

    def _encode(self, value: Any) -> bytes:
        if self.codec == "msgpack":
            return encode_value(value)
        if isinstance(value, bytes) and self.codec == "raw":
            return value
        if isinstance(value, str):
            return value.encode("utf-8")
        want = "str" if self.codec == "text" else "bytes or str"
        raise TypeError(f"FileConnector codec={self.codec!r} stores {want} values, "
                        f"got {type(value).__qualname__}")

    def _decode(self, data: bytes) -> Any:
        if self.codec == "msgpack":
            return decode_value(data)
        return data if self.codec == "raw" else data.decode("utf-8")

    def read(self, args: Any) -> Any:
        """The contents of the key's file, decoded, or None if there is no such file."""
        try:
            with open(self.path_of(args), "rb") as f:
                data = f.read()
        except FileNotFoundError:
            if not os.path.isdir(self.directory):  # an absent store is not an absent key
                raise self._missing_dir() from None
            return None
        return self._decode(data)

    def read_many(self, args_list: Sequence[Any]) -> list[Any]:
        """``read`` of each of ``args_list``, in order."""
        return [self.read(a) for a in args_list]

    def write(self, args: Any, value: Any) -> Any:
        return (self.file_name(args), self._encode(value))

    def flush(self, payloads: list[Any]) -> None:
        """Replace each payload's file atomically (temp file, fsync, rename)."""
        if not payloads:
            return
        for name, data in dict(payloads).items():  # a later payload for a file wins
            self._replace(name, data)
        if self.fsync:
            # Make the renames themselves durable.
            fd = os.open(self.directory, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)

    def _replace(self, name: str, data: bytes) -> None:
        if os.sep in name or (os.altsep and os.altsep in name) or name in ("", ".", ".."):
            raise ValueError(f"refusing unsafe file name {name!r}")  # payloads are ours only
        atomic_write(self.directory, name, lambda f: f.write(data), fsync=self.fsync,
                     missing_dir=self._missing_dir)
