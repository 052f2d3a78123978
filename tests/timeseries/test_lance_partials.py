"""``partials.py`` over what the clustered LanceDB layout hands it: dictionary columns
(one dictionary per batch, with repeats), single-valued columns, rows in cluster order."""

from __future__ import annotations

import random
from pathlib import Path

import pyarrow as pa

from tests.timeseries.test_partials import SQL_RAW, _rows
from twin.timeseries import partials
from twin.timeseries.base import Record, Selector, records_to_table
from twin.timeseries.lance import LanceStore

T0 = 1_700_000_000.0


def test_dictionary_columns_with_repeated_values_group_like_strings() -> None:
    recs: list[Record] = [
        (f"d{i % 3}", "m", float(i), T0 + i, 0, f"s{i % 2}", "g", ",x,") for i in range(60)
    ]
    plain = records_to_table(recs)
    # two chunks whose dictionaries both hold every site, in different orders, plus a
    # dictionary that repeats a value
    a, b = plain.slice(0, 30), plain.slice(30)

    def dict_col(t: pa.Table, order: list[str]) -> pa.Array:
        idx = [order.index(v) for v in t.column("site").to_pylist()]
        return pa.DictionaryArray.from_arrays(pa.array(idx, pa.int32()), pa.array(order))

    site = pa.chunked_array([dict_col(a, ["s1", "s0"]), dict_col(b, ["s0", "s1", "s0"])])
    as_dict = plain.set_column(plain.schema.get_field_index("site"), "site", site)
    want = partials.raw_partials(plain, 10.0)
    got = partials.raw_partials(as_dict, 10.0)
    assert _rows(got) == _rows(want)
    assert got.num_rows == 6 * 6  # 6 series (3 devices x 2 sites) x 6 buckets


def test_partials_match_sql_after_clustering(tmp_path: Path) -> None:
    rng = random.Random(11)
    # the row layout's clustering is compared with SQL over the row table: no chunks
    store = LanceStore(
        tmp_path / "ts", min_free_bytes=0, compact_every=1000, cluster_run=3, chunk_seconds=None
    )
    recs: list[Record] = []
    for i in range(4000):
        dev = f"d{rng.randrange(9)}"
        site = "north" if dev < "d5" else "south"
        value: float | str = (
            round(rng.uniform(0, 9), rng.choice([1, 2, 9])) if rng.random() < 0.9 else "x"
        )
        recs.append(
            (
                dev,
                rng.choice(["t", "h"]),
                value,
                T0 + i * 3.1,
                rng.choice([0, 0, 2]),
                site,
                "g",
                rng.choice([",", ",a,"]),
            )
        )
    for k in range(0, len(recs), 500):
        store.write_records(recs[k : k + 500])
    store.maintain(force=True)  # clustered, dictionaries cleaned
    for bucket in (60.0, 900.0):
        ours = store.aggregate("raw", Selector(), T0, T0 + 4000 * 3.1, bucket)
        sql = store._sql("raw", SQL_RAW.format(ms=int(bucket * 1000)))
        assert sql is not None
        assert _rows(ours) == _rows(sql)


def test_windowed_aggregate_equals_one_pass(tmp_path: Path) -> None:
    rng = random.Random(3)
    store = LanceStore(tmp_path / "ts", min_free_bytes=0)
    recs: list[Record] = [
        (f"d{rng.randrange(4)}", "t", round(rng.uniform(0, 9), 2), T0 + i * 13.7, 0, "s", "g", ",")
        for i in range(3000)
    ]
    store.write_records(recs)
    start, end = T0 + 100.0, T0 + 3000 * 13.7 - 100.0  # not on bucket boundaries
    for tier, bucket in (("raw", 60.0), ("raw", 3600.0), ("agg_60s", 600.0)):
        if tier != "raw":
            store.replace_partials(
                tier, Selector(), 0, 2e9, store.aggregate("raw", Selector(), 0, 2e9, 60.0)
            )
        store.aggregate_rows = 10**9
        whole = store.aggregate(tier, Selector(), start, end, bucket)
        store.aggregate_rows = 250  # 3000 rows in ~12 windows
        windowed = store.aggregate(tier, Selector(), start, end, bucket)
        assert _rows(windowed) == _rows(whole)
        # one row per (bucket, series): no bucket was split between two windows
        keys = list(
            zip(
                windowed.column("ts").to_pylist(),
                windowed.column("device").to_pylist(),
                strict=True,
            )
        )
        assert len(keys) == len(set(keys))
