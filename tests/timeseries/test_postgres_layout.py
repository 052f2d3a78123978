"""PostgreSQL store, layout 2: series catalogue + narrow points, SQL-free partials that match
the numpy reference, the in-server rollup, whole-partition retention, and the migration of
layout-1 tables (real server; skipped when unreachable)."""

from __future__ import annotations

import math
import random
import uuid
from collections.abc import Iterator
from typing import Any

import pyarrow as pa
import pytest

from tests.timeseries.conftest import PG_URL, T0, pg_reason
from twin.errors import StorageError
from twin.timeseries import partials
from twin.timeseries.base import PARTIAL_SCHEMA, Record, Selector, TimeSeriesQuery

pytestmark = pytest.mark.postgres


@pytest.fixture
def prefix() -> Iterator[str]:
    reason = pg_reason()
    if reason:
        pytest.skip(reason)
    p = f"t{uuid.uuid4().hex[:10]}_"
    yield p
    import psycopg

    with psycopg.connect(PG_URL, autocommit=True) as conn:
        rows = conn.execute(
            "SELECT tablename FROM pg_tables WHERE schemaname = current_schema() "
            "AND tablename LIKE %s",
            [p.replace("_", r"\_") + "%"],
        ).fetchall()
        for (name,) in rows:
            conn.execute(f"DROP TABLE IF EXISTS {name} CASCADE")


def _store(prefix: str, **kw: Any) -> Any:
    from twin.timeseries.postgres import PostgresStore

    return PostgresStore(PG_URL, prefix=prefix, **kw)


def _mixed(n_minutes: int = 180, seed: int = 1) -> list[Record]:
    """Numbers, bools, strings, bad and uncertain points, several series, duplicate times."""
    rng = random.Random(seed)
    recs: list[Record] = []
    for m in range(n_minutes):
        for d in range(3):
            ts = T0 + m * 60 + rng.choice([0.0, 7.5, 31.25, 59.999])
            q = rng.choice([0, 0, 0, 1, 2])
            recs.append(
                (f"d{d}", "temp", round(rng.uniform(-5, 30), 2), ts, q, "s1", "g", ",hvac,")
            )
            recs.append((f"d{d}", "on", rng.random() < 0.5, ts, 0, "s1", "g", ","))
            if m % 7 == 0:
                recs.append(
                    (f"d{d}", "state", rng.choice(["run", "idle", ""]), ts, 0, "s1", "g", ",")
                )
        if m % 11 == 0:  # a second point of d0/temp in the same minute (exact ties between
            # two points of one series have no defined first/last, so not at the same time)
            recs.append(("d0", "temp", 99.0, T0 + m * 60 + 1.5, 0, "s1", "g", ",hvac,"))
    return recs


def _canon(table: pa.Table) -> list[dict[str, Any]]:
    rows = table.select(PARTIAL_SCHEMA.names).to_pylist()
    for r in rows:
        for k, v in r.items():
            if isinstance(v, float) and math.isnan(v):
                r[k] = None
            elif isinstance(v, float):
                r[k] = round(v, 9)
    key = ("device", "metric", "site", "grp", "tags", "ts")
    return sorted(rows, key=lambda r: tuple(str(r[k]) for k in key))


def test_points_are_narrow_and_series_are_catalogued(prefix: str) -> None:
    s = _store(prefix)
    try:
        recs = _mixed(30)
        assert s.write_records(recs) == len(recs)
        cols = {
            r[0]
            for r in s._exec(
                "SELECT column_name FROM information_schema.columns WHERE table_name = %s",
                [f"{prefix}points"],
            )
        }
        assert cols == {"ts", "value", "series_id", "kind", "quality", "value_str"}
        n_series = s._exec(f"SELECT count(*) FROM {prefix}series")[0][0]
        assert n_series == len({(r[0], r[1], r[5], r[6], r[7]) for r in recs})
        assert s.get_meta("layout") == "2"
    finally:
        s.close()
    # a second store (cold cache) reuses the ids and sees everything
    s2 = _store(prefix)
    try:
        s2.write_records([("d0", "temp", 1.0, T0 + 99_999, 0, "s1", "g", ",hvac,")])
        assert s2._exec(f"SELECT count(*) FROM {prefix}series")[0][0] == n_series
        assert s2.read_raw(Selector(), 0, 4e9).num_rows == len(recs) + 1
    finally:
        s2.close()


