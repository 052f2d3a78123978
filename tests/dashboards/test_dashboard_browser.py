"""End to end in headless Chromium: the demo site on a real engine + API, the dashboard through
``twin dashboard``, a browser at 1280x800. Screenshots of every page go to artifacts/dashboards/.

Needs Debian's chromium (``apt-get install -y chromium``) and the playwright Python package
(the browser is /usr/bin/chromium; ``playwright install`` is never run). Skipped without them,
unless ``TWIN_REQUIRE_CHROMIUM=1`` (CI), which makes their absence an error.
"""

from __future__ import annotations

import csv
import io
import re
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.dashboards.browser import ARGS, CHROMIUM, MARKS, MISSING, sign_in, until
from tests.dashboards.procs import ROOT, dashboard, demo_copy, stop, twin_up

ARTIFACTS = ROOT / "artifacts" / "dashboards"
pytestmark = MARKS
if not MISSING:
    import playwright.sync_api as playwright


def _seed_history(site: Path, state: Path, hours: int = 6) -> None:
    """``hours`` of temperature and humidity at 1 min for the demo's TH sensors, written before
    the engine starts (it starts with an empty store): the History page then has a last hour
    and a previous period to compare, and a trend to draw."""
    import math

    from twin.spec import load_site
    from twin.timeseries.base import canonical_tags
    from twin.timeseries.factory import open_store

    store = open_store(None, state)
    end = time.time() // 60 * 60 - 60
    records = []
    for name, doc in sorted(load_site(site).of_kind("Device").items()):
        meta, spec = doc.body["metadata"], doc.body["spec"]
        if spec.get("model") != "th-sensor-v2":
            continue
        tags = canonical_tags(meta.get("tags"), meta.get("labels"))
        k = len(records) / (hours * 120)
        for i in range(hours * 60):
            ts = end - i * 60
            for metric, v in (
                ("temperature", 22 + k + 3 * math.sin(ts / 1800) + i / 240),
                ("humidity", 45 + 2 * k + 5 * math.cos(ts / 2400)),
            ):
                records.append((name, metric, float(v), float(ts), 0, str(meta.get("site")),
                                str(meta.get("group") or ""), tags))  # fmt: skip
    store.write_records(records)
    close = getattr(store, "close", None)
    if close:
        close()


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    site, state, env = demo_copy(
        tmp_path_factory.mktemp("dash"),
        {"operator": "operator", "viewer": "viewer", "admin": "admin"},
    )
    devices = site / "devices.yaml"
    # the HTTP door sensor never reports here: a short heartbeat gives an alarm within seconds
    devices.write_text(
        devices.read_text().replace(
            "heartbeat: {interval: 30s, timeout: 90s}", "heartbeat: {interval: 1s, timeout: 2s}"
        )
    )
    _seed_history(site, state)
    engine, api = twin_up(site, env)
    try:
        with dashboard(site, api, env) as url:
            token = httpx.post(
                f"{api}/api/v1/auth/login", json={"username": "operator", "password": "secret123"}
            ).json()["access_token"]
            headers = {"Authorization": f"Bearer {token}"}
            alarms = f"{api}/api/v1/alarms"
            until(lambda: httpx.get(alarms, headers=headers).json()["items"], limit=60)
            yield {"api": api, "url": url, "token": token}
    finally:
        stop(engine)


@pytest.fixture(scope="module")
def browser() -> Iterator[object]:
    with playwright.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        yield b
        b.close()


def _login(browser: object, url: str, user: str) -> object:
    page = browser.new_page(viewport={"width": 1280, "height": 800}, accept_downloads=True)  # type: ignore[attr-defined]
    sign_in(page, url, user)
    return page


def _shot(page: object, name: str) -> None:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / f"{name}.png"))  # type: ignore[attr-defined]
    page.set_viewport_size({"width": 1280, "height": 2400})  # type: ignore[attr-defined]
    page.wait_for_timeout(1500)  # type: ignore[attr-defined]
    page.screenshot(path=str(ARTIFACTS / f"{name}-full.png"))  # type: ignore[attr-defined]
    page.set_viewport_size({"width": 1280, "height": 800})  # type: ignore[attr-defined]


def _ws_clients(api: httpx.Client) -> float:
    text = api.get("/metrics").text
    m = re.search(r"^twin_ws_clients (\S+)$", text, re.M)
    return float(m.group(1)) if m else 0.0


def _colored_pixels(png: bytes) -> int:
    import numpy as np
    from PIL import Image

    rgb = np.asarray(Image.open(io.BytesIO(png)).convert("RGB")).astype(int)
    return int(((rgb.max(axis=2) - rgb.min(axis=2)) > 60).sum())


