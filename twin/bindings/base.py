"""The one interface every protocol implements, and the data that flows out of it.

Data flows one way: a binding produces :class:`Reading` s (and :class:`DeviceEvent` s for
heartbeats, faults and free events) into a bounded channel owned by the device task; the device
task updates twin state and fans out to subscribers. Commands flow back through
:meth:`Binding.write` and :meth:`Binding.send_command`.

Bindings are registered by protocol name in twin/bindings/registry.py (a dict, never found by
``getattr``); ``create_binding`` in twin/bindings/factory.py builds one from a Device document.
"""

from __future__ import annotations

import enum
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

if TYPE_CHECKING:
    import trio


class Quality(enum.StrEnum):
    """How far a reading can be trusted (stored with it: twin/timeseries/base.py)."""

    GOOD = "good"
    UNCERTAIN = "uncertain"
    """The source says the value may be wrong (an OPC UA ``Uncertain*`` status, a video
    stream that is not live)."""
    STALE = "stale"
    """The last good value again, not a new observation: a poll failed or timed out, or the
    value is older than its poll interval x ``STALE_AFTER`` (OPC UA
    ``UncertainLastUsableValue``)."""
    BAD = "bad"
    """A read or decoding error: no usable value."""


STALE_AFTER = 3
"""A polled value whose own timestamp is older than this many poll intervals is stale."""


@dataclass(frozen=True, slots=True)
class Reading:
    """One observed value of one point of one device."""

    device: str
    point: str
    value: Any
    ts: float  # unix seconds, UTC, as observed by the device (or on receipt)
    quality: Quality = Quality.GOOD
    logged: bool = False
    """In the write-ahead log already (``twin/timeseries/wal.py``): the time-series service
    stores it from there, not from the bus (the bus event carries ``"logged": true``)."""

    def to_json(self) -> dict[str, Any]:
        return {
            "device": self.device,
            "point": self.point,
            "value": self.value,
            "ts": self.ts,
            "quality": str(self.quality),
        }


class EventType(enum.StrEnum):
    HEARTBEAT = "heartbeat"  # "I am alive", no data
    FAULT = "fault"  # the device reports a fault (data: {"message": ...})
    OK = "ok"  # the device reports its fault is gone
    EVENT = "event"  # a free device event (data is passed through)


@dataclass(frozen=True, slots=True)
class DeviceEvent:
    device: str
    type: EventType
    ts: float
    data: Mapping[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {
            "device": self.device,
            "type": str(self.type),
            "ts": self.ts,
            "data": dict(self.data),
        }


Message = Reading | DeviceEvent
"""What a binding sends into its device task."""


@runtime_checkable
class Binding(Protocol):
    """One device's connection to its peer.

    Lifecycle: ``connect()`` once, then ``subscribe(send)`` runs until cancelled (pushing
    readings and events; it may poll or wait for pushes), while ``write`` / ``send_command``
    may be called concurrently; ``close()`` always runs last (also after failures).

    Errors are mapped at this boundary to :class:`~twin.errors.BindingError` subclasses; those
    with ``temporary = True`` are retried by the runtime with backoff. Any other exception is a
    bug: the device's supervisor restarts the device with backoff and quarantines it when it
    keeps failing (``twin.runtime.supervisor``).

    Every value a peer sends is checked with :mod:`twin.bindings.values` (``check_reading``)
    before it becomes a :class:`Reading`: a value that is not acceptable (not finite, beyond
    int64, a string too long or not valid Unicode, nesting too deep, a bad point name) is
    refused at this edge with a message naming the point, and never passed inward. The device
    task drops (and counts) any value a binding failed to refuse.
    """

    protocol: str
    device: str

    async def connect(self) -> None: ...

    async def read(self, points: list[str] | None = None) -> list[Reading]:
        """Read the current values of ``points`` (default: all) once."""
        ...

    async def subscribe(self, send: trio.MemorySendChannel[Message]) -> None:
        """Push readings and events into ``send`` until cancelled."""
        ...

    async def write(self, point: str, value: Any) -> None: ...

    async def send_command(self, name: str, params: Mapping[str, Any]) -> Any: ...

    async def close(self) -> None: ...


@dataclass(frozen=True)
class BindingContext:
    """What the engine hands to a binding factory: services a binding may need."""

    ingest: Any = None  # twin.runtime.ingest.IngestHub for push bindings (http)
    clock: Callable[[], float] | None = None  # wall clock (unix seconds); tests may fake it
    # device -> its DeviceModel spec, filled in by the device task before it builds the binding
    models: dict[str, Mapping[str, Any]] = field(default_factory=dict)
    # (device, point) -> its last reported value or None (the sim's cross-device effects)
    reported: Callable[[str, str], Any] | None = None
    # (device, point) -> the timestamp of its last reported value or None (history backfill)
    last_ts: Callable[[str, str], float | None] | None = None
    # (device, points, since) -> {point: timestamp of its newest stored value since `since`}
    # from the time-series store (history backfill after an engine restart)
    last_stored: Callable[[str, list[str], float], Awaitable[dict[str, float]]] | None = None
    # (device, command types) -> the type of the newest successful one in the command ledger
    # (a camera resumes a command-started recording / a stopped stream after a restart)
    last_command: Callable[[str, Sequence[str]], Awaitable[str | None]] | None = None
    video: Any = None  # twin.video.service.VideoService: camera bindings' pipelines and outputs
    # device -> binding options learnt at run time, over the declared ones: a site simulator
    # whose declared port was taken serves on a free one (twin/runtime/simulators.py)
    endpoints: dict[str, dict[str, Any]] = field(default_factory=dict)