@pytest.mark.parametrize("bucket", [60.0, 300.0, 3600.0, 7.0])
def test_partials_match_the_numpy_reference(prefix: str, bucket: float) -> None:
    s = _store(prefix)
    try:
        s.write_records(_mixed())
        start, end = T0 + 123, T0 + 170 * 60
        raw = s.read_raw(Selector(), start, end)
        good = raw.filter(pa.compute.less(raw.column("quality"), 2))
        expected = partials.raw_partials(good, bucket)
        got = s.aggregate("raw", Selector(), start, end, bucket)
        assert got.schema == PARTIAL_SCHEMA
        assert _canon(got) == _canon(expected)
        # compacted: closed partitions become series chunks (issue 19), same partials
        assert s._exec(f"SELECT count(*) FROM {prefix}chunks")[0][0] == 0
        s.reclaim()
        assert s._exec(f"SELECT count(*) FROM {prefix}points")[0][0] == 0
        assert s._exec(f"SELECT count(*) FROM {prefix}chunks")[0][0] > 0
        assert _canon(s.aggregate("raw", Selector(), start, end, bucket)) == _canon(expected)
        assert s.read_raw(Selector(), 0, 4e9).num_rows == len(_mixed())
        # a tier rolled up again matches partials.combine of the finer tier
        s.replace_partials(
            "agg_60s",
            Selector(),
            T0,
            T0 + 4 * 3600,
            s.aggregate("raw", Selector(), T0, T0 + 4 * 3600, 60),
        )
        fine = s.aggregate("agg_60s", Selector(), T0, T0 + 4 * 3600, 60)
        assert _canon(s.aggregate("agg_60s", Selector(), T0, T0 + 4 * 3600, 1800)) == _canon(
            partials.combine(fine, 1800)
        )
    finally:
        s.close()


def test_rollup_in_the_server_equals_aggregate_then_replace(prefix: str) -> None:
    s = _store(prefix)
    w0 = math.floor(T0 / 3600) * 3600  # windows aligned to the tiers, as retention does
    try:
        s.write_records(_mixed())
        sel = Selector.of(metrics=["temp", "state"])
        rows = s.aggregate("raw", sel, w0, w0 + 7200, 60)
        s.replace_partials("agg_60s", sel, w0, w0 + 7200, rows)
        via_python = _canon(s.aggregate("agg_60s", Selector(), 0, 4e9, 60))
        # a table that is not the one aggregate() returned (rows reversed, a new object)
        # takes the other path: series looked up from the text columns, rows re-sorted
        copy = pa.Table.from_pylist(rows.to_pylist()[::-1], schema=PARTIAL_SCHEMA)
        s.replace_partials("agg_60s", sel, w0, w0 + 7200, copy)
        assert _canon(s.aggregate("agg_60s", Selector(), 0, 4e9, 60)) == via_python
        assert s.rollup("raw", "agg_60s", sel, w0, w0 + 7200, 60) == len(via_python)
        assert _canon(s.aggregate("agg_60s", Selector(), 0, 4e9, 60)) == via_python
        # idempotent, and a second tier from the first
        s.rollup("raw", "agg_60s", sel, w0, w0 + 7200, 60)
        assert _canon(s.aggregate("agg_60s", Selector(), 0, 4e9, 60)) == via_python
        n = s.rollup("agg_60s", "agg_3600s", sel, w0, w0 + 3600, 3600)
        hours = s.aggregate("agg_3600s", Selector(), 0, 4e9, 3600)
        assert hours.num_rows == n == 6  # d0..d2 x temp, state
        assert sum(hours.column("count").to_pylist()) == sum(
            r["count"] for r in via_python if r["ts"].timestamp() < w0 + 3600
        )
        # a selector only replaces its own series
        s.rollup("raw", "agg_60s", Selector.of(metrics="state"), w0, w0 + 7200, 60)
        assert _canon(s.aggregate("agg_60s", Selector(), 0, 4e9, 60)) == via_python
        # nothing to read: the window is emptied
        assert s.rollup("raw", "agg_60s", sel, w0 - 7200, w0, 60) == 0
        assert s.rollup("raw", "agg_60s", sel, w0, w0 + 3600, 60) > 0
        s.delete_before("raw", Selector(), w0 + 3600)
        assert s.rollup("raw", "agg_60s", sel, w0, w0 + 3600, 60) == 0
        assert s.aggregate("agg_60s", Selector(), w0, w0 + 3600, 60).num_rows == 0
    finally:
        s.close()


