"""The time-series layer's own defence: a record no store can hold is counted and skipped,
never fails its whole batch (the ingest edges refuse these first)."""

from __future__ import annotations

import math
from pathlib import Path

import trio

from twin.timeseries.base import Record, Selector, storable
from twin.timeseries.lance import LanceStore
from twin.timeseries.writer import BatchedWriter


def rec(value: object, ts: float = 1.7e9, device: str = "d") -> Record:
    return (device, "t", value, ts, 0, "s", "g", ",")  # type: ignore[return-value]


def test_storable_keeps_the_good_and_is_the_identity_in_the_common_cases() -> None:
    good = [rec(1.5), rec(2), rec(True), rec("on"), rec(None)]
    assert storable(good) == good
    strings = [rec("on"), rec(True), rec(None)]
    assert storable(strings) is strings
    floats = [rec(float(i)) for i in range(100)]
    assert storable(floats) is floats
    numbers = [rec(1.5), rec(7), rec(True), rec(2**60)]  # counters beside floats
    assert storable(numbers) is numbers
    assert storable([*numbers, rec(10**400), rec(math.inf)]) == numbers
    bad = [
        rec(10**400),
        rec(math.nan),
        rec(math.inf),
        rec(1.0, math.nan),
        rec(1.0, 1e300),
        rec(object()),
        rec(1.0, 10**400),
    ]  # type: ignore[list-item]
    assert storable(good + bad) == good
    assert storable(bad) == []


async def test_writer_skips_a_bad_record_and_stores_the_rest(tmp_path: Path) -> None:
    store = LanceStore(tmp_path / "ts")
    try:
        writer = BatchedWriter(store, flush_interval=0.05)
        async with trio.open_nursery() as nursery:
            await nursery.start(writer.run)
            await writer.write_many([rec(1.0, 1.7e9 + i) for i in range(5)] + [rec(10**400)])
            await writer.aclose()
        assert writer.dropped == 1
        assert writer.points_written == 6  # the rollup barrier counts what was handled
        assert store.read_raw(Selector.of(devices="d"), 0, 2e9).num_rows == 5
    finally:
        store.close()