def test_overview_devices_chart_and_alarm_ack(stack: dict[str, str], browser: object) -> None:
    page = _login(browser, stack["url"], "operator")
    api = httpx.Client(base_url=stack["api"], headers={"Authorization": f"Bearer {stack['token']}"})
    devices = {d["name"]: d["status"] for d in api.get("/api/v1/devices").json()["items"]}
    grid = page.locator("[data-testid=stDataFrame] [role=gridcell]")  # type: ignore[attr-defined]
    until(lambda: len(grid.all_inner_texts()) >= 5 * len(devices))
    cells = grid.all_inner_texts()
    shown = {cells[i]: cells[i + 3] for i in range(0, len(cells) - 4, 5) if cells[i] in devices}
    assert set(shown) == set(devices)  # every demo device, with its status
    assert set(shown.values()) <= {"online", "offline", "fault", "maintenance", "unknown"}
    assert shown["door_sensor_01"] == "offline"
    chart = page.locator("[data-testid=stVegaLiteChart]").first  # type: ignore[attr-defined]
    chart.scroll_into_view_if_needed()
    # lines and points were drawn: the live chart fills in as readings arrive and the fragment
    # refreshes, so wait for it (bounded) rather than judging the first frame
    until(lambda: _colored_pixels(chart.screenshot()) > 200, limit=60)
    # live panels read the engine's WebSocket (the dashboard's feed is a client of /ws)
    until(lambda: _ws_clients(api) >= 1)
    page.get_by_text("Live updates: WebSocket").wait_for(timeout=30_000)  # type: ignore[attr-defined]
    _shot(page, "overview")
    alarm = api.get("/api/v1/alarms", params={"state": "active"}).json()["items"][0]
    page.locator(f".st-key-ack-{alarm['id']} button").click()  # type: ignore[attr-defined]
    until(lambda: api.get("/api/v1/alarms").json()["items"][0]["state"] != "active")
    state = next(a for a in api.get("/api/v1/alarms").json()["items"] if a["id"] == alarm["id"])
    assert state["state"] == "acknowledged" and state["acked_by"] == "operator"
    page.locator(f".st-key-clear-{alarm['id']}").wait_for(timeout=15_000)  # type: ignore[attr-defined]
    # the page converges: the acknowledged alarm offers Clear and no longer Acknowledge
    page.locator(f".st-key-ack-{alarm['id']}").wait_for(state="detached", timeout=15_000)  # type: ignore[attr-defined]
    _shot(page, "overview-acked")
    page.get_by_text("Control", exact=True).click()  # type: ignore[attr-defined]
    page.get_by_text("Commands", exact=True).wait_for()  # type: ignore[attr-defined]
    page.wait_for_timeout(2000)  # type: ignore[attr-defined]
    _shot(page, "control")
    page.close()  # type: ignore[attr-defined]


def test_history_export_downloads_the_shown_rows(stack: dict[str, str], browser: object) -> None:
    page = _login(browser, stack["url"], "viewer")
    assert page.locator("[class*=st-key-ack-]").count() == 0  # type: ignore[attr-defined]
    page.get_by_text("History", exact=True).first.click()  # type: ignore[attr-defined]
    caption = page.get_by_text(re.compile(r"· (\d+) rows"))  # type: ignore[attr-defined]
    caption.wait_for(timeout=30_000)
    page.get_by_text("Export CSV").wait_for()  # type: ignore[attr-defined]
    page.wait_for_timeout(1500)  # type: ignore[attr-defined]
    _shot(page, "history")
    rows = int(re.search(r"· (\d+) rows", caption.inner_text()).group(1))  # type: ignore[union-attr]
    assert rows > 0
    with page.expect_download() as info:  # type: ignore[attr-defined]
        page.get_by_role("button", name="Export CSV").click()  # type: ignore[attr-defined]
    data = Path(info.value.path()).read_text(encoding="utf-8")
    table = list(csv.reader(io.StringIO(data)))
    assert table[0][:3] == ["ts", "device", "metric"] and len(table) - 1 == rows
    grid = page.locator("[data-testid=stDataFrame] [role=gridcell]").all_inner_texts()  # type: ignore[attr-defined]
    assert table[1][1] in grid  # the first exported row is a row on screen
    # two periods on one chart with a trend line
    page.get_by_text("Compare", exact=True).click()  # type: ignore[attr-defined]
    page.get_by_text(re.compile(r"compared with \S+ earlier")).wait_for(timeout=30_000)  # type: ignore[attr-defined]
    page.get_by_text("Trend line", exact=True).click()  # type: ignore[attr-defined]
    frames = page.locator("[data-testid=stDataFrame]")  # type: ignore[attr-defined]
    until(lambda: frames.count() >= 2)  # the slopes, then the rows
    chart = page.locator("[data-testid=stVegaLiteChart]").first  # type: ignore[attr-defined]
    until(lambda: _colored_pixels(chart.screenshot()) > 200, limit=30)
    _shot(page, "history-compare-trend")
    page.close()  # type: ignore[attr-defined]


