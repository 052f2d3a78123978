from __future__ import annotations

import queue
import signal
import socket
import subprocess
import threading
from collections.abc import AsyncIterator
from typing import Any

import paho.mqtt.client as paho
import pytest
import trio
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties as PahoProps

from twin.mqtt import codec as c
from twin.mqtt.broker import Broker, BrokerConfig

WAIT = 10.0  # failure bound for blocking waits, not a performance threshold


@pytest.fixture
async def broker(nursery: trio.Nursery) -> AsyncIterator[Broker]:
    b = Broker(BrokerConfig(sys_interval=0))
    await nursery.start(b.run)
    yield b


def port_of(b: Broker) -> int:
    return b.addresses[0][1]


class Client:
    """A paho-mqtt client with blocking helpers, for use from a worker thread."""

    def __init__(
        self,
        port: int,
        client_id: str = "",
        *,
        v5: bool = False,
        clean: bool = True,
        keepalive: int = 60,
        will: tuple[str, bytes, int, bool] | None = None,
        will_props: PahoProps | None = None,
        connect_props: PahoProps | None = None,
        username: str | None = None,
        password: str | None = None,
        connect: bool = True,
    ) -> None:
        self.port = port
        self.v5 = v5
        proto = paho.MQTTv5 if v5 else paho.MQTTv311
        kw: dict[str, Any] = {} if v5 else {"clean_session": clean}
        self.c = paho.Client(CallbackAPIVersion.VERSION2, client_id=client_id, protocol=proto, **kw)
        self.messages: queue.Queue[paho.MQTTMessage] = queue.Queue()
        self.connacks: queue.Queue[tuple[Any, Any, Any]] = queue.Queue()
        self.subacks: queue.Queue[tuple[int, list[Any], Any]] = queue.Queue()
        self.unsubacks: queue.Queue[tuple[int, list[Any]]] = queue.Queue()
        self.disconnects: queue.Queue[tuple[Any, Any]] = queue.Queue()
        self.c.on_connect = lambda _c, _u, flags, rc, props: self.connacks.put((flags, rc, props))
        self.c.on_message = lambda _c, _u, msg: self.messages.put(msg)
        self.c.on_subscribe = lambda _c, _u, mid, rcs, props: self.subacks.put((mid, rcs, props))
        self.c.on_unsubscribe = lambda _c, _u, mid, rcs, props: self.unsubacks.put((mid, rcs))
        self.c.on_disconnect = lambda _c, _u, flags, rc, props: self.disconnects.put((rc, props))
        if will:
            self.c.will_set(*will, properties=will_props)
        if username is not None:
            self.c.username_pw_set(username, password)
        self.clean = clean
        self.keepalive = keepalive
        self.connect_props = connect_props
        self.connack: tuple[Any, Any, Any] | None = None
        if connect:
            self.connect()

    def connect(self) -> tuple[Any, Any, Any]:
        kw: dict[str, Any] = {}
        if self.v5:
            kw["clean_start"] = self.clean
            kw["properties"] = self.connect_props
        self.c.connect("127.0.0.1", self.port, self.keepalive, **kw)
        self.c.loop_start()
        self.connack = self.connacks.get(timeout=WAIT)
        return self.connack

    def subscribe(self, topic: str, qos: int = 0, **kw: Any) -> list[Any]:
        if self.v5:
            opts = paho.SubscribeOptions(
                qos=qos,
                noLocal=kw.pop("no_local", False),
                retainAsPublished=kw.pop("rap", False),
                retainHandling=kw.pop("rh", 0),
            )
            self.c.subscribe(topic, options=opts, **kw)
        else:
            self.c.subscribe(topic, qos)
        _mid, rcs, _props = self.subacks.get(timeout=WAIT)
        return rcs

    def unsubscribe(self, topic: str) -> list[Any]:
        self.c.unsubscribe(topic)
        return self.unsubacks.get(timeout=WAIT)[1]

    def publish(
        self,
        topic: str,
        payload: bytes | str = b"",
        qos: int = 0,
        retain: bool = False,
        props: PahoProps | None = None,
    ) -> None:
        info = self.c.publish(topic, payload, qos, retain, properties=props)
        info.wait_for_publish(WAIT)
        assert info.is_published()

    def get(self) -> paho.MQTTMessage:
        return self.messages.get(timeout=WAIT)

    def sync(self, other: Client | None = None) -> list[paho.MQTTMessage]:
        """Round trip a marker through the broker; return messages received before it."""
        marker = f"sync/{id(self)}/{threading.get_ident()}"
        self.subscribe(marker, 1)
        (other or self).publish(marker, b"m", 1)
        got: list[paho.MQTTMessage] = []
        while True:
            m = self.get()
            if m.topic == marker:
                self.unsubscribe(marker)
                return got
            got.append(m)

    def close(self) -> None:
        self.c.disconnect()
        self.c.loop_stop()

    def kill(self) -> None:
        """Drop the connection without DISCONNECT (so the will is published)."""
        self.c.loop_stop()
        sock: Any = self.c.socket()
        if sock is not None:
            sock.shutdown(socket.SHUT_RDWR)
            sock.close()


def props(ptype: str = "PUBLISH", **kw: Any) -> PahoProps:
    p = PahoProps(getattr(PacketTypes, ptype))
    for k, v in kw.items():
        setattr(p, k, v)
    return p


class Raw:
    """A raw-socket client speaking through our codec (for hostile-packet tests)."""

    def __init__(self, port: int, version: int = 4) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=WAIT)
        self.dec = c.Decoder(version)
        self.version = version

    def send(self, data: bytes | c.Packet) -> None:
        if not isinstance(data, bytes | bytearray):
            data = c.encode(data, self.version)
        self.sock.sendall(data)

    def recv(self) -> c.Packet | None:
        """Next packet, or None on EOF."""
        while True:
            p = self.dec.next_packet()
            if p is not None:
                return p
            try:
                data = self.sock.recv(65536)
            except (ConnectionResetError, TimeoutError):
                return None
            if not data:
                return None
            self.dec.feed(data)

    def connect(self, client_id: str = "raw", **kw: Any) -> c.Connack:
        self.send(c.Connect(client_id, protocol_level=self.version, **kw))
        ack = self.recv()
        assert isinstance(ack, c.Connack), ack
        return ack

    def close(self) -> None:
        self.sock.close()


async def run_sync(fn: Any, *args: Any) -> Any:
    return await trio.to_thread.run_sync(fn, *args)


def roundtrip(cl: paho.Client, port: int, topic: str, payload: bytes = b"hello") -> bytes:
    """Connect ``cl``, subscribe to ``topic``, publish ``payload`` there: what came back."""
    got: queue.Queue[bytes] = queue.Queue()
    cl.on_message = lambda _c, _u, m: got.put(bytes(m.payload))
    cl.on_connect = lambda c, _u, _f, _rc, _p: c.subscribe(topic, 1)
    cl.on_subscribe = lambda c, *_: c.publish(topic, payload, 1)
    cl.connect("127.0.0.1", port)
    cl.loop_start()
    try:
        return got.get(timeout=WAIT)
    finally:
        cl.disconnect()
        cl.loop_stop()


def interrupt(proc: subprocess.Popen[Any]) -> None:
    """Stop a ``twin`` process as Ctrl-C does; kill it if it has not ended 20 s later."""
    proc.send_signal(signal.SIGINT)
    try:
        proc.wait(20)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
