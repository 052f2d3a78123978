"""Alarm list; operators (and admins) can acknowledge active alarms and clear them."""

from __future__ import annotations

import time
from datetime import UTC, datetime
from typing import Any

import streamlit as st

from dashboards.client import ApiError
from dashboards.core import Ctx, ago
from dashboards.live import cached
from dashboards.panels.common import headed

SEVERITY = {
    "critical": ":red[■]",
    "major": ":orange[■]",
    "minor": ":orange[■]",
    "warning": ":orange[■]",
    "info": ":blue[■]",
}


def visible(ctx: Ctx, panel: dict[str, Any]) -> list[dict[str, Any]]:
    states = list(panel.get("states") or ["active", "acknowledged"])
    names = {d["name"] for d in ctx.selected(panel)}
    rows = _alarms(ctx, states)
    shown = [a for a in rows if a["device"] in names or not panel.get("select")]
    return sorted(shown, key=lambda a: (a["state"] != "active", -float(a["raised_at"] or 0)))


ALARMS_TTL = 30.0
"""With a live feed the alarm list is fetched again when an alarm event arrives, or after this."""


def _alarms(ctx: Ctx, states: list[str]) -> list[dict[str, Any]]:
    feed = ctx.live
    if feed is None or not feed.connected.is_set():
        return ctx.client.alarms(states=states)
    version = (feed.generation, feed.alarm_version, st.session_state.get("flux_alarms_acted"))
    return list(
        cached(
            st.session_state,
            feed,
            f"alarms:{','.join(states)}",
            version,
            ALARMS_TTL,
            lambda: ctx.client.alarms(states=states),
        )
    )


def render(ctx: Ctx, panel: dict[str, Any]) -> None:
    alarms = headed(panel, "Alarms", lambda: visible(ctx, panel))
    if alarms is None:
        return
    if not alarms:
        st.success("No alarms.")
        return
    operator = ctx.login.can("operator")
    limit = int(panel.get("limit", 15))
    for a in alarms[:limit]:
        with st.container(border=True, key=f"alarm-{a['id']}"):
            c1 = c2 = st.container()
            raised = datetime.fromtimestamp(float(a["raised_at"]), UTC).strftime("%H:%M:%S")
            c1.markdown(
                f"{SEVERITY.get(a['severity'], '■')} **{a['device']}** · {a['type']} · "
                f"`{a['state']}`  \n{a.get('message') or ''} "
                f"<span style='color:gray'>raised {raised} UTC ({ago(a['raised_at'])})"
                + (f", acked by {a['acked_by']}" if a.get("acked_by") else "")
                + "</span>",
                unsafe_allow_html=True,
            )
            if not operator:
                continue
            if a["state"] == "active":
                if c2.button("Acknowledge", key=f"ack-{a['id']}"):
                    _act(ctx, "ack", a["id"])
            elif a["state"] == "acknowledged" and c2.button("Clear", key=f"clear-{a['id']}"):
                _act(ctx, "clear", a["id"])
    if len(alarms) > limit:
        st.caption(f"{len(alarms) - limit} more not shown")


def _act(ctx: Ctx, action: str, alarm_id: int) -> None:
    try:
        if action == "ack":
            ctx.client.ack_alarm(alarm_id)
        else:
            ctx.client.clear_alarm(alarm_id)
    except ApiError as exc:
        st.error(str(exc))
        return
    # the list changed: do not wait for the feed's alarm event
    st.session_state["flux_alarms_acted"] = time.time()
    st.rerun()
