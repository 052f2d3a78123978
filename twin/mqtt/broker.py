"""The embedded MQTT 3.1.1 / 5.0 broker, on Trio.

Usage::

    broker = Broker(BrokerConfig(listen=[("127.0.0.1", 0)]))
    addrs = await nursery.start(broker.run)     # [(host, port), ...]

Each connection has one reader (the connection's task) and one writer task. Publishing never
awaits another client: routing appends to each target session's bounded queue and wakes that
session's writer, so a slow consumer only fills (and then sheds) its own queue. All bytes to a
client go through its writer, which batches control packets and queued messages into one
``send_all``.
"""

from __future__ import annotations

import contextlib
import errno
import inspect
import itertools
import logging
import math
import socket
import ssl
import time
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import trio

from twin.errors import PortInUseError
from twin.mqtt import codec as c
from twin.mqtt.codec import MQTT_5, NO_PROPS, ProtocolError, ReasonCode
from twin.mqtt.session import NEVER_EXPIRES, Message, Outgoing, Session, SubOptions
from twin.mqtt.topics import (
    SubscriptionTree,
    is_valid_filter,
    matches,
    parse_shared,
    validate_topic_name,
)

log = logging.getLogger(__name__)

VERSION = "flux-mqtt/0.1"

Authenticate = Callable[[str, str | None, bytes | None, Any], Any]
Authorize = Callable[[Any, str, str], Any]
PayloadCheck = Callable[[Any, Message], "str | None"]
"""``payload_check(principal, message)``: why a publish must be refused (None: deliver it). Asked for
MQTT 5 publishes with QoS >= 1 before they are acknowledged (refused: reason code 0x99, with
the reason string when the client accepts problem information); the engine sets it to ask its
device bindings whether they would accept the payload."""

DurableWait = Callable[[], Awaitable[int]]
Durability = Callable[[Any, Message], "tuple[Message, DurableWait] | int | None"]
"""``durability(principal, message)``: asked for every accepted publish with QoS >= 1 before it
is delivered; the engine sets it to put the readings it will store into its write-ahead log
(``twin/timeseries/wal.py``), so that a PUBACK / PUBREC means the readings are on disk.
Returns None (nothing to log: acknowledge as usual), ``(message, wait)`` (deliver ``message``,
the original annotated with what was logged; the acknowledgement is held until ``await wait()``
returns 0, or carries the reason code it returns, e.g. 0x97 on a full disk), or a reason code
(refused now: not delivered). Acknowledgements stay in the order the publishes came: one held
behind a slow log holds those after it. An MQTT 3.1.1 client cannot be told a reason code:
its connection is closed without the acknowledgement, and it publishes again on reconnect.
A ``wait`` may also have a ``poll()`` method: the code at once when the log write is settled,
None while it is not (then ``wait`` is awaited); it spares one Trio checkpoint per held ack."""


Prefetch = Callable[[Any, "list[c.Publish]"], "Callable[[], None] | None"]
"""``prefetch(principal, publishes)``: the QoS >= 1 publishes of one socket read (two or more),
before they are handled one by one — so the engine can decode their payloads together for
``payload_check`` / ``durability`` (one plugin call instead of one per message). May return a
callable run after they were handled. Nothing waits for more data: a lone publish is handled as
before. Never delays or changes what is acknowledged."""


def allow_all_authenticate(
    client_id: str, username: str | None, password: bytes | None, peer_cert: Any
) -> Any:
    return username or client_id


def allow_all_authorize(principal: Any, action: str, topic: str) -> bool:
    return True


@dataclass(frozen=True)
class BrokerConfig:
    listen: Sequence[tuple[str, int]] = (("127.0.0.1", 0),)
    tls_listen: Sequence[tuple[str, int]] = ()
    ssl_context: ssl.SSLContext | None = None
    max_packet_size: int = 1024 * 1024 * 16
    max_queued: int = 1000  # per session
    # QoS 1/2 messages un-acknowledged towards an MQTT 3.1.1 client (5.0 clients say their
    # own receive maximum). 100 held a fan-in subscriber to ~30k msg/s: each refill waits for
    # its PUBACKs to come back through a scheduling pass (benchmarks/README.md, Session 6).
    max_inflight: int = 1000
    receive_maximum: int = 1024  # QoS 2 messages a client may have un-released with us
    topic_alias_maximum: int = 100  # aliases a client may use towards us (client → server)
    server_topic_aliases: bool = False
    """Use topic aliases towards MQTT 5 clients that allow them (server → client). Off by
    default: libmosquitto (mosquitto_sub, 2.0.11) announces a topic alias maximum when asked
    to, but drops the connection with "protocol error" on the first aliased PUBLISH."""
    max_keep_alive: int = 0  # 0: accept the client's; else cap (sent as server keep alive)
    connect_timeout: float = 10.0
    max_connections: int = 100_000
    max_connections_per_address: int = 100_000
    sys_interval: float = 10.0  # $SYS publication period; 0 disables
    state_dir: str | None = None
    fsync_interval: float = 1.0
    port_hint: str | None = None  # replaces PortInUseError's hint (e.g. name the CLI option)
    ws_listen: Sequence[tuple[str, int]] = ()  # MQTT over WebSocket (subprotocol "mqtt")
    ws_tls: bool = False  # wss: the ws_listen listeners use ssl_context
    wss_listen: Sequence[tuple[str, int]] = ()  # MQTT over secure WebSocket (uses ssl_context)


@dataclass
class Stats:
    started: float = field(default_factory=time.time)
    connections: int = 0
    clients_connected: int = 0
    messages_received: int = 0
    messages_sent: int = 0
    bytes_received: int = 0
    bytes_sent: int = 0
    messages_dropped: int = 0
    auth_failures: int = 0
    authz_denied_publish: int = 0
    authz_denied_subscribe: int = 0
    protocol_errors: int = 0
    connections_refused: int = 0
    payload_refused: int = 0  # publishes refused by ``Broker.payload_check`` (MQTT 5 QoS >= 1)
    durability_refused: int = 0  # publishes the durability hook refused (log full, failing)


@dataclass
class SharedGroup:
    group: str
    filter: str
    members: dict[str, SubOptions] = field(default_factory=dict)
    rr: int = 0


_Route = tuple[list[tuple[str, int, bool, tuple[int, ...]]], list[SharedGroup]]


class _Close(Exception):
    """Internal: end this connection (after flushing what is queued)."""


