"""Device table with filters (status, type, group, text)."""

from __future__ import annotations

from typing import Any

import pandas as pd
import streamlit as st

from dashboards.core import Ctx

DEFAULT_COLUMNS = ["name", "type", "group", "status", "last_seen"]


def table(devices: list[dict[str, Any]], columns: list[str]) -> pd.DataFrame:
    df = pd.DataFrame([{c: d.get(c) for c in columns} for d in devices], columns=columns)
    if "last_seen" in columns:
        df["last_seen"] = pd.to_datetime(df["last_seen"], unit="s", utc=True)
    if "tags" in columns:
        df["tags"] = [", ".join(v or []) for v in df["tags"]]
    if "labels" in columns:
        df["labels"] = [", ".join(f"{k}={x}" for k, x in (v or {}).items()) for v in df["labels"]]
    return df


def filtered(
    devices: list[dict[str, Any]], status: list[str], types: list[str], groups: list[str], text: str
) -> list[dict[str, Any]]:
    text = text.strip().lower()
    return [
        d
        for d in devices
        if (not status or d.get("status") in status)
        and (not types or d.get("type") in types)
        and (not groups or d.get("group") in groups)
        and (not text or text in d["name"].lower() or any(text in t for t in d.get("tags") or []))
    ]


def render(ctx: Ctx, panel: dict[str, Any]) -> None:
    st.subheader(panel.get("title") or "Devices")
    devices = ctx.selected(panel)
    key = f"devices-{panel.get('title', '')}"
    c1, c2, c3, c4 = st.columns(4)
    status = c1.multiselect(
        "Status", sorted({d.get("status", "unknown") for d in devices}), key=f"{key}-status"
    )
    types = c2.multiselect("Type", sorted({str(d.get("type")) for d in devices}), key=f"{key}-type")
    groups = c3.multiselect(
        "Group", sorted({str(d.get("group")) for d in devices}), key=f"{key}-group"
    )
    text = c4.text_input("Search name or tag", key=f"{key}-text")
    shown = filtered(devices, status, types, groups, text)
    columns = list(panel.get("columns") or DEFAULT_COLUMNS)
    df = table(shown, columns)
    st.caption(f"{len(shown)} of {len(devices)} devices")
    config: dict[str, Any] = {}
    if "last_seen" in columns:
        config["last_seen"] = st.column_config.DatetimeColumn("last seen", format="HH:mm:ss")
    st.dataframe(
        df,
        hide_index=True,
        width="stretch",
        column_config=config,
        height=min(36 * (len(df) + 1) + 3, int(panel.get("height", 460))),
    )
