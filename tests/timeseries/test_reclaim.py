"""A retention cut that falls inside a partition / fragment still gives the space back."""

from __future__ import annotations

import math

from twin.timeseries.base import Record, Selector, TimeSeriesStore

T0 = 1_700_000_000.0  # as in conftest


def _fill(store: TimeSeriesStore, hours: int = 30) -> int:
    recs: list[Record] = []
    for minute in range(hours * 60):
        ts = T0 + minute * 60 + 0.5
        for d in range(20):
            recs.append(
                # full-precision values: the series-chunk layout makes rounded ones so
                # small that the store's size is its metadata (issue 19)
                (f"d{d}", "temperature", 20.0 + math.sin(minute * 0.37 + d), ts, 0, "s", "g", ",")
            )
    for i in range(0, len(recs), 10_000):
        store.write_records(recs[i : i + 10_000])
    store.reclaim()  # type: ignore[attr-defined]
    return len(recs)


def test_cut_inside_a_partition_reclaims_space(store: TimeSeriesStore) -> None:
    n = _fill(store)
    before = store.stats()
    assert before.points == n
    # 7.5 h + a bit: not on a day, 6 h or fragment boundary
    cut = T0 + 7.5 * 3600 + 123
    dropped = store.delete_before("raw", Selector(), cut)
    assert dropped == sum(1 for m in range(30 * 60) if T0 + m * 60 + 0.5 < cut) * 20
    store.reclaim()  # type: ignore[attr-defined]
    after = store.stats()
    assert after.points == n - dropped
    assert after.bytes < before.bytes
    # the rows left are exactly the ones at or after the cut
    rest = store.read_raw(Selector.of(devices="d3"), 0, 2e9)
    assert rest.num_rows == (n - dropped) // 20
    assert rest.column("ts")[0].as_py().timestamp() >= cut


def test_awkward_strings_round_trip(store: TimeSeriesStore) -> None:
    """CSV COPY (PostgreSQL) and dictionary columns (Lance) keep every string intact."""
    values = ["a,b", 'say "hi"', "two\nlines", "", "NULL", "\\N", "ünïcode"]
    recs: list[Record] = [
        ("dev,1", "state", v, T0 + i, 0, "", 'g"1', ",x=a b,") for i, v in enumerate(values)
    ]
    assert store.write_records(recs) == len(values)
    table = store.read_raw(Selector.of(devices="dev,1"), 0, 2e9)
    assert table.column("value_str").to_pylist() == values
    assert set(table.column("site").to_pylist()) == {""}
    assert set(table.column("grp").to_pylist()) == {'g"1'}
    part = store.aggregate("raw", Selector.of(devices="dev,1"), T0, T0 + 100, 100.0)
    assert part.column("first_str").to_pylist() == ["a,b"]
    assert part.column("last_str").to_pylist() == ["ünïcode"]
    store.replace_partials("agg_100s", Selector.of(devices="dev,1"), T0, T0 + 100, part)
    again = store.aggregate("agg_100s", Selector.of(devices="dev,1"), T0, T0 + 100, 100.0)
    assert again.column("first_str").to_pylist() == ["a,b"]
    assert again.column("site").to_pylist() == [""]
