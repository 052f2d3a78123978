"""Gather a report's sections: the Dashboard panel vocabulary over the same selectors and
the same time-series queries (:func:`twin.timeseries.query.run_query`), plus alarms, commands
and scene runs from the registry.

Plain synchronous code over a store and a registry: the engine runs it in a worker thread,
``twin report run`` directly. ``progress(done, total, text)`` is called after each section.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping
from typing import Any

import pyarrow as pa

from twin.registry.base import Key, Registry
from twin.reports.model import NUMBER, TEXT, TIME, ReportData, SectionData, Series, Table
from twin.spec.dashboards import as_list, model_points, panel_metrics, select_devices
from twin.spec.periods import Period
from twin.timeseries.base import Quality, Selector, TimeSeriesQuery, TimeSeriesStore

MAX_LINES = 8
"""A chart with more series than this shows their mean with a min-max band instead."""
NICE_BUCKETS = (60, 300, 900, 1800, 3600, 3 * 3600, 6 * 3600, 12 * 3600, 86400, 7 * 86400)
DEFAULT_LIMIT = 100_000
Progress = Callable[[int, int, str], None]


def default_bucket(seconds: float, points: int = 96) -> float:
    """A round bucket giving about ``points`` points over ``seconds``."""
    want = seconds / points
    return next((b for b in NICE_BUCKETS if b >= want), NICE_BUCKETS[-1])


def _docs(specs: Mapping[Key, Mapping[str, Any]], kind: str) -> dict[str, Mapping[str, Any]]:
    return {n: d for (k, n), d in specs.items() if k == kind}


def selected(
    specs: Mapping[Key, Mapping[str, Any]], select: Mapping[str, Any] | None, site: str | None
) -> list[str]:
    """Devices a section selects; a report of a site only sees that site's devices."""
    sel = dict(select or {})
    if site and "site" not in sel:
        sel["site"] = site
    devices = _docs(specs, "Device").values()
    groups = _docs(specs, "DeviceGroup")
    return select_devices(devices, sel, groups)


def _unit(specs: Mapping[Key, Mapping[str, Any]], devices: list[str], metric: str) -> str | None:
    models = _docs(specs, "DeviceModel")
    for name in devices:
        dev = specs.get(("Device", name)) or {}
        model = models.get(str((dev.get("spec") or {}).get("model"))) or {}
        mspec = model.get("spec") or {}
        for section in ("telemetry", "properties"):
            decl = (mspec.get(section) or {}).get(metric)
            if isinstance(decl, dict) and decl.get("unit"):
                return str(decl["unit"])
    return None


def _num(v: Any) -> float | None:
    if v is None:
        return None
    f = float(v)
    return None if math.isnan(f) else f


def _ts(v: Any) -> float:
    return float(v.timestamp()) if hasattr(v, "timestamp") else float(v)


