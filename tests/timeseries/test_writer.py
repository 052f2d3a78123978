"""The batched Trio writer: size/time flush, backpressure, shutdown, errors, kill -9."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pytest
import trio

from twin.errors import StorageError
from twin.timeseries.base import Record, Selector, TimeSeriesQuery
from twin.timeseries.writer import BatchedWriter

from .conftest import T0, make_lance


class FakeStore:
    def __init__(self, fail_times: int = 0) -> None:
        self.batches: list[int] = []
        self.records: list[Record] = []
        self.fail_times = fail_times
        self.gate: threading.Event | None = None

    def write_records(self, records: Sequence[Record]) -> int:
        if self.gate is not None:
            self.gate.wait(10)
        if self.fail_times:
            self.fail_times -= 1
            raise StorageError("disk full (simulated)")
        self.batches.append(len(records))
        self.records.extend(records)
        return len(records)


async def inline(fn: Callable[..., Any], *args: Any) -> Any:
    return fn(*args)


def rec(i: int) -> Record:
    return ("d1", "temp", float(i), T0 + i, 0, "", "", ",")


async def test_flush_by_size(autojump_clock: trio.testing.MockClock) -> None:
    store = FakeStore()
    w = BatchedWriter(store, batch_size=10, flush_interval=60, run_sync=inline)  # type: ignore[arg-type]
    async with trio.open_nursery() as n:
        await n.start(w.run)
        await w.write_many(rec(i) for i in range(25))
        await trio.sleep(1)  # well under the flush interval
        assert store.batches == [10, 10]
        await w.aclose()
    assert store.batches == [10, 10, 5]
    assert [r[2] for r in store.records] == [float(i) for i in range(25)]


async def test_flush_by_time(autojump_clock: trio.testing.MockClock) -> None:
    store = FakeStore()
    w = BatchedWriter(store, batch_size=1000, flush_interval=2.0, run_sync=inline)  # type: ignore[arg-type]
    async with trio.open_nursery() as n:
        await n.start(w.run)
        for i in range(3):
            await w.write(rec(i))
        await trio.sleep(1.9)
        assert store.batches == []
        await trio.sleep(0.2)
        assert store.batches == [3]
        await w.write_reading("d2", "hum", 1.0, T0)
        await trio.sleep(2.1)
        assert store.batches == [3, 1]
        n.cancel_scope.cancel()


async def test_backpressure_bounds_memory() -> None:
    store = FakeStore()
    store.gate = threading.Event()  # the store hangs until released
    w = BatchedWriter(store, batch_size=10, flush_interval=0.01, max_chunks=2)  # type: ignore[arg-type]
    accepted = 0
    async with trio.open_nursery() as n:
        await n.start(w.run)
        with trio.move_on_after(0.5):
            for i in range(1000):
                await w.write(rec(i))
                accepted += 1
        # one batch in the store call, one being built, the channel full: then it blocks
        assert accepted <= 10 + 10 + 2
        store.gate.set()
        await w.aclose()
    assert len(store.records) == accepted


async def test_storage_errors_are_retried_not_dropped(
    autojump_clock: trio.testing.MockClock,
) -> None:
    store = FakeStore(fail_times=3)
    w = BatchedWriter(store, batch_size=5, flush_interval=1, run_sync=inline)  # type: ignore[arg-type]
    async with trio.open_nursery() as n:
        await n.start(w.run)
        await w.write_many(rec(i) for i in range(5))
        await trio.sleep(10)
        await w.aclose()
    assert len(store.records) == 5 and w.errors == 3


async def test_clean_shutdown_and_cancel_put_everything_on_disk(tmp_path: Path) -> None:
    store = make_lance(tmp_path)
    w = BatchedWriter(store, batch_size=10_000, flush_interval=60)
    async with trio.open_nursery() as n:
        await n.start(w.run)
        await w.write_many(rec(i) for i in range(1234))
        n.cancel_scope.cancel()  # a cancelled engine: the writer drains before it returns
    t = store.query(TimeSeriesQuery(T0, T0 + 10_000, Selector.of(devices="d1")))
    assert t.num_rows == 1234
    w2 = BatchedWriter(store, batch_size=10_000, flush_interval=60)
    async with trio.open_nursery() as n:
        await n.start(w2.run)
        await w2.write_many(rec(i) for i in range(2000, 2100))
        await w2.aclose()
    assert store.query(TimeSeriesQuery(T0, T0 + 10_000)).num_rows == 1334


CHILD = textwrap.dedent(
    """
    import sys, trio
    from twin.timeseries.lance import LanceStore
    from twin.timeseries.writer import BatchedWriter

    store = LanceStore(sys.argv[1], compact_every=8, min_free_bytes=1024)
    written = [0]

    def on_flush(n):
        written[0] += n
        print("flushed", written[0], flush=True)

    async def main():
        w = BatchedWriter(store, batch_size=500, flush_interval=0.05, on_flush=on_flush)
        async with trio.open_nursery() as nursery:
            await nursery.start(w.run)
            i = 0
            while True:
                await w.write(("d1", "seq", float(i), 1_700_000_000.0 + i * 0.001, 0, "", "", ","))
                i += 1
                if i % 50 == 0:
                    await trio.sleep(0.001)

    trio.run(main)
    """
)


@pytest.mark.slow
def test_kill_9_loses_at_most_the_unflushed_window(tmp_path: Path) -> None:
    path = tmp_path / "ts"
    proc = subprocess.Popen(
        [sys.executable, "-c", CHILD, str(path)],
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    assert proc.stdout is not None
    last = 0
    flushes = 0
    try:
        for line in proc.stdout:
            last = int(line.split()[1])
            flushes += 1
            if flushes >= 30:
                break
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    # anything reported after we stopped reading is also on disk; read the rest
    for line in proc.stdout:
        last = int(line.split()[1])
    assert last > 0
    from twin.timeseries.lance import LanceStore

    store = LanceStore(path, min_free_bytes=1024)  # the store opens: not corrupted
    t = store.query(TimeSeriesQuery(T0 - 1, T0 + 1e6, Selector.of(devices="d1")))
    values = sorted(t.column("value").to_pylist())
    # every point whose flush completed is there, in order, with no gaps or duplicates
    assert len(values) >= last
    assert values == [float(i) for i in range(len(values))]
    store.write_records([rec(0)])  # and it accepts writes again
