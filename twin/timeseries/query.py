"""Query execution shared by every store: tier choice, partial roll-up, aggregates, fill;
range comparison, trend, and export to CSV / Parquet / XLSX.

Stores supply building blocks (``read_raw``, ``aggregate``); this module turns
``TimeSeriesQuery`` into a result table. Results are ``pyarrow.Table`` with columns
``ts`` (bucket start, UTC), the group key(s), ``metric`` and one column per aggregate.
"""

from __future__ import annotations

import io
import json
import math
from collections.abc import Sequence
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from twin.timeseries.base import (
    PARTIAL_SCHEMA,
    RAW,
    TS_TYPE,
    Agg,
    Fill,
    Selector,
    TimeSeriesQuery,
    tag_value,
    tier_name,
)

if TYPE_CHECKING:
    from twin.timeseries.base import TimeSeriesStore

TIERS_META = "tiers"
"""Meta key: JSON ``{tier_name: {"resolution": s, "keep": s or null}}``."""


def watermark_key(tier: str) -> str:
    return f"wm:{tier}"


def tier_catalog(store: TimeSeriesStore) -> dict[str, dict[str, Any]]:
    raw = store.get_meta(TIERS_META)
    return json.loads(raw) if raw else {}


def covers(policy: Selector, query: Selector) -> bool:
    """True when every series the query can select is also selected by the policy."""
    for p, q in (
        (policy.devices, query.devices),
        (policy.sites, query.sites),
        (policy.groups, query.groups),
        (policy.metrics, query.metrics),
    ):
        if p and (not q or not set(q) <= set(p)):
            return False
    return set(policy.tags) <= set(query.tags)


def choose_tier(
    store: TimeSeriesStore, selector: Selector, start: float, bucket: float
) -> tuple[str, float | None]:
    """The coarsest tier whose resolution divides ``bucket``, whose policies cover the
    selector and that has rolled up anything.

    Returns ``(tier, watermark)``: the tier is complete before the watermark; after it the
    query reads raw data. ``("raw", None)`` when no tier fits.
    """
    best: tuple[float, str, float] | None = None
    for name, info in tier_catalog(store).items():
        res = float(info["resolution"])
        if res > bucket or abs(bucket / res - round(bucket / res)) > 1e-9:
            continue
        wms = [
            p["wm"]
            for p in info.get("policies", [])
            if p.get("wm") is not None
            and covers(Selector(**{k: tuple(v) for k, v in p["selector"].items()}), selector)
        ]
        if not wms:
            continue
        wm = min(wms)
        if wm <= start:
            continue  # nothing of the range is rolled up yet
        if best is None or res > best[0]:
            best = (res, name, wm)
    if best is None:
        return RAW, None
    return best[1], best[2]


def run_query(store: TimeSeriesStore, q: TimeSeriesQuery) -> pa.Table:
    start, end = q.start_s, q.end_s
    bucket = q.bucket_s
    if bucket is None:
        table = store.read_raw(q.selector, start, end, q.limit)
        return table.rename_columns(["group" if c == "grp" else c for c in table.column_names])
    if q.tier is not None:
        tier = q.tier if q.tier == RAW or q.tier.startswith("agg_") else _tier_of(q.tier)
        parts = [store.aggregate(tier, q.selector, start, end, bucket)]
    else:
        tier, wm = choose_tier(store, q.selector, start, bucket)
        if tier == RAW or wm is None:
            parts = [store.aggregate(RAW, q.selector, start, end, bucket)]
        else:
            parts = []
            if start < wm:
                parts.append(store.aggregate(tier, q.selector, start, min(end, wm), bucket))
            if end > wm:
                parts.append(store.aggregate(RAW, q.selector, max(start, wm), end, bucket))
    partials = pa.concat_tables([p.select(PARTIAL_SCHEMA.names) for p in parts])
    keys = group_keys(q.group_by)
    partials = _add_tag_column(partials, q.group_by)
    merged = combine_partials(partials, ["ts", *keys])
    result = finalize(merged, keys, [Agg(a) for a in q.aggregates])
    result = apply_fill(result, keys, start, end, bucket, Fill(q.fill))
    if q.limit is not None:
        result = result.slice(0, q.limit)
    return result


