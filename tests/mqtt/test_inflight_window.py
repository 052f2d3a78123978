"""The in-flight window towards a subscriber is refilled on every acknowledgement.

Refilling only when half the window was free stalled a drain ~40 ms per half window against a
libmosquitto client (Nagle on its PUBACKs + delayed ACK on ours): 1,000 queued QoS 1 messages
took 2.17 s vs Mosquitto's 0.011 s. The drain itself is measured in benchmarks/mqtt/run.py
(scenario "drain"); these tests check the mechanism, without timing thresholds.
"""

from __future__ import annotations

import socket

import pytest
import trio

from tests.mqtt.conftest import Client, Raw, run_sync
from twin.mqtt import codec as c
from twin.mqtt.broker import Broker, BrokerConfig

WINDOW = 10


def drain_one_by_one(port: int, version: int, cid: str) -> list[int]:
    """Queue 3 windows for an offline session, reconnect, and acknowledge one message at a
    time once the first window has arrived: each ack must release the next message."""
    props = (c.Properties(receive_maximum=WINDOW, session_expiry_interval=3600)
             if version == 5 else c.NO_PROPS)
    r = Raw(port, version)
    r.connect(cid, clean_start=False, properties=props)
    r.send(c.Subscribe(1, (c.Subscription("w/#", 1),)))
    assert isinstance(r.recv(), c.Suback)
    r.close()
    pub = Client(port, f"{cid}-pub")
    for i in range(3 * WINDOW):
        pub.publish(f"w/{i}", str(i).encode(), 1)
    pub.close()
    r = Raw(port, version)
    assert r.connect(cid, clean_start=False, properties=props).session_present
    window = []
    for _ in range(WINDOW):
        p = r.recv()
        assert isinstance(p, c.Publish), p
        window.append(p)
    got = [int(p.payload) for p in window]
    for _ in range(2 * WINDOW):
        r.send(c.Puback(window.pop(0).packet_id or 0))
        p = r.recv()  # before the fix: nothing came until half the window was acknowledged
        assert isinstance(p, c.Publish), f"no PUBLISH after an ack with {len(window)} in flight: {p}"
        window.append(p)
        got.append(int(p.payload))
    for p in window:
        r.send(c.Puback(p.packet_id or 0))
    r.send(c.Pingreq())
    assert isinstance(r.recv(), c.Pingresp)
    r.close()
    return got


@pytest.mark.parametrize("version", [4, 5])
async def test_window_refilled_on_every_ack(nursery: trio.Nursery, version: int) -> None:
    b = Broker(BrokerConfig(sys_interval=0, max_inflight=WINDOW))  # 3.1.1: the broker's window
    await nursery.start(b.run)
    got = await run_sync(drain_one_by_one, b.addresses[0][1], version, f"drain{version}")
    assert got == list(range(3 * WINDOW))
    assert not b.sessions[f"drain{version}"].inflight


async def test_accepted_sockets_have_tcp_nodelay(nursery: trio.Nursery) -> None:
    b = Broker(BrokerConfig(sys_interval=0))
    await nursery.start(b.run)
    port = b.addresses[0][1]
    r = await run_sync(Raw, port)
    await run_sync(r.connect, "nd")
    try:
        stream = b.sessions["nd"].conn.stream
        assert stream.socket.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
    finally:
        r.close()
