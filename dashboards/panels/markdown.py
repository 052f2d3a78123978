from __future__ import annotations

from typing import Any

import streamlit as st

from dashboards.core import Ctx


def render(ctx: Ctx, panel: dict[str, Any]) -> None:
    if panel.get("title"):
        st.subheader(panel["title"])
    st.markdown(str(panel.get("text", "")))
