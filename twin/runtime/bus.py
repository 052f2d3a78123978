"""Fan-out of live events (readings, status changes, alarms) to subscribers.

Every subscriber gets its own bounded memory channel. ``publish`` never blocks: a subscriber
whose buffer is full is dropped (its channel is closed and ``dropped`` is set), so a slow
WebSocket client or consumer can never slow the engine down.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from typing import Any

import trio

log = logging.getLogger(__name__)

KINDS = ("reading", "status", "alarm", "event")


@dataclass(frozen=True)
class Filter:
    """None means "everything"; otherwise an event must match one of the given values."""

    sites: frozenset[str] | None = None
    groups: frozenset[str] | None = None
    devices: frozenset[str] | None = None
    kinds: frozenset[str] | None = None
    unlogged: bool = False
    """Only events not marked ``"logged": true`` (readings already in the write-ahead log:
    the time-series service stores those from the log, so the bus need not queue them)."""

    @classmethod
    def of(
        cls,
        sites: Iterable[str] | None = None,
        groups: Iterable[str] | None = None,
        devices: Iterable[str] | None = None,
        kinds: Iterable[str] | None = None,
        unlogged: bool = False,
    ) -> Filter:
        def fz(v: Iterable[str] | None) -> frozenset[str] | None:
            return None if v is None else frozenset(v)

        return cls(fz(sites), fz(groups), fz(devices), fz(kinds), unlogged)

    def matches(self, event: dict[str, Any]) -> bool:
        if self.kinds is not None and event["kind"] not in self.kinds:
            return False
        if self.unlogged and event.get("logged"):
            return False
        if self.devices is not None and event.get("device") not in self.devices:
            return False
        if self.sites is not None and event.get("site") not in self.sites:
            return False
        return not (
            self.groups is not None and not self.groups.intersection(event.get("groups") or ())
        )


@dataclass(eq=False)
class Subscription:
    filter: Filter
    send: trio.MemorySendChannel[dict[str, Any]]
    receive: trio.MemoryReceiveChannel[dict[str, Any]]
    dropped: bool = False
    delivered: int = 0
    name: str = ""
    _bus: Bus | None = field(default=None, repr=False)


class Bus:
    def __init__(self) -> None:
        self._subs: list[Subscription] = []
        self.published = 0
        self.dropped_subscribers = 0

    def __len__(self) -> int:
        return len(self._subs)

    def open(
        self, filter: Filter | None = None, *, buffer: int = 1000, name: str = ""
    ) -> Subscription:
        send, receive = trio.open_memory_channel[dict[str, Any]](buffer)
        sub = Subscription(filter or Filter(), send, receive, name=name, _bus=self)
        self._subs.append(sub)
        return sub

    def close(self, sub: Subscription) -> None:
        with suppress(ValueError):
            self._subs.remove(sub)
        sub.send.close()

    @contextmanager
    def subscribe(
        self, filter: Filter | None = None, *, buffer: int = 1000, name: str = ""
    ) -> Iterator[Subscription]:
        sub = self.open(filter, buffer=buffer, name=name)
        try:
            yield sub
        finally:
            self.close(sub)

    def publish(self, event: dict[str, Any]) -> None:
        self.published += 1
        drop: list[Subscription] = []
        for sub in self._subs:
            if not sub.filter.matches(event):
                continue
            try:
                sub.send.send_nowait(event)
                sub.delivered += 1
            except trio.WouldBlock:
                drop.append(sub)
            except (trio.ClosedResourceError, trio.BrokenResourceError):
                drop.append(sub)
        for sub in drop:
            sub.dropped = True
            self.dropped_subscribers += 1
            log.warning("bus: dropping slow subscriber %s", sub.name or id(sub))
            self.close(sub)