def _tier_of(resolution: str) -> str:
    from twin.spec.units import parse_duration

    return tier_name(parse_duration(resolution))


def group_keys(group_by: str) -> list[str]:
    if group_by == "device":
        return ["device", "metric"]
    if group_by in ("site", "grp"):
        return ["site", "metric"] if group_by == "site" else ["grp", "metric"]
    if group_by == "group":
        return ["grp", "metric"]
    if group_by in ("metric", "none", ""):
        return ["metric"]
    if group_by.startswith("tag:"):
        return [group_by[4:], "metric"]
    raise ValueError(f"group_by {group_by!r}: use device, site, group, metric, none or tag:<key>")


def _add_tag_column(table: pa.Table, group_by: str) -> pa.Table:
    if not group_by.startswith("tag:"):
        return table
    key = group_by[4:]
    tags = table.column("tags").to_pylist()
    cache: dict[str, str | None] = {}
    values = []
    for t in tags:
        if t not in cache:
            cache[t] = tag_value(t, key)
        values.append(cache[t])
    return table.append_column(key, pa.array(values, pa.string()))


def combine_partials(partials: pa.Table, keys: Sequence[str]) -> pa.Table:
    """Merge partials that share ``keys`` (count/sum add, min/max, first/last by time)."""
    if partials.num_rows == 0:
        cols = {k: pa.array([], partials.schema.field(k).type) for k in keys}
        for name in ("count", "sum", "min", "max", "first", "last"):
            cols[name] = pa.array([], pa.int64() if name == "count" else pa.float64())
        cols["first_str"] = pa.array([], pa.string())
        cols["last_str"] = pa.array([], pa.string())
        return pa.table(cols)
    by_first = partials.sort_by([("first_ts", "ascending")])
    grouped = pa.TableGroupBy(by_first, list(keys), use_threads=False).aggregate(
        [
            ("count", "sum"),
            ("sum", "sum"),
            ("min", "min"),
            ("max", "max"),
            ("first", "first"),
            ("first_str", "first"),
        ]
    )
    by_last = partials.sort_by([("last_ts", "ascending")])
    lasts = pa.TableGroupBy(by_last, list(keys), use_threads=False).aggregate(
        [("last", "last"), ("last_str", "last")]
    )
    grouped = grouped.rename_columns(
        [
            {
                "count_sum": "count",
                "sum_sum": "sum",
                "min_min": "min",
                "max_max": "max",
                "first_first": "first",
                "first_str_first": "first_str",
            }.get(c, c)
            for c in grouped.column_names
        ]
    )
    lasts = lasts.rename_columns(
        [{"last_last": "last", "last_str_last": "last_str"}.get(c, c) for c in lasts.column_names]
    )
    joined = grouped.join(lasts, list(keys), join_type="inner")
    return joined.sort_by([(k, "ascending") for k in keys[1:]] + [(keys[0], "ascending")])


def finalize(merged: pa.Table, keys: Sequence[str], aggs: Sequence[Agg]) -> pa.Table:
    cols: dict[str, pa.Array | pa.ChunkedArray] = {"ts": merged.column("ts")}
    cols.update({k: merged.column(k) for k in keys})
    count = merged.column("count")
    strings = merged.column("first_str").null_count < merged.num_rows
    for agg in aggs:
        if agg == Agg.AVG:
            cols["avg"] = pc.divide(merged.column("sum"), pc.cast(count, pa.float64()))
        elif agg == Agg.COUNT:
            cols["count"] = count
        elif agg in (Agg.FIRST, Agg.LAST):
            cols[agg.value] = merged.column(agg.value)
            if strings:
                cols[f"{agg.value}_str"] = merged.column(f"{agg.value}_str")
        else:
            cols[agg.value] = merged.column(agg.value)
    table = pa.table(cols)
    names = ["ts", *keys]
    rest = [c for c in table.column_names if c not in names]
    table = table.select(names + rest)
    return table.sort_by([(k, "ascending") for k in names[1:]] + [("ts", "ascending")])


