"""Devices on a map, coloured by status: a Vega-Lite scatter on lon/lat by default, deck.gl
(pydeck, WebGL) with ``renderer: deck`` (or ``FLUX_MAP_RENDERER=deck``). Devices without
``spec.location`` are placed on a small ring around their site's location, marked approximate."""

from __future__ import annotations

import math
import os
import re
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
                "color": [*STATUS_COLORS.get(d.get("status", "unknown"), (0, 0, 0)),
                          90 if approx else 220],
            }
            for d, lat, lon, approx in rows
        ]
    )


def approx_note(approx: int, total: int) -> str:
    """Says which positions are placed, not declared (devices without ``spec.location``)."""
    if not approx:
        return ""
    who = "" if approx == total else f" of {total}"
    return f"  ·  {approx}{who} without spec.location: placed around the site (faded)"


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
        + approx_note(int(df["approx"].sum()), len(df))
    )
    height = int(panel.get("height", 360))
    renderer = str(panel.get("renderer") or os.environ.get("FLUX_MAP_RENDERER") or "chart")
    with st.container(key="map-" + re.sub(r"[^A-Za-z0-9_-]+", "-", str(panel.get("title", "")))):
        if renderer == "deck":
            deck(df, height)
        else:
            chart(df, height)


def chart(df: pd.DataFrame, height: int) -> None:
    """A Vega-Lite scatter on lon/lat (pan and zoom with the mouse): no WebGL, no deck.gl
    bundle, so it draws as fast as any chart; the sites we map are a few hundred metres wide,
    where an equirectangular view is exact enough. Without a base map, like the deck view.

    The spec is written as a dict (Altair's validation cost ~60 ms per refresh at 1,000
    devices)."""
    statuses = sorted(set(df["status"]) | {"online", "offline", "fault"})
    colors = ["#{:02x}{:02x}{:02x}".format(*STATUS_COLORS.get(s, (0, 0, 0))) for s in statuses]
    span_lat = float(df["lat"].max() - df["lat"].min()) or 0.001
    span_lon = float(df["lon"].max() - df["lon"].min()) or 0.001
    pad_lat, pad_lon = span_lat * 0.08 + 0.0002, span_lon * 0.08 + 0.0002
    x = {
        "field": "lon",
        "type": "quantitative",
        "axis": None,
        "scale": {"domain": [float(df["lon"].min()) - pad_lon, float(df["lon"].max()) + pad_lon]},
    }
    y = {
        "field": "lat",
        "type": "quantitative",
        "axis": None,
        "scale": {"domain": [float(df["lat"].min()) - pad_lat, float(df["lat"].max()) + pad_lat]},
    }
    layers: list[dict[str, Any]] = [
        {
            "mark": {
                "type": "circle",
                "size": 60 if len(df) <= MAX_LABELS else 18,
                "stroke": "white",
                "strokeWidth": 0.5,
            },
            "params": [{"name": "view", "select": "interval", "bind": "scales"}],
            "encoding": {
                "x": x,
                "y": y,
                "color": {
                    "field": "status",
                    "type": "nominal",
                    "scale": {"domain": statuses, "range": colors},
                    "legend": {"orient": "bottom", "title": None},
                },
                "opacity": {
                    "field": "approx",
                    "type": "nominal",
                    "scale": {"domain": [False, True], "range": [0.9, 0.35]},
                    "legend": None,
                },
                "tooltip": [{"field": c, "type": "nominal"} for c in ("name", "type", "status")],
            },
        }
    ]
    if len(df) <= MAX_LABELS:  # beyond that, labels are clutter: names on hover
        layers.append(
            {
                "mark": {"type": "text", "dy": -10, "fontSize": 11, "color": "#333"},
                "encoding": {"x": x, "y": y, "text": {"field": "name", "type": "nominal"}},
            }
        )
    st.vega_lite_chart(
        df[["name", "status", "type", "lat", "lon", "approx"]],
        {"height": height, "layer": layers},
        width="stretch",
    )


def deck(df: pd.DataFrame, height: int) -> None:
    """deck.gl (WebGL): for large or spread-out sites; costs a WebGL context and its bundle."""
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
        height=height,
    )
