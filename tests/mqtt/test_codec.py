from __future__ import annotations

import contextlib

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from twin.mqtt import codec as c
from twin.mqtt.codec import ProtocolError, ReasonCode

# MQTT strings: any code point except U+0000 and surrogates
text = st.text(
    alphabet=st.characters(blacklist_categories=["Cs"], blacklist_characters="\x00"),
    max_size=20,
)
topic = text.filter(lambda t: t and "+" not in t and "#" not in t)
u16 = st.integers(1, 0xFFFF)
u32 = st.integers(0, 0xFFFFFFFF)
pid = st.integers(1, 0xFFFF)
binary = st.binary(max_size=30)
users = st.lists(st.tuples(text, text), max_size=3).map(tuple)


def props_for(kind: str) -> st.SearchStrategy[c.Properties]:
    common = {"user_property": users}
    table: dict[str, dict[str, st.SearchStrategy[object]]] = {
        "publish": {
            "payload_format_indicator": st.sampled_from([0, 1]),
            "message_expiry_interval": u32,
            "content_type": text,
            "response_topic": topic,
            "correlation_data": binary,
            "subscription_identifier": st.lists(st.integers(1, c.MAX_VARINT), max_size=3).map(
                tuple
            ),
            "topic_alias": u16,
        },
        "will": {
            "payload_format_indicator": st.sampled_from([0, 1]),
            "message_expiry_interval": u32,
            "content_type": text,
            "response_topic": topic,
            "correlation_data": binary,
            "will_delay_interval": u32,
        },
        "connect": {
            "session_expiry_interval": u32,
            "authentication_method": text,
            "authentication_data": binary,
            "request_problem_information": st.sampled_from([0, 1]),
            "request_response_information": st.sampled_from([0, 1]),
            "receive_maximum": u16,
            "topic_alias_maximum": st.integers(0, 0xFFFF),
            "maximum_packet_size": st.integers(1, 0xFFFFFFFF),
        },
        "connack": {
            "session_expiry_interval": u32,
            "assigned_client_identifier": text,
            "server_keep_alive": st.integers(0, 0xFFFF),
            "authentication_method": text,
            "authentication_data": binary,
            "response_information": text,
            "server_reference": text,
            "reason_string": text,
            "receive_maximum": u16,
            "topic_alias_maximum": st.integers(0, 0xFFFF),
            "maximum_qos": st.sampled_from([0, 1]),
            "retain_available": st.sampled_from([0, 1]),
            "maximum_packet_size": st.integers(1, 0xFFFFFFFF),
            "wildcard_subscription_available": st.sampled_from([0, 1]),
            "subscription_identifier_available": st.sampled_from([0, 1]),
            "shared_subscription_available": st.sampled_from([0, 1]),
        },
        "ack": {"reason_string": text},
        "subscribe": {"subscription_identifier": st.integers(1, c.MAX_VARINT).map(lambda v: (v,))},
        "disconnect": {
            "session_expiry_interval": u32,
            "reason_string": text,
            "server_reference": text,
        },
        "auth": {
            "authentication_method": text,
            "authentication_data": binary,
            "reason_string": text,
        },
        "none": {},
    }
    fields = {**table[kind], **common}
    return st.fixed_dictionaries({}, optional=fields).map(lambda d: c.Properties(**d))  # type: ignore[arg-type]


