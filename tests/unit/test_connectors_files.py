"""File and Parquet connectors: the contract, plus atomic replace, path safety and reopen."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import pytest

from persistroids_dist.codec import encode_key
from persistroids_dist.connectors.files import FileConnector
from persistroids_dist.connectors.parquet import ParquetConnector
from persistroids_dist.connectors.testing import ConnectorContract, Outage
from persistroids_dist.shard import ShardCore


def _moved_away(directory: Path) -> Any:
    @contextlib.contextmanager
    def down() -> Iterator[None]:
        # The store's directory disappears (unmounted, removed) and comes back.
        os.rename(directory, str(directory) + ".away")
        try:
            yield
        finally:
            os.rename(str(directory) + ".away", directory)
    return down


class TestFilesContract(ConnectorContract):
    duplicate_keys_in_batch = True

    def make_connector(self) -> FileConnector:
        return FileConnector(self.tmp_path / "store")

    def make_outage(self) -> Outage:
        conn = self.make_connector()
        os.makedirs(conn.directory, exist_ok=True)
        return Outage(conn, _moved_away(self.tmp_path / "store"))


class TestParquetContract(ConnectorContract):
    duplicate_keys_in_batch = True

    def make_connector(self) -> ParquetConnector:
        return ParquetConnector(self.tmp_path / "pq", rows_per_file=7)

    def make_outage(self) -> Outage:
        conn = self.make_connector()
        os.makedirs(conn.directory, exist_ok=True)
        return Outage(conn, _moved_away(self.tmp_path / "pq"))


# -- files ----------------------------------------------------------------------------------
def test_no_path_traversal(tmp_path: Path) -> None:
    store = tmp_path / "store"
    conn = FileConnector(store)
    conn.connect()
    evil = ["../escape", "../../etc/passwd", "/abs/path", "..", ".", "a/../../b", "\\..\\x",
            "..\x00", ("..", ".."), b"../x"]
    conn.flush([conn.write(k, i) for i, k in enumerate(evil)])
    assert sorted(os.listdir(tmp_path)) == ["store"]  # nothing outside the directory
    names = os.listdir(store)
    assert len(names) == len(evil)
    assert all(not n.startswith(".") and "/" not in n for n in names)
    assert [conn.read(k) for k in evil] == list(range(len(evil)))
    assert conn.file_name("user 42!").startswith("user_42.")
    plain = FileConnector(store, plain_names=True)
    for bad in ("../x", ".hidden", "a/b", "", 42, "x" * 201):
        with pytest.raises(ValueError, match="not a plain file name"):
            plain.write(bad, "v")


def test_atomic_replace_leaves_no_temp_files(tmp_path: Path) -> None:
    conn = FileConnector(tmp_path, codec="raw")
    conn.flush([conn.write("k", b"old")])
    path = conn.path_of("k")
    inode = os.stat(path).st_ino
    conn.flush([conn.write("k", b"new contents")])
    assert open(path, "rb").read() == b"new contents"
    assert os.stat(path).st_ino != inode  # a new file renamed over the old, not rewritten
    assert os.listdir(tmp_path) == [os.path.basename(path)]

    class Boom(Exception):
        pass

    real_replace = os.replace

    def failing_replace(src: str, dst: str) -> None:
        raise Boom("disk full")

    os.replace = failing_replace  # type: ignore[assignment]
    try:
        with pytest.raises(Boom):
            conn.flush([conn.write("k", b"torn?")])
    finally:
        os.replace = real_replace
    assert open(path, "rb").read() == b"new contents"  # the old file is intact
    assert os.listdir(tmp_path) == [os.path.basename(path)]  # the temp file is gone


def test_text_codec_appends_to_a_file(tmp_path: Path) -> None:
    # The seed's motivating example: the cache in front of a log file you can cat.
    conn = FileConnector(tmp_path, codec="text", plain_names=True)
    core = ShardCore([conn])
    kb = encode_key("log.txt")
    for line in ("first", "second", "ünïcode"):
        core.update(kb, None, lambda s, line=line: (s or "") + line + "\n")
    core.close(disconnect=True)
    assert (tmp_path / "log.txt").read_text("utf-8") == "first\nsecond\nünïcode\n"
    core2 = ShardCore([FileConnector(tmp_path, codec="text", plain_names=True)])
    core2.update(kb, None, lambda s: s + "third\n")
    core2.close()
    assert (tmp_path / "log.txt").read_text("utf-8").endswith("ünïcode\nthird\n")


def test_codec_errors(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="codec must be one of"):
        FileConnector(tmp_path, codec="pickle")
    with pytest.raises(TypeError, match="stores str values, got bytes"):
        FileConnector(tmp_path, codec="text").write("k", b"x")
    with pytest.raises(TypeError, match="stores bytes or str values, got int"):
        FileConnector(tmp_path, codec="raw").write("k", 1)
    raw = FileConnector(tmp_path, codec="raw")
    raw.flush([raw.write("s", "ü")])
    assert raw.read("s") == "ü".encode()
    (tmp_path / "f").write_text("x")
    with pytest.raises(NotADirectoryError):
        FileConnector(tmp_path / "f")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        FileConnector(tmp_path / "absent", create=False).connect()


def test_missing_directory_is_an_error_not_a_miss(tmp_path: Path) -> None:
    conn = FileConnector(tmp_path / "store")
    conn.connect()
    assert conn.read("k") is None
    os.rmdir(tmp_path / "store")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        conn.read("k")


# -- parquet --------------------------------------------------------------------------------
def test_parquet_read_back_after_reopen(tmp_path: Path) -> None:
    conn = ParquetConnector(tmp_path, rows_per_file=1000)
    conn.connect()
    conn.flush([conn.write(("k", i), i) for i in range(2500)])  # three files
    conn.flush([conn.write(("k", 5), "newer")])
    assert len(conn.files) == 4
    conn.disconnect()
    again = ParquetConnector(tmp_path)
    again.connect()
    assert again.read(("k", 5)) == "newer"
    assert again.read_many([("k", 0), ("k", 2499), ("k", 2500)]) == [0, 2499, None]
    table = pq.read_table(os.path.join(tmp_path, again.files[-1]))
    assert table.column_names == ["key", "value", "seq"]  # plain Parquet, readable anywhere


def test_parquet_keeps_history_and_ignores_partial_files(tmp_path: Path) -> None:
    conn = ParquetConnector(tmp_path)
    conn.connect()
    for v in range(3):
        conn.flush([conn.write("k", v)])
    (tmp_path / ".tmp-partial.parquet").write_bytes(b"not parquet")  # a writer mid-flush
    fresh = ParquetConnector(tmp_path)
    assert fresh.read("k") == 2
    rows = sum(pq.read_metadata(os.path.join(tmp_path, n)).num_rows for n in fresh.files)
    assert rows == 3  # every version is kept: an audit log


def test_parquet_bad_arguments(tmp_path: Path) -> None:
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="rows_per_file"):
            ParquetConnector(tmp_path, rows_per_file=bad)
