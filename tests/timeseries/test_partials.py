"""The numpy bucketing in ``partials.py`` equals DataFusion's GROUP BY on the same rows."""

from __future__ import annotations

import math
import random
from pathlib import Path

import pyarrow as pa

from twin.timeseries.base import PARTIAL_SCHEMA, Record, Selector
from twin.timeseries.lance import VALUE_SQL, LanceStore

T0 = 1_700_000_000.0

SQL_RAW = (
    "SELECT date_bin(INTERVAL '{ms} milliseconds', ts, TIMESTAMP '1970-01-01T00:00:00Z') AS ts, "
    'device, site, grp, tags, metric, count(*) AS "count", sum(value) AS "sum", '
    'min(value) AS "min", max(value) AS "max", first_value(value ORDER BY ts) AS "first", '
    'last_value(value ORDER BY ts) AS "last", first_value(value_str ORDER BY ts) AS first_str, '
    "last_value(value_str ORDER BY ts) AS last_str, min(ts) AS first_ts, max(ts) AS last_ts "
    "FROM (SELECT ts, device, site, grp, tags, metric, value_str, quality, "
    f"{VALUE_SQL} AS value FROM dataset) "
    "WHERE quality < 2 GROUP BY 1, device, site, grp, tags, metric"
)


def _rows(table: pa.Table) -> list[tuple[object, ...]]:
    out = []
    for r in table.select(PARTIAL_SCHEMA.names).cast(PARTIAL_SCHEMA).to_pylist():
        out.append(
            tuple(
                round(v, 9) if isinstance(v, float) and not math.isnan(v) else v for v in r.values()
            )
        )
    return sorted(out, key=repr)


def test_numpy_partials_match_sql(tmp_path: Path) -> None:
    rng = random.Random(5)
    store = LanceStore(tmp_path / "ts", min_free_bytes=0)
    recs: list[Record] = []
    for i in range(3000):
        dev = f"d{rng.randrange(7)}"
        metric = rng.choice(["temperature", "state", "on"])
        value: float | str | bool = (
            round(rng.uniform(-5, 40), rng.choice([1, 2, 12]))  # decimal layout or not
            if metric == "temperature"
            else rng.choice(["idle", "run", "stop"])
            if metric == "state"
            else rng.random() < 0.5
        )
        tags = rng.choice([",", ",hvac,", ",critical,hvac,"])
        recs.append((dev, metric, value, T0 + i * 7.3, rng.choice([0, 0, 0, 1, 2]), "s", "g", tags))
    for k in range(0, len(recs), 700):  # several fragments, in no particular order
        store.write_records(recs[k : k + 700])
    for bucket in (60.0, 3600.0):
        ours = store.aggregate("raw", Selector(), T0, T0 + 3000 * 7.3, bucket)
        sql = store._sql("raw", SQL_RAW.format(ms=int(bucket * 1000)))
        assert sql is not None
        assert _rows(ours) == _rows(sql)
    # rolling partials up: 1m partials combined into 1h equal 1h straight from raw
    minute = store.aggregate("raw", Selector(), T0, T0 + 3000 * 7.3, 60.0)
    store.replace_partials("agg_60s", Selector(), 0, 2e9, minute)
    hourly = store.aggregate("agg_60s", Selector(), 0, 2e9, 3600.0)
    assert _rows(hourly) == _rows(store.aggregate("raw", Selector(), T0, T0 + 3000 * 7.3, 3600.0))
