"""Time series: the store protocol, LanceDB and PostgreSQL stores, the batched writer,
retention policies with downsampling tiers, queries and export.

``LanceStore`` and ``PostgresStore`` are imported from their modules
(``twin.timeseries.lance``, ``twin.timeseries.postgres``) so importing this package stays
cheap.
"""

from __future__ import annotations

from twin.timeseries.base import (
    Agg,
    DataPoint,
    Fill,
    Quality,
    Record,
    Selector,
    StorageStats,
    TierStats,
    TimeSeriesQuery,
    TimeSeriesStore,
    canonical_tags,
)
from twin.timeseries.query import compare, export, run_query, trend
from twin.timeseries.retention import RetentionManager, RetentionPolicy, StorageMonitor
from twin.timeseries.writer import BatchedWriter

__all__ = [
    "Agg",
    "BatchedWriter",
    "DataPoint",
    "Fill",
    "Quality",
    "Record",
    "RetentionManager",
    "RetentionPolicy",
    "Selector",
    "StorageMonitor",
    "StorageStats",
    "TierStats",
    "TimeSeriesQuery",
    "TimeSeriesStore",
    "canonical_tags",
    "compare",
    "export",
    "run_query",
    "trend",
]
