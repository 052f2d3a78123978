"""The engine's one MQTT connection, shared by every MQTT device binding.

::

    MqttBinding ──route(filter, handler)──▶ MqttHub ──▶ Transport ──▶ broker
         ▲                                     │
         └────── handler(InMessage) ◀── dispatch (own topic tree) ◀── messages

* :class:`MqttHub` keeps its own :class:`~twin.mqtt.topics.SubscriptionTree` of
  ``filter → handlers`` and subscribes each distinct filter once on its transport (with
  ``$share/<group>/`` in front when the engine runs as one of several sharing device traffic).
  Incoming messages are matched against that tree and handed to the handlers synchronously;
  handlers must be quick and never block (bindings push into their bounded channel with
  ``send_nowait`` and count what they had to drop).
* Transports: :class:`EmbeddedTransport` (the in-process :class:`~twin.mqtt.local.LocalClient`
  of the embedded broker: no TCP) and :class:`twin.mqtt.paho_trio.PahoTransport` (an external
  broker through paho-mqtt driven from Trio).
* ``on_offline(device, reason)`` is set by the engine service: bindings call
  :meth:`MqttHub.device_offline` when a device's Last Will / status topic says it is gone, and the
  engine marks it offline at once (instead of waiting for its heartbeat timeout).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Protocol

import trio

from twin.mqtt import codec as c
from twin.mqtt.session import Message
from twin.mqtt.topics import SubscriptionTree

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class InMessage:
    """A message as a binding sees it (transport-independent)."""

    topic: str
    payload: bytes
    qos: int = 0
    retain: bool = False
    response_topic: str | None = None
    correlation_data: bytes | None = None
    user_properties: tuple[tuple[str, str], ...] = ()
    logged: Any = None
    """The readings the embedded broker's durability hook put in the write-ahead log for this
    message (``MqttHub.readings``), already marked ``logged``: the binding passes these on
    instead of parsing the payload again. None: nothing was logged."""


Handler = Callable[[InMessage], None]
Check = Callable[[InMessage], "str | None"]
Readings = Callable[[InMessage], "list[Any]"]
"""Why a message would be refused by its route's handler (None: acceptable)."""


class Prefetcher(Protocol):
    """A route's handler that can decode many messages at once, ahead of their one-by-one
    handling (the MQTT binding with a codec: one plugin call for what arrived together)."""

    def prefetch_key(self, msg: InMessage) -> str | None:
        """What groups ``msg`` with others for one call (the codec's name), or None: nothing
        to do ahead for it."""

    def prefetch_many(self, items: Sequence[tuple[Any, InMessage]]) -> None:
        """Decode ``(owner, msg)`` pairs of one key together; each owner remembers its own
        (never raises for what a message holds)."""

    def forget(self, msg: InMessage) -> None:
        """Drop what was remembered for ``msg`` (its handling is over)."""


class Transport(Protocol):
    """What the hub needs from a connection to a broker."""

    name: str

    async def subscribe(self, flt: str, qos: int) -> None: ...

    async def unsubscribe(self, flt: str) -> None: ...

    async def publish(
        self,
        topic: str,
        payload: bytes,
        qos: int = 0,
        retain: bool = False,
        *,
        response_topic: str | None = None,
        correlation_data: bytes | None = None,
        user_properties: Sequence[tuple[str, str]] = (),
    ) -> None: ...


@dataclass(eq=False)
class Route:
    flt: str
    handler: Handler
    qos: int = 1
    check: Check | None = None
    readings: Readings | None = None
    prefetch: Prefetcher | None = None


@dataclass
class HubStats:
    received: int = 0
    unrouted: int = 0
    published: int = 0
    handler_errors: int = 0
    refused: int = 0
    offline_events: int = 0
    routes: int = 0
    extra: dict[str, int] = field(default_factory=dict)


