"""Broker behaviour driven by paho-mqtt (the independent client) and raw packets."""

from __future__ import annotations

from typing import Any

import trio

from twin.mqtt import codec as c
from twin.mqtt.broker import Broker, BrokerConfig
from twin.mqtt.codec import ReasonCode

from .conftest import Client, Raw, port_of, props, run_sync


def rc(x: object) -> int:
    return int(getattr(x, "value", x))  # type: ignore[call-overload]


async def test_retained(broker: Broker) -> None:
    def scenario() -> None:
        p = port_of(broker)
        pub = Client(p, "pub")
        pub.publish("r/a", b"1", 1, retain=True)
        pub.publish("r/b", b"2", 1, retain=True)
        pub.publish("r/b", b"", 1, retain=True)  # empty payload deletes
        sub = Client(p, "sub")
        sub.subscribe("r/#", 1)
        m = sub.get()
        assert (m.topic, m.payload, m.retain) == ("r/a", b"1", True)
        assert sub.sync(pub) == []
        pub.publish("r/a", b"live", 0, retain=True)  # live delivery: retain flag cleared
        m = sub.get()
        assert (m.payload, m.retain) == (b"live", False)
        sub.close()
        pub.close()

    await run_sync(scenario)


async def test_retain_handling_and_rap_v5(broker: Broker) -> None:
    def scenario() -> None:
        p = port_of(broker)
        pub = Client(p, "pub", v5=True)
        pub.publish("h/x", b"kept", 1, retain=True)
        s = Client(p, "s", v5=True)
        s.subscribe("h/#", 1, rh=2)
        assert s.sync(pub) == []  # retain handling 2: never sent
        s.subscribe("h/+", 1, rh=1)
        assert s.get().payload == b"kept"
        s.subscribe("h/+", 1, rh=1)  # existing subscription: not sent again
        assert s.sync(pub) == []
        s2 = Client(p, "s2", v5=True)
        s2.subscribe("h/x", 1, rap=True)
        assert s2.get().retain is True
        pub.publish("h/x", b"again", 1, retain=True)
        m = s2.get()
        assert m.payload == b"again" and m.retain is True  # retain as published
        for cl in (pub, s, s2):
            cl.close()

    await run_sync(scenario)


async def test_wildcards_and_dollar_topics(broker: Broker) -> None:
    def scenario() -> None:
        p = port_of(broker)
        s = Client(p, "s")
        s.subscribe("#", 0)
        s.subscribe("+/mon", 0)
        s.subscribe("$SYS/#", 0)
        pub = Client(p, "pub")
        pub.publish("$internal/mon", b"x", 1)  # '#' and '+/..' do not match '$' topics
        pub.publish("a/mon", b"y", 1)
        got = s.sync(pub)
        # overlapping subscriptions deliver one copy
        assert [(m.topic, m.payload) for m in got] == [("a/mon", b"y")]
        s.close()
        pub.close()

    await run_sync(scenario)


async def test_sys_topics(nursery: trio.Nursery) -> None:
    b = Broker(BrokerConfig(sys_interval=3600))
    await nursery.start(b.run)

    def scenario() -> None:
        s = Client(port_of(b), "s")
        s.subscribe("$SYS/broker/version", 0)
        m = s.get()
        assert m.payload.startswith(b"flux-mqtt") and m.retain
        s.close()

    await run_sync(scenario)


async def test_publish_to_sys_denied(broker: Broker) -> None:
    def scenario() -> None:
        pub = Client(port_of(broker), "pub", v5=True)
        info = pub.c.publish("$SYS/x", b"1", 1)
        info.wait_for_publish(5)
        pub.close()

    await run_sync(scenario)
    assert broker.stats.authz_denied_publish == 1