def packets(version: int) -> st.SearchStrategy[c.Packet]:
    v5 = version == 5

    def p(kind: str) -> st.SearchStrategy[c.Properties]:
        return props_for(kind) if v5 else st.just(c.NO_PROPS)

    def rc(codes: frozenset[int]) -> st.SearchStrategy[int]:
        return st.sampled_from(sorted(codes)) if v5 else st.just(0)

    will = st.builds(c.Will, topic, binary, st.integers(0, 2), st.booleans(), p("will"))
    connect = st.builds(
        c.Connect,
        client_id=text,
        protocol_level=st.just(version),
        clean_start=st.booleans(),
        keep_alive=st.integers(0, 0xFFFF),
        username=st.none() | text,
        password=st.none() | binary,
        will=st.none() | will,
        properties=p("connect"),
    ).filter(lambda x: v5 or x.password is None or x.username is not None)
    connack = st.builds(
        c.Connack, st.booleans(), rc(c._CONNACK_RCS) if v5 else st.integers(0, 5), p("connack")
    )

    def pub(qos: int, dup: bool, packet_id: int | None) -> st.SearchStrategy[c.Publish]:
        return st.builds(
            c.Publish,
            topic,
            binary,
            st.just(qos),
            st.booleans(),
            st.just(dup),
            st.just(packet_id),
            p("publish"),
        )

    publish = st.one_of(
        pub(0, False, None),
        st.tuples(st.integers(1, 2), st.booleans(), pid).flatmap(lambda t: pub(*t)),
    )
    acks = st.one_of(
        st.builds(c.Puback, pid, rc(c._PUBACK_RCS), p("ack")),
        st.builds(c.Pubrec, pid, rc(c._PUBACK_RCS), p("ack")),
        st.builds(c.Pubrel, pid, rc(c._PUBREL_RCS), p("ack")),
        st.builds(c.Pubcomp, pid, rc(c._PUBREL_RCS), p("ack")),
    )
    sub = st.builds(
        c.Subscription,
        text,
        st.integers(0, 2),
        st.booleans() if v5 else st.just(False),
        st.booleans() if v5 else st.just(False),
        st.integers(0, 2) if v5 else st.just(0),
    )
    subscribe = st.builds(
        c.Subscribe, pid, st.lists(sub, min_size=1, max_size=4).map(tuple), p("subscribe")
    )
    suback_codes = sorted(c._SUBACK_RCS) if v5 else [0, 1, 2, 0x80]
    suback = st.builds(
        c.Suback,
        pid,
        st.lists(st.sampled_from(suback_codes), min_size=1, max_size=4).map(tuple),
        p("ack"),
    )
    unsub = st.builds(
        c.Unsubscribe, pid, st.lists(text, min_size=1, max_size=4).map(tuple), p("none")
    )
    unsuback = (
        st.builds(
            c.Unsuback,
            pid,
            st.lists(st.sampled_from(sorted(c._UNSUBACK_RCS)), min_size=1, max_size=4).map(tuple),
            p("ack"),
        )
        if v5
        else st.builds(c.Unsuback, pid)
    )
    simple = st.sampled_from([c.Pingreq(), c.Pingresp()])
    disconnect = st.builds(c.Disconnect, rc(c._DISCONNECT_RCS), p("disconnect"))
    choices = [
        connect,
        connack,
        publish,
        acks,
        subscribe,
        suback,
        unsub,
        unsuback,
        simple,
        disconnect,
    ]
    if v5:
        choices.append(st.builds(c.Auth, rc(c._AUTH_RCS), p("auth")))
    return st.one_of(*choices)


@pytest.mark.parametrize("version", [4, 5])
@settings(max_examples=100, deadline=None)
@given(data=st.data())
def test_roundtrip(version: int, data: st.DataObject) -> None:
    pkts = data.draw(st.lists(packets(version), min_size=1, max_size=5))
    wire = b"".join(c.encode(x, version) for x in pkts)
    assert c.decode_all(wire, version) == pkts
    # byte-at-a-time feeding yields the same packets
    d = c.Decoder(version)
    out: list[c.Packet] = []
    for i in range(len(wire)):
        d.feed(wire[i : i + 1])
        out.extend(d.packets())
    assert out == pkts


@given(st.integers(0, c.MAX_VARINT))
def test_varint_roundtrip(n: int) -> None:
    r = c._Reader(c.encode_varint(n))
    assert r.varint() == n


def _decode_stream(data: bytes, version: int | None) -> None:
    d = c.Decoder(version, max_packet_size=4096)
    d.feed(data)
    for _ in range(len(data) + 1):  # bounded: every packet consumes >= 2 bytes
        if d.next_packet() is None:
            break


@pytest.mark.parametrize("version", [None, 4, 5])
@settings(max_examples=500, deadline=None)
@given(data=st.binary(max_size=200))
def test_fuzz_random_bytes(version: int | None, data: bytes) -> None:
    with contextlib.suppress(ProtocolError):
        _decode_stream(data, version)


@pytest.mark.parametrize("version", [4, 5])
@settings(max_examples=150, deadline=None)
@given(data=st.data())
def test_fuzz_mutated_packets(version: int, data: st.DataObject) -> None:
    pkt = data.draw(packets(version))
    wire = bytearray(c.encode(pkt, version))
    for _ in range(data.draw(st.integers(1, 4))):
        op = data.draw(st.sampled_from(["flip", "insert", "delete", "truncate"]))
        i = data.draw(st.integers(0, max(0, len(wire) - 1)))
        if op == "flip" and wire:
            wire[i] ^= 1 << data.draw(st.integers(0, 7))
        elif op == "insert":
            wire.insert(i, data.draw(st.integers(0, 255)))
        elif op == "delete" and wire:
            del wire[i]
        else:
            del wire[i:]
    with contextlib.suppress(ProtocolError):
        _decode_stream(bytes(wire), version)


