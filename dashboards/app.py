"""FLUX IoT dashboard (Streamlit): pages and panels from ``kind: Dashboard`` documents.

Run by ``twin dashboard SITE --server URL`` (``streamlit run dashboards/app.py``) with
``FLUX_SERVER`` (API base URL), ``FLUX_SITE`` (site folder: Dashboard documents, models,
locations; without one, or with no Dashboard in it, a default dashboard is generated),
optionally ``FLUX_TOKEN`` (skip the login form) and ``FLUX_REFRESH`` (override the refresh).
Live panels read the engine's WebSocket (``dashboards/live.py``) after a REST backfill; nothing
here touches the engine directly.
"""

from __future__ import annotations

import os
import re
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
from dashboards.live import LiveFeed, cached, feed_for
from dashboards.panels import LIVE, PANELS
from twin.spec.dashboards import dashboards_of, page_rows, row_widths
from twin.spec.units import parse_duration

# FLUX_PROFILE=1: print each panel's server-side render time to stderr (the benchmark reads it)
PROFILE = bool(os.environ.get("FLUX_PROFILE"))


@st.cache_resource(show_spinner=False)
def _site(site: str | None) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The site's documents and dashboards, loaded once per process and shared, not copied
    (``cache_data`` pickles its value on every read: ~1,000 Device documents per rerun).
    Nothing may modify them (the scenes panel deep-copies before it edits)."""
    docs = load_docs(site)
    return docs, dashboards_of(docs)


def _mark(what: str, since: float) -> None:
    if PROFILE:
        print(f"stage {what}: {time.perf_counter() - since:.3f} s", file=sys.stderr, flush=True)


def _client(cfg: Config, token: str | None) -> FluxClient:
    transport = st.session_state.get("flux_transport")  # tests inject an httpx.MockTransport
    if transport is not None or token is None:
        return FluxClient(cfg.server, token, transport=transport)
    return _shared_client(cfg.server, token)


@st.cache_resource(show_spinner=False, max_entries=64)
def _shared_client(server: str, token: str) -> FluxClient:
    """One client (connection pool) per user token: a new httpx.Client costs ~30 ms (its SSL
    context), paid by every rerun before; httpx clients are thread-safe."""
    return FluxClient(server, token)


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


def live_feed(cfg: Config, login: Login) -> LiveFeed | None:
    """The WebSocket feed of this user (shared by the user's sessions), or None: under
    AppTest (an injected transport) and with ``FLUX_LIVE=0`` the panels poll REST."""
    if "flux_transport" in st.session_state or os.environ.get("FLUX_LIVE") == "0":
        return None
    return feed_for(cfg.server, login.token)


def feed_state(feed: LiveFeed | None) -> str:
    if feed is None:
        return "Live updates: REST polling"
    if feed.connected.is_set():
        return "Live updates: WebSocket"
    why = f" ({feed.error})" if feed.error else ""
    return f"Live updates: REST polling until the WebSocket connects{why}"


DEVICES_TTL = 30.0
"""With a live feed the device list (membership, names, models) is fetched again this often;
status and last_seen come from the feed in between."""


def device_list(client: FluxClient, feed: LiveFeed | None) -> list[dict[str, Any]]:
    if feed is None or not feed.connected.is_set():
        return client.devices()

    def fetch() -> tuple[float, list[dict[str, Any]]]:
        started = time.time()
        return started, client.devices()

    started, devices = cached(
        st.session_state, feed, "devices", feed.generation, DEVICES_TTL, fetch
    )
    return feed.overlay(devices, started)


def page_heading(board: str, page: str) -> str:
    """``Plant A · Control``; the dashboard's title alone when it already says the page's
    (``Plant A — overview``, not ``Plant A — overview · Overview``)."""
    words = set(re.findall(r"\w+", board.casefold()))
    if set(re.findall(r"\w+", page.casefold())) <= words:
        return board
    return f"{board} · {page}"


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
    started = time.perf_counter()
    client = _client(cfg, login.token)
    docs, boards = _site(cfg.site)
    _mark("site", started)
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
    st.markdown(f"### {page_heading(str(spec.get('title') or names[0]), str(page['title']))}")
    refresh = cfg.refresh if cfg.refresh is not None else parse_duration(spec.get("refresh", "2s"))
    rows = page_rows(page)
    live = any(p.get("type") in LIVE for row in rows for p in row)

    _mark("sidebar", started)

    def body() -> None:
        t0 = time.perf_counter()
        # every run, fragment reruns too: keeps the feed from closing as idle, and replaces
        # a feed that has stopped
        feed = live_feed(cfg, login) if live else None
        try:
            devices = device_list(client, feed)
            _mark("devices", t0)
        except ApiError as exc:
            if exc.status == 401:
                st.session_state.pop("flux_login", None)
                st.rerun()
            st.error(f"Cannot list devices: {exc}")
            return
        except httpx.HTTPError as exc:
            st.error(f"Cannot reach {cfg.server}: {exc}")
            return
        render_rows(Ctx(client, login, docs, devices, live=feed), rows)
        if live:
            st.caption(feed_state(feed))

    if live and refresh and refresh > 0:
        st.fragment(run_every=refresh)(body)()
    else:
        body()


main()
