"""Scenes: list with enabled state; operators run a scene, admins enable/disable it; the last
trace of the chosen scene. Uses the scenes API (issue 5)."""

from __future__ import annotations

import copy
from typing import Any

import streamlit as st

from dashboards.client import ApiError, NotAvailable
from dashboards.core import Ctx


def scene_name(s: dict[str, Any]) -> str:
    return str(s.get("name") or (s.get("metadata") or {}).get("name"))


def is_enabled(s: dict[str, Any]) -> bool:
    spec = s.get("spec")
    return bool((spec if isinstance(spec, dict) else s).get("enabled", True))


def render(ctx: Ctx, panel: dict[str, Any]) -> None:
    st.subheader(panel.get("title") or "Scenes")
    try:
        scenes = ctx.client.scenes()
    except NotAvailable as exc:
        scenes = [d for d in ctx.docs if d.get("kind") == "Scene"]
        st.caption(
            f"Scenes are not available on this server ({exc.detail}); "
            "from the site files, read-only."
        )
        for s in scenes:
            st.markdown(f"- **{scene_name(s)}** — {(s.get('spec') or {}).get('description', '')}")
        return
    except ApiError as exc:
        st.error(str(exc))
        return
    if not scenes:
        st.caption("No scenes.")
        return
    key = f"scenes-{panel.get('title', '')}"
    if ctx.login.can("admin"):
        st.caption("Switched on: the scene runs when its triggers fire. Run: once, now.")
    for s in scenes:
        name = scene_name(s)
        c1, c3 = st.columns([5, 1], vertical_alignment="center")
        if ctx.login.can("admin"):  # the toggle is labelled with the scene: on = enabled
            on = c1.toggle(f"**{name}**", value=is_enabled(s), key=f"{key}-{name}-on")
            if on != is_enabled(s):
                doc = copy.deepcopy(s if "spec" in s else {"spec": s})
                doc["spec"]["enabled"] = on
                try:
                    ctx.client.put_scene(name, doc)
                except ApiError as exc:
                    st.error(exc.detail)
        else:
            c1.markdown(f"**{name}** {'' if is_enabled(s) else '(disabled)'}")
        if ctx.login.can("operator") and c3.button("Run", key=f"{key}-{name}-run"):
            try:
                ctx.client.run_scene(name)
                st.toast(f"scene {name} started")
            except ApiError as exc:
                st.error(exc.detail)
    chosen = st.selectbox("Last trace of", [scene_name(s) for s in scenes], key=f"{key}-trace")
    try:
        traces = ctx.client.scene_traces(chosen, limit=1)
    except ApiError as exc:
        st.caption(exc.detail)
        return
    if traces:
        st.json(traces[0], expanded=False)
    else:
        st.caption("No run recorded yet.")