class MqttHub:
    def __init__(self, transport: Transport, *, share_group: str | None = None) -> None:
        self.transport = transport
        self.share_group = share_group
        self.tree = SubscriptionTree()
        self._refs: dict[str, int] = {}
        self._lock = trio.Lock()
        self.stats = HubStats()
        self.on_offline: Callable[[str, str], None] | None = None
        self.on_refused: Callable[[str, str], None] | None = None

    def wire(self, flt: str) -> str:
        """The filter as subscribed on the broker."""
        return f"$share/{self.share_group}/{flt}" if self.share_group else flt

    async def route(
        self,
        flt: str,
        handler: Handler,
        qos: int = 1,
        *,
        check: Check | None = None,
        readings: Readings | None = None,
        prefetch: Prefetcher | None = None,
    ) -> Route:
        """Hand messages matching ``flt`` to ``handler``; ``check`` (optional) tells the
        embedded broker, before it acknowledges a publish, whether the handler would refuse
        it (see :meth:`check`); ``readings`` (optional) gives the readings the handler would
        take from a message, for the write-ahead log (see :meth:`readings`); ``prefetch``
        (optional) decodes messages that arrived together in one go (see :meth:`prefetch`)."""
        r = Route(flt, handler, qos, check, readings, prefetch)
        async with self._lock:
            self.tree.add(flt, id(r), r)
            self.stats.routes += 1
            n = self._refs.get(flt, 0)
            self._refs[flt] = n + 1
            if n == 0:
                try:
                    await self.transport.subscribe(self.wire(flt), qos)
                except BaseException:
                    self.tree.remove(flt, id(r))
                    self.stats.routes -= 1
                    self._refs[flt] = n
                    if n == 0:
                        del self._refs[flt]
                    raise
        return r

    async def unroute(self, r: Route) -> None:
        async with self._lock:
            if not self.tree.remove(r.flt, id(r)):
                return
            self.stats.routes -= 1
            n = self._refs.get(r.flt, 1) - 1
            if n > 0:
                self._refs[r.flt] = n
                return
            self._refs.pop(r.flt, None)
            try:
                await self.transport.unsubscribe(self.wire(r.flt))
            except Exception as exc:  # the connection may be gone: nothing left to undo
                log.debug("mqtt hub: unsubscribe %s failed: %s", r.flt, exc)

    def dispatch(self, msg: InMessage) -> None:
        """Called by the transport for every incoming message (synchronously, never raises)."""
        self.stats.received += 1
        hits = self.tree.match(msg.topic)
        if not hits:
            self.stats.unrouted += 1
            return
        for _flt, _key, r in hits:
            try:
                r.handler(msg)
            except Exception:
                self.stats.handler_errors += 1
                log.exception("mqtt hub: handler for %s failed", r.flt)

    def check(self, msg: InMessage) -> str | None:
        """Why a route's handler would refuse ``msg`` (the first reason), or None. Called by
        the embedded broker for a publish it is about to acknowledge (never raises)."""
        for _flt, _key, r in self.tree.match(msg.topic):
            if r.check is None:
                continue
            try:
                problem = r.check(msg)
            except Exception:
                self.stats.handler_errors += 1
                log.exception("mqtt hub: payload check for %s failed", r.flt)
                return "payload could not be checked"
            if problem is not None:
                return problem
        return None

    def readings(self, msg: InMessage) -> list[Any]:
        """The readings the routes' handlers would take from ``msg`` (for the write-ahead log
        before the embedded broker acknowledges it; a route that would refuse it adds none).
        Never raises."""
        out: list[Any] = []
        for _flt, _key, r in self.tree.match(msg.topic):
            if r.readings is None:
                continue
            try:
                out.extend(r.readings(msg))
            except Exception:
                self.stats.handler_errors += 1
                log.exception("mqtt hub: readings of %s failed", r.flt)
        return out

    def prefetch(self, msgs: Sequence[InMessage]) -> list[tuple[Any, InMessage]]:
        """Before messages that arrived together are handled one by one (a socket read's
        publishes, a delivery queue drained in one turn): let their routes' prefetchers decode
        them in one call per key (a codec: one plugin call instead of one per message). Nothing
        waits for more to arrive, so a lone message costs what it did. Returns the pairs to
        :meth:`forget` once the messages are handled. Never raises."""
        groups: dict[str, list[tuple[Any, InMessage]]] = {}
        tree = self.tree
        for msg in msgs:
            for _flt, _key, r in tree.match(msg.topic):
                p = r.prefetch
                if p is None:
                    continue
                try:
                    key = p.prefetch_key(msg)
                except Exception:
                    log.exception("mqtt hub: prefetch key of %s failed", r.flt)
                    continue
                if key is not None:
                    groups.setdefault(key, []).append((p, msg))
        pairs: list[tuple[Any, InMessage]] = []
        for items in groups.values():
            if len(items) < 2:
                continue  # decoded when handled, as before
            try:
                items[0][0].prefetch_many(items)
            except Exception:
                self.stats.handler_errors += 1
                log.exception("mqtt hub: prefetch failed (messages are decoded one by one)")
            pairs.extend(items)
        return pairs

    @staticmethod
    def forget(pairs: Sequence[tuple[Any, InMessage]]) -> None:
        for owner, msg in pairs:
            try:
                owner.forget(msg)
            except Exception:
                log.exception("mqtt hub: forgetting a prefetched message failed")

    def refused(self, device: str, reason: str) -> None:
        """A binding refused a message of ``device`` (bad values): count and report it."""
        self.stats.refused += 1
        if self.on_refused is not None:
            try:
                self.on_refused(device, reason)
            except Exception:
                log.exception("mqtt hub: reporting a refused message of %s failed", device)

    async def publish(
        self,
        topic: str,
        payload: bytes,
        qos: int = 1,
        retain: bool = False,
        *,
        response_topic: str | None = None,
        correlation_data: bytes | None = None,
        user_properties: Sequence[tuple[str, str]] = (),
    ) -> None:
        self.stats.published += 1
        await self.transport.publish(
            topic,
            payload,
            qos,
            retain,
            response_topic=response_topic,
            correlation_data=correlation_data,
            user_properties=user_properties,
        )

    def device_offline(self, device: str, reason: str) -> None:
        self.stats.offline_events += 1
        if self.on_offline is not None:
            try:
                self.on_offline(device, reason)
            except Exception:
                log.exception("mqtt hub: marking %s offline failed", device)


