"""The in-process client of the embedded broker (the engine's side of embedded mode)."""

from __future__ import annotations

import trio

from twin.mqtt import codec as c
from twin.mqtt.broker import Broker
from twin.mqtt.hub import EmbeddedTransport, InMessage, MqttHub
from twin.mqtt.local import LocalClient
from twin.mqtt.session import Message

from .conftest import Client, port_of, run_sync


async def test_local_client_roundtrip_retained_and_network_peers(
    broker: Broker, nursery: trio.Nursery
) -> None:
    got: list[tuple[Message, bool]] = []
    a = LocalClient(broker, lambda m, r: None, client_id="$flux-a")
    b = LocalClient(broker, lambda m, r: got.append((m, r)), client_id="$flux-b")
    await nursery.start(a.run)
    await nursery.start(b.run)
    a.publish("dev/1/status", b"offline", 1, retain=True)
    b.subscribe("dev/+/status", 1)  # retained: delivered on subscribe, flagged retained
    a.publish("dev/2/status", b"online", 1, retain=True)  # live: not flagged
    while len(got) < 2:  # noqa: ASYNC110
        await trio.sleep(0.01)
    assert [(m.topic, m.payload, r) for m, r in got] == [
        ("dev/1/status", b"offline", True),
        ("dev/2/status", b"online", False),
    ]
    # a network client sees the engine's publishes, with MQTT 5 properties
    net = await run_sync(lambda: Client(port_of(broker), "net", v5=True))
    await run_sync(net.subscribe, "cmd/#", 1)
    props = c.Properties(response_topic="resp/x", correlation_data=b"42")
    a.publish("cmd/x", b"go", 1, properties=props)
    m = await run_sync(net.get)
    assert m.payload == b"go"
    mp: object = m.properties
    assert getattr(mp, "ResponseTopic") == "resp/x"  # noqa: B009
    assert getattr(mp, "CorrelationData") == b"42"  # noqa: B009
    await run_sync(net.close)


async def test_hub_routes_and_refcounts(broker: Broker, nursery: trio.Nursery) -> None:
    t = EmbeddedTransport(broker, client_id="$flux-hub")
    hub = MqttHub(t)
    t.hub = hub
    await nursery.start(t.run)
    got1: list[InMessage] = []
    got2: list[InMessage] = []
    r1 = await hub.route("x/+", got1.append)
    r2 = await hub.route("x/+", got2.append)
    await hub.publish("x/a", b"1")
    while not (got1 and got2):  # noqa: ASYNC110
        await trio.sleep(0.01)
    await hub.unroute(r1)
    assert "x/+" in t.client.session.subs  # still routed for r2
    await hub.unroute(r2)
    assert "x/+" not in t.client.session.subs
    await hub.publish("nobody/listens", b"")
    assert hub.stats.published == 2