def test_retention_drops_whole_partitions_and_cuts_the_rest(prefix: str) -> None:
    # the row partitions' own retention (closed partitions stay rows: no chunks)
    s = _store(prefix, partition_hours=1, chunks=False)
    try:
        day0 = math.floor(T0 / 3600) * 3600
        recs: list[Record] = [
            ("d", "m", float(i), day0 + i * 60, 0, "", "", ",") for i in range(5 * 60)
        ]
        s.write_records(recs)
        assert len(s._list_partitions()) == 5
        cut = day0 + 2 * 3600 + 30 * 60  # 2 whole partitions and half of the third
        assert s.delete_before("raw", Selector(), cut) == 150
        assert len(s._list_partitions()) == 3
        s.reclaim()
        left = s.read_raw(Selector(), 0, 4e9)
        assert left.num_rows == 150
        assert left.column("ts")[0].as_py().timestamp() == cut
        # with a selector: other series keep their points; an expired partition the
        # delete emptied is dropped, one that still holds other series is only cut
        parts = s._list_partitions()
        s.write_records([("other", "m", 1.0, day0 + 3 * 3600, 0, "", "", ",")])
        assert s.delete_before("raw", Selector.of(devices="d"), day0 + 4 * 3600) == 90
        assert s.read_raw(Selector.of(devices="other"), 0, 4e9).num_rows == 1
        assert s._list_partitions() == parts[1:]
        assert s._dirty == {parts[1]}  # only what lost rows is rewritten by reclaim()
        s.reclaim()
        assert s.read_raw(Selector(), 0, 4e9).num_rows == 61
    finally:
        s.close()


def test_a_failed_batch_writes_nothing(prefix: str) -> None:
    s = _store(prefix)
    try:
        s.write_records([("d", "m", 1.0, T0, 0, "", "", ",")])
        bad: list[Record] = [
            ("d", "m", 2.0, T0 + 1, 0, "", "", ","),
            ("d", "m", "x\x00y", T0 + 2, 0, "", "", ","),  # NUL: PostgreSQL refuses it
        ]
        with pytest.raises(StorageError):
            s.write_records(bad)
        assert s.read_raw(Selector(), 0, 4e9).num_rows == 1
        assert s.write_records([("d", "m", 3.0, T0 + 3, 0, "", "", ",")]) == 1
    finally:
        s.close()


# --- migration from layout 1 ---------------------------------------------------------------

_V1_RAW = """(ts timestamptz NOT NULL, device text NOT NULL, site text NOT NULL,
    grp text NOT NULL, tags text NOT NULL, metric text NOT NULL,
    value double precision, value_str text, kind smallint NOT NULL,
    quality smallint NOT NULL)"""
_V1_PARTIAL = """(ts timestamptz NOT NULL, device text NOT NULL, site text NOT NULL,
    grp text NOT NULL, tags text NOT NULL, metric text NOT NULL, count bigint NOT NULL,
    sum double precision, min double precision, max double precision,
    first double precision, last double precision, first_str text, last_str text,
    first_ts timestamptz, last_ts timestamptz)"""


