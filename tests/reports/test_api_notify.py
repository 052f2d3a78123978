"""Through a running engine: the API runs a report (RBAC, runs listed, file downloaded), and an
alarm raised on a device reaches a NotificationRule's webhook (signed), its clearing sends the
resolved message, and an unacknowledged alarm escalates; a scene's `notify` action uses the
same channels."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import httpx
import trio

from tests.api.conftest import demo_docs, start_api
from twin.control.webhooks import WebhookPolicy
from twin.reports.service import ReportService

from .peers import start_receiver


def _docs(url: str) -> list[dict[str, Any]]:
    report = {
        "apiVersion": "flux.iot/v1", "kind": "Report",
        "metadata": {"name": "daily", "site": "plant-a"},
        "spec": {"title": "Daily", "formats": ["pdf", "csv"],
                 "sections": [{"type": "alarms", "title": "Alarms"},
                              {"type": "devices", "title": "Devices"}]},
    }
    rule = {
        "apiVersion": "flux.iot/v1", "kind": "NotificationRule",
        "metadata": {"name": "ops", "site": "plant-a"},
        "spec": {"match": {"min_severity": "major"},
                 "channels": [{"type": "webhook", "url": url, "secret": {"secret": "hook"}}],
                 "escalate": {"after": "1s", "channels": [
                     {"type": "webhook", "url": url, "secret": {"secret": "hook"}}]}},
    }
    return [*demo_docs(), report, rule]


async def _wait(fn: Any, seconds: float = 20) -> Any:
    with trio.fail_after(seconds):
        while True:
            got = await fn()
            if got:
                return got
            await trio.sleep(0.05)


async def test_api_run_download_and_alarm_notifications(tmp_path: Path) -> None:
    rec = start_receiver()
    os.environ["TWIN_SECRET_HOOK"] = "hook-secret"
    api = None
    try:
        async with trio.open_nursery() as nursery:
            svc = ReportService(webhooks=WebhookPolicy.parse("127.0.0.1/32"), tick=0.05)
            api = await start_api(nursery, tmp_path / "state", docs=_docs(rec.url),
                                  services=[svc])
            admin = {"Authorization": f"Bearer {api.tokens['admin']}"}
            viewer = {"Authorization": f"Bearer {api.tokens['viewer']}"}
            async with httpx.AsyncClient(base_url=api.url, timeout=30) as c:
                r = await c.get("/api/v1/reports", headers=viewer)
                assert r.status_code == 200 and r.json()["items"][0]["name"] == "daily"
                r = await c.post("/api/v1/reports/daily/run", headers=viewer)
                assert r.status_code == 403
                r = await c.post("/api/v1/reports/daily/run?period=2026-01-01..2026-01-02",
                                 headers=admin)
                assert r.status_code == 202, r.text
                run_id = r.json()["id"]

                async def done() -> Any:
                    got = (await c.get(f"/api/v1/reports/runs/{run_id}", headers=viewer)).json()
                    return got if got["status"] != "running" else None

                run = await _wait(done, 60)
                assert run["status"] == "success", run
                assert run["period"]["label"] == "2026-01-01..2026-01-02"
                runs = (await c.get("/api/v1/reports/daily/runs", headers=viewer)).json()
                assert [x["id"] for x in runs["items"]] == [run_id]
                pdf = next(a for a in run["artifacts"] if a["format"] == "pdf")
                r = await c.get(f"/api/v1/reports/runs/{run_id}/files/{pdf['filename']}",
                                headers=viewer)
                assert r.status_code == 200 and r.content.startswith(b"%PDF")
                assert r.headers["content-type"] == "application/pdf"
                r = await c.get(f"/api/v1/reports/runs/{run_id}/files/nope.pdf", headers=viewer)
                assert r.status_code == 404
                r = await c.post("/api/v1/reports/nope/run", headers=admin)
                assert r.status_code == 404
                r = await c.post("/api/v1/reports/daily/run?period=someday", headers=admin)
                assert r.status_code == 422 and "unknown period" in r.text

                # notifications: raised -> webhook, escalated (not acknowledged in 1 s), resolved
                api.engine.monitor.raise_alarm("t1", "overheat", "critical", "too hot")
                await _wait(lambda: _async(len(rec.bodies) >= 1))
                first = rec.bodies[0]
                assert first["event"] == "alarm.raised" and first["rule"] == "ops"
                assert first["alarms"][0]["device"] == "t1"
                await _wait(lambda: _async(any(b["event"] == "alarm.escalated"
                                               for b in rec.bodies)))
                api.engine.monitor.clear_alarm("t1", "overheat")
                await _wait(lambda: _async(any(b["event"] == "alarm.resolved"
                                               for b in rec.bodies)))
                # what was sent, with each channel's answer, through the API
                async def settled() -> Any:
                    r = await c.get("/api/v1/notifications", headers=viewer)
                    assert r.status_code == 200, r.text
                    return r if all(e["deliveries"] for e in r.json()["items"]) else None

                r = await _wait(settled)
                events = [e["event"] for e in r.json()["items"]]
                assert events[:3] == ["resolved", "escalated", "raised"], events
                assert all(d["status"] == "delivered"
                           for e in r.json()["items"] for d in e["deliveries"])
                assert r.json()["counts"]["escalated"] == 1
                # a minor alarm does not match min_severity: major
                n = len(rec.bodies)
                api.engine.monitor.raise_alarm("t2", "dusty", "minor", "dust")
                await trio.sleep(0.5)
                assert len(rec.bodies) == n and rec.bad_signatures == 0
            nursery.cancel_scope.cancel()
    finally:
        os.environ.pop("TWIN_SECRET_HOOK", None)
        rec.stop()
        if api is not None:
            api.registry.close()


async def _async(value: Any) -> Any:
    await trio.lowlevel.checkpoint()
    return value
