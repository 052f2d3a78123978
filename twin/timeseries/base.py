"""Time-series model: data points, queries and the ``TimeSeriesStore`` protocol.

Mapping from the runtime
------------------------
A binding produces ``Reading(device, point, value, ts, quality)``; the device spec adds
``site``, ``group``, ``tags`` (a list such as ``[hvac, critical]``) and ``labels``
(``{floor: "2"}``). One reading becomes one stored row::

    ts | device | site | grp | tags | metric | value | value_str | kind | quality

* ``metric`` is the point name (``temperature``). A ``DataPoint`` with several fields
  (Influx style) becomes one row per field, named ``measurement.field``; the field called
  ``value`` keeps the bare measurement name.
* ``tags`` is one canonical string ``",critical,floor=2,hvac,"``: list tags as themselves,
  labels as ``key=value``, sorted, with leading/trailing commas so ``tag=hvac`` is a
  ``LIKE '%,hvac,%'`` on either backend, and group-by-tag parses it.
* numbers and bools go to ``value`` (float64; bools as 0/1 so ``avg`` is a duty cycle),
  strings to ``value_str``; ``kind`` says which (0 number, 1 bool, 2 string).
* ``quality`` is 0 good, 1 uncertain, 2 bad, 3 stale (the last good value re-reported after a
  failed poll; added later, so older data has 0-2 only). Aggregates and downsampling skip bad
  and stale points (``quality < 2``: a stale point repeats an observation already counted, and
  would drag an average towards the frozen value during an outage); raw queries return every
  point with its flag.

Aggregates travel as *partials* (count, sum, min, max, first/last with their times) per
``(bucket, series)``, the shape that downsampling tiers store. Partials combine exactly,
so a query can mix a tier with raw data and roll up to any coarser bucket.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from enum import IntEnum, StrEnum
from itertools import repeat
from operator import is_, itemgetter
from typing import Any, Protocol, runtime_checkable

import numpy as np
import pyarrow as pa

Value = float | int | str | bool


class Quality(IntEnum):
    GOOD = 0
    UNCERTAIN = 1
    BAD = 2
    STALE = 3  # after BAD so that ``quality < 2`` (what aggregates keep) skips it

    @classmethod
    def parse(cls, value: Quality | int | str | None) -> Quality:
        if value is None:
            return cls.GOOD
        if isinstance(value, Quality):
            return value
        if isinstance(value, int):
            return cls(value)
        return cls[value.upper()]


class ValueKind(IntEnum):
    NUMBER = 0
    BOOL = 1
    STRING = 2


class Agg(StrEnum):
    AVG = "avg"
    MIN = "min"
    MAX = "max"
    SUM = "sum"
    COUNT = "count"
    FIRST = "first"
    LAST = "last"


class Fill(StrEnum):
    NONE = "none"  # empty buckets are absent
    NULL = "null"  # empty buckets present with nulls
    ZERO = "zero"
    PREVIOUS = "previous"
    LINEAR = "linear"


TS_TYPE = pa.timestamp("us", tz="UTC")
_ZSTD = {b"lance-encoding:compression": b"zstd"}

RAW_SCHEMA = pa.schema(
    [
        pa.field("ts", TS_TYPE, nullable=False),
        pa.field("device", pa.string(), nullable=False),
        pa.field("site", pa.string(), nullable=False),
        pa.field("grp", pa.string(), nullable=False),
        pa.field("tags", pa.string(), nullable=False),
        pa.field("metric", pa.string(), nullable=False),
        pa.field("value", pa.float64(), metadata=_ZSTD),
        pa.field("value_str", pa.string(), metadata=_ZSTD),
        pa.field("kind", pa.uint8(), nullable=False),
        pa.field("quality", pa.uint8(), nullable=False),
    ]
)
"""One row per point. Batches are sorted by (device, metric, ts) before they are written."""

PARTIAL_SCHEMA = pa.schema(
    [
        pa.field("ts", TS_TYPE, nullable=False),  # bucket start
        pa.field("device", pa.string(), nullable=False),
        pa.field("site", pa.string(), nullable=False),
        pa.field("grp", pa.string(), nullable=False),
        pa.field("tags", pa.string(), nullable=False),
        pa.field("metric", pa.string(), nullable=False),
        pa.field("count", pa.int64(), nullable=False),
        pa.field("sum", pa.float64(), metadata=_ZSTD),
        pa.field("min", pa.float64(), metadata=_ZSTD),
        pa.field("max", pa.float64(), metadata=_ZSTD),
        pa.field("first", pa.float64(), metadata=_ZSTD),
        pa.field("last", pa.float64(), metadata=_ZSTD),
        pa.field("first_str", pa.string()),
        pa.field("last_str", pa.string()),
        pa.field("first_ts", TS_TYPE),
        pa.field("last_ts", TS_TYPE),
    ]
)
"""Aggregate partials per (bucket, series): what downsampling tiers store."""

SERIES_COLUMNS = ("device", "site", "grp", "tags", "metric")

Record = tuple[str, str, Value, float, int, str, str, str]
"""Fast path from the runtime: ``(device, metric, value, ts_epoch_s, quality, site, group,
tags)`` with ``tags`` already canonical (see :func:`canonical_tags`)."""


def canonical_tags(
    tags: Iterable[str] | Mapping[str, str] | None = None,
    labels: Mapping[str, Any] | None = None,
) -> str:
    """``[hvac, critical]`` + ``{floor: 2}`` → ``",critical,floor=2,hvac,"``."""
    items: set[str] = set()
    if isinstance(tags, Mapping):
        items.update(f"{k}={v}" for k, v in tags.items())
    elif tags is not None:
        items.update(str(t) for t in tags)
    if labels:
        items.update(f"{k}={v}" for k, v in labels.items())
    for item in items:
        if "," in item:
            raise ValueError(f"tag {item!r} must not contain a comma")
    return "," + ",".join(sorted(items)) + "," if items else ","


def tag_value(tags: str, key: str) -> str | None:
    """The value of label ``key`` in a canonical tag string, ``""`` for a bare tag, or None."""
    for item in tags.strip(",").split(","):
        if item == key:
            return ""
        if item.startswith(key + "="):
            return item[len(key) + 1 :]
    return None


def to_epoch(ts: datetime | float | int | str) -> float:
    """Seconds since the epoch for a datetime (naive = UTC), number or ISO string."""
    if isinstance(ts, datetime):
        if ts.tzinfo is None:
            ts = ts.replace(tzinfo=UTC)
        return ts.timestamp()
    if isinstance(ts, str):
        return to_epoch(datetime.fromisoformat(ts))
    return float(ts)


def to_datetime(ts: datetime | float | int | str) -> datetime:
    return datetime.fromtimestamp(to_epoch(ts), tz=UTC)


@dataclass(frozen=True)
class DataPoint:
    """One measurement at one time: Influx-style ``measurement``, ``tags``, ``fields``.

    ``tags`` carries ``device``, ``site`` and ``group``; any other tags are stored in the
    canonical tag string (``key=value``, or a bare tag when the value is ``""``).
    """

    measurement: str
    tags: Mapping[str, str]
    fields: Mapping[str, Value]
    timestamp: datetime
    quality: Quality = Quality.GOOD

    def __post_init__(self) -> None:
        if "device" not in self.tags:
            raise ValueError("DataPoint.tags must include 'device'")
        if not self.fields:
            raise ValueError("DataPoint needs at least one field")
        if self.timestamp.tzinfo is None:
            object.__setattr__(self, "timestamp", self.timestamp.replace(tzinfo=UTC))

    @classmethod
    def from_reading(
        cls,
        device: str,
        point: str,
        value: Value,
        ts: datetime | float,
        quality: Quality | int | str | None = Quality.GOOD,
        *,
        site: str = "",
        group: str = "",
        tags: Iterable[str] = (),
        labels: Mapping[str, Any] | None = None,
    ) -> DataPoint:
        all_tags: dict[str, str] = {"device": device, "site": site, "group": group}
        all_tags.update({t: "" for t in tags})
        all_tags.update({k: str(v) for k, v in (labels or {}).items()})
        return cls(point, all_tags, {"value": value}, to_datetime(ts), Quality.parse(quality))

    def records(self) -> list[Record]:
        extra = {k: v for k, v in self.tags.items() if k not in ("device", "site", "group")}
        tag_str = canonical_tags([k if v == "" else f"{k}={v}" for k, v in extra.items()])
        ts = self.timestamp.timestamp()
        out: list[Record] = []
        for name, value in self.fields.items():
            metric = self.measurement if name == "value" else f"{self.measurement}.{name}"
            out.append(
                (
                    self.tags["device"],
                    metric,
                    value,
                    ts,
                    int(self.quality),
                    self.tags.get("site", ""),
                    self.tags.get("group", ""),
                    tag_str,
                )
            )
        return out


TS_MIN = -62_135_596_800.0  # 0001-01-01 UTC
TS_MAX = 253_402_300_799.0  # 9999-12-31 UTC
_SAFE_TYPES = frozenset({float, bool, str, type(None)})
_NUMERIC_TYPES = frozenset({float, int, bool})
_VALUE_OF = itemgetter(2)
_TS_OF = itemgetter(3)


def _storable(record: Record) -> bool:
    v, ts = record[2], record[3]
    if isinstance(ts, bool) or not isinstance(ts, int | float):
        return False
    try:
        if not TS_MIN <= float(ts) <= TS_MAX:  # also False for NaN
            return False
        if isinstance(v, float | int) and not isinstance(v, bool):
            return math.isfinite(float(v))  # OverflowError: an int beyond float64
    except OverflowError:
        return False
    return v is None or isinstance(v, bool | str)


def storable(records: Sequence[Record]) -> Sequence[Record]:
    """``records`` without those no store can hold: a value that is not a finite float64 (an
    int of 400 digits, NaN, ±Inf) or not a number/bool/str, a timestamp that is not finite
    unix seconds in years 1-9999. The ingest edges refuse these first
    (``twin.bindings.values``); this is the inner layers' defence, so one bad record that
    slipped through never fails a whole batch. Vectorised; returns ``records`` itself when all
    are fine (the common case)."""
    n = len(records)
    if not n:
        return records
    try:
        ts = np.fromiter(map(_TS_OF, records), dtype=np.float64, count=n)
        ok = bool(np.all((ts >= TS_MIN) & (ts <= TS_MAX)))
    except (TypeError, ValueError, OverflowError):
        ok = False
    if ok:
        types = set(map(type, map(_VALUE_OF, records)))
        if types <= _NUMERIC_TYPES:  # floats, ints (counters), bools: one C-level pass
            try:
                values = np.fromiter(map(_VALUE_OF, records), dtype=np.float64, count=n)
            except OverflowError:  # an int beyond float64: the per-record pass says which
                values = np.array([np.nan])
            if bool(np.all(np.isfinite(values))):
                return records
        elif types <= _SAFE_TYPES and float not in types:
            return records
    return [r for r in records if _storable(r)]


_RECORD_COLUMNS = [itemgetter(i) for i in range(8)]


def _numeric(values: Sequence[Any], n: int) -> tuple[pa.Array, pa.Array, pa.Array] | None:
    """(value, value_str, kind) columns when every value is a float, int or bool (at C
    speed: no per-value Python bytecode); None when there are strings or None."""
    types = set(map(type, values))
    if not types <= _NUMERIC_TYPES:
        return None
    num = np.fromiter(values, dtype=np.float64, count=n)  # True/False -> 1.0/0.0
    if bool in types:
        kind = np.fromiter(map(is_, map(type, values), repeat(bool)), dtype=bool, count=n)
        kind_arr = pa.array(kind.astype(np.uint8))
    else:
        kind_arr = pa.array(np.zeros(n, dtype=np.uint8))
    return pa.array(num, pa.float64()), pa.nulls(n, pa.string()), kind_arr


def records_to_table(records: Sequence[Record]) -> pa.Table:
    """Columnar RAW_SCHEMA table, sorted by (device, metric, ts).

    Columns are pulled out one at a time with ``map(itemgetter(i), records)``, not
    ``zip(*records)``: the transpose made one tuple iterator per record, all alive until
    it finished — 50,000 tracked objects per batch promoted to the oldest generation,
    which set off a full collection of the whole heap every few batches (profiled: ~45 %
    of the writer thread's time in the realistic ingest benchmark)."""
    if not records:
        return RAW_SCHEMA.empty_table()
    device, metric, values, ts, quality, site, grp, tags = (
        list(map(col, records)) for col in _RECORD_COLUMNS
    )
    n = len(values)
    num_arr: pa.Array
    str_arr: pa.Array
    numeric = _numeric(values, n)
    if numeric is not None:  # the common case: C-speed conversion
        num_arr, str_arr, kind_arr = numeric
    else:
        num: list[float | None] = []
        strs: list[str | None] = []
        kinds: list[int] = []
        for v in values:
            if isinstance(v, bool):
                num.append(1.0 if v else 0.0)
                strs.append(None)
                kinds.append(1)
            elif isinstance(v, int | float):
                num.append(float(v))
                strs.append(None)
                kinds.append(0)
            else:
                num.append(None)
                strs.append(str(v))
                kinds.append(2)
        num_arr = pa.array(num, pa.float64())
        str_arr = pa.array(strs, pa.string())
        kind_arr = pa.array(kinds, pa.uint8())
    micros = np.round(np.asarray(ts, dtype=np.float64) * 1_000_000).astype(np.int64)
    table = pa.Table.from_arrays(
        [
            pa.array(micros, TS_TYPE),
            pa.array(device, pa.string()),
            pa.array(site, pa.string()),
            pa.array(grp, pa.string()),
            pa.array(tags, pa.string()),
            pa.array(metric, pa.string()),
            num_arr,
            str_arr,
            kind_arr,
            pa.array(quality, pa.uint8()),
        ],
        schema=RAW_SCHEMA,
    )
    return table.sort_by([("device", "ascending"), ("metric", "ascending"), ("ts", "ascending")])


@dataclass(frozen=True)
class Selector:
    """Which series: every non-empty field must match (values within a field are OR-ed)."""

    devices: tuple[str, ...] = ()
    sites: tuple[str, ...] = ()
    groups: tuple[str, ...] = ()
    tags: tuple[str, ...] = ()  # "hvac" or "floor=2"; all must be present
    metrics: tuple[str, ...] = ()

    @classmethod
    def of(cls, **kw: str | Iterable[str] | None) -> Selector:
        norm: dict[str, tuple[str, ...]] = {}
        for key, value in kw.items():
            if value is None:
                continue
            norm[key] = (value,) if isinstance(value, str) else tuple(value)
        return cls(**norm)

    def sql(self, quote: Any, *, group_col: str = "grp") -> str:
        """A SQL predicate (``quote`` turns a str into a literal); ``TRUE`` when empty."""
        parts: list[str] = []
        for col, vals in (
            ("device", self.devices),
            ("site", self.sites),
            (group_col, self.groups),
            ("metric", self.metrics),
        ):
            if len(vals) == 1:
                parts.append(f"{col} = {quote(vals[0])}")
            elif vals:
                parts.append(f"{col} IN ({', '.join(quote(v) for v in vals)})")
        for tag in self.tags:
            parts.append(f"tags LIKE {quote('%,' + tag + ',%')}")
        return " AND ".join(parts) if parts else "TRUE"


def sql_quote(value: str) -> str:
    return "'" + value.replace("'", "''") + "'"


@dataclass(frozen=True)
class TimeSeriesQuery:
    """A query over ``[start, end)``.

    Without ``bucket`` it returns raw points (columns of RAW_SCHEMA, ``grp`` named ``group``).
    With ``bucket`` (seconds, or a duration string such as ``"1m"``) it returns one row per
    bucket and group with a column per aggregate. ``group_by`` is ``device`` (default),
    ``site``, ``group``, ``metric`` only, ``tag:<key>`` or ``none``; the metric is always a
    key. ``tier`` forces a tier (``raw`` or a resolution such as ``"1m"``); by default the
    coarsest tier whose resolution divides the bucket and still holds ``start`` is used.
    """

    start: datetime | float
    end: datetime | float
    selector: Selector = field(default_factory=Selector)
    bucket: float | str | None = None
    aggregates: tuple[Agg | str, ...] = (Agg.AVG,)
    fill: Fill | str = Fill.NONE
    group_by: str = "device"
    tier: str | None = None
    limit: int | None = None

    @property
    def start_s(self) -> float:
        return to_epoch(self.start)

    @property
    def end_s(self) -> float:
        return to_epoch(self.end)

    @property
    def bucket_s(self) -> float | None:
        if self.bucket is None:
            return None
        from twin.spec.units import parse_duration

        b = parse_duration(self.bucket)
        if b <= 0 or math.isinf(b):
            raise ValueError(f"bucket {self.bucket!r} must be a positive finite duration")
        return b


@dataclass(frozen=True)
class TierStats:
    tier: str
    rows: int
    points: int
    bytes: int

    @property
    def bytes_per_point(self) -> float:
        return self.bytes / self.points if self.points else 0.0


@dataclass(frozen=True)
class StorageStats:
    tiers: tuple[TierStats, ...]
    free_bytes: int
    total_bytes: int
    disk_nearly_full: bool

    @property
    def points(self) -> int:
        return sum(t.points for t in self.tiers)

    @property
    def bytes(self) -> int:
        return sum(t.bytes for t in self.tiers)

    @property
    def bytes_per_point(self) -> float:
        return self.bytes / self.points if self.points else 0.0

    def as_dict(self) -> dict[str, Any]:
        return {
            "tiers": [
                {
                    "tier": t.tier,
                    "rows": t.rows,
                    "points": t.points,
                    "bytes": t.bytes,
                    "bytes_per_point": round(t.bytes_per_point, 3),
                }
                for t in self.tiers
            ],
            "points": self.points,
            "bytes": self.bytes,
            "bytes_per_point": round(self.bytes_per_point, 3),
            "free_bytes": self.free_bytes,
            "disk_nearly_full": self.disk_nearly_full,
        }


RAW = "raw"


def tier_name(resolution_s: float | None) -> str:
    """``None`` → ``raw``; 60 → ``agg_60s``."""
    if resolution_s is None:
        return RAW
    return f"agg_{round(resolution_s)}s"


@runtime_checkable
class TimeSeriesStore(Protocol):
    """Synchronous store; the Trio runtime calls it through ``trio.to_thread.run_sync``.

    ``write_*`` either store the whole batch or raise ``StorageError`` having changed nothing.
    Tier tables hold PARTIAL_SCHEMA rows and are named by :func:`tier_name`.
    """

    def write_point(self, point: DataPoint) -> None: ...

    def write_batch(self, points: Iterable[DataPoint]) -> int: ...

    def write_records(self, records: Sequence[Record]) -> int: ...

    def query(self, q: TimeSeriesQuery) -> pa.Table: ...

    # --- building blocks for queries and retention -------------------------------------
    def read_raw(
        self, selector: Selector, start: float, end: float, limit: int | None = None
    ) -> pa.Table: ...

    def aggregate(
        self, tier: str, selector: Selector, start: float, end: float, bucket: float
    ) -> pa.Table:
        """PARTIAL_SCHEMA rows for ``[start, end)`` from ``tier`` (raw or a tier table),
        bucketed on ``bucket`` seconds aligned to the epoch; bad-quality points skipped."""
        ...

    def replace_partials(
        self, tier: str, selector: Selector, start: float, end: float, rows: pa.Table
    ) -> None:
        """Delete the tier's rows in ``[start, end)`` matching ``selector``, then add ``rows``."""
        ...

    def delete_before(self, tier: str, selector: Selector, before: float) -> int: ...

    def tiers(self) -> list[str]: ...

    def get_meta(self, key: str) -> str | None: ...

    def set_meta(self, key: str, value: str) -> None: ...

    def maintain(self, *, force: bool = False) -> None:
        """Compaction, index refresh and old-version cleanup (or VACUUM)."""
        ...

    def stats(self) -> StorageStats: ...

    def close(self) -> None: ...
