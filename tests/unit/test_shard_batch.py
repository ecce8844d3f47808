"""ShardCore.read_many reads missed keys from stores with one batched call per connector."""

from __future__ import annotations

from typing import Any

from persistroids_dist import BaseConnector
from persistroids_dist.codec import decode_value, encode_key
from persistroids_dist.shard import ShardCore


class BatchStore(BaseConnector):
    def __init__(self, id: str, data: dict[Any, Any]) -> None:
        self.id = id
        self.data = data
        self.calls: list[tuple[str, Any]] = []
        self.flushed: list[list[Any]] = []

    def read(self, args: Any) -> Any:
        self.calls.append(("read", args))
        return self.data.get(args)

    def read_many(self, args_list: list[Any]) -> list[Any]:
        self.calls.append(("read_many", list(args_list)))
        return [self.data.get(a) for a in args_list]

    def flush(self, payloads: list[Any]) -> None:
        self.flushed.append(payloads)
        self.data.update(payloads)


def read_many(core: ShardCore, keys: list[Any]) -> list[Any]:
    return [decode_value(vb) for vb in core.read_many([encode_key(k) for k in keys])]


def test_misses_are_read_in_one_batch_per_connector_and_merged():
    one = BatchStore("one", {"a": {"x": 1}, "b": {"x": 2}})
    two = BatchStore("two", {"a": {"y": 1}})
    core = ShardCore([one, two], init_fn=lambda args: "init")
    core.get("b")  # cached: not read again
    one.calls.clear()
    assert read_many(core, ["a", "b", "c", "a"]) == [{"x": 1, "y": 1}, {"x": 2}, "init",
                                                     {"x": 1, "y": 1}]
    assert one.calls == [("read_many", ["a", "c"])]
    assert two.calls[-1] == ("read_many", ["a", "c"])
    m = core.metrics()
    assert (m["lookup"], m["misses"], m["read"]) == (5, 3, 3)


def test_buffered_writes_reach_the_store_before_a_batched_read_of_them():
    store = BatchStore("s", {})
    core = ShardCore([store], max_entries=2, writes_threshold=100)
    core.put("a", 1)
    core.put("b", 2)
    core.put("c", 3)  # evicting dirty "a" flushes the whole buffer first; nothing is lost
    assert store.data == {"a": 1, "b": 2, "c": 3}
    assert core.metrics()["evictions"] == 1
    core.put("b", 20)  # dirty again, and cached
    assert read_many(core, ["a", "b", "c", "x"]) == [1, 20, 3, None]
    assert store.calls == [("read_many", ["a", "x"])]  # cached "b" and "c" are not read
    core.flush()
    assert store.data == {"a": 1, "b": 20, "c": 3}


def test_a_recorded_checkpoint_runs_the_handler_once():
    saved: list[Any] = []
    store = BatchStore("s", {})
    core = ShardCore([store], checkpoint_handler=saved.append)
    core.write(encode_key("a"), None, b"\x01", checkpoint="state-1")
    core.flush()
    core.put("b", 2)
    core.flush()  # no newer state was recorded: the handler does not run again
    assert saved == ["state-1"]



class Refusing(BatchStore):
    def write(self, args: Any, value: Any) -> Any:
        if value == 3:
            raise ValueError("refused")
        return super().write(args, value)


def test_rejected_writes_are_not_counted_as_writes():
    core = ShardCore([Refusing("s", {})])
    core.put("b", 2)
    try:
        core.put("c", 3)
    except ValueError:
        pass
    m = core.metrics()
    assert (m["write"], m["write_errors"], m["pending"]) == (1, 1, 1)


def test_encoded_reads_skip_decoding_yet_keep_init_fn_and_none_semantics(tmp_path):
    from persistroids_dist.connectors.sqlite import SQLiteConnector

    path = tmp_path / "enc.db"
    writer = ShardCore([SQLiteConnector(path)])
    writer.put("n", None)
    writer.put("v", {"x": (1, 2)})
    writer.close()
    reader = ShardCore([SQLiteConnector(path)], init_fn=lambda args: f"init:{args}")
    assert reader._encoded_reader is not None
    assert read_many(reader, ["v", "n", "absent"]) == [{"x": (1, 2)}, "init:n", "init:absent"]
    assert reader.get("v") == {"x": (1, 2)}


def test_a_subclass_overriding_read_is_always_called(tmp_path):
    from persistroids_dist.connectors.sqlite import SQLiteConnector

    class Audited(SQLiteConnector):
        reads = 0

        def read_many(self, args_list):
            Audited.reads += len(args_list)
            return super().read_many(args_list)

    core = ShardCore([Audited(tmp_path / "a.db")])
    assert core._encoded_reader is None
    assert read_many(core, ["a", "b"]) == [None, None]
    assert Audited.reads == 2
