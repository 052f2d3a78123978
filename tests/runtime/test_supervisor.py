"""Supervision (twin.runtime.supervisor): restart with backoff, quarantine, cancellation passes
through; and in a real engine: a failing service, device or scene is restarted/isolated while
everything else keeps running; a core failure ends the engine with one clear error."""

from __future__ import annotations

import itertools
from collections.abc import Mapping
from functools import partial
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio
import trio.testing

from tests.runtime.helpers import (
    apply,
    eventually,
    fast_config,
    model,
    running_engine,
    sim_device,
    site,
)
from twin.bindings.base import BindingContext, Reading
from twin.registry.base import Registry
from twin.runtime.device_config import DeviceConfig
from twin.runtime.engine import Engine, EngineCoreError
from twin.runtime.metrics import EngineMetrics
from twin.runtime.state import Status, TwinStore
from twin.runtime.supervisor import ENGINE_DEVICE, RestartPolicy, Supervision, supervise

POLICY = RestartPolicy(
    initial=1.0, maximum=8.0, factor=2.0, reset_after=30.0, quarantine_after=4, quarantine_for=100.0
)


class Alarms:
    """The Supervision's alarm sinks, recorded (the engine wires them to its Monitor)."""

    def __init__(self) -> None:
        self.raised: list[tuple[str, str, str]] = []
        self.cleared: list[tuple[str, str]] = []

    def supervision(self) -> Supervision:
        prom = EngineMetrics(TwinStore())
        return Supervision(
            prom,
            lambda d, t, sev, _msg: self.raised.append((d, t, sev)),
            lambda d, t: self.cleared.append((d, t)),
        )


def metric(sup: Supervision, metric_name: str, **labels: str) -> float | None:
    value = sup.prom.registry.get_sample_value(metric_name, labels)
    return None if value is None else float(value)


async def test_restart_with_exponential_backoff_then_recovery(autojump_clock: Any) -> None:
    alarms = Alarms()
    sup = alarms.supervision()
    starts: list[float] = []

    async def child() -> None:
        starts.append(trio.current_time())
        if len(starts) <= 3:
            raise ValueError(f"boom {len(starts)}")
        await trio.sleep(5)  # the 4th run is good and returns

    await supervise(child, kind="service", name="svc", supervision=sup, policy=POLICY)
    gaps = [b - a for a, b in itertools.pairwise(starts)]
    assert gaps == [1.0, 2.0, 4.0]  # virtual time: exactly the policy's backoff
    assert metric(sup, "twin_supervised_failures_total", kind="service", name="svc") == 3.0
    assert alarms.raised[0] == (ENGINE_DEVICE, "service_failure:svc", "major")
    # the good run cleared the alarm
    assert (ENGINE_DEVICE, "service_failure:svc") in alarms.cleared


async def test_keeps_failing_is_quarantined_then_tried_again(autojump_clock: Any) -> None:
    alarms = Alarms()
    sup = alarms.supervision()
    starts: list[float] = []
    quarantined: list[int] = []

    async def child() -> None:
        starts.append(trio.current_time())
        raise RuntimeError("always")

    with trio.move_on_after(200):
        await supervise(
            child,
            kind="device",
            name="d1",
            supervision=sup,
            policy=POLICY,
            on_quarantine=lambda n, exc: quarantined.append(n),
        )
    # 4 failures (backoff 1, 2, 4), quarantined for 100 s, then one more try: quarantined again
    t0 = starts[0]
    assert [s - t0 for s in starts[:5]] == [0.0, 1.0, 3.0, 7.0, 107.0]
    assert quarantined[:2] == [4, 4]
    assert ("d1", "quarantined", "critical") in alarms.raised
    assert ("d1", "task_failure", "major") in alarms.raised
    assert metric(sup, "twin_supervised_quarantined", kind="device", name="d1") == 1.0


