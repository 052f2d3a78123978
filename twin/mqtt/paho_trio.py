"""External-broker mode: paho-mqtt 2.x driven natively from Trio (no paho thread).

paho's external-loop hooks do the plumbing (DESIGN §4):

* ``on_socket_open`` / ``on_socket_close``: remember the socket; on close
  ``trio.lowlevel.notify_closing`` wakes whoever waits on it;
* ``on_socket_register_write`` / ``on_socket_unregister_write``: a Trio event that the writer
  task waits on, then ``wait_writable`` → ``loop_write()``;
* the reader task: ``wait_readable`` → ``loop_read()`` (paho's callbacks run here, in the Trio
  thread, and only hand messages to the hub);
* ``loop_misc()`` once a second (keep-alive pings, timeouts);
* ``max_inflight_messages_set(0)``: no client-side cap (the broker's receive maximum rules).

The only blocking paho call is the TCP connect inside ``connect()`` / ``reconnect()``; it runs
in a worker thread (Trio does not touch the client meanwhile; the socket callbacks it triggers
there only set attributes). On a lost connection the transport reconnects with exponential
backoff and jitter (``backoff_initial`` doubling to ``backoff_max``, each delay drawn from
[½, 1] of its step); the backoff starts over only after a session that stayed up
``stable_after`` seconds, so a broker that accepts and then drops us at once (a client id taken
over by another client, a broker that kicks us) is backed off from like one that is down. A
refused CONNACK (bad user name or password, not authorised, …) is one error line with a hint
(:func:`refusal`) and backs off too. Failures are logged one line each, at most one line every
``log_every`` seconds while the error stays the same. The session is persistent (MQTT 5: clean
start off + session expiry; 3.1.1: clean session off, under a stable client id), so
subscriptions and QoS 1/2 messages survive short outages; if the broker lost the session, every
route is subscribed again.
"""

from __future__ import annotations

import logging
import random
import socket
import ssl
import threading
from collections.abc import Sequence
from typing import Any

import trio

from twin.errors import BindingConnectError
from twin.mqtt.hub import InMessage, MqttHub

log = logging.getLogger(__name__)

# CONNACK reason codes (MQTT 5 values; paho maps 3.1.1 return codes onto them) -> what to do
_HINTS = {
    0x84: "the broker does not speak this MQTT version: try protocol 4 (3.1.1)",
    0x85: "the broker rejects this client id: configure another one",
    0x86: "check the user name and password (key) this client connects with",
    0x87: "check the credentials, and the broker's ACL / allow_anonymous for this user",
    0x88: "the broker is up but not accepting clients yet",
    0x89: "the broker is busy: it will be tried again",
    0x8A: "this client is banned on the broker",
    0x8C: "the broker wants an authentication method this client does not offer",
    0x97: "the broker's connection quota for this client is used up",
    0x9C: "the broker redirects to another server: connect to that one",
    0x9D: "the broker has moved: connect to the new address",
}
# DISCONNECT reason codes a broker sends before it drops us
_DROP_HINTS = {
    0x8E: "another client connected with the same client id: give each client its own",
    0x87: "the broker no longer authorises this client (key revoked?)",
    0x8B: "the broker is shutting down",
}


def refusal(host: str, port: int, client_id: str, reason: Any) -> str:
    """One line for a refused CONNACK: what the broker said and what to check."""
    value = getattr(reason, "value", None)
    hint = _HINTS.get(value, "see the broker's log") if isinstance(value, int) else (
        "the connection closed before the broker answered: is it an MQTT broker?")  # fmt: skip
    said = f"{reason} (0x{value:02X})" if isinstance(value, int) else "no CONNACK"
    return f"broker {host}:{port} refused client {client_id}: {said}; hint: {hint}"