def apply_fill(
    table: pa.Table, keys: Sequence[str], start: float, end: float, bucket: float, fill: Fill
) -> pa.Table:
    if fill == Fill.NONE or table.num_rows == 0:
        return table
    first = math.floor(start / bucket) * bucket
    grid_ts = np.arange(first, end, bucket)
    grid_us = (np.round(grid_ts * 1e6)).astype("int64")
    group_rows = table.select(list(keys)).group_by(list(keys)).aggregate([])
    n_groups, n_ts = group_rows.num_rows, len(grid_us)
    grid_cols = {
        k: pc.take(group_rows.column(k), np.repeat(np.arange(n_groups), n_ts)) for k in keys
    }
    grid_cols["ts"] = pa.array(np.tile(grid_us, n_groups), TS_TYPE)
    grid = pa.table(grid_cols)
    full = grid.join(table, ["ts", *keys], join_type="left outer")
    full = full.sort_by([(k, "ascending") for k in keys] + [("ts", "ascending")])
    full = full.select(table.column_names)
    value_cols = [c for c in table.column_names if c not in ("ts", *keys)]
    out = {c: full.column(c) for c in full.column_names}
    for c in value_cols:
        col = full.column(c)
        if not (pa.types.is_floating(col.type) or pa.types.is_integer(col.type)):
            continue
        if fill == Fill.ZERO or (c == "count" and fill != Fill.NULL):
            out[c] = pc.fill_null(col, pa.scalar(0, col.type))
            continue
        if fill == Fill.NULL:
            continue
        arr = col.to_numpy(zero_copy_only=False).astype("float64")
        for g in range(n_groups):
            seg = arr[g * n_ts : (g + 1) * n_ts]
            _fill_segment(seg, grid_ts, fill)
        out[c] = pa.array(arr, pa.float64(), from_pandas=True)
    return pa.table(out)


def _fill_segment(seg: np.ndarray, x: np.ndarray, fill: Fill) -> None:
    mask = np.isnan(seg)
    if not mask.any() or mask.all():
        return
    if fill == Fill.PREVIOUS:
        idx = np.where(~mask, np.arange(len(seg)), 0)
        np.maximum.accumulate(idx, out=idx)
        filled = seg[idx]
        filled[: np.argmax(~mask)] = np.nan  # nothing before the first value
        seg[:] = filled
    elif fill == Fill.LINEAR:
        good = ~mask
        inside = (x >= x[good][0]) & (x <= x[good][-1])
        seg[mask & inside] = np.interp(x[mask & inside], x[good], seg[good])


# --- comparison and trend ----------------------------------------------------------------


def compare(store: TimeSeriesStore, q: TimeSeriesQuery, offset: float | str) -> pa.Table:
    """This range vs the same range ``offset`` earlier (e.g. ``"7d"``: this week vs last).

    Aligns buckets by position; returns key columns, ``ts`` (current bucket), and for each
    aggregate ``<agg>``, ``<agg>_previous``, ``<agg>_delta`` and ``<agg>_pct``.
    """
    from dataclasses import replace

    from twin.spec.units import parse_duration

    off = parse_duration(offset)
    if q.bucket is None:
        raise ValueError("compare needs a bucket (use the range length for one total)")
    current = run_query(store, q)
    prev_q = replace(q, start=q.start_s - off, end=q.end_s - off)
    previous = run_query(store, prev_q)
    shifted = previous.set_column(
        previous.column_names.index("ts"),
        "ts",
        pc.add(previous.column("ts"), pa.scalar(timedelta(seconds=off), pa.duration("us"))).cast(
            TS_TYPE
        ),
    )
    keys = [c for c in current.column_names if c in ("ts", "device", "site", "grp", "metric")]
    keys += [c for c in group_keys(q.group_by) if c not in keys]
    aggs = [c for c in current.column_names if c not in keys]
    prev_renamed = shifted.select(keys + aggs).rename_columns(
        keys + [f"{a}_previous" for a in aggs]
    )
    joined = current.join(prev_renamed, keys, join_type="full outer")
    for a in aggs:
        cur, prev = joined.column(a), joined.column(f"{a}_previous")
        if not pa.types.is_floating(cur.type) and not pa.types.is_integer(cur.type):
            continue
        delta = pc.subtract(pc.cast(cur, pa.float64()), pc.cast(prev, pa.float64()))
        joined = joined.append_column(f"{a}_delta", delta)
        pct = pc.multiply(pc.divide(delta, pc.abs(pc.cast(prev, pa.float64()))), 100.0)
        joined = joined.append_column(f"{a}_pct", pct)
    return joined.sort_by([(k, "ascending") for k in keys if k != "ts"] + [("ts", "ascending")])


