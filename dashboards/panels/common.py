"""What several panels do the same way."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

import streamlit as st

from dashboards.client import ApiError

T = TypeVar("T")


def headed(panel: dict[str, Any], title: str, fetch: Callable[[], T]) -> T | None:
    """The panel's heading (its ``title``, else ``title``), then what ``fetch`` reads from the
    API; None, with the API's error shown in the panel, when the request failed."""
    st.subheader(panel.get("title") or title)
    try:
        return fetch()
    except ApiError as exc:
        st.error(str(exc))
        return None