class Broker:
    def __init__(
        self,
        config: BrokerConfig | None = None,
        *,
        authenticate: Authenticate = allow_all_authenticate,
        authorize: Authorize = allow_all_authorize,
        sockets: Sequence[Any] = (),
    ) -> None:
        """``sockets``: already bound and listening stdlib sockets to serve instead of
        ``config.listen`` (so a caller can report a taken port before starting Trio)."""
        self.config = config or BrokerConfig()
        self._sockets = list(sockets)
        self.authenticate = authenticate
        self.authorize = authorize
        self.payload_check: PayloadCheck | None = None
        self.durability: Durability | None = None
        self.prefetch: Prefetch | None = None
        self.stats = Stats()
        self.sessions: dict[str, Session] = {}
        self.tree = SubscriptionTree()
        self._routes: dict[str, _Route] = {}  # topic -> Broker._route (cleared on any change)
        self.retained: dict[str, Message] = {}
        self.addresses: list[tuple[str, int]] = []
        self.tls_addresses: list[tuple[str, int]] = []
        self.ws_addresses: list[tuple[str, int]] = []
        self.wss_addresses: list[tuple[str, int]] = []
        self._nursery: trio.Nursery | None = None
        self._ids = itertools.count(1)
        self._per_address: dict[str, int] = {}
        self.store: Any = None
        if self.config.state_dir:
            from twin.mqtt.store import Store

            self.store = Store(self.config.state_dir, fsync_interval=self.config.fsync_interval)

    # ------------------------------------------------------------------ service

    async def run(
        self, *, task_status: trio.TaskStatus[list[tuple[str, int]]] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Serve until cancelled. ``task_status.started`` gets the bound (host, port)s."""
        # bind before the nursery so a PortInUseError reaches the caller unwrapped
        if self._sockets:
            plain = [
                trio.SocketListener(trio.socket.from_stdlib_socket(sk)) for sk in self._sockets
            ]
        else:
            plain = await self._open(self.config.listen, "mqtt")
        self.addresses = [_addr(ln) for ln in plain]
        tls: list[trio.SocketListener] = []
        if self.config.tls_listen:
            if self.config.ssl_context is None:
                raise ValueError("tls_listen needs ssl_context")
            tls = await self._open(self.config.tls_listen, "mqtt+tls")
            self.tls_addresses = [_addr(ln) for ln in tls]
        ws: list[trio.SocketListener] = []
        if self.config.ws_listen:
            if self.config.ws_tls and self.config.ssl_context is None:
                raise ValueError("ws_tls needs ssl_context")
            ws = await self._open(self.config.ws_listen, "mqtt+ws")
            self.ws_addresses = [_addr(ln) for ln in ws]
        wss: list[trio.SocketListener] = []
        if self.config.wss_listen:
            if self.config.ssl_context is None:
                raise ValueError("wss_listen needs ssl_context")
            wss = await self._open(self.config.wss_listen, "mqtt+wss")
            self.wss_addresses = [_addr(ln) for ln in wss]
        if self.store is not None:
            self._load_state()
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                if plain:
                    nursery.start_soon(trio.serve_listeners, self._serve, plain)
                if tls:
                    assert self.config.ssl_context is not None
                    wrapped = [
                        trio.SSLListener(ln, self.config.ssl_context, https_compatible=False)
                        for ln in tls
                    ]
                    nursery.start_soon(trio.serve_listeners, self._serve, wrapped)
                if ws:
                    from twin.mqtt.ws import ws_server

                    ws_listeners: list[Any] = ws
                    if self.config.ws_tls:
                        assert self.config.ssl_context is not None
                        ws_listeners = [
                            trio.SSLListener(ln, self.config.ssl_context, https_compatible=True)
                            for ln in ws
                        ]
                    nursery.start_soon(ws_server(self._serve, ws_listeners, nursery).run)
                if wss:
                    from twin.mqtt.ws import ws_server

                    assert self.config.ssl_context is not None
                    secure: list[Any] = [
                        trio.SSLListener(ln, self.config.ssl_context, https_compatible=True)
                        for ln in wss
                    ]
                    nursery.start_soon(ws_server(self._serve, secure, nursery).run)
                if self.config.sys_interval > 0:
                    nursery.start_soon(self._sys_loop)
                if self.store is not None:
                    nursery.start_soon(self.store.sync_loop)
                for s in list(self.sessions.values()):  # restored sessions start their clocks
                    self._schedule_expiry(s)
                task_status.started(list(self.addresses))
                log.info("mqtt broker listening on %s", self.addresses)
        finally:
            if self.store is not None:
                self.store.close()

    async def _open(self, addrs: Sequence[tuple[str, int]], what: str) -> list[trio.SocketListener]:
        out: list[trio.SocketListener] = []
        for host, port in addrs:
            try:
                out.extend(await trio.open_tcp_listeners(port, host=host))
            except OSError as exc:
                if exc.errno == errno.EADDRINUSE:
                    err = PortInUseError(host, port, what)
                    if self.config.port_hint:
                        err.hint = self.config.port_hint
                    raise err from exc
                raise
        return out

    async def _serve(self, stream: trio.abc.Stream, peer: str | None = None) -> None:
        peer = peer or _peer_host(stream)
        st = self.stats
        if (
            st.connections >= self.config.max_connections
            or self._per_address.get(peer, 0) >= self.config.max_connections_per_address
        ):
            st.connections_refused += 1
            await trio.aclose_forcefully(stream)
            return
        st.connections += 1
        self._per_address[peer] = self._per_address.get(peer, 0) + 1
        _no_delay(stream)
        conn = Connection(self, stream, peer)
        try:
            await conn.run()
        except Exception:  # one connection's bug must not take the broker down
            log.exception("mqtt connection from %s failed", peer)
        finally:
            st.connections -= 1
            n = self._per_address[peer] - 1
            if n:
                self._per_address[peer] = n
            else:
                del self._per_address[peer]
            with trio.move_on_after(1) as cs:
                cs.shield = True
                await trio.aclose_forcefully(stream)

    # ------------------------------------------------------------------ state

    def _load_state(self) -> None:
        sessions, retained = self.store.load(max_queued=self.config.max_queued)
        self.store.attach(lambda: (self.sessions, self.retained))
        self.retained = retained
        for s in sessions.values():
            self.sessions[s.client_id] = s
            for flt, opts in s.subs.items():
                self._tree_add(s.client_id, flt, opts)

    def _tree_add(self, cid: str, flt: str, opts: SubOptions) -> bool:
        self._routes.clear()
        shared = parse_shared(flt)
        if shared is None:
            return self.tree.add(flt, cid, opts)
        group, inner = shared
        key = ("$share", group)
        grp = self.tree.get(inner, key)
        if grp is None:
            grp = SharedGroup(group, inner)
            self.tree.add(inner, key, grp)
        new = cid not in grp.members
        grp.members[cid] = opts
        return new

    def _tree_remove(self, cid: str, flt: str) -> bool:
        self._routes.clear()
        shared = parse_shared(flt)
        if shared is None:
            return self.tree.remove(flt, cid)
        group, inner = shared
        key = ("$share", group)
        grp = self.tree.get(inner, key)
        if grp is None or cid not in grp.members:
            return False
        del grp.members[cid]
        if not grp.members:
            self.tree.remove(inner, key)
        return True

    # ------------------------------------------------------------------ routing

    def publish(self, msg: Message) -> int:
        """Route one message to every matching subscription. Returns how many sessions."""
        self.stats.messages_received += 1
        if msg.retain:
            self._set_retained(msg)
        route = self._routes.get(msg.topic)
        if route is None:
            route = self._route(msg.topic, msg.sender)
        targets, groups = route
        n = 0
        sessions = self.sessions
        mq = msg.qos
        retain = msg.retain
        deliver = self._deliver
        for cid, qos, rap, ids in targets:
            s = sessions.get(cid)
            if s is None:
                continue
            deliver(s, Outgoing(msg, qos if qos < mq else mq, retain and rap, ids))
            n += 1
        for grp in groups:
            if self._deliver_shared(grp, msg):
                n += 1
        return n

    def _route(self, topic: str, sender: str | None) -> _Route:
        """Who gets a message on ``topic``: one entry per session (its subscriptions merged:
        highest QoS, all subscription ids) and the shared groups. Cached per topic until the
        subscriptions change, unless a no-local subscription makes it depend on the sender."""
        targets: dict[str, tuple[int, bool, list[int]]] = {}
        groups: list[SharedGroup] = []
        local = False
        for _flt, key, opts in self.tree.match(topic):
            if type(key) is tuple:
                groups.append(opts)
                continue
            if opts.no_local:
                local = True
                if key == sender:
                    continue
            key = str(key)
            prev = targets.get(key)
            ids = [opts.sub_id] if opts.sub_id else []
            if prev is None:
                targets[key] = (opts.qos, opts.retain_as_published, ids)
            else:
                targets[key] = (
                    max(prev[0], opts.qos),
                    prev[1] or opts.retain_as_published,
                    prev[2] + ids,
                )
        route = ([(cid, q, rap, tuple(ids)) for cid, (q, rap, ids) in targets.items()], groups)
        if not local:
            if len(self._routes) >= 10_000:
                self._routes.clear()
            self._routes[topic] = route
        return route

    def _deliver_shared(self, grp: SharedGroup, msg: Message, exclude: str | None = None) -> bool:
        members = [m for m in grp.members if m != exclude]
        if not members:
            return False
        k = len(members)
        chosen = None
        for i in range(k):  # fair round robin, preferring connected members with room
            cid = members[(grp.rr + i) % k]
            s = self.sessions.get(cid)
            if s is not None and s.conn is not None and len(s.queue) < s.max_queued:
                chosen = cid
                grp.rr = (grp.rr + i + 1) % k
                break
        if chosen is None:
            chosen = members[grp.rr % k]
            grp.rr = (grp.rr + 1) % k
        opts = grp.members[chosen]
        s = self.sessions.get(chosen)
        if s is None:
            return False
        ids = (opts.sub_id,) if opts.sub_id else ()
        self._deliver(s, Outgoing(msg, min(opts.qos, msg.qos), False, ids, (grp.group, grp.filter)))
        return True

    def _deliver(self, s: Session, out: Outgoing) -> None:
        if out.qos == 0 and s.conn is None:
            return  # QoS 0 is not queued for offline sessions
        if s.persistent and out.qos and self.store is not None:
            self.store.enqueued(s.client_id, out)
        dropped = s.enqueue(out)
        if dropped is not None:
            self.stats.messages_dropped += 1
            if dropped.qos and s.persistent and self.store is not None:
                self.store.completed(s.client_id, dropped)
        conn = s.conn
        if conn is not None:
            conn.wake.set()

    def _set_retained(self, msg: Message) -> None:
        if msg.payload:
            self.retained[msg.topic] = msg
        else:
            self.retained.pop(msg.topic, None)
        if self.store is not None:
            self.store.retained(msg.topic, msg if msg.payload else None)

    # ------------------------------------------------------------------ sessions

    def end_session(self, s: Session) -> None:
        """The session is over: drop its subscriptions, re-route shared messages."""
        current = self.sessions.get(s.client_id) is s
        if current:
            del self.sessions[s.client_id]
        for flt in list(s.subs):
            self._tree_remove(s.client_id, flt)
        s.subs.clear()
        pending = list(s.inflight.values()) + list(s.queue)
        s.inflight.clear()
        s.clear_queue()
        for out in pending:  # redeliver shared-subscription messages to another member
            if out.share is not None:
                grp = self.tree.get(out.share[1], ("$share", out.share[0]))
                if grp is not None and not out.msg.expired():
                    self._deliver_shared(grp, out.msg, exclude=s.client_id)
        if s.expiry_scope is not None:
            s.expiry_scope.cancel()
        if s.will_scope is not None:
            s.will_scope.cancel()
        if self.store is not None and current:
            self.store.session_deleted(s.client_id)

    def _schedule_expiry(self, s: Session) -> None:
        if s.expiry == NEVER_EXPIRES or self._nursery is None:
            return
        scope = trio.CancelScope()
        s.expiry_scope = scope

        async def expire() -> None:
            with scope:
                await trio.sleep(s.expiry)
                if s.conn is None and self.sessions.get(s.client_id) is s:
                    log.info("mqtt session %s expired", s.client_id)
                    pending_will = s.will_scope
                    s.will_scope = None
                    if pending_will is not None:
                        pending_will.cancel()
                        will = s.pending_will
                        s.pending_will = None
                        if will is not None:
                            self.publish(will)
                    self.end_session(s)

        self._nursery.start_soon(expire)

    def _schedule_will(self, s: Session, will: Message, delay: int) -> None:
        assert self._nursery is not None
        scope = trio.CancelScope()
        s.will_scope = scope
        s.pending_will = will

        async def later() -> None:
            with scope:
                await trio.sleep(delay)
                if s.will_scope is scope:
                    s.will_scope = None
                    s.pending_will = None
                    self.publish(will)

        self._nursery.start_soon(later)

    # ------------------------------------------------------------------ $SYS

    async def _sys_loop(self) -> None:
        while True:
            self.publish_sys()
            await trio.sleep(self.config.sys_interval)

    def sys_values(self) -> dict[str, str]:
        st = self.stats
        return {
            "version": VERSION,
            "uptime": str(int(time.time() - st.started)),
            "clients/connected": str(st.clients_connected),
            "clients/total": str(len(self.sessions)),
            "messages/received": str(st.messages_received),
            "messages/sent": str(st.messages_sent),
            "messages/dropped": str(st.messages_dropped),
            "bytes/received": str(st.bytes_received),
            "bytes/sent": str(st.bytes_sent),
            "retained messages/count": str(len(self.retained)),
            "subscriptions/count": str(len(self.tree)),
            "auth/rejected": str(st.auth_failures),
            "auth/denied": str(st.authz_denied_publish + st.authz_denied_subscribe),
        }

    def publish_sys(self) -> None:
        values = self.sys_values()
        for name, value in values.items():
            self.publish(Message(f"$SYS/broker/{name}", value.encode(), 0, True))
        self.stats.messages_received -= len(values)  # not client traffic


def _addr(listener: trio.SocketListener) -> tuple[str, int]:
    host, port = listener.socket.getsockname()[:2]
    return host, port


def _peer_host(stream: Any) -> str:
    try:
        inner = stream
        while hasattr(inner, "transport_stream"):
            inner = inner.transport_stream
        return str(inner.socket.getpeername()[0])
    except (AttributeError, OSError):
        return "?"


def _no_delay(stream: Any) -> None:
    """TCP_NODELAY on the socket under ``stream`` (plain or TLS). Trio's SocketStream sets it
    already; saying it here keeps it true whatever the transport's default: small packets
    (PUBACK, the next PUBLISH of a window) must not wait for Nagle's algorithm."""
    inner = stream
    while hasattr(inner, "transport_stream"):
        inner = inner.transport_stream
    sock = getattr(inner, "socket", None)
    if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def _peer_cert(stream: Any) -> Any:
    if isinstance(stream, trio.SSLStream):
        try:
            return stream.getpeercert()
        except (ValueError, AttributeError):
            return None
    return None


_MAX_CONTROL_BACKLOG = 1 << 20


class Connection:
    """One network connection: a reader (this task) and a writer task."""

    def __init__(self, broker: Broker, stream: trio.abc.Stream, peer: str) -> None:
        self.broker = broker
        self.stream = stream
        self.peer = peer
        self.decoder = c.Decoder(None, broker.config.max_packet_size)
        self.version = 4
        self.session: Session | None = None
        self.control = bytearray()
        self.wake = trio.Event()
        self.drained = trio.Event()
        self.closing = False
        self.will: Message | None = None
        self.will_delay = 0
        self.send_quota = broker.config.max_inflight
        self.client_max_packet = c.MAX_REMAINING_LENGTH + 5
        self.client_alias_max = 0
        self.out_aliases: dict[str, int] = {}
        self.in_aliases: dict[int, str] = {}
        self.principal: Any = None
        self.keep_alive = 0
        self.problem_info = True
        self._writer_done = trio.Event()
        # publish acknowledgements held behind the durability hook (see Broker.durability)
        self._held: deque[tuple[DurableWait | None, int, int, int, c.Properties]] = deque()
        self._held_wake = trio.Event()
        self._releasing = False
        self._nursery: trio.Nursery | None = None

    # ------------------------------------------------------------------ lifecycle

    async def run(self) -> None:
        b = self.broker
        connect = await self._read_connect()
        if connect is None:
            return
        if not await self._accept(connect):
            await self._flush()
            return
        session = self.session
        assert session is not None
        clean_exit = False
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._writer)
                self._nursery = nursery  # the ack releaser starts with the first held ack
                try:
                    clean_exit = await self._reader()
                except ProtocolError as exc:
                    b.stats.protocol_errors += 1
                    log.info("mqtt client %s: protocol error: %s", session.client_id, exc)
                    self._disconnect(exc.reason_code, str(exc))
                except _Close:
                    pass
                except trio.BrokenResourceError:
                    pass
                self.closing = True
                self.wake.set()
                with trio.move_on_after(2):
                    await self._writer_done.wait()
                nursery.cancel_scope.cancel()
        finally:
            self._on_close(clean_exit)

    async def _read_connect(self) -> c.Connect | None:
        b = self.broker
        with trio.move_on_after(b.config.connect_timeout):
            while True:
                try:
                    data = await self.stream.receive_some(65536)
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    return None
                if not data:
                    return None
                b.stats.bytes_received += len(data)
                self.decoder.feed(data)
                try:
                    pkt = self.decoder.next_packet()
                except ProtocolError as exc:
                    b.stats.protocol_errors += 1
                    if exc.reason_code == ReasonCode.UNSUPPORTED_PROTOCOL_VERSION:
                        # answer in 3.1.1 form: return code 1 (unacceptable protocol version)
                        await self._send_raw(c.encode(c.Connack(False, 1), 4))
                    return None
                if pkt is not None:
                    assert isinstance(pkt, c.Connect)
                    return pkt
        return None

    async def _send_raw(self, data: bytes) -> None:
        with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
            await self.stream.send_all(data)

    async def _flush(self) -> None:
        if self.control:
            data = bytes(self.control)
            self.control.clear()
            with trio.move_on_after(2):
                await self._send_raw(data)

    def _send(self, pkt: c.Packet) -> None:
        self.control += c.encode(pkt, self.version)
        self.wake.set()

    def _disconnect(self, rc: int, reason: str | None = None) -> None:
        """Send a server DISCONNECT (5.0 only) and end the connection."""
        if self.version >= MQTT_5:
            props = NO_PROPS
            if reason and self.problem_info:
                props = c.Properties(reason_string=reason[:200])
            self._send(c.Disconnect(rc, props))

    def _connack_error(self, rc5: int, rc3: int, reason: str | None = None) -> bool:
        if self.version >= MQTT_5:
            props = c.Properties(reason_string=reason) if reason else NO_PROPS
            self._send(c.Connack(False, rc5, props))
        else:
            self._send(c.Connack(False, rc3))
        return False

    async def _accept(self, p: c.Connect) -> bool:
        b = self.broker
        cfg = b.config
        self.version = v = p.protocol_level
        props = p.properties
        v5 = v >= MQTT_5
        if props.request_problem_information == 0:
            self.problem_info = False
        cid = p.client_id
        assigned = None
        if not cid:
            if not v5 and not p.clean_start:
                return self._connack_error(0x85, 2, "empty client id needs clean session")
            cid = assigned = f"auto-{next(b._ids)}-{int(time.time() * 1000) % 100000}"
        # authentication
        result = b.authenticate(cid, p.username, p.password, _peer_cert(self.stream))
        if inspect.isawaitable(result):
            result = await result
        if result is None or result is False:
            b.stats.auth_failures += 1
            log.info("mqtt client %s from %s: authentication failed", cid, self.peer)
            return self._connack_error(0x86, 4, "bad user name or password")
        self.principal = result
        # will
        if p.will is not None:
            w = p.will
            if not b.authorize(self.principal, "publish", w.topic):
                b.stats.authz_denied_publish += 1
                return self._connack_error(0x87, 5, "will topic not authorised")
            wp = w.properties
            self.will = _make_message(w.topic, w.payload, w.qos, w.retain, wp, cid)
            self.will_delay = wp.will_delay_interval or 0
        # limits from the client
        if v5:
            self.send_quota = props.receive_maximum or 65535
            if props.maximum_packet_size:
                self.client_max_packet = props.maximum_packet_size
            if cfg.server_topic_aliases:
                self.client_alias_max = props.topic_alias_maximum or 0
            expiry = props.session_expiry_interval or 0
        else:
            expiry = 0 if p.clean_start else NEVER_EXPIRES
        # keep alive
        ka = p.keep_alive
        server_ka = None
        if cfg.max_keep_alive and (ka == 0 or ka > cfg.max_keep_alive):
            ka = cfg.max_keep_alive
            server_ka = ka
        self.keep_alive = ka
        # session: take over / resume / create
        old = b.sessions.get(cid)
        if old is not None and old.conn is not None:
            old.conn.take_over()
        if old is not None and old.will_scope is not None:
            scope = old.will_scope
            old.will_scope = None
            scope.cancel()
            if p.clean_start:  # the old session ends now: its delayed will goes out
                will = old.pending_will
                old.pending_will = None
                if will is not None:
                    b.publish(will)
        if old is not None and old.expiry_scope is not None:
            old.expiry_scope.cancel()
            old.expiry_scope = None
        present = False
        if old is not None and not p.clean_start:
            session = old
            present = True
        else:
            if old is not None:
                old.conn = None
                b.end_session(old)
            session = Session(cid, max_queued=cfg.max_queued)
            b.sessions[cid] = session
        session.version = v
        session.expiry = expiry
        session.conn = self
        self.session = session
        b.stats.clients_connected += 1
        if b.store is not None:
            if session.persistent:
                b.store.session_saved(session)
            elif present is False:
                b.store.session_deleted(cid)
        self.decoder.version = v
        ack_props = NO_PROPS
        if v5:
            ack_props = c.Properties(
                assigned_client_identifier=assigned,
                server_keep_alive=server_ka,
                receive_maximum=cfg.receive_maximum,
                topic_alias_maximum=cfg.topic_alias_maximum or None,
                maximum_packet_size=cfg.max_packet_size,
            )
        self._send(c.Connack(present, 0, ack_props))
        # resend what was in flight
        for out in session.inflight.values():
            if out.state == "pubrec":
                self._send(c.Pubrel(out.pid or 0))
            else:
                data = self._encode_publish(out, dup=True)
                if data is not None:
                    self.control += data
        log.debug("mqtt client %s connected (v%d, present=%s)", cid, v, present)
        return True

    def take_over(self) -> None:
        """Another connection claimed this session."""
        self.taken_over = True
        self.kick(ReasonCode.SESSION_TAKEN_OVER, "session taken over")

    def kick(self, rc: int, reason: str) -> None:
        """End this connection from the server side: a DISCONNECT with ``rc`` (MQTT 5; a
        3.1.1 client just sees the socket close), then close. The session itself follows its
        expiry rules and the will is published, as for any connection the server ends."""
        self._disconnect(rc, reason)
        self.closing = True
        self.wake.set()
        if self._reader_scope is not None:
            self._reader_scope.cancel()

    _reader_scope: trio.CancelScope | None = None
    taken_over = False
    _writer_done: trio.Event

    def _on_close(self, clean: bool) -> None:
        b = self.broker
        s = self.session
        if s is None:
            return
        b.stats.clients_connected -= 1
        will = None if clean else self.will
        current = b.sessions.get(s.client_id) is s
        if s.conn is self:
            s.conn = None
            s.clear_queue(only_qos0=True)  # QoS 0 is not kept for an offline client
        delayed = self.version >= MQTT_5 and self.will_delay > 0
        if current and s.conn is None:
            if s.expiry == 0:
                b.end_session(s)
                current = False
            else:
                b._schedule_expiry(s)
        if will is not None:
            if delayed and current and s.conn is None:
                b._schedule_will(s, will, min(self.will_delay, s.expiry))
            elif delayed and current and self.taken_over:
                pass  # a new connection resumed the session within the will delay
            else:
                b.publish(will)

    # ------------------------------------------------------------------ writer

    async def _writer(self) -> None:
        b = self.broker
        try:
            while True:
                await self.wake.wait()
                self.wake = trio.Event()
                data = self._collect()
                if data:
                    try:
                        await self.stream.send_all(data)
                    except (trio.BrokenResourceError, trio.ClosedResourceError):
                        if self._reader_scope is not None:
                            self._reader_scope.cancel()
                        return
                    b.stats.bytes_sent += len(data)
                    if not self.drained.is_set():
                        self.drained.set()
                if self.closing and not self.control:
                    return
        finally:
            self._writer_done.set()

    def _collect(self) -> bytes:
        out = self.control
        self.control = bytearray()
        s = self.session
        if s is None or self.closing:
            return bytes(out)
        queue = s.queue
        inflight = s.inflight
        store = self.broker.store if s.persistent else None
        now = time.time()
        sent = 0
        while queue and len(out) < 262_144:
            item = queue[0]
            if item.qos and len(inflight) >= self.send_quota:
                break
            s.popleft()
            if item.msg.expires_at is not None and now >= item.msg.expires_at:
                if item.qos and store is not None:
                    store.completed(s.client_id, item)
                continue
            if item.qos:
                item.pid = s.alloc_pid()
                item.state = "sent"
            data = self._encode_publish(item, dup=False, now=now)
            if data is None:  # too large for this client: discard
                if item.qos and store is not None:
                    store.completed(s.client_id, item)
                continue
            if item.qos:
                inflight[item.pid] = item  # type: ignore[index]
                if store is not None:
                    store.sent(s.client_id, item)
            out += data
            sent += 1
        self.broker.stats.messages_sent += sent
        if queue and (queue[0].qos == 0 or len(inflight) < self.send_quota):
            self.wake.set()  # more to do after this batch
        return bytes(out)

    def _encode_publish(self, out: Outgoing, dup: bool, now: float | None = None) -> bytes | None:
        msg = out.msg
        v = self.version
        simple = (
            out.qos == 0
            and not out.sub_ids
            and msg.expires_at is None
            and (v < MQTT_5 or not self.client_alias_max)
        )
        if simple:
            key = (v, out.retain)
            data = msg.encoded.get(key)
            if data is None:
                data = c.encode_publish(
                    msg.topic, msg.payload, 0, out.retain, False, None, msg.properties, v
                )
                msg.encoded[key] = data
            return data if len(data) <= self.client_max_packet else None
        props = NO_PROPS
        topic = msg.topic
        if v >= MQTT_5:
            props = msg.properties
            changes: dict[str, Any] = {}
            if msg.expires_at is not None:
                remaining = msg.expires_at - (now or time.time())
                changes["message_expiry_interval"] = max(0, math.ceil(remaining))
            if out.sub_ids:
                changes["subscription_identifier"] = out.sub_ids
            if self.client_alias_max:
                alias = self.out_aliases.get(topic)
                if alias is not None:
                    changes["topic_alias"] = alias
                    topic = ""
                elif len(self.out_aliases) < self.client_alias_max:
                    alias = len(self.out_aliases) + 1
                    self.out_aliases[topic] = alias
                    changes["topic_alias"] = alias
            if changes:
                props = replace(props, **changes)
        data = c.encode_publish(topic, msg.payload, out.qos, out.retain, dup, out.pid, props, v)
        if len(data) > self.client_max_packet:
            if props.topic_alias is not None and topic:  # alias never reached the client
                self.out_aliases.pop(topic, None)
            return None
        return data

    # ------------------------------------------------------------------ reader

    async def _reader(self) -> bool:
        """Read and handle packets. Returns True after a normal DISCONNECT."""
        b = self.broker
        stats = b.stats
        decoder = self.decoder
        ka = self.keep_alive * 1.5 if self.keep_alive else math.inf
        with trio.CancelScope() as scope:
            self._reader_scope = scope
            deadline = trio.current_time() + ka
            while True:
                with trio.CancelScope(deadline=deadline) as ka_scope:
                    data = await self.stream.receive_some(65536)
                if ka_scope.cancelled_caught:
                    log.info(
                        "mqtt client %s: keep-alive timeout",
                        self.session and self.session.client_id,
                    )
                    self._disconnect(ReasonCode.KEEP_ALIVE_TIMEOUT, "keep alive timeout")
                    return False
                if not data:
                    return False
                stats.bytes_received += len(data)
                deadline = trio.current_time() + ka
                decoder.feed(data)
                if await self._handle_read(b.prefetch):
                    return True
                if len(self.control) > _MAX_CONTROL_BACKLOG:
                    self.drained = trio.Event()
                    await self.drained.wait()
        return False  # cancelled: taken over or writer failed

    async def _handle_read(self, prefetch: Prefetch | None) -> bool:
        """The packets of one read (decoded in one pass, the hot ones as tuples and ints: see
        ``Decoder.next_batch``), with their QoS >= 1 publishes shown to ``prefetch`` first.
        A malformed packet still ends the connection, after the ones before it are handled."""
        pkts, error = self.decoder.next_batch()
        done = None
        if prefetch is not None:
            pubs: list[c.Publish] = []
            for p in pkts:
                if type(p) is tuple:
                    if p[2]:
                        pubs.append(c.Publish(p[0], p[1], p[2], p[3], False, p[4]))
                elif isinstance(p, c.Publish) and p.qos and p.topic:
                    pubs.append(p)
            if len(pubs) > 1:
                try:
                    done = prefetch(self.principal, pubs)
                except Exception:
                    log.exception("mqtt: prefetch hook failed (payloads are decoded one by one)")
        try:
            publish = self._publish
            on_ack = self._on_ack
            n = 0
            for pkt in pkts:
                kind = type(pkt)
                if kind is int:
                    # A PUBACK costs a dict deletion and frees room in the window: it does
                    # not count towards the turn (a subscriber's acks read in one receive are
                    # handled in one turn, so its window refills at the publishers' pace)
                    on_ack(pkt, 1)
                    continue
                if kind is tuple:
                    publish(*pkt)
                elif self._handle(pkt):
                    return True
                n += 1
                if n % 32 == 0:  # let other connections (and their acks) run: fairness
                    await trio.lowlevel.checkpoint()
        finally:
            if done is not None:
                done()
        if error is not None:
            raise error
        return False

    def _handle(self, p: c.Packet) -> bool:
        if isinstance(p, c.Publish):
            self._on_publish(p)
        elif isinstance(p, c.Puback):
            self._on_ack(p.packet_id, 1)
        elif isinstance(p, c.Pubrec):
            self._on_pubrec(p)
        elif isinstance(p, c.Pubrel):
            self._on_pubrel(p)
        elif isinstance(p, c.Pubcomp):
            self._on_ack(p.packet_id, 2)
        elif isinstance(p, c.Subscribe):
            self._on_subscribe(p)
        elif isinstance(p, c.Unsubscribe):
            self._on_unsubscribe(p)
        elif isinstance(p, c.Pingreq):
            self.control += b"\xd0\x00"
            self.wake.set()
        elif isinstance(p, c.Disconnect):
            return self._on_disconnect(p)
        elif isinstance(p, c.Connect):
            raise ProtocolError("second CONNECT", ReasonCode.PROTOCOL_ERROR)
        else:  # CONNACK, SUBACK, UNSUBACK, PINGRESP, AUTH from a client
            name = type(p).__name__
            raise ProtocolError(f"unexpected {name} from a client", ReasonCode.PROTOCOL_ERROR)
        return False

    def _on_publish(self, p: c.Publish) -> None:
        b = self.broker
        topic = p.topic
        props = p.properties
        if self.version >= MQTT_5:
            alias = props.topic_alias
            if alias is not None:
                if alias > b.config.topic_alias_maximum:
                    raise ProtocolError("topic alias out of range", ReasonCode.TOPIC_ALIAS_INVALID)
                if topic:
                    self.in_aliases[alias] = topic
                else:
                    known = self.in_aliases.get(alias)
                    if known is None:
                        raise ProtocolError("unknown topic alias", ReasonCode.PROTOCOL_ERROR)
                    topic = known
            if props.subscription_identifier:
                raise ProtocolError(
                    "subscription identifier from a client", ReasonCode.PROTOCOL_ERROR
                )
            if props.response_topic is not None and not _valid_name(props.response_topic):
                raise ProtocolError("invalid response topic", ReasonCode.PROTOCOL_ERROR)
        self._publish(topic, p.payload, p.qos, p.retain, p.packet_id or 0, None, props)

    def _publish(
        self,
        topic: str,
        payload: bytes,
        qos: int,
        retain: bool,
        pid: int,
        frame: bytes | None = None,
        props: c.Properties = NO_PROPS,
    ) -> None:
        """One PUBLISH from this client (its topic alias resolved): authorise, route, ack.
        ``frame``: the packet as received, when it is exactly what a subscriber with this
        client's protocol version gets at QoS 0 (see ``Decoder.next_batch``)."""
        b = self.broker
        s = self.session
        assert s is not None
        v5 = self.version >= MQTT_5
        if topic.startswith("$") and topic.startswith("$SYS"):
            rc = ReasonCode.NOT_AUTHORIZED
            allowed = False
        else:
            allowed = b.authorize is allow_all_authorize or bool(
                b.authorize(self.principal, "publish", topic)
            )
            rc = ReasonCode.SUCCESS if allowed else ReasonCode.NOT_AUTHORIZED
        if not allowed:
            b.stats.authz_denied_publish += 1
        elif v5 and props.payload_format_indicator == 1:
            try:
                payload.decode("utf-8")
            except UnicodeDecodeError:
                if qos == 0:
                    raise ProtocolError(
                        "payload is not UTF-8", ReasonCode.PAYLOAD_FORMAT_INVALID
                    ) from None
                rc = ReasonCode.PAYLOAD_FORMAT_INVALID
                allowed = False
        if qos == 2 and pid in s.in_qos2:
            self._send(c.Pubrec(pid))  # duplicate: acknowledge, do not deliver again
            return
        n = 1
        problem: str | None = None
        gate: DurableWait | None = None
        if allowed:
            if v5 and (props.topic_alias is not None or props.subscription_identifier):
                props = replace(props, topic_alias=None)
            expires = None
            if v5 and props.message_expiry_interval is not None:
                expires = time.time() + props.message_expiry_interval
            msg = Message(topic, payload, qos, retain, props, s.client_id, expires)
            if frame is not None:
                msg.encoded[(self.version, False)] = frame
            problem = (
                b.payload_check(self.principal, msg) if v5 and qos and b.payload_check else None
            )
            logged = (
                b.durability(self.principal, msg)
                if qos and problem is None and b.durability is not None
                else None
            )
            if problem is not None:
                # the engine would refuse the payload (e.g. a value that is not finite): tell
                # an MQTT 5 publisher (PUBACK/PUBREC 0x99) instead of acknowledging it
                b.stats.payload_refused += 1
                rc = ReasonCode.PAYLOAD_FORMAT_INVALID
                allowed = False
            elif isinstance(logged, int):  # the write-ahead log refuses it (full, busy)
                b.stats.durability_refused += 1
                if not v5:
                    raise _Close  # no reason codes in 3.1.1: no ack, it publishes again
                rc = ReasonCode(logged)
                allowed = False
            else:
                if logged is not None:
                    msg, gate = logged
                n = b.publish(msg)
        if qos == 0:
            return
        if v5 and rc == 0 and n == 0:
            rc = ReasonCode.NO_MATCHING_SUBSCRIBERS
        if not v5:
            rc = ReasonCode.SUCCESS
        ack_props = NO_PROPS
        if problem is not None and self.problem_info:
            ack_props = c.Properties(reason_string=problem[:200])
        if qos == 2 and rc < 0x80:
            # known at once (a resent PUBLISH is not delivered twice), even if PUBREC waits
            if len(s.in_qos2) >= b.config.receive_maximum:
                raise ProtocolError("receive maximum exceeded", ReasonCode.RECEIVE_MAXIMUM_EXCEEDED)
            s.in_qos2.add(pid)
            if s.persistent and b.store is not None:
                b.store.in_qos2(s.client_id, pid, True)
        if gate is None and not self._held:
            self._send_ack(qos, pid, rc, ack_props)
        else:  # held until the log is on disk (and behind earlier held ones: order)
            self._held.append((gate, qos, pid, rc, ack_props))
            self._held_wake.set()
            if not self._releasing and self._nursery is not None:
                self._releasing = True
                self._nursery.start_soon(self._release_acks)

    def _send_ack(self, qos: int, pid: int, rc: int, props: c.Properties) -> None:
        if qos == 1:
            if rc == 0:
                self.control += b"\x40\x02" + pid.to_bytes(2, "big")
                self.wake.set()
            else:
                self._send(c.Puback(pid, rc, props))
        else:
            self._send(c.Pubrec(pid, rc, props))

    async def _release_acks(self) -> None:
        """Send held acknowledgements in order, each once its log write is on disk."""
        held = self._held
        while True:
            await self._held_wake.wait()
            self._held_wake = trio.Event()
            while held:
                gate, qos, pid, rc, props = held[0]
                # a gate whose log write is already on disk answers at once (``poll``): no
                # checkpoint per acknowledgement (one group commit settles hundreds of them)
                poll = getattr(gate, "poll", None) if gate is not None else None
                code = poll() if poll is not None else None
                if code is None:
                    code = await gate() if gate is not None else 0
                held.popleft()
                if code:
                    self.broker.stats.durability_refused += 1
                    s = self.session
                    if qos == 2 and s is not None:
                        s.in_qos2.discard(pid)
                        if s.persistent and self.broker.store is not None:
                            self.broker.store.in_qos2(s.client_id, pid, False)
                    if self.version < MQTT_5:
                        # no reason codes in 3.1.1: end the connection without the ack
                        held.clear()
                        if self._reader_scope is not None:
                            self._reader_scope.cancel()
                        return
                    rc = code
                self._send_ack(qos, pid, rc, props)

    def _on_ack(self, pid: int, qos: int) -> None:
        s = self.session
        assert s is not None
        out = s.inflight.get(pid)
        if out is None or out.qos != qos or (qos == 2 and out.state != "pubrec"):
            if self.version >= MQTT_5 or out is not None:
                raise ProtocolError(
                    f"unexpected acknowledgement for {pid}", ReasonCode.PROTOCOL_ERROR
                )
            return
        del s.inflight[pid]
        if s.persistent and self.broker.store is not None:
            self.broker.store.completed(s.client_id, out)
        # Refill the window on every ack. The writer still batches: acks read in one
        # receive_some are handled before it runs, so it sends one write for all of them.
        # Waiting until half the window was free stalled drains ~40 ms per half window: a
        # client that does not set TCP_NODELAY (libmosquitto) holds its next PUBACKs back
        # (Nagle) until its first is ACKed, and with nothing to send, our kernel delays that
        # ACK (delayed ACK). Sending the next PUBLISH at once carries the ACK.
        if s.queue:
            self.wake.set()

    def _on_pubrec(self, p: c.Pubrec) -> None:
        s = self.session
        assert s is not None
        out = s.inflight.get(p.packet_id)
        if out is None or out.qos != 2:
            self._send(
                c.Pubrel(
                    p.packet_id,
                    ReasonCode.PACKET_IDENTIFIER_NOT_FOUND if self.version >= MQTT_5 else 0,
                )
            )
            return
        store = self.broker.store if s.persistent else None
        if p.reason_code >= 0x80:
            del s.inflight[p.packet_id]
            if store is not None:
                store.completed(s.client_id, out)
            self.wake.set()
            return
        out.state = "pubrec"
        if store is not None:
            store.pubrec(s.client_id, out)
        self._send(c.Pubrel(p.packet_id))

    def _on_pubrel(self, p: c.Pubrel) -> None:
        s = self.session
        assert s is not None
        if p.packet_id in s.in_qos2:
            s.in_qos2.discard(p.packet_id)
            if s.persistent and self.broker.store is not None:
                self.broker.store.in_qos2(s.client_id, p.packet_id, False)
            rc = 0
        else:
            rc = ReasonCode.PACKET_IDENTIFIER_NOT_FOUND if self.version >= MQTT_5 else 0
        self._send(c.Pubcomp(p.packet_id, rc))

    def _on_subscribe(self, p: c.Subscribe) -> None:
        b = self.broker
        s = self.session
        assert s is not None
        v5 = self.version >= MQTT_5
        sub_id = (
            p.properties.subscription_identifier[0]
            if p.properties.subscription_identifier
            else None
        )
        codes: list[int] = []
        retained: list[Outgoing] = []
        for sub in p.subscriptions:
            flt = sub.topic_filter
            try:
                shared = parse_shared(flt)
                inner = shared[1] if shared else flt
                if not is_valid_filter(inner):
                    raise ProtocolError("bad filter", ReasonCode.TOPIC_FILTER_INVALID)
            except ProtocolError:
                codes.append(ReasonCode.TOPIC_FILTER_INVALID if v5 else 0x80)
                continue
            if shared is not None and sub.no_local:
                raise ProtocolError("no local on a shared subscription", ReasonCode.PROTOCOL_ERROR)
            if not b.authorize(self.principal, "subscribe", flt):
                b.stats.authz_denied_subscribe += 1
                codes.append(ReasonCode.NOT_AUTHORIZED if v5 else 0x80)
                continue
            opts = SubOptions(
                sub.qos,
                sub.no_local,
                sub.retain_as_published,
                sub.retain_handling,
                sub_id,
                shared[0] if shared else None,
            )
            existed = flt in s.subs
            s.subs[flt] = opts
            b._tree_add(s.client_id, flt, opts)
            codes.append(sub.qos)
            if shared is None and (
                sub.retain_handling == 0 or (sub.retain_handling == 1 and not existed)
            ):
                for topic, msg in b.retained.items():
                    if matches(flt, topic) and not msg.expired():
                        ids = (sub_id,) if sub_id else ()
                        retained.append(Outgoing(msg, min(sub.qos, msg.qos), True, ids))
        if s.persistent and b.store is not None:
            b.store.session_saved(s)
        self._send(c.Suback(p.packet_id, tuple(codes)))
        for out in retained:
            b._deliver(s, out)

    def _on_unsubscribe(self, p: c.Unsubscribe) -> None:
        b = self.broker
        s = self.session
        assert s is not None
        codes = []
        for flt in p.topic_filters:
            if flt in s.subs:
                del s.subs[flt]
                b._tree_remove(s.client_id, flt)
                codes.append(0)
            else:
                codes.append(ReasonCode.NO_SUBSCRIPTION_EXISTED)
        if s.persistent and b.store is not None:
            b.store.session_saved(s)
        self._send(c.Unsuback(p.packet_id, tuple(codes) if self.version >= MQTT_5 else ()))

    def _on_disconnect(self, p: c.Disconnect) -> bool:
        s = self.session
        assert s is not None
        new_expiry = p.properties.session_expiry_interval
        if new_expiry is not None:
            if s.expiry == 0 and new_expiry != 0:
                raise ProtocolError("session expiry set after 0", ReasonCode.PROTOCOL_ERROR)
            s.expiry = new_expiry
            b = self.broker
            if b.store is not None and s.persistent:
                b.store.session_saved(s)
        # 0x04 (disconnect with will) is treated as abnormal: the will is published
        return p.reason_code != ReasonCode.DISCONNECT_WITH_WILL


def _valid_name(topic: str) -> bool:
    try:
        validate_topic_name(topic)
    except ProtocolError:
        return False
    return True


def _make_message(
    topic: str, payload: bytes, qos: int, retain: bool, props: c.Properties, sender: str
) -> Message:
    expires = None
    if props.message_expiry_interval is not None:
        expires = time.time() + props.message_expiry_interval
    if props.will_delay_interval is not None:
        props = replace(props, will_delay_interval=None)
    return Message(topic, payload, qos, retain, props, sender, expires)