async def test_will_published_on_abnormal_close_only(broker: Broker) -> None:
    def scenario() -> None:
        p = port_of(broker)
        s = Client(p, "s")
        s.subscribe("will/#", 1)
        a = Client(p, "a", will=("will/a", b"gone", 1, False))
        a.close()  # normal DISCONNECT: no will
        assert s.sync() == []
        b = Client(p, "b", will=("will/b", b"gone", 1, True))
        b.kill()
        m = s.get()
        assert (m.topic, m.payload) == ("will/b", b"gone")
        s2 = Client(p, "s2")
        s2.subscribe("will/b")
        assert s2.get().retain  # will retain
        s.close()
        s2.close()

    await run_sync(scenario)


async def test_will_delay_v5_cancelled_by_reconnect(broker: Broker) -> None:
    def scenario() -> None:
        p = port_of(broker)
        s = Client(p, "s", v5=True)
        s.subscribe("w/#", 1)
        cp = props("CONNECT", SessionExpiryInterval=3600)
        a = Client(
            p,
            "a",
            v5=True,
            clean=False,
            connect_props=cp,
            will=("w/a", b"x", 1, False),
            will_props=props("WILLMESSAGE", WillDelayInterval=3600),
        )
        a.kill()
        a2 = Client(p, "a", v5=True, clean=False, connect_props=cp)  # resumes within the delay
        assert a2.connack is not None and a2.connack[0].session_present
        assert s.sync() == []
        # disconnect with will (0x04) and will delay 0: immediate
        b = Client(p, "b", v5=True, will=("w/b", b"y", 1, False))
        b.c.disconnect(reasoncode=paho_rc(4))  # type: ignore[arg-type]
        assert s.get().payload == b"y"
        a2.close()
        s.close()

    await run_sync(scenario)


def paho_rc(value: int) -> object:
    from paho.mqtt.packettypes import PacketTypes
    from paho.mqtt.reasoncodes import ReasonCode as PRC

    return PRC(PacketTypes.DISCONNECT, identifier=value)


async def test_persistent_session_v311(broker: Broker) -> None:
    def scenario() -> None:
        p = port_of(broker)
        s = Client(p, "ps", clean=False)
        s.subscribe("q/#", 1)
        s.close()
        pub = Client(p, "pub")
        for i in range(5):
            pub.publish("q/x", str(i).encode(), 1)
        pub.publish("q/x", b"qos0", 0)  # QoS 0 is not queued for an offline client
        s = Client(p, "ps", clean=False)
        assert s.connack is not None and s.connack[0].session_present
        assert [s.get().payload for _ in range(5)] == [str(i).encode() for i in range(5)]
        assert s.sync(pub) == []
        s.close()
        s = Client(p, "ps", clean=True)  # clean session discards
        assert s.connack is not None and not s.connack[0].session_present
        s.close()
        pub.close()

    await run_sync(scenario)
    # the client's DISCONNECT reaches the broker's reader task asynchronously: wait for the
    # clean session to be discarded (bounded), rather than racing it
    for _ in range(1000):  # at most ~10 s
        if "ps" not in broker.sessions:
            break
        await trio.sleep(0.01)
    assert "ps" not in broker.sessions


async def test_inflight_retransmitted_with_dup(broker: Broker) -> None:
    p = port_of(broker)

    def scenario() -> None:
        r = Raw(p)
        r.connect("rt", clean_start=False)
        r.send(c.Subscribe(1, (c.Subscription("d/#", 2),)))
        assert isinstance(r.recv(), c.Suback)
        pub = Client(p, "pub")
        pub.publish("d/1", b"one", 1)
        pub.publish("d/2", b"two", 2)
        m1, m2 = r.recv(), r.recv()
        assert isinstance(m1, c.Publish) and isinstance(m2, c.Publish)
        r.send(c.Pubrec(m2.packet_id or 0))
        assert isinstance(r.recv(), c.Pubrel)
        r.close()  # m1 unacknowledged, m2 awaiting PUBCOMP
        r = Raw(p)
        ack = r.connect("rt", clean_start=False)
        assert ack.session_present
        again = r.recv()
        assert isinstance(again, c.Publish) and again.dup and again.packet_id == m1.packet_id
        rel = r.recv()
        assert isinstance(rel, c.Pubrel) and rel.packet_id == m2.packet_id
        r.send(c.Puback(m1.packet_id or 0))
        r.send(c.Pubcomp(m2.packet_id or 0))
        r.send(c.Pingreq())
        assert isinstance(r.recv(), c.Pingresp)
        r.close()
        pub.close()

    await run_sync(scenario)
    assert not broker.sessions["rt"].inflight