def _err(data: bytes, version: int | None = 5, **kw: int) -> ReasonCode:
    with pytest.raises(ProtocolError) as ei:
        d = c.Decoder(version, **kw)  # type: ignore[arg-type]
        d.feed(data)
        list(d.packets())
    return ei.value.reason_code


def test_reserved_flags_rejected() -> None:
    assert _err(b"\x60\x02\x00\x01") == ReasonCode.MALFORMED_PACKET  # PUBREL flags 0
    assert (
        _err(b"\x80\x06\x00\x01\x00\x01a\x00", 4) == ReasonCode.MALFORMED_PACKET
    )  # SUBSCRIBE flags 0
    assert _err(b"\xc1\x00") == ReasonCode.MALFORMED_PACKET  # PINGREQ flag
    assert _err(b"\x36\x05\x00\x01a\x00\x01") == ReasonCode.MALFORMED_PACKET  # QoS 3
    assert _err(b"\x38\x03\x00\x01a", 4) == ReasonCode.MALFORMED_PACKET  # DUP on QoS 0
    assert _err(b"\x00\x00") == ReasonCode.MALFORMED_PACKET  # type 0


def test_remaining_length_limits() -> None:
    assert _err(b"\x30\xff\xff\xff\xff\x01") == ReasonCode.MALFORMED_PACKET
    assert _err(b"\x30\xff\xff\x7f", max_packet_size=1000) == ReasonCode.PACKET_TOO_LARGE


def test_utf8_rules() -> None:
    # U+0000 in a topic name
    assert _err(b"\x30\x04\x00\x02a\x00", 4) == ReasonCode.MALFORMED_PACKET
    # encoded surrogate U+D800 (ED A0 80)
    assert _err(b"\x30\x05\x00\x03\xed\xa0\x80", 4) == ReasonCode.MALFORMED_PACKET
    # overlong encoding of '/'
    assert _err(b"\x30\x04\x00\x02\xc0\xaf", 4) == ReasonCode.MALFORMED_PACKET
    with pytest.raises(ValueError):
        c.encode(c.Publish("a\ud800"))


def test_wildcard_in_topic_name() -> None:
    assert _err(c.encode(c.Publish("a"), 4).replace(b"a", b"+"), 4) == ReasonCode.TOPIC_NAME_INVALID


def test_first_packet_must_be_connect() -> None:
    assert _err(b"\xc0\x00", None) == ReasonCode.PROTOCOL_ERROR


def test_connect_checks() -> None:
    good = c.encode(c.Connect("x", protocol_level=4), 4)
    bad_reserved = bytearray(good)
    bad_reserved[9] |= 1
    assert _err(bytes(bad_reserved), None) == ReasonCode.MALFORMED_PACKET
    bad_level = bytearray(good)
    bad_level[8] = 6
    assert _err(bytes(bad_level), None) == ReasonCode.UNSUPPORTED_PROTOCOL_VERSION
    assert c.decode_all(good, None)[0] == c.Connect("x", protocol_level=4)
    v3 = c.encode(c.Connect("x", protocol_level=3), 3)
    assert c.decode_all(v3, None)[0].protocol_level == 3  # type: ignore[union-attr]


def test_property_rules() -> None:
    # property not allowed in PUBLISH (session expiry, 0x11)
    body = b"\x00\x01a" + b"\x05\x11\x00\x00\x00\x01"
    assert _err(b"\x30" + bytes([len(body)]) + body) == ReasonCode.MALFORMED_PACKET
    # duplicated content type
    body = b"\x00\x01a" + b"\x08\x03\x00\x01x\x03\x00\x01y"
    assert _err(b"\x30" + bytes([len(body)]) + body) == ReasonCode.PROTOCOL_ERROR
    # receive maximum 0 in CONNECT
    pkt = c.encode(c.Connect("x", protocol_level=5, properties=c.Properties(receive_maximum=1)), 5)
    pkt = pkt.replace(b"\x21\x00\x01", b"\x21\x00\x00")
    assert _err(pkt, None) == ReasonCode.PROTOCOL_ERROR
    # user properties repeat and keep order
    props = c.Properties(user_property=(("a", "1"), ("a", "2"), ("b", "3")))
    pkt2 = c.Publish("t", b"x", properties=props)
    assert c.decode_all(c.encode(pkt2, 5), 5) == [pkt2]


