"""Live time-series chart: the panel's metrics over its range, one line per device."""

from __future__ import annotations

from typing import Any

import altair as alt
import pandas as pd
import streamlit as st

from dashboards.client import ApiError, NotAvailable
from dashboards.core import Ctx, bucket_for, fmt_seconds, metric_label, segments, select_params
from dashboards.live import LiveSeries, refresh_series
from twin.spec.dashboards import panel_metrics
from twin.spec.units import parse_duration

MAX_LINES = 20
"""Above this many devices a chart shows their average (one line per metric)."""


def data(ctx: Ctx, panel: dict[str, Any]) -> pd.DataFrame:
    """The panel's buckets: one REST backfill, then the live feed's readings (WebSocket)."""
    span = parse_duration(panel.get("range", "15m"))
    every = panel.get("every") or fmt_seconds(bucket_for(span))
    metrics = tuple(panel_metrics(panel))
    selected = ctx.selected(panel)
    by_device = len(selected) <= MAX_LINES
    fresh = LiveSeries(
        metrics,
        frozenset(d["name"] for d in selected),
        parse_duration(every),
        span,
        by_device,
        label=f"average of {len(selected)} devices",
    )
    params = select_params(panel, ctx)

    def backfill(to: float) -> list[dict[str, Any]]:
        table = ctx.client.query(
            metric=list(metrics),
            from_=f"{to - span:.3f}",
            to=f"{to:.3f}",
            every=every,
            agg=["avg", "count", "min", "max"],
            group_by="device" if by_device else "none",
            **params,
        )
        return table.records()

    key = f"live-ts:{panel.get('title')}:{metrics}"
    return refresh_series(
        st.session_state, key, fresh, ctx.live, backfill, read=lambda s: s.frame()
    )


def chart(
    df: pd.DataFrame,
    metric: str,
    unit: str,
    height: int,
    legend: bool = True,
    fmt: str = "%H:%M",
    every_s: float = 0.0,
) -> alt.Chart:
    keep = alt.Legend(orient="bottom", title=None, columns=2, labelLimit=200)
    df = df.assign(seg=segments(df, "device", every_s) if every_s else 0)
    return (
        alt.Chart(df)
        .mark_line(point=alt.OverlayMarkDef(size=12))
        .encode(
            x=alt.X("ts:T", title=None, axis=alt.Axis(format=fmt, labelOverlap=True, tickCount=5)),
            y=alt.Y("avg:Q", title=metric_label(metric, unit), scale=alt.Scale(zero=False)),
            color=alt.Color("device:N", legend=keep if legend else None),
            detail="seg:N",  # no line across a gap
            tooltip=["device", alt.Tooltip("ts:T", format="%H:%M:%S"), "avg"],
        )
        .properties(height=height)
    )


def render(ctx: Ctx, panel: dict[str, Any]) -> None:
    metrics = panel_metrics(panel)
    st.subheader(panel.get("title") or ", ".join(metrics))
    try:
        df = data(ctx, panel)
    except NotAvailable as exc:
        st.info(f"No time-series service on the server ({exc.detail}).")
        return
    except ApiError as exc:
        st.error(str(exc))
        return
    if df.empty:
        st.info("No data in this range yet.")
        return
    span = parse_duration(panel.get("range", "15m"))
    every_s = parse_duration(panel.get("every") or fmt_seconds(bucket_for(span)))
    fmt = "%H:%M:%S" if span <= 1800 else "%H:%M" if span <= 86400 else "%m-%d %H:%M"
    height = max(220, int(panel.get("height", 300)) // max(1, len(metrics)))
    for i, metric in enumerate(metrics):
        part = df[df["metric"] == metric]
        if part.empty:
            st.caption(f"{metric}: no data")
            continue
        st.altair_chart(
            chart(part, metric, ctx.unit(metric), height, i == len(metrics) - 1, fmt, every_s),
            width="stretch",
        )