async def test_qos2_exactly_once_dedup(broker: Broker) -> None:
    p = port_of(broker)

    def scenario() -> None:
        s = Client(p, "s")
        s.subscribe("e/#", 2)
        r = Raw(p)
        r.connect("raw-pub", clean_start=False)
        pub = c.Publish("e/1", b"once", 2, packet_id=7)
        r.send(pub)
        assert r.recv() == c.Pubrec(7)
        r.send(c.Publish("e/1", b"once", 2, dup=True, packet_id=7))  # re-sent
        assert r.recv() == c.Pubrec(7)
        r.close()
        r = Raw(p)
        r.connect("raw-pub", clean_start=False)  # QoS2 receive state survives reconnect
        r.send(c.Publish("e/1", b"once", 2, dup=True, packet_id=7))
        assert r.recv() == c.Pubrec(7)
        r.send(c.Pubrel(7))
        assert r.recv() == c.Pubcomp(7)
        r.send(c.Pubrel(7))  # unknown: still completed (3.1.1)
        assert r.recv() == c.Pubcomp(7)
        assert s.get().payload == b"once"
        assert s.sync() == []
        s.close()
        r.close()

    await run_sync(scenario)


async def test_shared_subscriptions_fair_and_redelivered(broker: Broker) -> None:
    p = port_of(broker)

    def scenario() -> None:
        a = Client(p, "a", v5=True)
        b = Client(p, "b", v5=True)
        a.subscribe("$share/g/job/+", 1)
        b.subscribe("$share/g/job/+", 1)
        pub = Client(p, "pub", v5=True)
        for i in range(10):
            pub.publish("job/x", str(i).encode(), 1)
        got_a = a.sync(pub)
        got_b = b.sync(pub)
        assert len(got_a) == 5 and len(got_b) == 5  # round robin
        assert sorted(int(m.payload) for m in got_a + got_b) == list(range(10))
        for cl in (a, b, pub):
            cl.close()

    await run_sync(scenario)

    # redelivery: a member's session ends with unacknowledged messages
    def scenario2() -> None:
        r = Raw(p, 5)
        r.connect("m1")
        r.send(c.Subscribe(1, (c.Subscription("$share/h/w", 1),)))
        assert isinstance(r.recv(), c.Suback)
        other = Client(p, "m2", v5=True)
        other.subscribe("$share/h/w", 1)
        pub = Client(p, "pub", v5=True)
        pub.publish("w", b"first", 1)  # goes to m1 (first member), never acknowledged
        first = r.recv()
        assert isinstance(first, c.Publish) and first.payload == b"first"
        r.close()
        assert other.get().payload == b"first"
        other.close()
        pub.close()

    await run_sync(scenario2)


async def test_v5_properties_end_to_end(broker: Broker) -> None:
    def scenario() -> None:
        p = port_of(broker)
        s = Client(p, "s", v5=True)
        s.c.subscribe(
            "req/#",
            options=__import__("paho.mqtt.client").mqtt.client.SubscribeOptions(qos=1),
            properties=props("SUBSCRIBE", SubscriptionIdentifier=42),
        )
        s.subacks.get(timeout=10)
        pub = Client(p, "pub", v5=True)
        pp = props(
            "PUBLISH",
            ResponseTopic="resp/1",
            CorrelationData=b"cid",
            ContentType="text/plain",
            PayloadFormatIndicator=1,
            MessageExpiryInterval=3600,
            UserProperty=[("k", "v"), ("k", "w")],
        )
        pub.publish("req/a", "héllo".encode(), 1, props=pp)
        m = s.get()
        mp: Any = m.properties
        assert mp.ResponseTopic == "resp/1"
        assert mp.CorrelationData == b"cid"
        assert mp.ContentType == "text/plain"
        assert mp.PayloadFormatIndicator == 1
        assert 3590 <= mp.MessageExpiryInterval <= 3600
        assert mp.UserProperty == [("k", "v"), ("k", "w")]
        assert mp.SubscriptionIdentifier == [42]
        s.close()
        pub.close()

    await run_sync(scenario)