async def test_cancellation_and_base_exceptions_pass_through(autojump_clock: Any) -> None:
    sup = Alarms().supervision()
    ran = trio.Event()

    async def sleeper() -> None:
        ran.set()
        await trio.sleep_forever()

    with trio.CancelScope() as scope:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(
                lambda: supervise(sleeper, kind="service", name="s", supervision=sup)
            )
            await ran.wait()
            scope.cancel()
    assert scope.cancelled_caught
    assert sup.failures == {}  # a cancel is no failure

    async def interrupted() -> None:
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        await supervise(interrupted, kind="service", name="k", supervision=sup)
    assert sup.failures == {}


async def test_with_status_first_start_failure_is_raised_later_ones_restart(
    autojump_clock: Any,
) -> None:
    sup = Alarms().supervision()

    async def broken(*, task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED) -> None:
        raise OSError("port taken")

    async with trio.open_nursery() as nursery:
        with pytest.raises(OSError, match="port taken"):
            await nursery.start(
                lambda task_status: supervise(
                    broken,
                    kind="service",
                    name="api",
                    supervision=sup,
                    with_status=True,
                    task_status=task_status,
                )
            )
    runs: list[float] = []

    async def flaky(*, task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED) -> None:
        runs.append(trio.current_time())
        task_status.started(f"run {len(runs)}")
        if len(runs) < 3:
            await trio.sleep(1)
            raise RuntimeError("later failure")
        await trio.sleep_forever()

    async with trio.open_nursery() as nursery:
        value = await nursery.start(
            lambda task_status: supervise(
                flaky,
                kind="service",
                name="flaky",
                supervision=sup,
                policy=POLICY,
                with_status=True,
                task_status=task_status,
            )
        )
        assert value == "run 1"  # only the first start is reported
        await trio.sleep(20)
        assert len(runs) == 3
        nursery.cancel_scope.cancel()
    assert sup.failures[("service", "flaky")] == 2


# -- in a real engine ------------------------------------------------------------------------------
class CrashingService:
    """Fails a while after it started, ``fail_times`` times, then runs."""

    name = "crashy"

    def __init__(self, fail_times: int) -> None:
        self.fail_times = fail_times
        self.starts = 0

    async def __call__(
        self, engine: Engine, *, task_status: trio.TaskStatus[Any] = trio.TASK_STATUS_IGNORED
    ) -> None:
        self.starts += 1
        task_status.started({"starts": self.starts})
        await trio.sleep(0.5)
        if self.starts <= self.fail_times:
            raise ZeroDivisionError("service bug")
        await trio.sleep_forever()


async def test_a_failing_service_is_restarted_and_the_engine_stays_up(
    registry: Registry, mock_clock: Any
) -> None:
    apply(registry, site(), model(), sim_device("t1"))
    crashy = CrashingService(fail_times=2)
    config = fast_config(restart=RestartPolicy(initial=1.0, reset_after=5.0))
    async with running_engine(registry, config, [crashy], clock=mock_clock) as engine:
        await eventually(lambda: crashy.starts == 3)
        assert engine.service_info["crashy"] == {"starts": 3}  # what the running one reported
        t1 = engine.twin("t1")
        assert t1 is not None
        await eventually(lambda: t1.status == Status.ONLINE)
        got = engine.prom.registry.get_sample_value(
            "twin_supervised_failures_total", {"kind": "service", "name": "crashy"}
        )
        assert got == 2.0
        await engine.writer.flushed()
        alarms = registry.alarms(device=ENGINE_DEVICE, states=["active"])
        assert [a.type for a in alarms] == ["service_failure:crashy"]
        # running well for reset_after clears it
        await trio.sleep(10)
        await engine.writer.flushed()
        assert registry.alarms(device=ENGINE_DEVICE, states=["active"]) == []


