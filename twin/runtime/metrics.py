"""Prometheus metrics of one engine (its own CollectorRegistry, so tests can run many)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    Metric,
    SummaryMetricFamily,
)
from prometheus_client.registry import Collector

from twin.bindings.protostats import STATS
from twin.runtime.state import Status, TwinStore


class _TwinCollector(Collector):
    def __init__(self, twins: TwinStore) -> None:
        self.twins = twins

    def collect(self) -> Iterator[Metric]:
        counts = {str(s): 0 for s in Status}
        for twin in self.twins.all():
            counts[str(twin.status)] += 1
        g = GaugeMetricFamily("twin_devices", "Devices by status", labels=["status"])
        for status, n in counts.items():
            g.add_metric([status], n)
        yield g


class _ProtocolCollector(Collector):
    """Requests, errors, malformed frames and latency per protocol binding
    (twin.bindings.protostats)."""

    def collect(self) -> Iterator[Metric]:
        fams = {
            "requests": CounterMetricFamily("twin_protocol_requests", "Protocol requests", labels=["binding"]),
            "errors": CounterMetricFamily("twin_protocol_errors", "Failed protocol requests", labels=["binding"]),
            "timeouts": CounterMetricFamily("twin_protocol_timeouts", "Protocol requests timed out", labels=["binding"]),
            "malformed": CounterMetricFamily(
                "twin_protocol_malformed", "Malformed frames dropped", labels=["binding"]
            ),
        }
        lat = SummaryMetricFamily(
            "twin_protocol_request_seconds", "Protocol request latency", labels=["binding"]
        )
        for name, st in sorted(STATS.items()):
            for field, fam in fams.items():
                fam.add_metric([name], getattr(st, field))
            lat.add_metric([name], st.latency_count, st.latency_sum)
        yield from fams.values()
        yield lat


class EngineMetrics:
    def __init__(self, twins: TwinStore) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.readings = Counter("twin_readings", "Readings received", ["binding"], registry=r)
        self.binding_errors = Counter(
            "twin_binding_errors",
            "Binding failures (each retried with backoff)",
            ["binding"],
            registry=r,
        )
        self.status_transitions = Counter(
            "twin_status_transitions", "Device status transitions", ["status"], registry=r
        )
        self.reloads = Counter("twin_reloads", "Hot reloads of a new revision", registry=r)
        self.revision = Gauge("twin_revision", "Revision the engine runs", registry=r)
        self.device_tasks = Gauge("twin_device_tasks", "Running device tasks", registry=r)
        self.alarms_active = Gauge(
            "twin_alarms_active", "Uncleared alarms known to the engine", registry=r
        )
        self.ingest = Counter(
            "twin_ingest_requests", "HTTP ingest requests", ["result"], registry=r
        )
        self.ws_clients = Gauge("twin_ws_clients", "Connected WebSocket clients", registry=r)
        self.ws_dropped = Counter(
            "twin_ws_dropped", "WebSocket clients dropped for being slow", registry=r
        )
        self.api_requests = Counter(
            "twin_api_requests", "API requests", ["method", "route", "status"], registry=r
        )
        self.api_latency = Histogram(
            "twin_api_request_seconds",
            "API request latency",
            ["method", "route"],
            registry=r,
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5),
        )
        self.rate_limited = Counter("twin_api_rate_limited", "Requests answered 429", registry=r)
        self.registry_writes = Gauge(
            "twin_registry_pending_writes", "Queued registry writes", registry=r
        )
        self.ingest_refused = Counter(
            "twin_ingest_refused",
            "Readings/messages refused at an ingest edge (twin.bindings.values)",
            ["edge", "device"],
            registry=r,
        )
        self.bad_values_dropped = Counter(
            "twin_bad_values_dropped",
            "Bad values that passed an edge and were dropped by an inner layer",
            ["layer"],
            registry=r,
        )
        self.supervised_failures = Counter(
            "twin_supervised_failures",
            "Failures caught by a supervisor (each restarted with backoff)",
            ["kind", "name"],
            registry=r,
        )
        self.supervised_quarantined = Gauge(
            "twin_supervised_quarantined",
            "1 while a supervised task is quarantined after repeated failures",
            ["kind", "name"],
            registry=r,
        )
        r.register(_TwinCollector(twins))
        r.register(_ProtocolCollector())
        self._children: dict[tuple[int, tuple[str, ...]], Any] = {}

    def child(self, metric: Any, *labels: str) -> Any:
        """``metric.labels(*labels)``, cached: ``labels()`` takes a lock and builds a tuple key
        on every call, too slow for the per-reading and per-request hot paths."""
        key = (id(metric), labels)
        out = self._children.get(key)
        if out is None:
            out = self._children[key] = metric.labels(*labels)
        return out

    def readings_child(self, binding: str) -> Any:
        return self.child(self.readings, binding)

    def binding_errors_child(self, binding: str) -> Any:
        return self.child(self.binding_errors, binding)

    def refused(self, device: str, edge: str) -> None:
        """Count a refusal at an ingest edge (per device)."""
        self.child(self.ingest_refused, edge, device).inc()

    def dropped(self, layer: str) -> None:
        self.child(self.bad_values_dropped, layer).inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)
