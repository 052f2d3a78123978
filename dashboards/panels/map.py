"""Devices on a map, coloured by status (pydeck). Devices without ``spec.location`` are placed
on a small ring around their site's location and marked as approximate."""

from __future__ import annotations

import math
from typing import Any

import pandas as pd
import pydeck as pdk
import streamlit as st

from dashboards.core import STATUS_COLORS, STATUS_ICONS, Ctx

MAX_LABELS = 60


def positions(ctx: Ctx, devices: list[dict[str, Any]]) -> pd.DataFrame:
    rows = []
    missing = []
    for d in devices:
        doc = ctx.doc("Device", d["name"]) or {}
        loc = (doc.get("spec") or {}).get("location")
        if isinstance(loc, dict) and "lat" in loc and "lon" in loc:
            rows.append((d, float(loc["lat"]), float(loc["lon"]), False))
        else:
            missing.append(d)
    for i, d in enumerate(missing):
        site = ctx.doc("Site", d.get("site")) or {}
        loc = (site.get("spec") or {}).get("location") or {}
        if rows:
            lat0 = sum(r[1] for r in rows) / len(rows)
            lon0 = sum(r[2] for r in rows) / len(rows)
        else:
            lat0, lon0 = float(loc.get("lat", 0.0)), float(loc.get("lon", 0.0))
        angle = 2 * math.pi * i / max(1, len(missing))
        rows.append((d, lat0 + 0.0006 * math.sin(angle), lon0 + 0.0009 * math.cos(angle), True))
    return pd.DataFrame(
        [
            {
                "name": d["name"],
                "status": d.get("status", "unknown"),
                "type": d.get("type"),
                "lat": lat,
                "lon": lon,
                "approx": approx,
                "color": [*STATUS_COLORS.get(d.get("status", "unknown"), (0, 0, 0)), 220],
            }
            for d, lat, lon, approx in rows
        ]
    )


def render(ctx: Ctx, panel: dict[str, Any]) -> None:
    st.subheader(panel.get("title") or "Devices")
    devices = ctx.selected(panel)
    if not devices:
        st.info("No device matches this panel's selector.")
        return
    df = positions(ctx, devices)
    counts = df["status"].value_counts()
    st.caption(
        "  ".join(f"{STATUS_ICONS.get(s, '')} {s}: **{n}**" for s, n in sorted(counts.items()))
        + ("  ·  ring: no location declared" if df["approx"].any() else "")
    )
    span_lat = float(df["lat"].max() - df["lat"].min()) or 0.001
    span_lon = float(df["lon"].max() - df["lon"].min()) or 0.001
    zoom = max(2.0, min(18.0, math.log2(360 / max(span_lat, span_lon)) - 0.8))
    layers: list[pdk.Layer] = [
        pdk.Layer(
            "ScatterplotLayer",
            df,
            get_position="[lon, lat]",
            get_fill_color="color",
            get_radius=1,
            radius_min_pixels=7 if len(df) <= MAX_LABELS else 3,
            radius_max_pixels=12,
            stroked=True,
            get_line_color=[255, 255, 255],
            line_width_min_pixels=1,
            pickable=True,
        ),
    ]
    if len(df) <= MAX_LABELS:  # beyond that, labels are clutter (and slow): names on hover
        layers.append(
            pdk.Layer(
                "TextLayer",
                df,
                get_position="[lon, lat]",
                get_text="name",
                get_size=12,
                get_color=[30, 30, 30],
                get_pixel_offset=[0, -14],
            )
        )
    view = pdk.ViewState(
        latitude=float(df["lat"].mean()), longitude=float(df["lon"].mean()), zoom=zoom
    )
    st.pydeck_chart(
        pdk.Deck(
            layers=layers,
            initial_view_state=view,
            map_style=None,
            tooltip={"text": "{name}\n{type}\n{status}"},
        ),
        height=int(panel.get("height", 360)),
    )
