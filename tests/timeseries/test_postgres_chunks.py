"""The PostgreSQL store's series-chunk layout (issue 19): closed partitions become one row
per (series, partition) in <prefix>chunks; reads, aggregates, late points, retention and
stores of the row layout keep giving the very same data."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from typing import Any

import pytest

from tests.timeseries.conftest import PG_URL, pg_reason
from tests.timeseries.test_lance_chunks import T0, H, _aggs, _canon, _records, same_aggs
from twin.timeseries.base import Record, Selector

pytestmark = pytest.mark.postgres


@pytest.fixture
def prefix() -> Iterator[str]:
    reason = pg_reason()
    if reason:
        pytest.skip(reason)
    p = f"t{uuid.uuid4().hex[:10]}_"
    yield p
    from twin.timeseries.postgres import PostgresStore

    s = PostgresStore(PG_URL, prefix=p)
    s.drop_all()
    s.close()


def _store(prefix: str, **kw: Any) -> Any:
    from twin.timeseries.postgres import PostgresStore

    return PostgresStore(PG_URL, prefix=prefix, **kw)


def _all(s: Any) -> list[tuple[object, ...]]:
    return _canon(s.read_raw(Selector(), 0, 4e9))


def _count(s: Any, table: str) -> int:
    return int(s._exec(f"SELECT count(*) FROM {s.prefix}{table}")[0][0])


def test_closed_partitions_become_chunks_with_identical_data(prefix: str) -> None:
    s = _store(prefix)
    try:
        recs = _records(hours=20, devices=3)
        s.write_records(recs)
        before = _all(s)
        aggs = {b: _aggs(s, b) for b in ("1m", "1h", "1d")}
        s.maintain(force=True)
        assert _count(s, "points") == 0 and _count(s, "chunks") > 0
        raw = next(t for t in s.stats().tiers if t.tier == "raw")
        assert raw.points == len(recs)
        assert _all(s) == before
        same_aggs(s, aggs)
        sel = Selector.of(devices="d1", metrics="temp")
        got = _canon(s.read_raw(sel, T0 + 2 * H, T0 + 3 * H))
        assert got == [
            r
            for r in before
            if r[:2] == ("d1", "temp") and T0 + 2 * H <= r[2].timestamp() < T0 + 3 * H
        ]
        # a late point into a chunked partition: read at once, merged at the next pass
        late: list[Record] = [("d0", "temp", -0.0, T0 + H + 0.5, 0, "s", "g", ",a,")]
        s.write_records(late)
        n_chunks = _count(s, "chunks")
        want = _all(s)
        assert len(want) == len(recs) + 1
        s.maintain(force=True)
        assert _count(s, "chunks") == n_chunks and _count(s, "points") == 0
        assert _all(s) == want
        # retention through the middle of a chunk
        cut = T0 + 7.5 * H + 17
        dropped = s.delete_before("raw", Selector(), cut)
        assert dropped == sum(1 for r in want if r[2].timestamp() < cut)
        s.reclaim()
        assert _all(s) == [r for r in want if r[2].timestamp() >= cut]
    finally:
        s.close()


def test_a_row_layout_store_migrates_in_place(prefix: str) -> None:
    old = _store(prefix, chunks=False)  # every store before issue 19: rows only
    recs = _records(hours=14, devices=2)
    old.write_records(recs)
    old.maintain(force=True)  # CLUSTERs, as it always did
    before = _all(old)
    assert _count(old, "chunks") == 0
    old.close()
    new = _store(prefix)
    try:
        assert _all(new) == before
        new.maintain(force=True)
        assert _count(new, "points") == 0
        assert _all(new) == before
    finally:
        new.close()
