"""Devices that either push to the engine or are polled at a URL (the ``http`` and ``coap``
bindings): the options both read the same way, and the poll loop both run.

``mode`` (``push`` by default), ``url`` / ``write_url`` / ``command_url``, ``interval`` (10 s),
``timeout`` (5 s) and ``points`` (point name -> dotted ``path`` in the answer, the name itself
by default). What a mode means, and the modes beyond these two, stay with each binding.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, NoReturn

import trio

from twin.bindings.base import DeviceEvent, EventType, Message, Reading
from twin.errors import BindingError
from twin.spec.units import parse_duration


@dataclass(frozen=True)
class PollOptions:
    mode: str
    url: Any
    write_url: Any
    command_url: Any
    interval: float
    timeout: float
    points: dict[str, str]

    @classmethod
    def parse(cls, options: Mapping[str, Any], *, zero_interval: float) -> PollOptions:
        """``zero_interval``: the poll interval when the spec says 0."""
        return cls(
            mode=str(options.get("mode", "push")),
            url=options.get("url"),
            write_url=options.get("write_url"),
            command_url=options.get("command_url"),
            interval=parse_duration(options.get("interval", "10s")) or zero_interval,
            timeout=parse_duration(options.get("timeout", "5s")) or 5.0,
            points={
                str(k): str((v or {}).get("path", k))
                for k, v in (options.get("points") or {}).items()
            },
        )


async def poll_forever(
    device: str,
    read: Callable[[], Awaitable[list[Reading]]],
    send: trio.MemorySendChannel[Message],
    interval: float,
    clock: Callable[[], float],
    *,
    on_error: Callable[[], Iterable[Reading]] = tuple,
) -> NoReturn:
    """Read every ``interval`` and send what was read, or a heartbeat when it was nothing (the
    device answered). A failed read sends ``on_error()`` (e.g. the last values, stale) and
    raises: the device task reconnects with backoff."""
    while True:
        try:
            readings = await read()
        except BindingError:
            for r in on_error():
                await send.send(r)
            raise
        for r in readings:
            await send.send(r)
        if not readings:
            await send.send(DeviceEvent(device, EventType.HEARTBEAT, clock()))
        await trio.sleep(interval)
