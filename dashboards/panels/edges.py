"""Edges: the link state of every edge node (``GET /api/v1/edges``) — online or offline, the
spec revision it runs, lag (age of the oldest record still in its outbox), outbox depth and
size, last sync, records its overflow policy dropped. Offline edges first."""

from __future__ import annotations

import time
from typing import Any

import streamlit as st

from dashboards.core import Ctx
from dashboards.panels.common import headed


def _age(seconds: float | None) -> str:
    if seconds is None:
        return "never"
    if seconds < 90:
        return f"{seconds:.0f} s ago"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min ago"
    return f"{seconds / 3600:.1f} h ago"


def rows(items: list[dict[str, Any]], now: float | None = None) -> list[dict[str, Any]]:
    """One row per edge, offline ones first (pure: tested without Streamlit)."""
    now = time.time() if now is None else now
    out = []
    for e in items:
        last = e.get("last_sync")
        lag = e.get("lag_s")
        dropped = sum(int(v) for v in (e.get("dropped_at_edge") or {}).values())
        out.append({
            "edge": e.get("name"),
            "link": "online" if e.get("online") else "offline",
            "revision": e.get("revision"),
            "lag (s)": None if lag is None else round(float(lag), 1),
            "outbox": int(e.get("outbox_depth") or 0),
            "outbox MB": round(int(e.get("outbox_bytes") or 0) / 1e6, 2),
            "last sync": _age(None if last is None else max(0.0, now - float(last))),
            "dropped": dropped,
            "acked seq": e.get("acked"),
        })  # fmt: skip
    out.sort(key=lambda r: (r["link"] == "online", str(r["edge"])))
    return out


def summary(table: list[dict[str, Any]]) -> str:
    offline = [str(r["edge"]) for r in table if r["link"] == "offline"]
    behind = sum(r["outbox"] for r in table)
    n = len(table)
    line = f"{n} edge{'' if n == 1 else 's'} · {n - len(offline)} online"
    if offline:
        line += f" · **offline: {', '.join(offline)}**"
    return line + f" · {behind} records waiting in outboxes"


def render(ctx: Ctx, panel: dict[str, Any]) -> None:
    items = headed(panel, "Edges", ctx.client.edges)
    if items is None:
        return
    if not items:
        st.caption("No edge nodes: this engine has no EdgeNode in its running revision.")
        return
    table = rows(items)
    st.caption(summary(table))
    height = min(36 * (len(table) + 1) + 3, int(panel.get("height", 400)))
    st.dataframe(table, hide_index=True, use_container_width=True, height=height)