async def test_no_local_and_message_expiry(broker: Broker) -> None:
    def scenario() -> None:
        p = port_of(broker)
        me = Client(p, "me", v5=True)
        me.subscribe("nl/#", 1, no_local=True)
        me.publish("nl/x", b"mine", 1)
        other = Client(p, "other", v5=True)
        other.publish("nl/x", b"theirs", 1)
        assert [m.payload for m in me.sync(other)] == [b"theirs"]
        # an expired retained message is not delivered
        other.publish(
            "ex/x", b"old", 1, retain=True, props=props("PUBLISH", MessageExpiryInterval=0)
        )
        late = Client(p, "late", v5=True)
        late.subscribe("ex/x", 1)
        assert late.sync(other) == []
        for cl in (me, other, late):
            cl.close()

    await run_sync(scenario)


async def test_topic_alias_both_ways(nursery: trio.Nursery) -> None:
    broker = Broker(BrokerConfig(sys_interval=0, server_topic_aliases=True))  # off by default
    await nursery.start(broker.run)
    p = port_of(broker)

    def scenario() -> None:
        r = Raw(p, 5)
        ack = r.connect("alias", properties=c.Properties(topic_alias_maximum=5))
        assert ack.properties.topic_alias_maximum
        r.send(c.Subscribe(1, (c.Subscription("al/#", 0),)))
        assert isinstance(r.recv(), c.Suback)
        r.send(c.Publish("al/x", b"1", properties=c.Properties(topic_alias=1)))
        r.send(c.Publish("", b"2", properties=c.Properties(topic_alias=1)))
        m1, m2 = r.recv(), r.recv()
        assert isinstance(m1, c.Publish) and isinstance(m2, c.Publish)
        assert m1.topic == "al/x" and m1.properties.topic_alias == 1
        assert m2.topic == "" and m2.properties.topic_alias == 1 and m2.payload == b"2"
        r.send(c.Publish("", b"3", properties=c.Properties(topic_alias=2)))  # unknown alias
        d = r.recv()
        assert isinstance(d, c.Disconnect) and d.reason_code == ReasonCode.PROTOCOL_ERROR
        r.close()

    await run_sync(scenario)


async def test_receive_maximum_limits_inflight(broker: Broker) -> None:
    p = port_of(broker)

    def scenario() -> None:
        r = Raw(p, 5)
        r.connect("rm", properties=c.Properties(receive_maximum=2))
        r.send(c.Subscribe(1, (c.Subscription("rm", 1),)))
        assert isinstance(r.recv(), c.Suback)
        pub = Client(p, "pub", v5=True)
        for i in range(4):
            pub.publish("rm", str(i).encode(), 1)
        a, b = r.recv(), r.recv()
        assert isinstance(a, c.Publish) and isinstance(b, c.Publish)
        # the third arrives only after an acknowledgement
        r.send(c.Pingreq())
        assert isinstance(r.recv(), c.Pingresp)
        r.send(c.Puback(a.packet_id or 0))
        third = r.recv()
        assert isinstance(third, c.Publish) and third.payload == b"2"
        r.close()
        pub.close()

    await run_sync(scenario)


