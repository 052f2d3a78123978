"""Commands: operators send a command to a selected device and follow its status; everyone
sees the recent commands of the selected device. Uses the control API (issue 5)."""

from __future__ import annotations

import json
from typing import Any

import pandas as pd
import streamlit as st

from dashboards.client import ApiError, NotAvailable
from dashboards.core import Ctx

TERMINAL = {"success", "failed", "timeout", "cancelled"}
ICONS = {
    "pending": ":gray[●]",
    "sent": ":blue[●]",
    "executing": ":blue[●]",
    "success": ":green[●]",
    "failed": ":red[●]",
    "timeout": ":orange[●]",
    "cancelled": ":gray[●]",
}


def example_params(schema: dict[str, Any] | None) -> dict[str, Any]:
    """A starting value for a command's parameters from its JSON Schema."""
    out: dict[str, Any] = {}
    props = (schema or {}).get("properties") or {}
    for name, decl in props.items():
        t = decl.get("type")
        if "default" in decl:
            out[name] = decl["default"]
        elif t == "boolean":
            out[name] = True
        elif t in ("integer", "number"):
            out[name] = decl.get("minimum", 0) if decl.get("minimum", 0) > 0 else 0
        else:
            out[name] = ""
    return out


def render(ctx: Ctx, panel: dict[str, Any]) -> None:
    st.subheader(panel.get("title") or "Commands")
    devices = ctx.selected(panel)
    if not devices:
        st.info("No device matches this panel's selector.")
        return
    key = f"cmd-{panel.get('title', '')}"
    names = [d["name"] for d in devices]
    device = st.selectbox("Device", names, key=f"{key}-device")
    summary = next(d for d in devices if d["name"] == device)
    commands = ctx.model_commands(summary.get("model"))
    if ctx.login.can("operator"):
        if not commands:
            st.caption(f"Model {summary.get('model')} declares no commands.")
        else:
            c1, c2 = st.columns([2, 3])
            ctype = c1.selectbox("Command", sorted(commands), key=f"{key}-type")
            decl = commands.get(ctype) or {}
            text = c2.text_area(
                "Parameters (JSON)",
                json.dumps(example_params(decl.get("params"))),
                key=f"{key}-params-{device}-{ctype}",
                height=68,
            )
            if st.button("Send command", key=f"{key}-send", type="primary"):
                try:
                    params = json.loads(text or "{}")
                    cmd = ctx.client.send_command(device, ctype, params)
                    st.session_state[f"{key}-last"] = cmd.get("id")
                except json.JSONDecodeError as exc:
                    st.error(f"parameters are not JSON: {exc}")
                except NotAvailable as exc:
                    st.warning(f"Commands are not available on this server: {exc.detail}")
                except ApiError as exc:
                    st.error(exc.detail)
    last = st.session_state.get(f"{key}-last")
    if last:
        try:
            cmd = ctx.client.command(str(last))
            status = str(cmd.get("status"))
            st.markdown(
                f"Command `{cmd.get('type')}` → **{cmd.get('device')}**: "
                f"{ICONS.get(status, '')} **{status}**"
                + (f" — {cmd['error']}" if cmd.get("error") else "")
            )
            if (
                status not in TERMINAL
                and ctx.login.can("operator")
                and st.button("Cancel", key=f"{key}-cancel")
            ):
                ctx.client.cancel_command(str(last))
        except ApiError as exc:
            st.caption(f"command {last}: {exc.detail}")
    try:
        recent = ctx.client.device_commands(device, limit=10)
    except NotAvailable as exc:
        st.caption(f"Commands are not available on this server ({exc.detail}).")
        return
    except ApiError as exc:
        st.caption(exc.detail)
        return
    if recent:
        df = pd.DataFrame(recent)
        cols = [c for c in ("created_at", "type", "status", "error") if c in df.columns]
        if "created_at" in df.columns:
            df["created_at"] = pd.to_datetime(df["created_at"], unit="s", utc=True)
        config = {"created_at": st.column_config.DatetimeColumn("sent", format="HH:mm:ss")}
        st.dataframe(df[cols], hide_index=True, width="stretch", column_config=config)
    else:
        st.caption("No commands for this device yet.")
