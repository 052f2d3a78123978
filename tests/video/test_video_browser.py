"""The demo's cameras in the dashboard, in Debian's headless Chromium: `twin up sites/demo`,
`twin dashboard`, log in, open the Cameras page; each camera's <video> (hls.js playing the
signed HLS link) advances its currentTime — live video, end to end."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.dashboards.browser import ARGS, CHROMIUM, MARKS, sign_in
from tests.dashboards.procs import ROOT, dashboard, demo_copy, stop, twin_up

pytestmark = MARKS


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    site, _, env = demo_copy(tmp_path_factory.mktemp("video"), {"operator": "operator"})
    engine, api = twin_up(site, env)
    try:
        with dashboard(site, api, env) as url:
            yield {"api": api, "url": url}
    finally:
        stop(engine)


def _current_times(page: Any) -> dict[str, float]:
    out = {}
    for frame in page.frames:
        try:
            got = frame.evaluate(
                "() => { const v = document.querySelector('video[data-camera]');"
                " return v ? [v.dataset.camera, v.currentTime] : null; }")
        except Exception:  # a frame navigating or gone
            continue
        if got:
            out[str(got[0])] = float(got[1])
    return out


def test_cameras_play_live_in_the_dashboard(stack: dict[str, str]) -> None:
    import playwright.sync_api as playwright

    with playwright.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            sign_in(page, stack["url"], "operator", timeout=60_000)
            page.get_by_text("Cameras", exact=True).first.click()
            deadline = time.monotonic() + 90
            first: dict[str, float] = {}
            while time.monotonic() < deadline:  # wait until both players have started
                first = {k: v for k, v in _current_times(page).items() if v > 0}
                if len(first) >= 2:
                    break
                page.wait_for_timeout(500)
            assert set(first) == {"cam_gate_01", "cam_line_01"}, _current_times(page)
            later: dict[str, float] = {}
            while time.monotonic() < deadline:  # ... and keep playing
                later = _current_times(page)
                if all(later.get(k, 0) > v + 1.0 for k, v in first.items()):
                    break
                page.wait_for_timeout(500)
            assert all(later.get(k, 0) > v + 1.0 for k, v in first.items()), (first, later)
            ARTIFACTS = ROOT / "artifacts" / "dashboards"
            ARTIFACTS.mkdir(parents=True, exist_ok=True)
            page.screenshot(path=str(ARTIFACTS / "cameras.png"))
            # PTZ buttons for the operator: a move goes through the ledger to the camera
            page.get_by_role("button", name="▶").first.click()
            token = httpx.post(f"{stack['api']}/api/v1/auth/login",
                               json={"username": "operator", "password": "secret123"}
                               ).json()["access_token"]
            h = {"Authorization": f"Bearer {token}"}

            def ptz_sent() -> bool:
                cmds = httpx.get(f"{stack['api']}/api/v1/devices/cam_gate_01/commands",
                                 headers=h).json()["commands"]
                return any(c["type"] == "ptz" and c["status"] == "success" for c in cmds)

            while time.monotonic() < deadline and not ptz_sent():
                time.sleep(0.5)
            assert ptz_sent()
        finally:
            browser.close()
    assert Path(CHROMIUM).exists()