def _make_v1(prefix: str) -> None:
    """Layout-1 tables as the previous PostgresStore created them, with some data."""
    import psycopg

    raw = f"{prefix}raw"
    with psycopg.connect(PG_URL, autocommit=True) as conn:
        conn.execute(f"CREATE TABLE {raw} {_V1_RAW} PARTITION BY RANGE (ts)")
        conn.execute(
            f"CREATE TABLE {raw}_p2023111418 PARTITION OF {raw} FOR VALUES FROM "
            "('2023-11-14 18:00+00') TO ('2023-11-15 00:00+00')"
        )
        conn.execute(
            f"CREATE TABLE {raw}_p2023111500 PARTITION OF {raw} FOR VALUES FROM "
            "('2023-11-15 00:00+00') TO ('2023-11-15 06:00+00')"
        )
        conn.execute(f"CREATE INDEX {raw}_series ON {raw} (device, metric, ts)")
        conn.execute(f"CREATE TABLE {prefix}meta (key text PRIMARY KEY, value text NOT NULL)")
        conn.execute(f"INSERT INTO {prefix}meta VALUES ('wm:p:agg_60s', '1700000000.0')")
        with conn.cursor() as cur:
            cur.executemany(
                f"INSERT INTO {raw} VALUES (to_timestamp(%s), %s, %s, %s, %s, %s, %s, %s, %s, %s)",
                [
                    (T0 + 0.25, "d1", "s", "g", ",hvac,", "temp", 20.5, None, 0, 0),
                    (T0 + 60, "d1", "s", "g", ",hvac,", "temp", 21.5, None, 0, 2),
                    (T0 + 3 * 3600, "d1", "s", "g", ",hvac,", "temp", 22.0, None, 0, 1),
                    (T0 + 5, "d2", "", "", ",", "state", None, "on, really", 2, 0),
                    (T0 + 6, "d2", "", "", ",", "flag", 1.0, None, 1, 0),
                ],
            )
        conn.execute(f"CREATE TABLE {prefix}agg_60s {_V1_PARTIAL}")
        conn.execute(f"CREATE INDEX {prefix}agg_60s_series ON {prefix}agg_60s (device, metric, ts)")
        conn.execute(
            f"INSERT INTO {prefix}agg_60s VALUES (to_timestamp(%s), 'd1', 's', 'g', ',hvac,', "
            "'temp', 1, 20.5, 20.5, 20.5, 20.5, 20.5, NULL, NULL, to_timestamp(%s), "
            "to_timestamp(%s))",
            [T0 - 20, T0 + 0.25, T0 + 0.25],
        )


def test_old_layout_is_refused_with_the_command_to_run(prefix: str) -> None:
    _make_v1(prefix)
    with pytest.raises(StorageError) as err:
        _store(prefix)
    msg = str(err.value)
    assert f"python -m twin.timeseries.postgres migrate <url> --prefix {prefix}" in msg
    assert f"{prefix}raw" in msg and f"{prefix}agg_60s" in msg


def test_migration_keeps_every_point_partial_and_watermark(
    prefix: str, capsys: pytest.CaptureFixture[str]
) -> None:
    from twin.timeseries.postgres import main

    _make_v1(prefix)
    assert main(["migrate", PG_URL, "--prefix", prefix]) == 0
    assert "raw: 5 rows" in capsys.readouterr().out
    s = _store(prefix)  # no error now: the layout is current
    try:
        assert s.get_meta("layout") == "2"
        assert s.get_meta("wm:p:agg_60s") == "1700000000.0"
        assert s.tiers() == ["agg_60s", "raw"]
        assert not s._legacy_tables()
        raw = s.read_raw(Selector(), 0, 4e9).to_pylist()
        assert [(r["device"], r["metric"], r["ts"].timestamp(), r["quality"]) for r in raw] == [
            ("d1", "temp", T0 + 0.25, 0),
            ("d1", "temp", T0 + 60, 2),
            ("d1", "temp", T0 + 3 * 3600, 1),
            ("d2", "flag", T0 + 6, 0),
            ("d2", "state", T0 + 5, 0),
        ]
        assert raw[4]["value_str"] == "on, really" and raw[4]["kind"] == 2
        assert raw[0]["tags"] == ",hvac," and raw[0]["grp"] == "g"
        tier = s.aggregate("agg_60s", Selector(), 0, 4e9, 60).to_pylist()
        assert len(tier) == 1 and tier[0]["sum"] == 20.5
        assert tier[0]["first_ts"].timestamp() == T0 + 0.25
        # new writes land next to the migrated points; queries see both
        s.write_records([("d1", "temp", 23.0, T0 + 120, 0, "s", "g", ",hvac,")])
        q = s.query(TimeSeriesQuery(T0, T0 + 3600, Selector.of(devices="d1"), bucket=3600))
        assert q.column("avg").to_pylist() == [pytest.approx((20.5 + 23.0) / 2)]
    finally:
        s.close()


def test_migrate_flag_converts_on_open(prefix: str) -> None:
    _make_v1(prefix)
    s = _store(prefix, migrate=True)
    try:
        assert s.read_raw(Selector(), 0, 4e9).num_rows == 5
        assert (
            s._exec(
                "SELECT count(*) FROM pg_tables WHERE tablename IN (%s, %s)",
                [f"{prefix}raw", f"{prefix}agg_60s_v1"],
            )[0][0]
            == 0
        )
    finally:
        s.close()