def in_message(msg: Message, retained: bool = False) -> InMessage:
    p = msg.properties
    return InMessage(
        msg.topic,
        msg.payload,
        msg.qos,
        retained,
        p.response_topic,
        p.correlation_data,
        p.user_property,
        msg.logged,
    )


class EmbeddedTransport:
    """The hub's transport inside the engine: a :class:`~twin.mqtt.local.LocalClient`."""

    name = "embedded"

    def __init__(self, broker: Any, *, client_id: str | None = None) -> None:
        from twin.mqtt.local import LocalClient

        self.hub: MqttHub | None = None
        self.client = LocalClient(broker, self._on_message, client_id=client_id)
        self.client.on_batch = self._on_batch

    def _on_batch(self, msgs: Sequence[tuple[Message, bool]]) -> Callable[[], None] | None:
        """The delivery queue's messages of one turn, before they are dispatched: decode the
        ones that need it together (:meth:`MqttHub.prefetch`; what is decoded is remembered
        by the payload object, which the dispatched message carries too)."""
        hub = self.hub
        if hub is None:
            return None
        pairs = hub.prefetch([in_message(m, retained) for m, retained in msgs])
        if not pairs:
            return None
        return partial(hub.forget, pairs)

    def _on_message(self, msg: Message, retained: bool) -> None:
        if self.hub is not None:
            self.hub.dispatch(in_message(msg, retained))

    async def run(self, *, task_status: trio.TaskStatus[Any] = trio.TASK_STATUS_IGNORED) -> None:
        await self.client.run(task_status=task_status)

    async def subscribe(self, flt: str, qos: int) -> None:
        self.client.subscribe(flt, qos)
        await trio.lowlevel.checkpoint()

    async def unsubscribe(self, flt: str) -> None:
        self.client.unsubscribe(flt)
        await trio.lowlevel.checkpoint()

    async def publish(
        self,
        topic: str,
        payload: bytes,
        qos: int = 0,
        retain: bool = False,
        *,
        response_topic: str | None = None,
        correlation_data: bytes | None = None,
        user_properties: Sequence[tuple[str, str]] = (),
    ) -> None:
        props = c.NO_PROPS
        if response_topic or correlation_data or user_properties:
            props = c.Properties(
                response_topic=response_topic,
                correlation_data=correlation_data,
                user_property=tuple(user_properties),
            )
        self.client.publish(topic, payload, qos, retain, props)
        await trio.lowlevel.checkpoint()