class BuggyBinding:
    """A binding whose readings make the device task's ``handle`` fail."""

    protocol = "buggy"

    def __init__(self, device: str) -> None:
        self.device = device

    async def connect(self) -> None:
        await trio.lowlevel.checkpoint()

    async def read(self, points: list[str] | None = None) -> list[Reading]:
        await trio.lowlevel.checkpoint()
        return []

    async def subscribe(self, send: trio.MemorySendChannel[Any]) -> None:
        # a point name that is no string: handle() fails on it (a bug in a binding)
        await send.send(Reading(self.device, ["x"], 1.0, 1.7e9))  # type: ignore[arg-type]
        await trio.sleep_forever()

    async def write(self, point: str, value: Any) -> None:
        await trio.lowlevel.checkpoint()

    async def send_command(self, name: str, params: Mapping[str, Any]) -> Any:
        await trio.lowlevel.checkpoint()

    async def close(self) -> None:
        await trio.lowlevel.checkpoint()


async def test_a_device_that_keeps_failing_is_quarantined_others_keep_running(
    registry: Registry, mock_clock: Any
) -> None:
    apply(registry, site(), model(), sim_device("good"), sim_device("bad"), sim_device("worse"))
    policy = RestartPolicy(initial=1.0, maximum=4.0, quarantine_after=3, quarantine_for=1000.0)
    async with running_engine(registry, fast_config(restart=policy), clock=mock_clock) as engine:
        real = engine.runtime.binding_factory

        def factory(cfg: DeviceConfig, ctx: BindingContext) -> Any:
            if cfg.name == "bad":
                return BuggyBinding(cfg.name)
            if cfg.name == "worse":
                raise KeyError("factory bug")  # not a BindingError: a bug
            from twin.bindings.factory import create_binding

            return real(cfg, ctx) if real else create_binding(cfg.doc, ctx)

        engine.runtime.binding_factory = factory
        for name in ("bad", "worse"):  # restart both with the buggy factory
            task = engine.controller.tasks[name]
            await task.stop()
            del engine.controller.tasks[name]
        await engine.controller.reconcile(engine.specs)
        bad, worse, good = (engine.controller.tasks[n] for n in ("bad", "worse", "good"))
        await eventually(lambda: bad.quarantined and worse.quarantined)
        for task in (bad, worse):
            assert task.twin.status == Status.FAULT
            assert (task.twin.fault or "").startswith("quarantined after 3 failures")
        assert good.twin.status == Status.ONLINE
        n = len(good.twin.reported)
        assert n and not bad.done.is_set()
        await engine.writer.flushed()
        types = {a.type for a in registry.alarms(device="bad", states=["active"])}
        assert {"task_failure", "fault"} <= types
        value = engine.prom.registry.get_sample_value(
            "twin_supervised_quarantined", {"kind": "device", "name": "worse"}
        )
        assert value == 1.0
        # a new revision gives a quarantined device a fresh start (here: a good binding again)
        engine.runtime.binding_factory = real
        apply(
            registry,
            site(),
            model(),
            sim_device("good"),
            sim_device("bad"),
            sim_device("worse"),
            sim_device("extra"),
        )
        engine.poke()
        await eventually(lambda: "extra" in engine.controller.tasks)
        fresh = engine.controller.tasks["bad"]
        assert fresh is not bad and not fresh.quarantined
        await eventually(lambda: fresh.twin.status == Status.ONLINE)


