"""Device tasks without a registry (no worker threads): exact virtual timing."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import trio

from twin.bindings.base import (
    BindingContext,
    DeviceEvent,
    EventType,
    Message,
    Quality,
    Reading,
)
from twin.errors import BindingConnectError
from twin.registry.base import Registry
from twin.runtime.bus import Bus
from twin.runtime.device import Backoff, DeviceRuntime, DeviceTask
from twin.runtime.device_config import DeviceConfig, device_configs
from twin.runtime.monitor import Monitor
from twin.runtime.regio import RegistryIO, RegistryWriter
from twin.runtime.state import Status, TwinStore

from .helpers import model, sim_device, spec_set


class ScriptedBinding:
    """Sends at the given virtual times, then goes silent."""

    protocol = "test"

    def __init__(self, device: str, times: list[float], fail_connects: int = 0) -> None:
        self.device = device
        self.times = times
        self.fail_connects = fail_connects
        self.connects = 0
        self.writes: list[tuple[str, Any]] = []

    async def connect(self) -> None:
        await trio.lowlevel.checkpoint()
        self.connects += 1
        if self.fail_connects:
            self.fail_connects -= 1
            raise BindingConnectError("nope")

    async def read(self, points: list[str] | None = None) -> list[Reading]:
        await trio.lowlevel.checkpoint()
        return []

    async def subscribe(self, send: trio.MemorySendChannel[Message]) -> None:
        for t in self.times:
            await trio.sleep_until(t)
            await send.send(Reading(self.device, "temperature", t, 0.0))
        await trio.sleep_forever()

    async def write(self, point: str, value: Any) -> None:
        await trio.lowlevel.checkpoint()
        self.writes.append((point, value))

    async def send_command(self, name: str, params: Mapping[str, Any]) -> Any:
        await trio.lowlevel.checkpoint()

    async def close(self) -> None:
        await trio.lowlevel.checkpoint()


def make_runtime(binding: ScriptedBinding) -> tuple[DeviceRuntime, RegistryWriter]:
    twins, bus = TwinStore(), Bus()
    writer = RegistryWriter(RegistryIO(object()))  # type: ignore[arg-type]  # never drained here
    monitor = Monitor(twins, bus, writer, clock=trio.current_time)
    rt = DeviceRuntime(
        twins,
        bus,
        monitor,
        BindingContext(),
        backoff=Backoff(initial=1.0, maximum=8.0),
        clock=trio.current_time,
        binding_factory=lambda cfg, ctx: binding,
    )
    return rt, writer


def config(**kw: Any) -> DeviceConfig:
    return device_configs(spec_set(model(), sim_device("dev", **kw)))["dev"]


async def test_offline_detected_exactly_at_the_deadline(autojump_clock: Any) -> None:
    binding = ScriptedBinding("dev", [1.0, 2.0, 3.0])  # then silent; timeout 3s
    rt, writer = make_runtime(binding)
    seen: list[tuple[float, str]] = []
    rt.monitor.on_transition = lambda twin, old, new: seen.append((trio.current_time(), str(new)))
    task = DeviceTask(config(), rt)
    async with trio.open_nursery() as nursery:
        await nursery.start(rt.watchdog.run)
        await nursery.start(task.run)
        await trio.sleep(20)
        nursery.cancel_scope.cancel()
    assert seen == [(1.0, "online"), (6.0, "offline")]
    ops = len(writer)  # status x2, raise alarm, clear nothing (was never active)
    assert ops == 3
    assert math.isinf(task.deadline)


async def test_stale_readings_do_not_keep_a_silent_device_online(autojump_clock: Any) -> None:
    """A binding re-reporting the last good value as stale (the device did not answer) updates
    the twin's value and quality, but is not the device being heard: offline comes at the same
    deadline as without them."""
    binding = ScriptedBinding("dev", [1.0, 2.0, 3.0])  # then silent; timeout 3s
    rt, _ = make_runtime(binding)
    seen: list[tuple[float, str]] = []
    rt.monitor.on_transition = lambda twin, old, new: seen.append((trio.current_time(), str(new)))
    task = DeviceTask(config(), rt)
    async with trio.open_nursery() as nursery:
        await nursery.start(rt.watchdog.run)
        await nursery.start(task.run)
        await trio.sleep(4)
        last_seen = task.twin.last_seen
        for _ in range(2):  # at 4 s and 5 s
            task.handle(Reading("dev", "temperature", 3.0, trio.current_time(), Quality.STALE))
            await trio.sleep(1)
        assert task.twin.reported["temperature"].quality is Quality.STALE
        assert task.twin.last_seen == last_seen
        await trio.sleep(15)
        nursery.cancel_scope.cancel()
    assert seen == [(1.0, "online"), (6.0, "offline")]


async def test_backoff_grows_then_connects(autojump_clock: Any) -> None:
    binding = ScriptedBinding("dev", [], fail_connects=4)
    rt, _ = make_runtime(binding)
    task = DeviceTask(config(), rt)
    async with trio.open_nursery() as nursery:
        await nursery.start(rt.watchdog.run)
        await nursery.start(task.run)
        while not task.connected:  # noqa: ASYNC110
            await trio.sleep(0.01)
        elapsed = trio.current_time()
        nursery.cancel_scope.cancel()
    assert binding.connects == 5
    # delays 1, 2, 4, 8 each jittered into [x/2, x]
    assert 7.5 <= elapsed <= 15.0 + 0.1
    assert task.twin.metrics.errors == 4


async def test_fault_events_and_no_direct_desired_writes(autojump_clock: Any) -> None:
    binding = ScriptedBinding("dev", [1.0])
    rt, _ = make_runtime(binding)
    task = DeviceTask(config(desired={"sampling_rate": 7}), rt)
    async with trio.open_nursery() as nursery:
        await nursery.start(rt.watchdog.run)
        await nursery.start(task.run)
        await trio.sleep(1.5)
        assert task.twin.status == Status.ONLINE
        # desired values reach the device only through the command ledger (ControlService)
        assert binding.writes == []
        assert task.twin.delta() == {"sampling_rate": 7}
        task.handle(DeviceEvent("dev", EventType.FAULT, 0.0, {"message": "fan stuck"}))
        assert task.twin.status == Status.FAULT and task.twin.fault == "fan stuck"
        task.handle(Reading("dev", "temperature", 1.0, 0.0))
        assert task.twin.status == Status.FAULT  # a device fault needs the device's "ok"
        task.handle(DeviceEvent("dev", EventType.OK, 0.0))
        assert task.twin.status == Status.ONLINE
        nursery.cancel_scope.cancel()


def test_registry_protocol_is_what_the_writer_expects() -> None:
    assert hasattr(Registry, "set_device_status") and hasattr(Registry, "raise_alarm")
