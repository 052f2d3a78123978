"""The engine against a real SQLite registry (in its worker threads), in virtual time.

Each test takes trio's ``mock_clock`` (autojump off) and ``running_engine(..., clock=...)``
drives it with ``drive_clock``: time jumps to the next timer only when every task is blocked and
no registry call is in a thread, so windows of a few seconds are seen exactly as written, fast,
on a loaded machine too."""

from __future__ import annotations

import itertools
from typing import Any

import pytest
import trio

from twin.control.service import ControlService
from twin.registry.base import Registry
from twin.runtime.state import Status

from .helpers import apply, eventually, model, running_engine, sim_device, site


def statuses(registry: Registry, device: str) -> list[str]:
    return [c.status for c in reversed(registry.status_history(device, limit=1000))]


async def test_devices_come_online_and_report(registry: Registry, mock_clock: Any) -> None:
    apply(
        registry, site(), model(), sim_device("t1"), sim_device("t2", desired={"sampling_rate": 5})
    )
    control = ControlService(reconcile_interval=0.5)
    async with running_engine(registry, services=[control], clock=mock_clock) as engine:
        await eventually(lambda: all(t.status == Status.ONLINE for t in engine.twins.all()))
        t2 = engine.twin("t2")
        assert t2 is not None
        await eventually(lambda: "temperature" in t2.reported)
        # desired is written to the device through the command ledger (the only write path)
        # until reported matches, then the delta is empty
        await eventually(lambda: t2.delta() == {} and "sampling_rate" in t2.reported)
        assert t2.reported["sampling_rate"].value == 5
        sets = [c for c in control.ledger.commands.values() if c.device == "t2"]
        assert [(c.source, c.params, str(c.status)) for c in sets] == [
            ("reconciler", {"property": "sampling_rate", "value": 5}, "success")
        ]
        await engine.writer.flushed()
    assert statuses(registry, "t1") == ["online"]
    assert registry.device_rows(["t1"])[0]["status"] == "online"


async def test_heartbeat_timeout_offline_alarm_once_then_recovery(
    registry: Registry, mock_clock: Any
) -> None:
    # silent for 10s once every 20s; heartbeat timeout 3s
    dev = sim_device("flaky", faults={"offline_every": "20s", "offline_for": "10s"})
    apply(registry, site(), model(), dev, sim_device("steady"))
    async with running_engine(registry, clock=mock_clock) as engine:
        flaky = engine.twin("flaky")
        assert flaky is not None
        await eventually(lambda: flaky.status == Status.ONLINE)
        await eventually(lambda: flaky.status == Status.OFFLINE)
        await engine.writer.flushed()
        active = registry.alarms(device="flaky", states=["active"])
        assert [(a.type, a.severity) for a in active] == [("offline", "major")]
        await eventually(lambda: flaky.status == Status.ONLINE)
        await engine.writer.flushed()
        assert registry.alarms(device="flaky", states=["active"]) == []
        # a second outage raises a second alarm (never two at once)
        await eventually(lambda: flaky.status == Status.OFFLINE)
        await engine.writer.flushed()
        assert len(registry.alarms(device="flaky", states=["active"])) == 1
        steady = engine.twin("steady")
        assert steady is not None and steady.status == Status.ONLINE
    hist = statuses(registry, "flaky")
    assert hist[:4] == ["online", "offline", "online", "offline"]
    assert all(a != b for a, b in itertools.pairwise(hist))  # no repeated status
    assert statuses(registry, "steady") == ["online"]
    alarms = registry.alarms(device="flaky", limit=1000)
    assert len(alarms) == hist.count("offline")  # one alarm per outage, never duplicated
    assert sum(a.state != "cleared" for a in alarms) <= 1


async def test_device_fault_and_ok(registry: Registry, mock_clock: Any) -> None:
    dev = sim_device("f", faults={"fault_every": "20s", "fault_for": "5s"})
    apply(registry, site(), model(), dev)
    async with running_engine(registry, clock=mock_clock) as engine:
        twin = engine.twin("f")
        assert twin is not None
        await eventually(lambda: twin.status == Status.FAULT, within=30)
        await engine.writer.flushed()
        assert [a.type for a in registry.alarms(device="f", states=["active"])] == ["fault"]
        assert [a.severity for a in registry.alarms(device="f")] == ["critical"]
        await eventually(lambda: twin.status == Status.ONLINE, within=10)
        await engine.writer.flushed()
        assert registry.alarms(device="f", states=["active"]) == []


async def test_failing_binding_backs_off_and_never_hurts_others(
    registry: Registry, mock_clock: Any
) -> None:
    bad = sim_device(
        "bad", faults={"offline_every": "1h", "offline_for": "1s", "connect_failures": 4}
    )
    unknown = sim_device("modbus_dev", binding={"modbus": {"host": "10.0.0.7"}})
    apply(registry, site(), model(), bad, unknown, sim_device("good"))
    async with running_engine(registry, clock=mock_clock) as engine:
        good, b, u = engine.twin("good"), engine.twin("bad"), engine.twin("modbus_dev")
        assert good and b and u
        await eventually(lambda: b.status == Status.ONLINE)
        assert engine.controller.tasks["bad"].attempts == 4
        assert b.metrics.errors == 4
        assert good.status == Status.ONLINE
        assert u.status == Status.FAULT and "modbus" in (u.fault or "")