def test_subscribe_options_reserved() -> None:
    pkt = bytearray(c.encode(c.Subscribe(1, (c.Subscription("a", 1),)), 5))
    pkt[-1] |= 0x40
    assert _err(bytes(pkt)) == ReasonCode.MALFORMED_PACKET
    pkt = bytearray(c.encode(c.Subscribe(1, (c.Subscription("a", 1),)), 4))
    pkt[-1] |= 0x04
    assert _err(bytes(pkt), 4) == ReasonCode.MALFORMED_PACKET
    assert _err(b"\x82\x03\x00\x01\x00") == ReasonCode.PROTOCOL_ERROR  # no subscriptions


_version = 4


def _normalized(item: object) -> object:
    """A ``next_batch`` fast item as the packet the general decoder gives."""
    if type(item) is tuple:
        topic, payload, qos, retain, pid, frame = item
        p = c.Publish(topic, payload, qos, retain, False, pid or None)
        # the frame, when there is one, is that packet (as this decoder's version encodes it)
        assert frame is None or frame == c.encode(p, _version)
        return p
    if type(item) is int:
        return c.Puback(item)
    return item


def _both_ways(wire: bytes, version: int, cut: int) -> None:
    """``next_batch`` (fed in two pieces) == ``next_packet`` one by one: same packets, same
    error after the same packets, same bytes left over."""
    slow = c.Decoder(version, max_packet_size=4096)
    slow.feed(wire)
    want: list[object] = []
    want_err = None
    try:
        while (p := slow.next_packet()) is not None:
            want.append(p)
    except ProtocolError as exc:
        want_err = exc.reason_code
    global _version
    _version = version
    fast = c.Decoder(version, max_packet_size=4096)
    got: list[object] = []
    err = None
    for piece in (wire[:cut], wire[cut:]):
        fast.feed(piece)
        items, exc = fast.next_batch()
        got += [_normalized(x) for x in items]
        if exc is not None:
            err = exc.reason_code
            break
    assert got == want
    assert err == want_err
    if err is None:
        assert fast.buffered == slow.buffered


@pytest.mark.parametrize("version", [4, 5])
@settings(max_examples=150, deadline=None)
@given(data=st.data())
def test_next_batch_matches_next_packet(version: int, data: st.DataObject) -> None:
    hot = st.builds(
        c.Publish,
        st.sampled_from(["a/b", "x", "é/t", "bench/1"]),
        st.binary(max_size=300),
        st.sampled_from([0, 1]),
        st.booleans(),
        st.just(False),
    ).map(lambda p: p if not p.qos else c.Publish(p.topic, p.payload, 1, p.retain, False, 7))
    pkts = data.draw(
        st.lists(
            st.one_of(hot, packets(version), st.builds(c.Puback, st.integers(1, 0xFFFF))),
            min_size=1,
            max_size=8,
        )
    )
    wire = bytearray(b"".join(c.encode(x, version) for x in pkts))
    if data.draw(st.booleans()):  # damage it: the same error after the same packets
        i = data.draw(st.integers(0, len(wire) - 1))
        wire[i] ^= 1 << data.draw(st.integers(0, 7))
    _both_ways(bytes(wire), version, data.draw(st.integers(0, len(wire))))


def test_next_batch_hot_packets() -> None:
    wire = (
        c.encode(c.Publish("t/1", b"x" * 200, 1, True, False, 5), 4)  # 2-byte remaining length
        + c.encode(c.Puback(9), 4)
        + b"\x30\x05\x00\x03t/+"  # wildcard topic: the general path's error
    )
    d = c.Decoder(4)
    d.feed(wire)
    items, err = d.next_batch()
    assert items == [("t/1", b"x" * 200, 1, True, 5, None), 9]
    d = c.Decoder(4)
    d.feed(c.encode(c.Publish("t/2", b"abc"), 4))
    assert d.next_batch() == ([("t/2", b"abc", 0, False, 0, b"\x30\x08\x00\x03t/2abc")], None)
    assert err is not None and err.reason_code == ReasonCode.TOPIC_NAME_INVALID
