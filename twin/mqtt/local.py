"""An in-process client of the embedded :class:`~twin.mqtt.broker.Broker` (no TCP, no codec).

The engine talks to its own broker through one ``LocalClient``: it owns a broker
:class:`~twin.mqtt.session.Session` whose "connection" is this object, so routing, retained
messages, shared subscriptions and the bounded queue with its drop policy all work exactly as
for a network client. Delivery is immediate (no packet ids, no acks: nothing can be lost
between two objects in one process); messages are handed to ``on_message`` by a pump task.
Authentication and ACLs are not applied: the engine is trusted.

It publishes with :meth:`Broker.publish`, so MQTT 5 properties (response topic, correlation
data, user properties) reach 5.0 subscribers and are dropped for 3.1.1 ones as usual.
"""

from __future__ import annotations

import logging
import secrets
from collections.abc import Callable, Sequence

import trio

from twin.mqtt import codec as c
from twin.mqtt.broker import Broker
from twin.mqtt.session import Message, Outgoing, Session, SubOptions
from twin.mqtt.topics import matches, parse_shared

log = logging.getLogger(__name__)

OnMessage = Callable[[Message, bool], None]
OnBatch = Callable[[Sequence[tuple[Message, bool]]], "Callable[[], None] | None"]
"""``on_batch(messages)``: the (message, retained) pairs about to be handed to ``on_message`` in
one turn; may return a callable run once they have been (e.g. to drop what it prepared)."""
"""``on_message(message, retained)``: ``retained`` is the RETAIN flag as a subscriber sees it
(set for retained messages sent on subscribe, clear for live ones unless retain-as-published)."""


class LocalClient:
    """One in-process session. ``await nursery.start(client.run)``, then subscribe/publish."""

    def __init__(
        self,
        broker: Broker,
        on_message: OnMessage,
        *,
        client_id: str | None = None,
        max_queued: int = 100_000,
    ) -> None:
        self.broker = broker
        self.on_message = on_message
        self.client_id = client_id or f"$flux-engine-{secrets.token_hex(4)}"
        self.session = Session(self.client_id, version=c.MQTT_5, max_queued=max_queued)
        self.wake = trio.Event()  # the broker sets it when it queues a message for us
        self.on_batch: OnBatch | None = None
        self.closing = False

    # the broker calls these on a session's ``conn``
    def take_over(self) -> None:
        log.warning("mqtt: a network client took over the engine's session %s", self.client_id)

    async def run(
        self, *, task_status: trio.TaskStatus[LocalClient] = trio.TASK_STATUS_IGNORED
    ) -> None:
        b = self.broker
        old = b.sessions.get(self.client_id)
        if old is not None:
            if old.conn is not None and old.conn is not self:
                old.conn.take_over()
            old.conn = None
            b.end_session(old)
        self.session.conn = self
        b.sessions[self.client_id] = self.session
        try:
            task_status.started(self)
            s = self.session
            while True:
                await self.wake.wait()
                self.wake = trio.Event()
                n = 0
                while s.queue:
                    # what is queued (up to 256 a turn): handed to on_batch first, so the
                    # subscriber can decode it together, then delivered one by one
                    batch: list[Outgoing] = []
                    while s.queue and len(batch) < 256:
                        out = s.popleft()
                        if not out.msg.expired():
                            batch.append(out)
                    done = None
                    if self.on_batch is not None and len(batch) > 1:
                        try:
                            done = self.on_batch([(o.msg, o.retain) for o in batch])
                        except Exception:
                            log.exception("mqtt: local subscriber's batch hook failed")
                    try:
                        for out in batch:
                            try:
                                self.on_message(out.msg, out.retain)
                            except Exception:
                                log.exception("mqtt: local subscriber failed on %s", out.msg.topic)
                    finally:
                        if done is not None:
                            done()
                    n += len(batch)
                    if s.queue:
                        await trio.lowlevel.checkpoint()
                b.stats.messages_sent += n
        finally:
            self.session.conn = None
            if b.sessions.get(self.client_id) is self.session:
                b.end_session(self.session)

    def subscribe(self, flt: str, qos: int = 1) -> None:
        """Subscribe; a new (non-shared) subscription gets the matching retained messages."""
        b = self.broker
        opts = SubOptions(qos=qos, no_local=False)
        existed = flt in self.session.subs
        self.session.subs[flt] = opts
        b._tree_add(self.client_id, flt, opts)
        if existed or parse_shared(flt) is not None:
            return
        for topic, msg in list(b.retained.items()):
            if matches(flt, topic) and not msg.expired():
                b._deliver(self.session, Outgoing(msg, min(qos, msg.qos), True))

    def unsubscribe(self, flt: str) -> None:
        if self.session.subs.pop(flt, None) is not None:
            self.broker._tree_remove(self.client_id, flt)

    def publish(
        self,
        topic: str,
        payload: bytes,
        qos: int = 0,
        retain: bool = False,
        properties: c.Properties = c.NO_PROPS,
    ) -> int:
        """Route a message now. Returns the number of sessions it went to."""
        return self.broker.publish(Message(topic, payload, qos, retain, properties, self.client_id))
