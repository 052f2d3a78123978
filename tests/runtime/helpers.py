"""Spec builders and engine harness shared by runtime and API tests."""

from __future__ import annotations

import math
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import trio
import trio.testing

from twin.registry.base import Registry, Revision
from twin.runtime.device import Backoff
from twin.runtime.engine import Engine, EngineConfig, Service


def site(name: str = "plant-a") -> dict[str, Any]:
    return {
        "apiVersion": "flux.iot/v1",
        "kind": "Site",
        "metadata": {"name": name},
        "spec": {"title": name, "timezone": "Europe/Berlin"},
    }


def group(
    name: str, site_: str = "plant-a", parent: str | None = None, **spec: Any
) -> dict[str, Any]:
    s = dict(spec)
    if parent:
        s["parent"] = parent
    return {
        "apiVersion": "flux.iot/v1",
        "kind": "DeviceGroup",
        "metadata": {"name": name, "site": site_},
        "spec": s,
    }


def model(name: str = "th-sensor", **spec: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "properties": {"sampling_rate": {"type": "integer", "access": "readwrite"}},
        "telemetry": {"temperature": {"type": "number", "unit": "°C"}},
        "commands": {},
    }
    base.update(spec)
    return {
        "apiVersion": "flux.iot/v1",
        "kind": "DeviceModel",
        "metadata": {"name": name},
        "spec": base,
    }


def sim_device(
    name: str,
    *,
    site_: str = "plant-a",
    group_: str | None = None,
    interval: str = "1s",
    heartbeat: dict[str, Any] | None = None,
    faults: dict[str, Any] | None = None,
    points: dict[str, Any] | None = None,
    binding: dict[str, Any] | None = None,
    tags: list[str] | None = None,
    labels: dict[str, str] | None = None,
    model_: str = "th-sensor",
    type_: str = "sensor",
    **spec: Any,
) -> dict[str, Any]:
    meta: dict[str, Any] = {"name": name, "site": site_, "tags": tags or [], "labels": labels or {}}
    if group_:
        meta["group"] = group_
    sim: dict[str, Any] = {
        "interval": interval,
        "points": points
        or {"temperature": {"wave": "sine", "min": 18, "max": 32, "period": "10m"}},
    }
    if faults:
        sim["faults"] = faults
    body: dict[str, Any] = {
        "type": type_,
        "model": model_,
        "binding": binding or {"sim": sim},
        "heartbeat": heartbeat or {"interval": "1s", "timeout": "3s"},
    }
    body.update(spec)
    return {"apiVersion": "flux.iot/v1", "kind": "Device", "metadata": meta, "spec": body}


def spec_set(*docs: dict[str, Any]) -> dict[tuple[str, str], dict[str, Any]]:
    return {(d["kind"], d["metadata"]["name"]): d for d in docs}


def apply(registry: Registry, *docs: dict[str, Any], author: str = "test") -> Revision:
    head = registry.head()
    rev = registry.apply(spec_set(*docs), base=head.number if head else 0, author=author)
    assert rev is not None
    return rev


def fast_config(**kw: Any) -> EngineConfig:
    kw.setdefault("backoff", Backoff(initial=0.1, maximum=1.0, reset_after=5.0))
    kw.setdefault("reload_interval", 0.1)
    kw.setdefault("metrics_interval", 5.0)
    return EngineConfig(**kw)


async def drive_clock(clock: trio.testing.MockClock, engine: Engine) -> None:
    """Autojump that knows about worker threads: jump ``clock`` to the next timer only when
    every task is blocked *and* no registry call of ``engine`` is running in a thread.

    trio's own autojump clock also jumps while a registry write sits in a worker thread (a
    thread-bound task counts as blocked), so virtual time races past windows the test wanted to
    see; this keeps the real registry in its real threads and makes the engine deterministic.
    Use with a plain ``mock_clock`` (autojump off)."""
    while True:
        await trio.testing.wait_all_tasks_blocked()
        if engine.rio.in_flight:
            await engine.rio.idle()
            continue
        jump = trio.lowlevel.current_statistics().seconds_to_next_deadline
        if 0 < jump < math.inf:
            clock.jump(jump)
        else:
            await trio.lowlevel.checkpoint()


@asynccontextmanager
async def running_engine(
    registry: Registry,
    config: EngineConfig | None = None,
    services: list[Service] | None = None,
    *,
    clock: trio.testing.MockClock | None = None,
) -> AsyncIterator[Engine]:
    """Run an engine for the body. With ``clock`` (a MockClock without autojump) virtual time
    is driven by :func:`drive_clock`."""
    async with trio.open_nursery() as nursery:
        engine = Engine(registry, config or fast_config(), services or [])
        await nursery.start(engine.run)
        if clock is not None:
            nursery.start_soon(drive_clock, clock, engine)
        try:
            yield engine
        finally:
            nursery.cancel_scope.cancel()


async def eventually(pred: Callable[[], bool], *, within: float = 60.0, step: float = 0.05) -> None:
    with trio.fail_after(within):
        while not pred():  # noqa: ASYNC110 - polling a plain predicate
            await trio.sleep(step)
