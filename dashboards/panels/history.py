"""History (seed §6.2): time range, filters by site/group/tag/device/metric, aggregation,
bucket and resolution (auto = the engine picks the downsampled tier, or one tier of the
site's RetentionPolicy), comparison of two periods on one chart, trend line with slope, and
export of exactly the table shown to CSV or XLSX."""

from __future__ import annotations

import io
import math
from datetime import UTC, datetime, time, timedelta
from typing import Any

import altair as alt
import numpy as np
import pandas as pd
import streamlit as st

from dashboards.client import ApiError, NotAvailable
from dashboards.core import (
    Ctx,
    bucket_for,
    fmt_seconds,
    frame,
    metric_label,
    segments,
    select_params,
    series_key,
)
from twin.spec.dashboards import as_list
from twin.spec.units import parse_duration

PRESETS = {
    "Last hour": 3600,
    "Last 6 hours": 6 * 3600,
    "Last 24 hours": 86400,
    "Last 7 days": 7 * 86400,
    "Custom": 0,
}
AGGREGATES = ["avg", "min", "max", "sum", "count", "first", "last"]
BUCKETS = ["auto", "10s", "1m", "5m", "15m", "1h", "6h", "1d"]
COMPARE = {"previous period": None, "1 day earlier": "1d", "1 week earlier": "7d"}
SPLIT = ["device", "none", "site", "group", "metric"]


def time_range(key: str) -> tuple[datetime, datetime]:
    preset = st.selectbox("Time range", list(PRESETS), key=f"{key}-preset")
    now = datetime.now(UTC).replace(microsecond=0)
    if PRESETS[preset]:
        return now - timedelta(seconds=PRESETS[preset]), now
    c1, c2 = st.columns(2)
    days = c1.date_input("Days", (now.date() - timedelta(days=1), now.date()), key=f"{key}-days")
    t0, t1 = c2.columns(2)
    start_t = t0.time_input("From (UTC)", time(0, 0), key=f"{key}-t0")
    end_t = t1.time_input("To (UTC)", now.time().replace(second=0), key=f"{key}-t1")
    d0, d1 = days if isinstance(days, tuple) and len(days) == 2 else (now.date(), now.date())
    start = datetime.combine(d0, start_t, UTC)
    end = datetime.combine(d1, end_t, UTC)
    if end <= start:
        st.warning("The end is before the start: showing the last hour.")
        return now - timedelta(hours=1), now
    return start, end


def add_trend(df: pd.DataFrame, value: str, by: str) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Least-squares line per series over the shown points: (line points, slopes per hour)."""
    lines, slopes = [], []
    for name, part in df.dropna(subset=[value]).groupby(by):
        if len(part) < 2:
            continue
        epoch = pd.Timestamp(0, tz="UTC")
        x = (part["ts"] - epoch).dt.total_seconds().to_numpy()
        y = part[value].astype(float).to_numpy()
        slope, icpt = np.polyfit(x - x[0], y, 1)
        ends = np.array([0.0, x[-1] - x[0]])
        lines.append(
            pd.DataFrame(
                {
                    "ts": pd.to_datetime(x[0] + ends, unit="s", utc=True),
                    value: icpt + slope * ends,
                    by: f"{name} (trend)",
                }
            )
        )
        slopes.append({"series": name, "slope per hour": slope * 3600, "points": len(part)})
    line_df = pd.concat(lines) if lines else pd.DataFrame(columns=["ts", value, by])
    return line_df, pd.DataFrame(slopes)


def export_bytes(df: pd.DataFrame, fmt: str) -> bytes:
    out = df.copy()
    for c in out.columns:
        if pd.api.types.is_datetime64_any_dtype(out[c]):
            out[c] = out[c].dt.strftime("%Y-%m-%dT%H:%M:%SZ")
    if fmt == "csv":
        return out.to_csv(index=False).encode("utf-8")
    buf = io.BytesIO()
    out.to_excel(buf, index=False, sheet_name="history", engine="openpyxl")
    return buf.getvalue()


def tiers(ctx: Ctx) -> list[str]:
    """The resolutions of the site's RetentionPolicy tiers (raw first), finest first."""
    found = {"raw": 0.0}
    for d in ctx.docs:
        if d.get("kind") != "RetentionPolicy":
            continue
        for t in (d.get("spec") or {}).get("tiers") or []:
            res = str((t or {}).get("resolution", ""))
            if res and res != "raw":
                try:
                    found[res] = parse_duration(res)
                except ValueError:
                    continue
    return sorted(found, key=lambda r: found[r])


