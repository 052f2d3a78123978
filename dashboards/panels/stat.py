"""A stat tile: one aggregate of one metric over the selected devices and the panel's range."""

from __future__ import annotations

import math
import time
from typing import Any

import streamlit as st

from dashboards.client import ApiError, NotAvailable
from dashboards.core import Ctx, bucket_for, fmt_seconds, select_params
from dashboards.live import AGGS, LiveSeries, refresh_series
from twin.spec.units import parse_duration


def value(ctx: Ctx, panel: dict[str, Any]) -> float | None:
    metric = str(panel.get("metric"))
    agg = str(panel.get("aggregate", "avg"))
    span = int(parse_duration(panel.get("range", "5m")))
    try:
        if agg in AGGS:
            return _live_value(ctx, panel, metric, agg, span)
        table = ctx.client.query(
            metric=[metric],
            from_=f"-{fmt_seconds(span)}",
            every=fmt_seconds(span),
            agg=[agg],
            group_by="none",
            **select_params(panel, ctx),
        )
    except NotAvailable:
        return _from_twins(ctx, panel, metric, agg)
    rows = [r for r in table.records() if r.get(agg) is not None]
    if not rows:
        return None
    rows.sort(key=lambda r: str(r.get("ts")))
    return float(rows[-1][agg])


def _live_value(ctx: Ctx, panel: dict[str, Any], metric: str, agg: str, span: int) -> float | None:
    """The aggregate over the panel's range from fine buckets: a REST backfill, then the
    WebSocket feed's readings (the window moves by whole buckets)."""
    every = bucket_for(span, 30)
    fresh = LiveSeries(
        (metric,), frozenset(d["name"] for d in ctx.selected(panel)), every, span, False
    )
    params = select_params(panel, ctx)

    def backfill(to: float) -> list[dict[str, Any]]:
        table = ctx.client.query(
            metric=[metric],
            from_=f"{to - span:.3f}",
            to=f"{to:.3f}",
            every=fmt_seconds(every),
            agg=["avg", "count", "min", "max"],
            group_by="none",
            **params,
        )
        return table.records()

    key = f"live-stat:{panel.get('title')}:{metric}:{panel.get('select')!r}"
    since = math.floor((time.time() - span) / every) * every
    return refresh_series(
        st.session_state,
        key,
        fresh,
        ctx.live,
        backfill,
        read=lambda s: s.value(agg, metric, since=since),
    )


def _from_twins(ctx: Ctx, panel: dict[str, Any], metric: str, agg: str) -> float | None:
    """Without a time-series service: the devices' last reported values."""
    vals = []
    for d in ctx.selected(panel):
        rep = (ctx.client.twin(d["name"]).get("reported") or {}).get(metric)
        if rep and isinstance(rep.get("value"), int | float):
            vals.append(float(rep["value"]))
    if not vals:
        return None
    return {
        "min": min(vals),
        "max": max(vals),
        "sum": sum(vals),
        "count": float(len(vals)),
    }.get(agg, sum(vals) / len(vals))


def decimals(v: float) -> int:
    """Decimals shown for a value of this size."""
    a = abs(v)
    return 0 if a >= 1000 else 1 if a >= 10 else 2


def fmt_number(v: float, places: int | None = None) -> str:
    return f"{v:,.{decimals(v) if places is None else places}f}"


def fmt_delta(v: float | None, prev: float | None) -> str | None:
    """The change since the last refresh, at the precision the value is shown with; None
    (no arrow, no colour) when that rounds to zero — a "-0.00" in red was noise."""
    if v is None or prev is None:
        return None
    places = decimals(v)
    delta = round(v - prev, places)
    if delta == 0:
        return None
    return f"{delta:+,.{places}f}"


def render(ctx: Ctx, panel: dict[str, Any]) -> None:
    metric = str(panel.get("metric"))
    label = panel.get("title") or f"{metric} ({panel.get('aggregate', 'avg')})"
    unit = panel.get("unit") or ctx.unit(metric)
    key = f"stat:{label}:{metric}"
    try:
        v = value(ctx, panel)
    except ApiError as exc:
        st.metric(label, "—", help=str(exc))
        return
    prev = st.session_state.get(key)
    st.session_state[key] = v
    if unit and unit not in str(label):
        label = f"{label} [{unit}]"
    shown = "—" if v is None else fmt_number(v)
    st.metric(label, shown, delta=fmt_delta(v, prev), border=True)
