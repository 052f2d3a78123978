"""Schedules (a missed run runs once at start), notification rules (grouping, throttling,
quiet hours, escalation, resolved) with real folder deliveries, the scene action `notify`,
and the MQTT channel through the engine's embedded broker."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pytest
import trio

from tests.runtime.helpers import apply, fast_config, model, sim_device, site
from twin.control.service import ControlService
from twin.registry import open_registry
from twin.registry.reports import ReportRun
from twin.reports.channels import ChannelContext
from twin.reports.notify import Notifier, in_quiet_hours
from twin.reports.service import ReportService
from twin.runtime.engine import Engine
from twin.spec.secrets import Secrets


def _report(cron: str = "0 6 * * *") -> dict[str, Any]:
    return {"apiVersion": "flux.iot/v1", "kind": "Report",
            "metadata": {"name": "daily", "site": "plant-a"},
            "spec": {"title": "Daily", "formats": ["csv"],
                     "schedule": {"cron": cron, "timezone": "Europe/Berlin"},
                     "sections": [{"type": "devices", "title": "Devices"}]}}


async def test_a_missed_schedule_runs_once_at_start(tmp_path: Path) -> None:
    reg = open_registry(None, tmp_path / "state")
    apply(reg, site(), model(), sim_device("t1"), _report())
    now = time.time()
    # the last scheduled run was three days ago: three 06:00 fire times were missed
    reg.save_report_run(ReportRun("rr_old", "daily", "plant-a", "schedule", "success",
                                  now - 3 * 86400, now - 3 * 86400, now - 3 * 86400,
                                  {"label": "yesterday"}))
    svc = ReportService(tick=0.05)
    engine = Engine(reg, fast_config(state_dir=tmp_path / "state"), [ControlService(), svc])
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(engine.run)
            with trio.fail_after(60):
                while True:
                    runs = reg.report_runs("daily")
                    if runs[0].id != "rr_old" and runs[0].status != "running":
                        break
                    await trio.sleep(0.05)
            await trio.sleep(0.5)
            runs = reg.report_runs("daily")
            missed = [r for r in runs if r.trigger == "missed-schedule"]
            assert len(missed) == 1 and missed[0].status == "success", runs
            assert missed[0].scheduled_for is not None and missed[0].scheduled_for > now - 86400
            assert svc.next_fire["daily"] > now  # the next regular fire time is ahead
            nursery.cancel_scope.cancel()
    finally:
        reg.close()


class Clock:
    def __init__(self, t: float) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


def _notifier(tmp_path: Path, rule_spec: dict[str, Any], clock: Clock
              ) -> tuple[Notifier, list[Any]]:
    specs = {
        ("Site", "plant-a"): {"kind": "Site", "metadata": {"name": "plant-a"},
                              "spec": {"timezone": "UTC"}},
        ("Device", "t1"): {"kind": "Device", "metadata": {"name": "t1", "site": "plant-a"},
                           "spec": {"type": "sensor"}},
        ("NotificationRule", "r"): {"kind": "NotificationRule",
                                    "metadata": {"name": "r", "site": "plant-a"},
                                    "spec": {"channels": [{"type": "folder", "path": "out"}],
                                             **rule_spec}},
    }
    jobs: list[Any] = []
    ctx = ChannelContext(tmp_path, Secrets(environ={}, state_dir=tmp_path))
    return Notifier(ctx, lambda: specs, jobs.append, clock=clock), jobs


def _alarm(i: int, severity: str = "major", t: float = 0.0) -> dict[str, Any]:
    return {"kind": "alarm", "device": "t1", "site": "plant-a", "event": "raised",
            "alarm": {"id": i, "device": "t1", "type": f"a{i}", "severity": severity,
                      "message": f"alarm {i}", "raised_at": t}}


async def _drain(jobs: list[Any]) -> None:
    while jobs:
        await jobs.pop(0)()


def _sent(tmp_path: Path) -> list[dict[str, Any]]:
    return [json.loads(p.read_text()) for p in sorted((tmp_path / "out").glob("*.json"))] \
        if (tmp_path / "out").exists() else []


async def test_grouping_throttling_and_resolved(tmp_path: Path) -> None:
    clock = Clock(1000.0)
    n, jobs = _notifier(tmp_path, {"group": "10s", "throttle": {"max": 1, "window": "1h"}},
                        clock)
    n.feed(_alarm(1, t=1000))
    clock.t += 2
    n.feed(_alarm(2, t=1002))
    n.tick()
    assert jobs == []  # still collecting
    clock.t += 9
    n.tick()
    await _drain(jobs)
    (msg,) = _sent(tmp_path)
    assert msg["event"] == "alarm.raised" and [a["id"] for a in msg["alarms"]] == [1, 2]
    # throttled: max 1 message an hour
    clock.t += 20
    n.feed(_alarm(3, t=clock.t))
    clock.t += 11
    n.tick()
    await _drain(jobs)
    assert len(_sent(tmp_path)) == 1 and n.counts["throttled"] == 1
    # an hour later the held-back count rides along with the next message
    clock.t += 3600
    n.feed(_alarm(4, t=clock.t))
    clock.t += 11
    n.tick()
    await _drain(jobs)
    last = _sent(tmp_path)[-1]
    assert [a["id"] for a in last["alarms"]] == [4] and last["held_back"] == 1
    # cleared: the resolved message
    n.feed({"kind": "alarm", "device": "t1", "site": "plant-a", "event": "cleared",
            "alarm": {"id": 4, "device": "t1", "type": "a4", "severity": "major",
                      "state": "cleared", "raised_at": 0}})
    await _drain(jobs)
    assert _sent(tmp_path)[-1]["event"] == "alarm.resolved"


async def test_quiet_hours_and_escalation(tmp_path: Path) -> None:
    # 23:00 UTC: within 22:00-06:00
    night = 1_767_222_000.0 + 23 * 3600  # 2025-12-31 23:00 UTC
    assert in_quiet_hours({"from": "22:00", "to": "06:00"}, night, "UTC")
    clock = Clock(night)
    n, jobs = _notifier(tmp_path, {
        "quiet_hours": {"from": "22:00", "to": "06:00", "except": "critical"},
        "escalate": {"after": "15m", "channels": [{"type": "folder", "path": "out"}]},
    }, clock)
    n.feed(_alarm(1, "major", night))  # quiet: suppressed
    await _drain(jobs)
    assert _sent(tmp_path) == [] and n.counts["suppressed"] == 1
    n.feed(_alarm(2, "critical", night))  # critical goes through
    await _drain(jobs)
    assert [m["alarms"][0]["id"] for m in _sent(tmp_path)] == [2]
    clock.t += 14 * 60
    n.tick()
    assert jobs == []
    clock.t += 2 * 60
    n.tick()
    await _drain(jobs)
    esc = _sent(tmp_path)[-1]
    assert esc["event"] == "alarm.escalated" and esc["alarms"][0]["id"] == 2
    # acknowledged alarms do not escalate
    n.feed(_alarm(3, "critical", clock.t))
    n.feed({"kind": "alarm", "event": "acknowledged", "device": "t1",
            "alarm": {"id": 3, "device": "t1", "severity": "critical"}})
    clock.t += 3600
    n.tick()
    await _drain(jobs)
    assert sum(m["event"] == "alarm.escalated" for m in _sent(tmp_path)) == 1


async def test_scene_notify_action(tmp_path: Path) -> None:
    scene = {"apiVersion": "flux.iot/v1", "kind": "Scene",
             "metadata": {"name": "tell", "site": "plant-a"},
             "spec": {"triggers": [{"type": "manual"}], "actions": [
                 {"type": "notify", "subject": "hello from a scene", "message": "it works",
                  "channels": [{"type": "folder", "path": "scene-out"}]}]}}
    reg = open_registry(None, tmp_path / "state")
    apply(reg, site(), model(), sim_device("t1"), scene)
    svc = ReportService(tick=0.05)
    control = ControlService()
    engine = Engine(reg, fast_config(state_dir=tmp_path / "state"), [control, svc])
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(engine.run)
            with trio.fail_after(30):
                while "tell" not in control.scenes.scenes:  # noqa: ASYNC110
                    await trio.sleep(0.05)
            run_id = await control.scenes.execute("tell", wait=True)
            trace = reg.scene_trace(str(run_id))
            with trio.fail_after(30):
                while trace is None:
                    await trio.sleep(0.05)
                    trace = reg.scene_trace(str(run_id))
            assert trace.status == "success", trace
            files = list((tmp_path / "state" / "scene-out").glob("*.json"))
            assert len(files) == 1
            body = json.loads(files[0].read_text())
            assert body["subject"] == "hello from a scene" and body["scene"] == "tell"
            nursery.cancel_scope.cancel()
    finally:
        reg.close()


def _mosquitto_up() -> bool:
    import socket

    try:
        socket.create_connection(("127.0.0.1", 1883), timeout=1).close()
        return True
    except OSError:
        return False


@pytest.mark.mosquitto
@pytest.mark.skipif(not _mosquitto_up(), reason="no Mosquitto on 127.0.0.1:1883")
async def test_mqtt_channel_publishes_through_the_engine_broker_connection(tmp_path: Path
                                                                         ) -> None:
    """A rule's mqtt channel publishes through the engine's MQTT connection (here to Mosquitto,
    the external broker); a paho subscriber receives the alarm."""
    import uuid

    from tests.mqtt.conftest import Client, run_sync
    from twin.runtime.mqtt_service import MqttService, MqttServiceConfig

    topic = f"flux-test-{uuid.uuid4().hex[:8]}/alerts"
    rule = {"apiVersion": "flux.iot/v1", "kind": "NotificationRule",
            "metadata": {"name": "mq", "site": "plant-a"},
            "spec": {"channels": [{"type": "mqtt", "topic": topic, "qos": 1}]}}
    reg = open_registry(None, tmp_path / "state")
    apply(reg, site(), model(), sim_device("t1"), rule)
    mqtt = MqttService(MqttServiceConfig(mode="external", broker_host="127.0.0.1",
                                         broker_port=1883, client_id=f"{topic}-engine"))
    engine = Engine(reg, fast_config(state_dir=tmp_path / "state"),
                    [mqtt, ControlService(), ReportService(tick=0.05)])
    sub = await run_sync(lambda: Client(1883, f"{topic}-sub", v5=True))
    try:
        await run_sync(sub.subscribe, topic, 1)
        async with trio.open_nursery() as nursery:
            await nursery.start(engine.run)
            engine.monitor.raise_alarm("t1", "overheat", "critical", "too hot")
            msg = await run_sync(sub.messages.get, True, 20)
            body = json.loads(msg.payload)
            assert body["event"] == "alarm.raised" and body["alarms"][0]["type"] == "overheat"
            assert "CRITICAL t1: overheat" in body["subject"]
            nursery.cancel_scope.cancel()
    finally:
        await run_sync(sub.close)
        reg.close()
