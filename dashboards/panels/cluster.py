"""Cluster: the engines of a scale-out cluster (``GET /api/v1/cluster``), their leases, load
and what each owns; a single engine says so."""

from __future__ import annotations

import time
from typing import Any

import streamlit as st

from dashboards.core import Ctx
from dashboards.panels.common import headed


def rows(doc: dict[str, Any], now: float | None = None) -> list[dict[str, Any]]:
    """One row per engine, for the table (pure: tested without Streamlit)."""
    now = time.time() if now is None else now
    me = (doc.get("engine") or {}).get("id")
    out = []
    for m in doc.get("members") or []:
        load = m.get("load") or {}
        out.append(
            {
                "engine": m.get("name"),
                "this": "●" if m.get("id") == me else "",
                "state": "live" if m.get("alive", True) else "dead",
                "epoch": m.get("epoch"),
                "lease left (s)": round(float(m.get("lease_until", now)) - now, 1),
                "devices": load.get("devices", 0),
                "scenes": load.get("scenes", 0),
                "revision": load.get("revision"),
                "api": m.get("api") or "",
            }
        )
    return out


def render(ctx: Ctx, panel: dict[str, Any]) -> None:
    doc = headed(panel, "Cluster", ctx.client.cluster)
    if doc is None:
        return
    if not doc.get("cluster"):
        st.caption("One engine (not part of a cluster): it runs every device and scene.")
        return
    table = rows(doc)
    stats = doc.get("stats") or {}
    st.caption(
        f"cluster **{doc['cluster']}** · {len(table)} engines live · this engine "
        f"{(doc.get('engine') or {}).get('name')} · failovers seen: "
        f"{stats.get('claimed', 0)} claims, {stats.get('released', 0)} releases, "
        f"{stats.get('scene_dedup', 0)} scene runs deduplicated"
    )
    st.dataframe(table, hide_index=True, use_container_width=True)