def trend(store: TimeSeriesStore, q: TimeSeriesQuery) -> pa.Table:
    """Least-squares slope per series over the range, in units per second and per hour.

    Uses raw points, or bucket averages when ``q.bucket`` is set (cheaper over long ranges).
    """
    if q.bucket is None:
        data = run_query(store, q)
        key = "device" if q.group_by == "device" else None
        value_col = "value"
    else:
        data = run_query(store, q)
        key = group_keys(q.group_by)[0] if group_keys(q.group_by)[0] != "metric" else None
        value_col = "avg" if "avg" in data.column_names else data.column_names[-1]
    keys = ([key] if key else []) + ["metric"]
    out: dict[str, list[Any]] = {k: [] for k in keys}
    out.update(slope_per_s=[], slope_per_h=[], n=[], start_value=[], end_value=[])
    if data.num_rows == 0:
        return pa.table(
            {k: pa.array(v, pa.float64() if "slope" in k else None) for k, v in out.items()}
        )
    data = data.filter(pc.is_valid(data.column(value_col)))
    groups = data.select(keys).group_by(keys).aggregate([])
    for row in groups.to_pylist():
        mask = None
        for k in keys:
            m = pc.equal(data.column(k), row[k])
            mask = m if mask is None else pc.and_(mask, m)
        part = data.filter(mask)
        x = part.column("ts").cast(pa.int64()).to_numpy().astype("float64") / 1e6
        y = part.column(value_col).to_numpy(zero_copy_only=False).astype("float64")
        slope = float(np.polyfit(x - x[0], y, 1)[0]) if len(x) >= 2 and np.ptp(x) > 0 else math.nan
        for k in keys:
            out[k].append(row[k])
        out["slope_per_s"].append(slope)
        out["slope_per_h"].append(slope * 3600)
        out["n"].append(len(x))
        out["start_value"].append(float(y[0]) if len(y) else math.nan)
        out["end_value"].append(float(y[-1]) if len(y) else math.nan)
    return pa.table(out)


# --- export ------------------------------------------------------------------------------


def export(table: pa.Table, fmt: str, path: str | Path | None = None) -> bytes | None:
    """Write ``table`` as ``csv``, ``parquet`` or ``xlsx``: to ``path``, or return bytes."""
    fmt = fmt.lower()
    if fmt == "csv":
        data = to_csv(table)
    elif fmt == "parquet":
        data = to_parquet(table)
    elif fmt == "xlsx":
        data = to_xlsx(table)
    else:
        raise ValueError(f"unknown export format {fmt!r}: use csv, parquet or xlsx")
    if path is None:
        return data
    Path(path).write_bytes(data)
    return None


def to_csv(table: pa.Table) -> bytes:
    import pyarrow.csv as pcsv

    buf = io.BytesIO()
    pcsv.write_csv(table, buf)
    return buf.getvalue()


def to_parquet(table: pa.Table) -> bytes:
    import pyarrow.parquet as pq

    buf = io.BytesIO()
    pq.write_table(table, buf, compression="zstd")
    return buf.getvalue()


def to_xlsx(table: pa.Table, sheet: str = "timeseries") -> bytes:
    """XLSX via openpyxl (optional dependency, imported here only). Times are written as
    naive UTC datetimes (Excel has no time zones)."""
    try:
        from openpyxl import Workbook
    except ImportError as exc:  # pragma: no cover - depends on the environment
        from twin.errors import StorageError

        raise StorageError(
            "XLSX export needs openpyxl", hint="pip install openpyxl (or export csv/parquet)"
        ) from exc
    wb = Workbook(write_only=True)
    ws = wb.create_sheet(sheet)
    ws.append(table.column_names)
    for row in table.to_pylist():
        ws.append(
            [
                v.replace(tzinfo=None) if hasattr(v, "tzinfo") and v.tzinfo is not None else v
                for v in row.values()
            ]
        )
    buf = io.BytesIO()
    wb.save(buf)
    return buf.getvalue()