class PahoTransport:
    name = "external"

    def __init__(
        self,
        host: str,
        port: int = 1883,
        *,
        client_id: str | None = None,
        username: str | None = None,
        password: str | None = None,
        tls: ssl.SSLContext | None = None,
        protocol: int = 5,
        keepalive: int = 30,
        session_expiry: int = 3600,
        backoff_initial: float = 0.5,
        backoff_max: float = 30.0,
        connect_timeout: float = 5.0,
        stable_after: float = 10.0,
        log_every: float = 5.0,
    ) -> None:
        self.host = host
        self.port = port
        self.client_id = client_id or f"flux-engine-{socket.gethostname()}"
        self.username = username
        self.password = password
        self.tls = tls
        self.protocol = protocol
        self.keepalive = keepalive
        self.session_expiry = session_expiry
        self.backoff_initial = backoff_initial
        self.backoff_max = backoff_max
        self.connect_timeout = connect_timeout
        self.stable_after = stable_after
        self.log_every = log_every
        self.hub: MqttHub | None = None
        self.client: Any = None
        self.connected = False
        self.attempts = 0  # connection attempts (TCP connect + CONNACK), failed or not
        self.connects = 0
        self.disconnects = 0
        self.last_error: str | None = None
        self._subs: dict[str, int] = {}  # wire filter -> qos (re-subscribed after a lost session)
        self._sock: Any = None
        self._want_write = trio.Event()
        self._connack = trio.Event()
        self._lost = trio.Event()
        self._session_present = False
        self._connack_rc: Any = None
        self._disconnect_rc: Any = None
        self._logged: tuple[str, float] | None = None  # last failure line logged, and when
        self._quiet = 0  # failures not logged since
        self._acks: dict[int, trio.Event] = {}
        self._trio_thread = threading.get_ident()
        self._rng = random.Random()

    # ------------------------------------------------------------------ paho callbacks
    def _in_trio(self) -> bool:
        return threading.get_ident() == self._trio_thread

    def _on_socket_open(self, client: Any, userdata: Any, sock: Any) -> None:
        self._sock = sock

    def _on_socket_close(self, client: Any, userdata: Any, sock: Any) -> None:
        if self._in_trio():
            trio.lowlevel.notify_closing(sock)
            self._lost.set()
        self._sock = None

    def _on_register_write(self, client: Any, userdata: Any, sock: Any) -> None:
        if self._in_trio():
            self._want_write.set()

    def _on_unregister_write(self, client: Any, userdata: Any, sock: Any) -> None:
        if self._in_trio() and self._want_write.is_set():
            self._want_write = trio.Event()

    def _on_connect(
        self, client: Any, userdata: Any, flags: Any, reason_code: Any, properties: Any
    ) -> None:
        self._connack_rc = reason_code
        self._session_present = bool(getattr(flags, "session_present", False))
        self._connack.set()

    def _on_disconnect(
        self, client: Any, userdata: Any, flags: Any, reason_code: Any, properties: Any
    ) -> None:
        self.connected = False
        if getattr(flags, "is_disconnect_packet_from_server", False):
            self._disconnect_rc = reason_code  # not paho's own code for a closed socket
        self._lost.set()

    def _on_message(self, client: Any, userdata: Any, m: Any) -> None:
        hub = self.hub
        if hub is None:
            return
        props = getattr(m, "properties", None)
        rt = getattr(props, "ResponseTopic", None) if props is not None else None
        cd = getattr(props, "CorrelationData", None) if props is not None else None
        up = getattr(props, "UserProperty", None) if props is not None else None
        hub.dispatch(
            InMessage(m.topic, bytes(m.payload), m.qos, bool(m.retain), rt, cd, tuple(up or ()))
        )

    def _on_ack(self, client: Any, userdata: Any, mid: int, *rest: Any) -> None:
        ev = self._acks.pop(mid, None)
        if ev is not None:
            ev.set()

    # ------------------------------------------------------------------ setup
    def _make_client(self) -> Any:
        import paho.mqtt.client as mqtt
        from paho.mqtt.enums import CallbackAPIVersion

        v5 = self.protocol == 5
        client = mqtt.Client(
            CallbackAPIVersion.VERSION2,
            client_id=self.client_id,
            clean_session=None if v5 else False,
            protocol=mqtt.MQTTv5 if v5 else mqtt.MQTTv311,
            reconnect_on_failure=False,
        )
        client.max_inflight_messages_set(0)
        client.max_queued_messages_set(0)
        client.connect_timeout = self.connect_timeout
        if self.username is not None:
            client.username_pw_set(self.username, self.password)
        if self.tls is not None:
            client.tls_set_context(self.tls)
        client.on_socket_open = self._on_socket_open
        client.on_socket_close = self._on_socket_close
        client.on_socket_register_write = self._on_register_write
        client.on_socket_unregister_write = self._on_unregister_write
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_message = self._on_message
        client.on_subscribe = self._on_ack
        client.on_unsubscribe = self._on_ack
        return client

    def _blocking_connect(self) -> None:
        from paho.mqtt.packettypes import PacketTypes
        from paho.mqtt.properties import Properties

        client = self.client
        if self.protocol == 5:
            props = Properties(PacketTypes.CONNECT)
            props.SessionExpiryInterval = self.session_expiry
            client.connect(
                self.host,
                self.port,
                keepalive=self.keepalive,
                clean_start=False,
                properties=props,
            )
        else:
            client.connect(self.host, self.port, keepalive=self.keepalive)

    # ------------------------------------------------------------------ run
    async def run(self, *, task_status: trio.TaskStatus[Any] = trio.TASK_STATUS_IGNORED) -> None:
        """Connect, serve, reconnect with backoff until cancelled.

        Reports started after the first attempt, successful or not (the engine does not wait
        for an external broker; bindings see a temporary error until it is reachable)."""
        self._trio_thread = threading.get_ident()
        self.client = self._make_client()
        failures = 0  # since the last session that stayed up: the backoff step
        started = False
        try:
            while True:
                up_since: float | None = None
                self.attempts += 1
                try:
                    await self._connect_once(failures)
                    up_since = trio.current_time()
                    if not started:
                        started = True
                        task_status.started(self)
                    await self._serve()
                except (OSError, ConnectionError, BindingConnectError) as exc:
                    self.last_error = str(exc)
                finally:
                    self.connected = False
                if not started:
                    started = True
                    task_status.started(self)
                self.disconnects += 1
                if up_since is not None and trio.current_time() - up_since >= self.stable_after:
                    failures = 0
                delay = min(self.backoff_max, self.backoff_initial * 2 ** min(failures, 30))
                delay *= self._rng.uniform(0.5, 1.0)
                failures += 1
                self._report(self.last_error or "connection lost", failures, delay)
                await trio.sleep(delay)
        finally:
            self.connected = False
            client = self.client
            if client is not None:
                try:
                    client.disconnect()
                    client.loop_write()
                except Exception:  # best effort on the way out
                    pass
                sock = self._sock
                if sock is not None:
                    trio.lowlevel.notify_closing(sock)
                    sock.close()

    def _report(self, error: str, failures: int, delay: float) -> None:
        """One log line per failure, but at most one every ``log_every`` s for the same error."""
        now = trio.current_time()
        last = self._logged
        if last is not None and last[0] == error and now - last[1] < self.log_every:
            self._quiet += 1
            return
        quiet = f", {self._quiet} more failure(s) since the last line" if self._quiet else ""
        self._logged, self._quiet = (error, now), 0
        level = logging.ERROR if " refused client " in error else logging.WARNING
        log.log(
            level,
            "mqtt: %s (failure %d in a row%s; retrying in %.1fs)",
            error,
            failures,
            quiet,
            delay,
        )

    async def _connect_once(self, failures: int = 0) -> None:
        self._connack = trio.Event()
        self._connack_rc = self._disconnect_rc = None
        self._lost = trio.Event()
        self._want_write = trio.Event()
        where = f"broker {self.host}:{self.port}"
        try:
            await trio.to_thread.run_sync(self._blocking_connect)
        except OSError as exc:
            raise BindingConnectError(f"{where}: {exc}") from exc
        if self._sock is None:
            raise BindingConnectError(f"{where}: connect produced no socket")
        if self.client.want_write():
            self._want_write.set()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._io, nursery.cancel_scope)
            with trio.move_on_after(self.connect_timeout + 5) as scope:
                await self._connack.wait()
            if scope.cancelled_caught:
                raise BindingConnectError(
                    f"{where}: no CONNACK within {self.connect_timeout + 5:g}s; hint: is it an "
                    "MQTT broker (not TLS-only / a WebSocket port)?"
                )
            nursery.cancel_scope.cancel()
        rc = self._connack_rc
        if rc is None or getattr(rc, "is_failure", False):
            raise BindingConnectError(refusal(self.host, self.port, self.client_id, rc))
        self.connected = True
        self.connects += 1
        log.info(
            "mqtt: connected to %s:%d as %s (session present: %s%s)",
            self.host,
            self.port,
            self.client_id,
            self._session_present,
            f"; after {failures} failed attempt(s)" if failures else "",
        )
        self._logged, self._quiet = None, 0
        if not self._session_present:
            for flt, qos in list(self._subs.items()):
                self.client.subscribe(flt, qos)

    async def _serve(self) -> None:
        up_since = trio.current_time()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._io, nursery.cancel_scope)
            nursery.start_soon(self._misc)
            await self._lost.wait()
            nursery.cancel_scope.cancel()
        rc = self._disconnect_rc
        value = getattr(rc, "value", None)
        why = f": {rc} (0x{value:02X})" if isinstance(value, int) and value else ""
        hint = _DROP_HINTS.get(value) if isinstance(value, int) else None
        if not why and trio.current_time() - up_since < 1.0:
            hint = ("dropped right after it accepted us: another client with the same client id, "
                    "or the broker's limits / ACL (see its log)")  # fmt: skip
        raise BindingConnectError(
            f"connection to broker {self.host}:{self.port} as {self.client_id} lost{why}"
            + (f"; hint: {hint}" if hint else "")
        )

    async def _io(self, scope: trio.CancelScope) -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._writer)
            await self._reader()
            self._lost.set()
            self._connack.set()  # a handshake that died: stop waiting (rc stays None)
            nursery.cancel_scope.cancel()

    async def _reader(self) -> None:
        client = self.client
        while True:
            sock = self._sock
            if sock is None:
                return
            try:
                await trio.lowlevel.wait_readable(sock)
            except (trio.ClosedResourceError, OSError):
                return
            if client.loop_read() != 0:
                return

    async def _writer(self) -> None:
        client = self.client
        while True:
            await self._want_write.wait()
            sock = self._sock
            if sock is None:
                return
            try:
                await trio.lowlevel.wait_writable(sock)
            except (trio.ClosedResourceError, OSError):
                return
            if client.loop_write() != 0:
                self._lost.set()
                return
            if not client.want_write() and self._want_write.is_set():
                self._want_write = trio.Event()

    async def _misc(self) -> None:
        while True:
            await trio.sleep(1.0)
            if self.client.loop_misc() != 0:
                self._lost.set()
                return

    # ------------------------------------------------------------------ Transport
    def _check(self) -> None:
        if not self.connected:
            raise BindingConnectError(
                f"mqtt broker {self.host}:{self.port} is not connected"
                + (f" ({self.last_error})" if self.last_error else "")
            )

    async def subscribe(self, flt: str, qos: int) -> None:
        self._subs[flt] = qos
        if not self.connected:
            await trio.lowlevel.checkpoint()
            return  # subscribed on (re)connect
        rc, mid = self.client.subscribe(flt, qos)
        if rc != 0:
            await trio.lowlevel.checkpoint()
            return
        ev = self._acks[mid] = trio.Event()
        with trio.move_on_after(10):
            await ev.wait()

    async def unsubscribe(self, flt: str) -> None:
        self._subs.pop(flt, None)
        if self.connected:
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
        self._check()
        props = None
        if self.protocol == 5 and (response_topic or correlation_data or user_properties):
            from paho.mqtt.packettypes import PacketTypes
            from paho.mqtt.properties import Properties

            props = Properties(PacketTypes.PUBLISH)
            if response_topic:
                props.ResponseTopic = response_topic
            if correlation_data:
                props.CorrelationData = correlation_data
            if user_properties:
                props.UserProperty = list(user_properties)
        info = self.client.publish(topic, payload, qos, retain, properties=props)
        if info.rc != 0:
            raise BindingConnectError(f"mqtt publish to {topic} failed (rc {info.rc})")
        await trio.lowlevel.checkpoint()