async def test_maximum_packet_size_towards_client(broker: Broker) -> None:
    p = port_of(broker)

    def scenario() -> None:
        r = Raw(p, 5)
        r.connect("small", properties=c.Properties(maximum_packet_size=64))
        r.send(c.Subscribe(1, (c.Subscription("big/#", 0),)))
        assert isinstance(r.recv(), c.Suback)
        pub = Client(p, "pub", v5=True)
        pub.publish("big/1", b"x" * 200, 0)
        pub.publish("big/2", b"small", 0)
        m = r.recv()
        assert isinstance(m, c.Publish) and m.payload == b"small"
        r.close()
        pub.close()

    await run_sync(scenario)


async def test_assigned_client_id_and_server_keep_alive(nursery: trio.Nursery) -> None:
    b = Broker(BrokerConfig(sys_interval=0, max_keep_alive=30))
    await nursery.start(b.run)

    def scenario() -> None:
        cl = Client(port_of(b), "", v5=True, keepalive=120)
        assert cl.connack is not None
        pr = cl.connack[2]
        assert pr.AssignedClientIdentifier.startswith("auto-")
        assert pr.ServerKeepAlive == 30
        cl.close()
        r = Raw(port_of(b), 4)  # 3.1.1: empty id with clean session=0 is rejected
        r.send(c.Connect("", protocol_level=4, clean_start=False))
        assert r.recv() == c.Connack(False, 2)
        r.close()

    await run_sync(scenario)


async def test_keep_alive_enforced(broker: Broker) -> None:
    p = port_of(broker)

    def scenario() -> c.Packet | None:
        r = Raw(p, 5)
        r.connect("ka", keep_alive=1)
        got = r.recv()  # nothing sent: the broker closes after 1.5 s
        r.close()
        return got

    got = await run_sync(scenario)
    assert isinstance(got, c.Disconnect) and got.reason_code == ReasonCode.KEEP_ALIVE_TIMEOUT


async def test_session_takeover(broker: Broker) -> None:
    p = port_of(broker)

    def scenario() -> None:
        r1 = Raw(p, 5)
        r1.connect("same")
        r2 = Raw(p, 5)
        r2.connect("same")
        d = r1.recv()
        assert isinstance(d, c.Disconnect) and d.reason_code == ReasonCode.SESSION_TAKEN_OVER
        assert r1.recv() is None
        r2.send(c.Pingreq())
        assert isinstance(r2.recv(), c.Pingresp)
        r2.close()
        r1.close()

    await run_sync(scenario)


async def test_malformed_packet_closes_only_that_connection(broker: Broker) -> None:
    p = port_of(broker)

    def scenario() -> None:
        good = Client(p, "good", v5=True)
        good.subscribe("ok", 1)
        cases = [
            (
                b"\x62\x02\x00\x01"[:0] + b"\x60\x02\x00\x01",
                ReasonCode.MALFORMED_PACKET,
            ),  # PUBREL flags
            (b"\x30\x05\x00\x03\xed\xa0\x80", ReasonCode.MALFORMED_PACKET),  # surrogate
            (b"\x30\x04\x00\x02a\x00", ReasonCode.MALFORMED_PACKET),  # U+0000
            (
                c.encode(c.Connect("x", protocol_level=5), 5),
                ReasonCode.PROTOCOL_ERROR,
            ),  # 2nd CONNECT
            (b"\x30\x04\x00\x02a+", ReasonCode.TOPIC_NAME_INVALID),
        ]
        for data, code in cases:
            r = Raw(p, 5)
            r.connect("bad")
            r.send(data)
            d = r.recv()
            assert isinstance(d, c.Disconnect) and d.reason_code == code, (data, d)
            assert r.recv() is None
            r.close()
        r = Raw(p, 4)
        r.connect("bad4")
        r.send(b"\x60\x02\x00\x01")
        assert r.recv() is None  # 3.1.1: just closed
        r.close()
        good.publish("ok", b"still fine", 1)
        assert good.get().payload == b"still fine"
        good.close()

    await run_sync(scenario)
    assert broker.stats.protocol_errors >= 6


