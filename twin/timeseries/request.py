"""One query request shape shared by the API and the CLI.

``QueryRequest`` holds what a user types (``--from -1d --every 1m``, ``?from=-1d&every=1m``)
and runs it against a store: a plain query, ``compare`` (this range vs ``compare`` earlier)
or ``trend``. Times are ISO 8601, epoch seconds, ``now`` or relative to now (``-1d``,
``-90m``, ``now-2h``).
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import pyarrow as pa

from twin.timeseries.base import Agg, Fill, Selector, TimeSeriesQuery, TimeSeriesStore, to_epoch

FORMATS = ("json", "csv", "parquet", "xlsx")
MEDIA_TYPES = {
    "json": "application/json",
    "csv": "text/csv",
    "parquet": "application/vnd.apache.parquet",
    "xlsx": "application/vnd.openxmlformats-officedocument.spreadsheetml.sheet",
}


def parse_time(text: str | float | int | None, now: float | None = None) -> float:
    """``-1d`` / ``now-1d`` / ``now`` / ISO / epoch seconds → epoch seconds."""
    from twin.spec.units import parse_duration

    now = time.time() if now is None else now
    if text is None or text == "" or text == "now":
        return now
    if isinstance(text, int | float):
        return float(text)
    t = text.strip()
    rel = t[3:] if t.startswith("now") else t
    if rel.startswith(("-", "+")) and len(rel) > 1 and not rel[1:].replace(".", "").isdigit():
        sign = -1.0 if rel[0] == "-" else 1.0
        return now + sign * parse_duration(rel[1:].strip())
    try:
        return float(t)
    except ValueError:
        pass
    try:
        return to_epoch(datetime.fromisoformat(t.replace("Z", "+00:00")))
    except ValueError:
        raise ValueError(
            f"{text!r} is not a time: use ISO 8601, epoch seconds, now, or -1d / now-2h"
        ) from None


def _tuple(v: str | Sequence[str] | None) -> tuple[str, ...]:
    if v is None:
        return ()
    if isinstance(v, str):
        return tuple(x for x in v.split(",") if x)
    return tuple(x for item in v for x in item.split(",") if x)


@dataclass
class QueryRequest:
    metrics: tuple[str, ...] = ()
    devices: tuple[str, ...] = ()
    sites: tuple[str, ...] = ()
    groups: tuple[str, ...] = ()
    tags: tuple[str, ...] = ()
    start: str | float | None = "-1h"
    end: str | float | None = None
    every: str | None = None
    aggregates: tuple[str, ...] = ("avg",)
    fill: str = "none"
    group_by: str = "device"
    tier: str | None = None
    limit: int | None = None
    compare: str | None = None
    trend: bool = False
    now: float | None = field(default=None, repr=False)

    @classmethod
    def build(cls, **kw: Any) -> QueryRequest:
        """From loose inputs (lists, comma-separated strings); ValueError on bad values."""
        for key in ("metrics", "devices", "sites", "groups", "tags", "aggregates"):
            if key in kw:
                kw[key] = _tuple(kw[key])
        if not kw.get("aggregates"):
            kw.pop("aggregates", None)
        req = cls(**kw)
        req.validate()
        return req

    def validate(self) -> None:
        for a in self.aggregates:
            Agg(a)  # ValueError: 'x' is not a valid Agg
        Fill(self.fill)
        if self.group_by not in ("device", "site", "group", "metric", "none") and not (
            self.group_by.startswith("tag:") and len(self.group_by) > 4
        ):
            raise ValueError(
                f"group_by {self.group_by!r}: use device, site, group, metric, none or tag:KEY"
            )
        s, e = self.range()
        if not s < e:
            raise ValueError("the range is empty: 'from' must be before 'to'")
        if self.compare is not None and self.every is None:
            raise ValueError("compare needs 'every' (a bucket size)")
        if self.every is not None:
            self.query().bucket_s  # noqa: B018 - validates the bucket

    def range(self) -> tuple[float, float]:
        now = time.time() if self.now is None else self.now
        self.now = now
        return parse_time(self.start, now), parse_time(self.end, now)

    def selector(self) -> Selector:
        return Selector(self.devices, self.sites, self.groups, self.tags, self.metrics)

    def query(self) -> TimeSeriesQuery:
        start, end = self.range()
        return TimeSeriesQuery(
            start,
            end,
            self.selector(),
            bucket=self.every,
            aggregates=self.aggregates,
            fill=self.fill,
            group_by=self.group_by,
            tier=self.tier,
            limit=self.limit,
        )

    def run(self, store: TimeSeriesStore) -> pa.Table:
        from twin.timeseries.query import compare, trend

        q = self.query()
        if self.compare:
            return compare(store, q, self.compare)
        if self.trend:
            return trend(store, q)
        return store.query(q)


def table_json(table: pa.Table) -> dict[str, Any]:
    """``{"columns": [...], "rows": [[...]...]}`` with ISO times and NaN as null."""
    cols = table.column_names
    rows: list[list[Any]] = []
    for rec in table.to_pylist():
        row = []
        for c in cols:
            v = rec[c]
            if isinstance(v, datetime):
                v = v.isoformat().replace("+00:00", "Z")
            elif isinstance(v, float) and not math.isfinite(v):
                v = None
            row.append(v)
        rows.append(row)
    return {"columns": cols, "rows": rows, "count": len(rows)}


def render(table: pa.Table, fmt: str) -> bytes:
    """``json``, ``csv``, ``parquet`` or ``xlsx`` bytes."""
    import json

    from twin.timeseries.query import export

    if fmt == "json":
        return json.dumps(table_json(table)).encode()
    data = export(table, fmt)
    assert data is not None
    return data