def axis_format(ts: pd.Series) -> str:
    """Time labels for the shown points: with the date once they cross midnight (a 7-day
    range with one day of data is labelled 01:00 … 01:00 otherwise), seconds under 30 min."""
    if ts.dt.date.nunique() > 1:
        return "%m-%d %H:%M"
    return "%H:%M:%S" if (ts.max() - ts.min()).total_seconds() <= 1800 else "%H:%M"


def axis_title(ctx: Ctx, metrics: list[str], agg: str) -> str:
    """``temperature °C (avg)``; ``temperature °C, humidity % (avg)`` for several metrics."""
    named = ", ".join(metric_label(m, ctx.unit(m)) for m in metrics)
    return f"{named} ({agg})"


def tier_label(chosen: str, used: str | None) -> str:
    """``auto → 1h`` from the picker and the engine's ``X-Twin-Tier`` (``agg_3600s``)."""
    if chosen != "auto" or not used:
        return chosen
    parts = []
    for t in used.split("+"):
        if t.startswith("agg_") and t.endswith("s") and t[4:-1].isdigit():
            t = fmt_seconds(int(t[4:-1]))
        parts.append(t)
    return f"auto → {' + '.join(parts)}"


def options(ctx: Ctx, panel: dict[str, Any]) -> dict[str, list[str]]:
    devices = ctx.selected(panel)
    return {
        "site": sorted({str(d.get("site")) for d in devices if d.get("site")}),
        "group": sorted({str(d.get("group")) for d in devices if d.get("group")}),
        "tag": sorted({t for d in devices for t in d.get("tags") or []}),
        "device": sorted(d["name"] for d in devices),
        "metric": ctx.metrics() or as_list(panel.get("metrics")) or as_list(panel.get("metric")),
    }


