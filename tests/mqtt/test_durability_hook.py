"""``Broker.durability``: PUBACKs wait for the hook's write, stay in publish order, carry the
reason code the hook returns; a hook installed after a client connected still holds its acks
(the engine installs it once its broker runs)."""

from __future__ import annotations

import socket
from typing import Any

import trio

from tests.runtime.helpers import eventually
from twin.mqtt import codec as c
from twin.mqtt.broker import Broker

from .conftest import Raw, port_of, run_sync


def nothing_waiting(raw: Raw) -> bool:
    """True when no packet is waiting on the socket (a short look, never a failure bound)."""
    raw.sock.settimeout(0.3)
    try:
        return raw.dec.next_packet() is None and not raw.sock.recv(1, socket.MSG_PEEK)
    except TimeoutError:
        return True
    finally:
        raw.sock.settimeout(10)


async def test_acks_wait_for_the_hook_in_publish_order(broker: Broker) -> None:
    raw: Raw = await run_sync(lambda: Raw(port_of(broker), 5))
    await run_sync(raw.connect, "dev")
    gates: dict[bytes, trio.Event] = {}

    def hook(_principal: Any, msg: Any) -> Any:
        if msg.topic == "plain":
            return None  # nothing to log: acknowledged as usual (but after earlier held ones)
        if msg.topic == "refuse":
            return 0x97
        gates[msg.payload] = ev = trio.Event()

        async def wait() -> int:
            await ev.wait()
            return 0x80 if msg.payload == b"bad" else 0

        return msg, wait

    broker.durability = hook  # after the client connected
    for pid, (topic, payload) in enumerate([("t", b"a"), ("plain", b"p"), ("t", b"bad")], start=1):
        raw.send(c.Publish(topic, payload, 1, packet_id=pid))
    await eventually(lambda: len(gates) == 2)
    gates[b"bad"].set()  # the later write is done first: its ack still waits for "a"
    assert await run_sync(nothing_waiting, raw)
    gates[b"a"].set()
    acks = [await run_sync(raw.recv) for _ in range(3)]
    # in publish order; 0x10: accepted, no subscribers; 0x80: the hook's write failed
    got = [(a.packet_id, a.reason_code) for a in acks if isinstance(a, c.Puback)]
    assert got == [(1, 0x10), (2, 0x10), (3, 0x80)]
    raw.send(c.Publish("refuse", b"x", 1, packet_id=4))
    ack = await run_sync(raw.recv)
    assert isinstance(ack, c.Puback) and (ack.packet_id, ack.reason_code) == (4, 0x97)
    raw.close()