async def test_a_core_failure_ends_the_engine_with_one_clear_error(registry: Registry) -> None:
    apply(registry, site(), model(), sim_device("t1"))
    engine = Engine(registry, fast_config())

    async def broken_run(*, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        await trio.sleep(0.2)
        raise OSError("disk I/O error")

    engine.writer.run = broken_run  # type: ignore[method-assign]
    with pytest.raises(BaseExceptionGroup) as info:
        async with trio.open_nursery() as nursery:
            await nursery.start(engine.run)
            await trio.sleep(30)
    leaves = list(_leaves(info.value))
    assert len(leaves) == 1 and isinstance(leaves[0], EngineCoreError)
    assert str(leaves[0]) == "engine core failure in registry writer: OSError: disk I/O error"


def _leaves(exc: BaseException) -> Any:
    if isinstance(exc, BaseExceptionGroup):
        for e in exc.exceptions:
            yield from _leaves(e)
    else:
        yield exc


async def test_services_can_be_restarted_in_the_same_engine(
    registry: Registry, tmp_path: Path
) -> None:
    """What the supervisor does after a service failed: call it again on the same engine.
    The API and the broker come back on the same ports (their pre-bound sockets were closed
    with the first run), the time-series store is reopened, metrics are not registered twice."""
    from twin.api.app import ApiSettings
    from twin.api.server import ApiService, bind_socket
    from twin.runtime.mqtt_service import MqttService, MqttServiceConfig, bind_listener
    from twin.runtime.timeseries_service import TimeSeriesService

    apply(registry, site(), model(), sim_device("t1", interval="100ms"))
    state = tmp_path / "state"
    api = ApiService("127.0.0.1", 0, ApiSettings(state_dir=state), sock=bind_socket("127.0.0.1", 0))
    mqtt = MqttService(
        MqttServiceConfig(
            listen=[("127.0.0.1", 0)], sockets=[bind_listener("127.0.0.1", 0)], sys_interval=0
        )
    )
    ts = TimeSeriesService(flush_interval=0.1)
    async with running_engine(registry, fast_config(state_dir=state)) as engine:
        seen: list[tuple[Any, Any]] = []
        for _ in range(2):
            async with trio.open_nursery() as nursery:
                svc_ts = await nursery.start(partial(ts, engine))
                m = await nursery.start(partial(mqtt, engine))
                a = await nursery.start(partial(api, engine))
                seen.append((a["port"], m["addresses"]))
                async with httpx.AsyncClient(base_url=a["url"]) as client:
                    assert (await client.get("/api/v1/health")).status_code == 200
                await eventually(
                    lambda s=svc_ts: s.writer is not None and s.writer.points_written > 0
                )
                nursery.cancel_scope.cancel()
        assert seen[0] == seen[1]
        assert ts.store is None  # closed with its run; reopened by the next one


async def test_a_known_failure_is_one_log_line_a_bug_keeps_its_traceback(
    autojump_clock: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """A TwinError (a camera that refuses, a peer that times out) says what went wrong: each
    retry is one line, its traceback only at debug; any other exception is a bug and is logged
    with its traceback."""
    from twin.errors import BindingError

    sup = Alarms().supervision()
    errors: list[Exception] = [BindingError("camera cam1: ffmpeg ended: Connection refused"),
                               ValueError("a bug")]

    async def child() -> None:
        if errors:
            raise errors.pop(0)

    caplog.set_level("INFO", logger="twin.runtime.supervisor")
    await supervise(child, kind="camera", name="cam1", supervision=sup, policy=POLICY, site="s1")
    failed = [r for r in caplog.records if "failed (" in r.getMessage()]
    assert [r.getMessage() for r in failed] == [
        "camera cam1 (site s1) failed (1 in a row): BindingError: camera cam1: ffmpeg ended: "
        "Connection refused; restarting in 1.0s",
        "camera cam1 (site s1) failed (2 in a row): ValueError: a bug; restarting in 2.0s",
    ]
    assert failed[0].exc_info is None
    assert failed[1].exc_info is not None and failed[1].exc_info[0] is ValueError
    assert not [r for r in caplog.records if r.levelname == "DEBUG"]  # not enabled at INFO

    caplog.clear()
    caplog.set_level("DEBUG", logger="twin.runtime.supervisor")
    errors.append(BindingError("stalled"))
    await supervise(child, kind="camera", name="cam1", supervision=sup, policy=POLICY)
    debug = [r for r in caplog.records if r.levelname == "DEBUG"]
    assert len(debug) == 1 and debug[0].exc_info is not None