def _choose(page: object, label: str, option: str) -> None:
    """Pick ``option`` in the Streamlit selectbox labelled ``label``."""
    box = page.locator("[data-testid=stSelectbox]").filter(has_text=label).first  # type: ignore[attr-defined]
    box.click()
    page.get_by_role("option", name=option, exact=True).click()  # type: ignore[attr-defined]


def test_command_panel_sends_and_follows(stack: dict[str, str], browser: object) -> None:
    headers = {"Authorization": f"Bearer {stack['token']}"}
    if httpx.get(f"{stack['api']}/api/v1/scenes", headers=headers).status_code == 503:
        pytest.skip("twin up does not run the control service yet (503 from the control API)")
    page = _login(browser, stack["url"], "operator")
    page.get_by_text("Control", exact=True).first.click()  # type: ignore[attr-defined]
    page.get_by_role("button", name="Send command").wait_for(timeout=30_000)  # type: ignore[attr-defined]
    _choose(page, "Device", "fan_01")
    page.wait_for_timeout(1000)  # type: ignore[attr-defined]
    _choose(page, "Command", "set_state")
    page.wait_for_timeout(1000)  # type: ignore[attr-defined]
    page.get_by_role("button", name="Send command").click()  # type: ignore[attr-defined]
    page.get_by_text(re.compile(r"Command set_state → fan_01")).wait_for(timeout=30_000)  # type: ignore[attr-defined]
    cmds = httpx.get(f"{stack['api']}/api/v1/devices/fan_01/commands", headers=headers).json()
    assert any(c["type"] == "set_state" for c in cmds["commands"])
    _shot(page, "control-command")
    page.close()  # type: ignore[attr-defined]


def test_admin_scene_toggles_show_whole_names(stack: dict[str, str], browser: object) -> None:
    """Each scene's toggle is labelled with the scene's whole name (it was "enabled", cut to
    "en…" in a narrow column); the page heading does not repeat the page's name."""
    headers = {"Authorization": f"Bearer {stack['token']}"}
    scenes = httpx.get(f"{stack['api']}/api/v1/scenes", headers=headers)
    if scenes.status_code == 503:
        pytest.skip("twin up does not run the control service yet (503 from the control API)")
    from dashboards.client import _items
    from dashboards.panels.scenes import scene_name

    names = sorted(scene_name(s) for s in _items(scenes.json()))
    page = _login(browser, stack["url"], "admin")
    heading = page.get_by_role("heading", level=3).first  # type: ignore[attr-defined]
    assert heading.inner_text().strip() == "Plant A — overview"
    page.get_by_text("Control", exact=True).first.click()  # type: ignore[attr-defined]
    switches = page.get_by_role("switch")  # type: ignore[attr-defined]
    until(lambda: switches.count() == len(names))
    page.wait_for_timeout(1000)  # type: ignore[attr-defined]
    _shot(page, "control-admin")
    for name in names:
        label = page.get_by_text(name, exact=True).first  # type: ignore[attr-defined]
        assert label.is_visible(), name
        # the whole name is drawn: not clipped, no ellipsis
        assert label.evaluate("e => e.scrollWidth <= e.clientWidth + 1"), name
    page.close()  # type: ignore[attr-defined]


def test_edges_page_shows_each_edge_link(stack: dict[str, str], browser: object) -> None:
    """The ``edges`` panel: an EdgeNode applied to the engine shows up, offline (it never
    synced), with its outbox and last sync. Last in this module: the EdgeNode (it owns no
    device) raises an ``edge_offline`` alarm the other tests do not expect."""
    api = stack["api"]
    admin = httpx.post(f"{api}/api/v1/auth/login",
                       json={"username": "admin", "password": "secret123"}).json()["access_token"]  # fmt: skip
    headers = {"Authorization": f"Bearer {admin}"}
    doc = {"apiVersion": "flux.iot/v1", "kind": "EdgeNode",
           "metadata": {"name": "gw-x", "site": "plant-a"},
           "spec": {"devices": {"tag": ["edge-only"]}, "uplink": {"url": "mqtt://127.0.0.1:1883"}}}  # fmt: skip
    r = httpx.post(f"{api}/api/v1/apply", json={"documents": [doc]}, headers=headers)
    assert r.status_code == 200, r.text
    edges = f"{api}/api/v1/edges"
    until(lambda: [e["name"] for e in httpx.get(edges, headers=headers).json()["items"]] == ["gw-x"])
    page = _login(browser, stack["url"], "viewer")
    page.get_by_text("Edges", exact=True).first.click()  # type: ignore[attr-defined]
    page.get_by_text(re.compile(r"offline: gw-x")).wait_for(timeout=30_000)  # type: ignore[attr-defined]
    grid = page.locator("[data-testid=stDataFrame] [role=gridcell]")  # type: ignore[attr-defined]
    until(lambda: "gw-x" in grid.all_inner_texts())
    cells = grid.all_inner_texts()
    assert "offline" in cells and "never" in cells, cells
    _shot(page, "edges")
    page.close()  # type: ignore[attr-defined]
