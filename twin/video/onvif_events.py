"""ONVIF camera events (PullPoint) as device events: an engine service.

For every applied camera Device with an ``onvif`` binding (``events: false`` opts out) it keeps
one PullPoint subscription (``CreatePullPointSubscription``, then ``PullMessages`` long polls)
and publishes each notification on the engine's bus as that device's event::

    {"kind": "event", "device": "gate_cam", "type": "event",
     "data": {"topic": "tns1:RuleEngine/CellMotionDetector/Motion", "source": {...},
              "data": {"IsMotion": "true"}, "time": "..."}}

the same shape a binding's :class:`~twin.bindings.base.DeviceEvent` takes, so scenes,
WebSocket subscribers and the time series see camera events like any other. A camera without
an event service or one that refuses it is retried with backoff (logged once per failure
streak), never a failure of the service. Follows revisions: devices added, changed or removed
start, restart or stop their loop within ``poll`` seconds.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Mapping
from typing import Any

import trio

from twin.errors import TwinError
from twin.video.onvif import SOURCE, OnvifCamera, in_thread, onvif_options

log = logging.getLogger(__name__)

MAX_EVENTS_PER_PULL = 32


def onvif_devices(specs: Mapping[Any, Mapping[str, Any]]) -> dict[str, Mapping[str, Any]]:
    out = {}
    for (kind, name), doc in specs.items():
        if kind != "Device":
            continue
        options = ((doc.get("spec") or {}).get("binding") or {}).get("onvif")
        if isinstance(options, Mapping) and options.get("events", True) is not False:
            out[str(name)] = doc
    return out


class OnvifEventsService:
    name = "onvif-events"

    def __init__(self, poll: float = 2.0, wait_s: float = 5.0) -> None:
        self.poll = poll
        self.wait_s = wait_s
        self.published = 0
        self.pullpoints: dict[str, str] = {}

    async def __call__(self, engine: Any, *,
                       task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        running: dict[str, tuple[Mapping[str, Any], trio.CancelScope]] = {}
        async with trio.open_nursery() as nursery:
            task_status.started()
            while True:
                wanted = onvif_devices(engine.specs)
                for name in list(running):
                    doc, scope = running[name]
                    if wanted.get(name) != doc:
                        scope.cancel()
                        del running[name]
                for name, doc in wanted.items():
                    if name not in running:
                        scope = trio.CancelScope()
                        running[name] = (doc, scope)
                        nursery.start_soon(self._device, engine, name, doc, scope)
                await trio.sleep(self.poll)

    async def _device(self, engine: Any, name: str, doc: Mapping[str, Any],
                      scope: trio.CancelScope) -> None:
        backoff = 1.0
        failing = False
        with scope:
            while True:
                try:
                    opts = onvif_options(doc, engine.video.secrets)
                    cam = SOURCE.camera(opts)
                    await self._pull(engine, name, cam)
                except TwinError as exc:
                    if not failing:
                        log.warning("camera %s: ONVIF events unavailable: %s (retrying)", name,
                                    exc)
                    failing = True
                    self.pullpoints.pop(name, None)
                    await trio.sleep(backoff)
                    backoff = min(backoff * 2, 60.0)
                else:  # pragma: no cover - _pull only returns by raising
                    backoff = 1.0

    async def _pull(self, engine: Any, name: str, cam: OnvifCamera) -> None:
        pullpoint = await in_thread(cam.create_pullpoint)
        self.pullpoints[name] = pullpoint
        log.info("camera %s: ONVIF events from %s", name, pullpoint)
        try:
            while True:
                messages = await in_thread(cam.pull_messages, pullpoint, self.wait_s,
                                           MAX_EVENTS_PER_PULL)
                twin = engine.twin(name)
                for msg in messages[:MAX_EVENTS_PER_PULL]:
                    engine.bus.publish({
                        "kind": "event", "device": name,
                        "site": twin.site if twin is not None else "",
                        "groups": twin.groups if twin is not None else (),
                        "ts": time.time(), "type": "event", "data": msg,
                    })
                    self.published += 1
                await trio.lowlevel.checkpoint()
        finally:
            with trio.move_on_after(2) as cleanup:
                cleanup.shield = True
                with contextlib.suppress(TwinError):
                    await in_thread(cam.unsubscribe, pullpoint)


__all__ = ["OnvifEventsService", "onvif_devices"]