async def test_maintenance_suppresses_alarms(registry: Registry, mock_clock: Any) -> None:
    dev = sim_device("m", faults={"offline_every": "20s", "offline_for": "10s"})
    apply(registry, site(), model(), dev)
    async with running_engine(registry, clock=mock_clock) as engine:
        twin = engine.twin("m")
        assert twin is not None
        await eventually(lambda: twin.status == Status.ONLINE)
        rev = apply(
            registry, site(), model(), {**dev, "spec": {**dev["spec"], "maintenance": True}}
        )
        await engine.wait_revision(rev.number)
        assert twin.status == Status.MAINTENANCE
        await trio.sleep(25)  # through an outage window
        assert twin.status == Status.MAINTENANCE
        await engine.writer.flushed()
        assert registry.alarms(device="m") == []
        rev = apply(registry, site(), model(), dev)
        await engine.wait_revision(rev.number)
        assert twin.status in (Status.ONLINE, Status.OFFLINE)
    assert "maintenance" in statuses(registry, "m")


async def test_hot_reload_touches_only_what_changed(registry: Registry, mock_clock: Any) -> None:
    apply(registry, site(), model(), sim_device("a"), sim_device("b"), sim_device("c"))
    async with running_engine(registry, clock=mock_clock) as engine:
        await eventually(lambda: len(engine.twins) == 3)
        tasks = dict(engine.controller.tasks)
        rev = apply(
            registry,
            site(),
            model(),
            sim_device("a"),
            sim_device("b", interval="2s"),
            sim_device("c", desired={"sampling_rate": 9}),
            sim_device("d"),
        )
        t0 = trio.current_time()
        await engine.wait_revision(rev.number)
        assert trio.current_time() - t0 <= 1.0
        now = engine.controller.tasks
        assert now["a"] is tasks["a"]
        assert now["b"] is not tasks["b"]
        assert now["c"] is tasks["c"] and engine.twin("c").desired == {"sampling_rate": 9}  # type: ignore[union-attr]
        assert "d" in now
        assert engine.last_changes.summary() == "1 started, 1 restarted, 1 updated, 0 stopped"
        rev = apply(registry, site(), model(), sim_device("a"))
        await engine.wait_revision(rev.number)
        assert set(engine.controller.tasks) == {"a"}
        assert set(t.name for t in engine.twins.all()) == {"a"}


async def test_restart_resumes_status_and_alarms(registry: Registry, mock_clock: Any) -> None:
    dev = sim_device("r", faults={"offline_every": "1h", "offline_for": "59m"})  # silent after 1m
    apply(registry, site(), model(), dev)
    async with running_engine(registry, clock=mock_clock) as engine:
        twin = engine.twin("r")
        assert twin is not None
        await eventually(lambda: twin.status == Status.OFFLINE, within=200)
        await engine.writer.flushed()
    before = statuses(registry, "r")
    assert before == ["online", "offline"]
    assert registry.device_rows(["r"])[0]["status"] == "offline"
    # while the engine is down the device stays unreachable
    apply(registry, site(), model(), sim_device("r", faults={"connect_failures": 10**6}))
    async with running_engine(registry, clock=mock_clock) as engine:
        twin = engine.twin("r")
        assert twin is not None
        assert twin.status == Status.OFFLINE  # restored, not re-announced
        await trio.sleep(10)
        await engine.writer.flushed()
    assert statuses(registry, "r") == before
    assert [a.state for a in registry.alarms(device="r")] == ["active"]
    # it comes back: the restored alarm is cleared, not duplicated
    apply(registry, site(), model(), sim_device("r"))
    async with running_engine(registry, clock=mock_clock) as engine:
        twin = engine.twin("r")
        assert twin is not None
        await eventually(lambda: twin.status == Status.ONLINE)
        await engine.writer.flushed()
    assert [a.state for a in registry.alarms(device="r")] == ["cleared"]


async def test_metrics_are_persisted(registry: Registry, mock_clock: Any) -> None:
    apply(registry, site(), model(), sim_device("x"))
    async with running_engine(registry, clock=mock_clock) as engine:
        await trio.sleep(12)
        engine.flush_metrics()
        await engine.writer.flushed()
    names = {s.name for s in registry.metrics("x")}
    assert {"messages_in", "uptime_ratio", "errors", "latency_ms"} <= names
    ratios = [s.value for s in registry.metrics("x", names=["uptime_ratio"])]
    assert all(0.0 <= r <= 1.0 for r in ratios) and max(ratios) > 0.5


@pytest.mark.slow
async def test_many_devices_hot_reload_under_load(registry: Registry, mock_clock: Any) -> None:
    devices = [sim_device(f"d{i:04d}", interval="500ms") for i in range(500)]
    apply(registry, site(), model(), *devices)
    async with running_engine(registry, clock=mock_clock) as engine:
        await eventually(lambda: all(t.status == Status.ONLINE for t in engine.twins.all()))
        devices[7] = sim_device("d0007", interval="2s")
        rev = apply(registry, site(), model(), *devices)
        await engine.wait_revision(rev.number)
        assert engine.last_changes.restart == ("d0007",)
        assert engine.last_changes.summary().startswith("0 started, 1 restarted")


async def test_without_control_service_desired_is_not_written(
    registry: Registry, mock_clock: Any
) -> None:
    """The device task never writes desired values itself: without the ControlService (whose
    reconciler goes through the command ledger) the delta stays."""
    apply(registry, site(), model(), sim_device("t2", desired={"sampling_rate": 5}))
    async with running_engine(registry, clock=mock_clock) as engine:
        t2 = engine.twin("t2")
        assert t2 is not None
        await eventually(lambda: "temperature" in t2.reported)
        await trio.sleep(30)
        assert t2.delta() == {"sampling_rate": 5}
        assert "sampling_rate" not in t2.reported