def render(ctx: Ctx, panel: dict[str, Any]) -> None:
    st.subheader(panel.get("title") or "History")
    key = f"hist-{panel.get('title', '')}"
    opts = options(ctx, panel)
    with st.container(border=True):
        c1, c2, c3, c4, c5 = st.columns([2, 1, 1, 1, 1])
        with c1:
            start, end = time_range(key)
        agg = c2.selectbox("Aggregation", AGGREGATES, key=f"{key}-agg")
        bucket = c3.selectbox("Bucket", BUCKETS, key=f"{key}-bucket")
        tier = c4.selectbox(
            "Resolution",
            ["auto", *tiers(ctx)],
            key=f"{key}-tier",
            help="auto: the engine reads the coarsest downsampled tier that fits the bucket "
            "(raw data after the tier's last roll-up); or read one tier only",
        )
        split = c5.selectbox(
            "One line per", SPLIT, index=0 if len(opts["device"]) <= 20 else 1, key=f"{key}-split"
        )
        f = st.columns([2, 1, 1, 1, 1])
        default_metric = (
            as_list(panel.get("metrics"))
            or as_list(panel.get("metric"))
            or [m for m in opts["metric"] if m == "temperature"]
            or opts["metric"][:1]
        )
        metrics = f[0].multiselect(
            "Metric", opts["metric"], default=default_metric, key=f"{key}-metric"
        )
        chosen = {
            k: f[i].multiselect(k.capitalize(), opts[k], key=f"{key}-{k}", placeholder="all")
            for i, k in enumerate(("site", "group", "tag", "device"), start=1)
        }
        g1, g2, g3 = st.columns([1, 2, 1])
        compare_on = g1.checkbox("Compare", key=f"{key}-compare")
        compare_to = g2.selectbox(
            "with",
            list(COMPARE),
            key=f"{key}-compare-to",
            disabled=not compare_on,
            label_visibility="collapsed",
        )
        trend_on = g3.checkbox("Trend line", key=f"{key}-trend")
    if not metrics:
        st.info("Choose at least one metric.")
        return
    span = (end - start).total_seconds()
    every_s = bucket_for(span, 200) if bucket == "auto" else parse_duration(bucket)
    if tier not in ("auto", "raw"):
        res = parse_duration(tier)
        if every_s < res or every_s % res:
            if bucket != "auto":
                st.caption(f"Bucket {bucket} is finer than the {tier} tier: using whole {tier}s.")
            every_s = max(res, math.ceil(every_s / res) * res)
    every = fmt_seconds(every_s)
    compare = None
    if compare_on:
        compare = COMPARE[compare_to] or fmt_seconds(int(span))
    params: dict[str, Any] = {
        "metric": metrics,
        "from_": start.isoformat(),
        "to": end.isoformat(),
        "every": every,
        "agg": [agg],
        "group_by": split,
        "compare": compare,
        "tier": None if tier == "auto" else tier,
    }
    scope = {k: v for k, v in chosen.items() if v}
    params.update(scope or select_params(panel, ctx))
    try:
        table = ctx.client.query(**params)
        df = frame(table)
    except NotAvailable as exc:
        st.info(f"No time-series service on the server ({exc.detail}).")
        return
    except ApiError as exc:
        st.error(exc.detail)
        return
    st.caption(
        f"{start:%Y-%m-%d %H:%M} → {end:%Y-%m-%d %H:%M} UTC · bucket {every} · {agg}"
        + (f" · compared with {compare} earlier" if compare else "")
        + f" · tier {tier_label(tier, table.tier)} · {len(df)} rows"
    )
    if df.empty:
        st.info("No data for this selection.")
        return
    value_cols = [c for c in df.columns if c == agg or c.startswith(f"{agg}_")]
    df["series"] = series_key(df, value_cols)
    long = df[["ts", "series", agg]].rename(columns={agg: "value"})
    if compare and f"{agg}_previous" in df.columns:
        prev = df[["ts", "series", f"{agg}_previous"]].rename(columns={f"{agg}_previous": "value"})
        prev["series"] = prev["series"] + f" ({compare} earlier)"
        long = pd.concat([long, prev])
    fmt = axis_format(df["ts"])
    long["seg"] = segments(long.reset_index(drop=True), "series", every_s).to_numpy()
    layers = [
        alt.Chart(long)
        .mark_line(point=alt.OverlayMarkDef(size=10))
        .encode(
            x=alt.X("ts:T", title=None, axis=alt.Axis(format=fmt, labelOverlap=True)),
            y=alt.Y("value:Q", title=axis_title(ctx, metrics, agg), scale=alt.Scale(zero=False)),
            color=alt.Color(
                "series:N",
                legend=alt.Legend(orient="bottom", title=None, columns=3, labelLimit=260),
            ),
            detail="seg:N",  # no line across a gap
            strokeDash=alt.condition(
                alt.FieldOneOfPredicate(
                    "series", list(long["series"][long["series"].str.endswith("earlier)")].unique())
                ),
                alt.value([5, 3]),
                alt.value([1, 0]),
            ),
            tooltip=["series", alt.Tooltip("ts:T", format="%Y-%m-%d %H:%M"), "value"],
        )
    ]
    slopes = pd.DataFrame()
    if trend_on:
        line, slopes = add_trend(df[["ts", "series", agg]], agg, "series")
        if not line.empty:
            layers.append(
                alt.Chart(line.rename(columns={agg: "value"}))
                .mark_line(strokeDash=[2, 2], color="black")
                .encode(x="ts:T", y="value:Q", detail="series:N")
            )
    st.altair_chart(
        alt.layer(*layers).properties(height=int(panel.get("height", 320))), width="stretch"
    )
    if trend_on and not slopes.empty:
        st.dataframe(slopes, hide_index=True, width="stretch")
    shown = df.drop(columns=["series"])
    st.dataframe(
        shown, hide_index=True, width="stretch", height=min(35 * (len(shown) + 1) + 3, 400)
    )
    e1, e2, _ = st.columns([1, 1, 4])
    stamp = f"{start:%Y%m%dT%H%M}-{end:%Y%m%dT%H%M}"
    e1.download_button(
        "Export CSV",
        export_bytes(shown, "csv"),
        f"history-{stamp}.csv",
        "text/csv",
        key=f"{key}-csv",
    )
    e2.download_button(
        "Export XLSX",
        export_bytes(shown, "xlsx"),
        f"history-{stamp}.xlsx",
        "application/vnd.openxmlformats-officedocument.spreadsheetml.sheet",
        key=f"{key}-xlsx",
    )