class Gatherer:
    def __init__(
        self,
        store: TimeSeriesStore | None,
        registry: Registry | None,
        specs: Mapping[Key, Mapping[str, Any]],
        period: Period,
        site: str | None,
    ) -> None:
        self.store = store
        self.registry = registry
        self.specs = specs
        self.period = period
        self.site = site

    # -- time series ------------------------------------------------------------------------
    def _query(
        self, devices: list[str], metrics: list[str], bucket: float | None, aggs: tuple[str, ...],
        group_by: str = "device", limit: int | None = None,
    ) -> pa.Table:
        if self.store is None or not devices or not metrics:
            return pa.table({})
        q = TimeSeriesQuery(
            self.period.start,
            self.period.end,
            Selector.of(devices=devices, metrics=metrics),
            bucket=bucket,
            aggregates=aggs,
            group_by=group_by,
            limit=limit,
        )
        return self.store.query(q)

    def whole_period(
        self, devices: list[str], metrics: list[str], group_by: str = "device"
    ) -> dict[tuple[str, ...], dict[str, float | None]]:
        """Aggregates over the whole period per group key: buckets are aligned to the epoch, so
        the period's (one or two) buckets are combined exactly from count, sum, min, max,
        first and last."""
        aggs = ("count", "sum", "min", "max", "first", "last")
        table = self._query(devices, metrics, self.period.seconds + 1, aggs, group_by)
        keys = ["device", "metric"] if group_by == "device" else ["metric"]
        out: dict[tuple[str, ...], dict[str, float | None]] = {}
        for r in sorted(table.to_pylist() if table.num_rows else [], key=lambda r: r["ts"]):
            key = tuple(str(r[k]) for k in keys)
            cur = out.get(key)
            n = int(r["count"] or 0)
            if not n:
                continue
            if cur is None:
                out[key] = {a: _num(r[a]) for a in aggs}
                continue
            cur["count"] = (cur["count"] or 0) + n
            cur["sum"] = (cur["sum"] or 0.0) + (_num(r["sum"]) or 0.0)
            lo, hi = _num(r["min"]), _num(r["max"])
            if lo is not None:
                cur["min"] = lo if cur["min"] is None else min(cur["min"], lo)
            if hi is not None:
                cur["max"] = hi if cur["max"] is None else max(cur["max"], hi)
            if _num(r["last"]) is not None:
                cur["last"] = _num(r["last"])
        for agg in out.values():
            c = agg.get("count") or 0
            agg["avg"] = (agg["sum"] or 0.0) / c if c and agg.get("sum") is not None else None
        return out

    def stat(self, s: SectionData) -> None:
        metric = (panel_metrics(s.spec) or [""])[0]
        agg = str(s.spec.get("aggregate") or "avg")
        s.devices = self.with_metrics(s.devices, [metric])
        got = self.whole_period(s.devices, [metric], "none").get((metric,))
        s.value = got.get(agg) if got else None
        s.unit = s.spec.get("unit") or _unit(self.specs, s.devices, metric)

    def with_metrics(self, devices: list[str], metrics: list[str]) -> list[str]:
        """The devices whose model declares one of ``metrics`` (devices without a model are
        kept: their data decides)."""
        models = _docs(self.specs, "DeviceModel")
        out = []
        for name in devices:
            model = str(((self.specs.get(("Device", name)) or {}).get("spec") or {}).get("model"))
            if model not in models or set(model_points(models[model])) & set(metrics):
                out.append(name)
        return out

    def timeseries(self, s: SectionData) -> None:
        metrics = panel_metrics(s.spec)
        s.devices = self.with_metrics(s.devices, metrics)
        bucket = self._bucket(s)
        agg = str(s.spec.get("aggregate") or "avg")
        s.unit = s.spec.get("unit") or (_unit(self.specs, s.devices, metrics[0]) if metrics else None)
        if len(s.devices) * len(metrics) > MAX_LINES:
            table = self._query(s.devices, metrics, bucket, ("avg", "min", "max"), "none")
            rows = table.to_pylist() if table.num_rows else []
            by: dict[str, list[dict[str, Any]]] = {}
            for r in rows:
                by.setdefault(r["metric"], []).append(r)
            for m in metrics:
                pts = sorted(by.get(m, []), key=lambda r: r["ts"])
                s.series.append(
                    Series(
                        f"{m} (mean of {len(s.devices):,} devices)",
                        [_ts(r["ts"]) for r in pts],
                        [_num(r["avg"]) for r in pts],
                        [_num(r["min"]) for r in pts],
                        [_num(r["max"]) for r in pts],
                    )
                )
            s.note = f"{len(s.devices):,} devices: mean with min\u2013max band"
            s.table = Table(
                ["time", "metric", "avg", "min", "max"], [TIME, TEXT, NUMBER, NUMBER, NUMBER],
                [[_ts(r["ts"]), r["metric"], _num(r["avg"]), _num(r["min"]), _num(r["max"])]
                 for r in sorted(rows, key=lambda r: (r["metric"], r["ts"]))],
            )
            return
        table = self._query(s.devices, metrics, bucket, (agg,))
        rows = table.to_pylist() if table.num_rows else []
        series: dict[tuple[str, str], list[dict[str, Any]]] = {}
        for r in rows:
            series.setdefault((r["device"], r["metric"]), []).append(r)
        for (dev, m), pts in sorted(series.items()):
            pts.sort(key=lambda r: r["ts"])
            label = dev if len(metrics) == 1 else f"{dev} · {m}"
            s.series.append(Series(label, [_ts(r["ts"]) for r in pts], [_num(r[agg]) for r in pts]))
        s.table = Table(
            ["time", "device", "metric", agg], [TIME, TEXT, TEXT, NUMBER],
            [[_ts(r["ts"]), r["device"], r["metric"], _num(r[agg])]
             for r in sorted(rows, key=lambda r: (r["device"], r["metric"], r["ts"]))],
        )

    def _bucket(self, s: SectionData) -> float:
        from twin.spec.units import parse_duration

        every = s.spec.get("every")
        b = parse_duration(every) if every is not None else default_bucket(self.period.seconds)
        s.bucket = b
        return b

    def aggregate_table(self, s: SectionData) -> None:
        """``table``: aggregates per device and metric over the period (or per ``every``)."""
        metrics = panel_metrics(s.spec)
        s.devices = self.with_metrics(s.devices, metrics)
        aggs = tuple(as_list(s.spec.get("aggregates")) or ["avg", "min", "max", "count"])
        if "every" in s.spec:
            table = self._query(s.devices, metrics, self._bucket(s), aggs)
            rows = sorted(table.to_pylist() if table.num_rows else [],
                          key=lambda r: (r["device"], r["metric"], r["ts"]))
            out = [[_ts(r["ts"]), r["device"], r["metric"], *[_num(r[a]) for a in aggs]]
                   for r in rows]
            s.table = Table(["time", "device", "metric", *aggs],
                            [TIME, TEXT, TEXT] + [NUMBER] * len(aggs), out)
        else:
            whole = self.whole_period(s.devices, metrics)
            out = [[dev, m, *[whole[(dev, m)].get(a) for a in aggs]]
                   for dev, m in sorted(whole)]
            s.table = Table(["device", "metric", *aggs], [TEXT, TEXT] + [NUMBER] * len(aggs), out)
        units = {m: _unit(self.specs, s.devices, m) for m in metrics}
        s.unit = ", ".join(f"{m}: {u}" for m, u in units.items() if u) or None

    def readings(self, s: SectionData) -> None:
        metrics = panel_metrics(s.spec)
        s.devices = self.with_metrics(s.devices, metrics)
        limit = int(s.spec.get("limit") or DEFAULT_LIMIT)
        table = self._query(s.devices, metrics, None, ("avg",), limit=limit + 1)
        n = table.num_rows
        cols = {c: table.column(c).to_pylist() for c in ("ts", "device", "metric", "value",
                                                         "value_str", "quality")} if n else {}
        rows = []
        for i in range(min(n, limit)):
            v = cols["value"][i]
            rows.append([
                _ts(cols["ts"][i]), cols["device"][i], cols["metric"][i],
                v if v is not None else cols["value_str"][i],
                Quality(int(cols["quality"][i] or 0)).name.lower(),
            ])
        rows.sort(key=lambda r: (r[1], r[2], r[0]))
        s.table = Table(["time", "device", "metric", "value", "quality"],
                        [TIME, TEXT, TEXT, NUMBER, TEXT], rows, truncated=n > limit)

    # -- registry ---------------------------------------------------------------------------
    def alarms(self, s: SectionData) -> None:
        states = as_list(s.spec.get("states")) or None
        limit = int(s.spec.get("limit") or 500)
        rows: list[list[Any]] = []
        if self.registry is not None:
            wanted = set(s.devices)
            for a in self.registry.alarms(states=states, limit=1_000_000):
                if a.device not in wanted and not (a.device.startswith("_") and not s.spec.get("select")):
                    continue
                end = a.cleared_at or self.period.end
                if a.raised_at >= self.period.end or end < self.period.start:
                    continue
                rows.append([a.raised_at, a.device, a.type, a.severity, a.state, a.message,
                             a.acked_by or "", a.cleared_at])
        rows.sort(key=lambda r: r[0], reverse=True)
        s.table = Table(
            ["raised", "device", "alarm", "severity", "state", "message", "acknowledged by",
             "cleared"],
            [TIME, TEXT, TEXT, TEXT, TEXT, TEXT, TEXT, TIME], rows[:limit],
            truncated=len(rows) > limit,
        )

    def commands(self, s: SectionData) -> None:
        limit = int(s.spec.get("limit") or 500)
        rows: list[list[Any]] = []
        if self.registry is not None:
            wanted = set(s.devices)
            for c in self.registry.commands(limit=100_000):
                if c.device in wanted and self.period.start <= c.created_at < self.period.end:
                    rows.append([c.created_at, c.device, c.type, c.status, c.source or "",
                                 c.error or ""])
        s.table = Table(["created", "device", "command", "status", "source", "error"],
                        [TIME, TEXT, TEXT, TEXT, TEXT, TEXT], rows[:limit],
                        truncated=len(rows) > limit)

    def scenes(self, s: SectionData) -> None:
        limit = int(s.spec.get("limit") or 500)
        rows: list[list[Any]] = []
        if self.registry is not None:
            scenes = _docs(self.specs, "Scene")
            for t in self.registry.scene_traces(limit=100_000):
                site = ((scenes.get(t.scene) or {}).get("metadata") or {}).get("site")
                if self.site and site not in (None, self.site):
                    continue
                if self.period.start <= t.started_at < self.period.end:
                    took = (t.finished_at - t.started_at) if t.finished_at else None
                    error = str((t.trace or {}).get("error") or "")
                    rows.append([t.started_at, t.scene, t.status, took, error])
        s.table = Table(["started", "scene", "status", "seconds", "error"],
                        [TIME, TEXT, TEXT, NUMBER, TEXT], rows[:limit],
                        truncated=len(rows) > limit)

    def devices_table(self, s: SectionData) -> None:
        rows: list[list[Any]] = []
        status: dict[str, dict[str, Any]] = {}
        if self.registry is not None:
            status = {str(r["name"]): r for r in self.registry.device_rows(s.devices)}
        for name in s.devices:
            doc = self.specs.get(("Device", name)) or {}
            meta, spec = doc.get("metadata") or {}, doc.get("spec") or {}
            row = status.get(name, {})
            rows.append([name, str(spec.get("type") or ""), str(meta.get("group") or ""),
                         str(spec.get("model") or ""), str(row.get("status") or "unknown")])
        s.table = Table(["device", "type", "group", "model", "status"], [TEXT] * 5, rows)


