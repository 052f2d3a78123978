"""FLUX IoT dashboard (Streamlit): pages and panels from ``kind: Dashboard`` documents.

Run by ``twin dashboard SITE --server URL`` (``streamlit run dashboards/app.py``) with
``FLUX_SERVER`` (API base URL), ``FLUX_SITE`` (site folder: Dashboard documents, models,
locations; without one, or with no Dashboard in it, a default dashboard is generated),
optionally ``FLUX_TOKEN`` (skip the login form) and ``FLUX_REFRESH`` (override the refresh).
Everything live comes from the REST API; nothing here touches the engine directly.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # `streamlit run dashboards/app.py` runs this file as a script
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import httpx
import streamlit as st

from dashboards.client import ApiError, FluxClient, Login
from dashboards.core import Config, Ctx, load_docs
from dashboards.panels import LIVE, PANELS
from twin.spec.dashboards import dashboards_of, page_rows, row_widths
from twin.spec.units import parse_duration

# FLUX_PROFILE=1: print each panel's server-side render time to stderr (the benchmark reads it)
PROFILE = bool(os.environ.get("FLUX_PROFILE"))


@st.cache_data(show_spinner=False)
def _docs(site: str | None) -> list[dict[str, Any]]:
    return load_docs(site)


def _client(cfg: Config, token: str | None) -> FluxClient:
    transport = st.session_state.get("flux_transport")  # tests inject an httpx.MockTransport
    return FluxClient(cfg.server, token, transport=transport)


def token_claims(token: str) -> dict[str, Any]:
    """The (unverified) claims of a JWT, for the user name and role shown; the API verifies."""
    import base64
    import json

    try:
        payload = token.split(".")[1]
        data = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    except (IndexError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def login_form(cfg: Config) -> Login | None:
    login: Login | None = st.session_state.get("flux_login")
    if login is not None:
        return login
    if cfg.token:
        claims = token_claims(cfg.token)
        login = Login(str(claims.get("sub", "token")), str(claims.get("role", "viewer")), cfg.token)
        st.session_state["flux_login"] = login
        return login
    st.title("FLUX IoT")
    with st.form("login"):
        st.caption(f"Sign in to {cfg.server}")
        user = st.text_input("User name", key="login-user")
        password = st.text_input("Password", type="password", key="login-password")
        submitted = st.form_submit_button("Sign in", type="primary")
    if submitted:
        client = _client(cfg, None)
        try:
            login = client.login(user, password)
        except ApiError as exc:
            st.error(f"Sign-in failed: {exc.detail}")
            return None
        except httpx.HTTPError as exc:
            st.error(f"Cannot reach {cfg.server}: {exc}")
            return None
        st.session_state["flux_login"] = login
        st.rerun()
    return None


def render_rows(ctx: Ctx, rows: list[list[dict[str, Any]]]) -> None:
    for r, row in enumerate(rows):
        widths = row_widths(row)
        if sum(widths) < 12 and any(p.get("width") for p in row):
            widths.append(12 - sum(widths))  # keep the declared sizes: pad the row
        cols = st.columns(widths, gap="medium")[: len(row)] if len(widths) > 1 else [st.container()]
        for c, (col, panel) in enumerate(zip(cols, row, strict=True)):
            with col, st.container(border=panel.get("type") not in ("stat",), key=f"p-{r}-{c}"):
                fn = PANELS.get(str(panel.get("type")))
                if fn is None:
                    st.warning(f"unknown panel type {panel.get('type')!r}")
                    continue
                started = time.perf_counter()
                try:
                    fn(ctx, panel)
                except ApiError as exc:
                    if exc.status == 401:
                        st.session_state.pop("flux_login", None)
                        st.warning("Your session expired: sign in again.")
                        st.stop()
                    st.error(f"{panel.get('type')}: {exc}")
                finally:
                    if PROFILE:
                        took = time.perf_counter() - started
                        print(f"panel {panel.get('type')} {panel.get('title')!r}: {took:.3f} s",
                              file=sys.stderr, flush=True)  # fmt: skip


def main() -> None:
    st.set_page_config(page_title="FLUX IoT", page_icon="📟", layout="wide")
    cfg = Config.from_env()
    login = login_form(cfg)
    if login is None:
        st.stop()
        return
    client = _client(cfg, login.token)
    docs = _docs(cfg.site)
    boards = dashboards_of(docs)
    names = [str(b["metadata"]["name"]) for b in boards]
    with st.sidebar:
        st.markdown(f"**{login.user}** · {login.role}")
        board = boards[0]
        if len(boards) > 1:
            board = boards[names.index(st.selectbox("Dashboard", names, key="board"))]
        spec = board["spec"]
        titles = [p["title"] for p in spec["pages"]]
        title = st.radio("Page", titles, key="page")
        if st.button("Sign out"):
            st.session_state.pop("flux_login", None)
            st.rerun()
        st.caption(f"API {cfg.server}")
    page = spec["pages"][titles.index(title)]
    st.markdown(f"### {spec.get('title') or names[0]} · {page['title']}")
    refresh = cfg.refresh if cfg.refresh is not None else parse_duration(spec.get("refresh", "2s"))
    rows = page_rows(page)
    live = any(p.get("type") in LIVE for row in rows for p in row)

    def body() -> None:
        try:
            devices = client.devices()
        except ApiError as exc:
            if exc.status == 401:
                st.session_state.pop("flux_login", None)
                st.rerun()
            st.error(f"Cannot list devices: {exc}")
            return
        except httpx.HTTPError as exc:
            st.error(f"Cannot reach {cfg.server}: {exc}")
            return
        render_rows(Ctx(client, login, docs, devices), rows)

    if live and refresh and refresh > 0:
        st.fragment(run_every=refresh)(body)()
    else:
        body()


main()