async def test_oversized_packet_rejected(nursery: trio.Nursery) -> None:
    b = Broker(BrokerConfig(sys_interval=0, max_packet_size=1000))
    await nursery.start(b.run)

    def scenario() -> None:
        r = Raw(port_of(b), 5)
        ack = r.connect("big")
        assert ack.properties.maximum_packet_size == 1000
        r.send(c.Publish("t", b"x" * 2000))
        d = r.recv()
        assert isinstance(d, c.Disconnect) and d.reason_code == ReasonCode.PACKET_TOO_LARGE
        r.close()

    await run_sync(scenario)


async def test_unsupported_protocol_version(broker: Broker) -> None:
    def scenario() -> None:
        r = Raw(port_of(broker), 4)
        data = bytearray(c.encode(c.Connect("x", protocol_level=4), 4))
        data[8] = 9
        r.send(bytes(data))
        assert r.recv() == c.Connack(False, 1)
        r.close()

    await run_sync(scenario)


async def test_auth_hooks(nursery: trio.Nursery) -> None:
    def authenticate(cid: str, user: str | None, pw: bytes | None, cert: object) -> str | None:
        return user if (user, pw) == ("dev1", b"secret") else None

    def authorize(principal: str, action: str, topic: str) -> bool:
        return topic.startswith(f"devices/{principal}/")

    b = Broker(BrokerConfig(sys_interval=0), authenticate=authenticate, authorize=authorize)
    await nursery.start(b.run)

    def scenario() -> None:
        p = port_of(b)
        bad = Client(p, "x", username="dev1", password="wrong", connect=False)
        bad.c.connect("127.0.0.1", p)
        bad.c.loop_start()
        assert rc(bad.connacks.get(timeout=10)[1]) == 0x86  # paho maps 3.1.1 code 4 to 0x86
        bad.c.loop_stop()
        bad5 = Client(p, "x", v5=True, username="dev1", password="wrong", connect=False)
        bad5.c.connect("127.0.0.1", p)
        bad5.c.loop_start()
        assert rc(bad5.connacks.get(timeout=10)[1]) == 0x86
        bad5.c.loop_stop()
        ok = Client(p, "d", v5=True, username="dev1", password="secret")
        assert [rc(x) for x in ok.subscribe("devices/dev1/cmd", 1)] == [1]
        assert [rc(x) for x in ok.subscribe("devices/other/cmd", 1)] == [0x87]
        info = ok.c.publish("devices/other/x", b"1", 1)
        info.wait_for_publish(10)
        ok.publish("devices/dev1/cmd", b"hi", 1)
        assert ok.get().payload == b"hi"
        ok.close()

    await run_sync(scenario)
    assert b.stats.auth_failures == 2
    assert b.stats.authz_denied_subscribe == 1
    assert b.stats.authz_denied_publish == 1


async def test_slow_consumer_does_not_stall_others(nursery: trio.Nursery) -> None:
    b = Broker(BrokerConfig(sys_interval=0, max_queued=50))
    await nursery.start(b.run)
    p = port_of(b)

    def scenario() -> None:
        slow = Raw(p, 4)  # subscribes and never reads
        slow.connect("slow")
        slow.send(c.Subscribe(1, (c.Subscription("flood", 1),)))
        fast = Client(p, "fast")
        fast.subscribe("flood", 0)
        pub = Client(p, "pub")
        payload = b"x" * 10_000
        for _ in range(300):  # ~3 MB: more than the socket buffers hold
            pub.c.publish("flood", payload, 0)
        pub.publish("flood", b"end", 1)
        n = 0
        while fast.get().payload != b"end":
            n += 1
        fast.close()
        pub.close()
        slow.close()

    await run_sync(scenario)
    assert b.stats.messages_dropped > 0  # the slow session shed its own queue
    assert not b.sessions.get("slow") or len(b.sessions["slow"].queue) <= 50


async def test_port_in_use(nursery: trio.Nursery, broker: Broker) -> None:
    import pytest

    from twin.errors import PortInUseError

    with pytest.raises(PortInUseError):
        await Broker(BrokerConfig(listen=[("127.0.0.1", port_of(broker))])).run()