_SECTIONS: dict[str, Callable[[Gatherer, SectionData], None]] = {
    "stat": Gatherer.stat,
    "timeseries": Gatherer.timeseries,
    "table": Gatherer.aggregate_table,
    "readings": Gatherer.readings,
    "alarms": Gatherer.alarms,
    "commands": Gatherer.commands,
    "scenes": Gatherer.scenes,
    "devices": Gatherer.devices_table,
}
"""The Gatherer method that fills each section type (markdown has none: its text is its own)."""


def gather(
    doc: Mapping[str, Any],
    specs: Mapping[Key, Mapping[str, Any]],
    period: Period,
    store: TimeSeriesStore | None,
    registry: Registry | None,
    *,
    progress: Progress | None = None,
    now: float | None = None,
) -> ReportData:
    meta, spec = doc.get("metadata") or {}, doc.get("spec") or {}
    site = meta.get("site")
    site_doc = specs.get(("Site", str(site))) if site else None
    g = Gatherer(store, registry, specs, period, site)
    sections: list[SectionData] = []
    specs_list = list(spec.get("sections") or [])
    for i, sec in enumerate(specs_list):
        stype = str(sec.get("type"))
        title = str(sec.get("title") or (", ".join(panel_metrics(sec)) or stype).capitalize())
        s = SectionData(i, stype, title, dict(sec))
        if stype not in ("markdown",):
            s.devices = selected(specs, sec.get("select"), site)
        section = _SECTIONS.get(stype)
        if section is not None:
            section(g, s)
        elif stype == "markdown":
            s.text = str(sec.get("text") or "")
        sections.append(s)
        if progress is not None:
            progress(i + 1, len(specs_list), f"section {title}")
    return ReportData(
        name=str(meta.get("name")),
        title=str(spec.get("title") or meta.get("name")),
        site=site,
        site_title=str(((site_doc or {}).get("spec") or {}).get("title") or site or "") or None,
        period=period,
        generated_at=time.time() if now is None else now,
        language=str(spec.get("language") or "en"),
        description=str(spec.get("description") or ""),
        sections=sections,
        spec=dict(spec),
    )


__all__ = ["Gatherer", "default_bucket", "gather", "selected"]
