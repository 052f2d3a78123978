"""MQTT 3.1.1 and 5.0 packet codec.

Every one of the 15 control packets is a frozen dataclass; :func:`encode` turns one into bytes
for a given protocol version and :class:`Decoder` parses packets incrementally out of a byte
stream. Validation is strict: reserved flag bits, the four-byte remaining-length limit, UTF-8
rules (well formed, no U+0000, no surrogates), property identifiers allowed per packet type,
duplicated properties, the negotiated maximum packet size. Every violation raises
:class:`ProtocolError` carrying the MQTT 5.0 reason code the receiver must use when it closes
the connection (``MALFORMED_PACKET``, ``PROTOCOL_ERROR``, ``PACKET_TOO_LARGE`` ...).

Protocol levels: 3 (MQTT 3.1, ``MQIsdp``, parsed like 3.1.1), 4 (3.1.1) and 5 (5.0).
"""

from __future__ import annotations

import struct
from collections.abc import Iterator
from dataclasses import dataclass, field, fields
from enum import IntEnum
from typing import Any, ClassVar

from twin.errors import TwinError

MQTT_311 = 4
MQTT_5 = 5
MAX_REMAINING_LENGTH = 268_435_455
MAX_VARINT = MAX_REMAINING_LENGTH


class PacketType(IntEnum):
    CONNECT = 1
    CONNACK = 2
    PUBLISH = 3
    PUBACK = 4
    PUBREC = 5
    PUBREL = 6
    PUBCOMP = 7
    SUBSCRIBE = 8
    SUBACK = 9
    UNSUBSCRIBE = 10
    UNSUBACK = 11
    PINGREQ = 12
    PINGRESP = 13
    DISCONNECT = 14
    AUTH = 15


class ReasonCode(IntEnum):
    """MQTT 5.0 reason codes (section 2.4). ``SUCCESS`` doubles as normal disconnection and
    granted QoS 0."""

    SUCCESS = 0x00
    GRANTED_QOS_1 = 0x01
    GRANTED_QOS_2 = 0x02
    DISCONNECT_WITH_WILL = 0x04
    NO_MATCHING_SUBSCRIBERS = 0x10
    NO_SUBSCRIPTION_EXISTED = 0x11
    CONTINUE_AUTHENTICATION = 0x18
    RE_AUTHENTICATE = 0x19
    UNSPECIFIED_ERROR = 0x80
    MALFORMED_PACKET = 0x81
    PROTOCOL_ERROR = 0x82
    IMPLEMENTATION_SPECIFIC_ERROR = 0x83
    UNSUPPORTED_PROTOCOL_VERSION = 0x84
    CLIENT_IDENTIFIER_NOT_VALID = 0x85
    BAD_USER_NAME_OR_PASSWORD = 0x86
    NOT_AUTHORIZED = 0x87
    SERVER_UNAVAILABLE = 0x88
    SERVER_BUSY = 0x89
    BANNED = 0x8A
    SERVER_SHUTTING_DOWN = 0x8B
    BAD_AUTHENTICATION_METHOD = 0x8C
    KEEP_ALIVE_TIMEOUT = 0x8D
    SESSION_TAKEN_OVER = 0x8E
    TOPIC_FILTER_INVALID = 0x8F
    TOPIC_NAME_INVALID = 0x90
    PACKET_IDENTIFIER_IN_USE = 0x91
    PACKET_IDENTIFIER_NOT_FOUND = 0x92
    RECEIVE_MAXIMUM_EXCEEDED = 0x93
    TOPIC_ALIAS_INVALID = 0x94
    PACKET_TOO_LARGE = 0x95
    MESSAGE_RATE_TOO_HIGH = 0x96
    QUOTA_EXCEEDED = 0x97
    ADMINISTRATIVE_ACTION = 0x98
    PAYLOAD_FORMAT_INVALID = 0x99
    RETAIN_NOT_SUPPORTED = 0x9A
    QOS_NOT_SUPPORTED = 0x9B
    USE_ANOTHER_SERVER = 0x9C
    SERVER_MOVED = 0x9D
    SHARED_SUBSCRIPTIONS_NOT_SUPPORTED = 0x9E
    CONNECTION_RATE_EXCEEDED = 0x9F
    MAXIMUM_CONNECT_TIME = 0xA0
    SUBSCRIPTION_IDENTIFIERS_NOT_SUPPORTED = 0xA1
    WILDCARD_SUBSCRIPTIONS_NOT_SUPPORTED = 0xA2


# Reason codes valid in each v5 packet (section 3.x.2.1); anything else is malformed.
_RC = ReasonCode
_PUBACK_RCS = frozenset({0x00, 0x10, 0x80, 0x83, 0x87, 0x90, 0x91, 0x97, 0x99})
_PUBREL_RCS = frozenset({0x00, 0x92})
_SUBACK_RCS = frozenset({0x00, 0x01, 0x02, 0x80, 0x83, 0x87, 0x8F, 0x91, 0x97, 0x9E, 0xA1, 0xA2})
_UNSUBACK_RCS = frozenset({0x00, 0x11, 0x80, 0x83, 0x87, 0x8F, 0x91})
_AUTH_RCS = frozenset({0x00, 0x18, 0x19})
_CONNACK_RCS = frozenset(
    {
        0x00,
        0x80,
        0x81,
        0x82,
        0x83,
        0x84,
        0x85,
        0x86,
        0x87,
        0x88,
        0x89,
        0x8A,
        0x8C,
        0x90,
        0x95,
        0x97,
        0x99,
        0x9A,
        0x9B,
        0x9C,
        0x9D,
        0x9F,
    }
)
_DISCONNECT_RCS = frozenset(
    {
        0x00,
        0x04,
        0x80,
        0x81,
        0x82,
        0x83,
        0x87,
        0x89,
        0x8B,
        0x8D,
        0x8E,
        0x8F,
        0x90,
        0x93,
        0x94,
        0x95,
        0x96,
        0x97,
        0x98,
        0x99,
        0x9A,
        0x9B,
        0x9C,
        0x9D,
        0x9E,
        0x9F,
        0xA0,
        0xA1,
        0xA2,
    }
)


class ProtocolError(TwinError):
    """The peer broke the protocol. ``reason_code`` is what to send before closing."""

    def __init__(self, message: str, reason_code: int = ReasonCode.MALFORMED_PACKET) -> None:
        super().__init__(message)
        self.reason_code = ReasonCode(reason_code)


def _malformed(msg: str) -> ProtocolError:
    return ProtocolError(msg, ReasonCode.MALFORMED_PACKET)


def _protocol(msg: str) -> ProtocolError:
    return ProtocolError(msg, ReasonCode.PROTOCOL_ERROR)


# --------------------------------------------------------------------------- properties

_BYTE, _U16, _U32, _VARINT, _STR, _BIN, _PAIR = range(7)

# id -> (attribute name, type, packet types where allowed; 0 means "will properties")
_WILL = 0
_P = PacketType
_PROPS: dict[int, tuple[str, int, frozenset[int]]] = {
    0x01: ("payload_format_indicator", _BYTE, frozenset({_P.PUBLISH, _WILL})),
    0x02: ("message_expiry_interval", _U32, frozenset({_P.PUBLISH, _WILL})),
    0x03: ("content_type", _STR, frozenset({_P.PUBLISH, _WILL})),
    0x08: ("response_topic", _STR, frozenset({_P.PUBLISH, _WILL})),
    0x09: ("correlation_data", _BIN, frozenset({_P.PUBLISH, _WILL})),
    0x0B: ("subscription_identifier", _VARINT, frozenset({_P.PUBLISH, _P.SUBSCRIBE})),
    0x11: ("session_expiry_interval", _U32, frozenset({_P.CONNECT, _P.CONNACK, _P.DISCONNECT})),
    0x12: ("assigned_client_identifier", _STR, frozenset({_P.CONNACK})),
    0x13: ("server_keep_alive", _U16, frozenset({_P.CONNACK})),
    0x15: ("authentication_method", _STR, frozenset({_P.CONNECT, _P.CONNACK, _P.AUTH})),
    0x16: ("authentication_data", _BIN, frozenset({_P.CONNECT, _P.CONNACK, _P.AUTH})),
    0x17: ("request_problem_information", _BYTE, frozenset({_P.CONNECT})),
    0x18: ("will_delay_interval", _U32, frozenset({_WILL})),
    0x19: ("request_response_information", _BYTE, frozenset({_P.CONNECT})),
    0x1A: ("response_information", _STR, frozenset({_P.CONNACK})),
    0x1C: ("server_reference", _STR, frozenset({_P.CONNACK, _P.DISCONNECT})),
    0x1F: (
        "reason_string",
        _STR,
        frozenset(
            {
                _P.CONNACK,
                _P.PUBACK,
                _P.PUBREC,
                _P.PUBREL,
                _P.PUBCOMP,
                _P.SUBACK,
                _P.UNSUBACK,
                _P.DISCONNECT,
                _P.AUTH,
            }
        ),
    ),
    0x21: ("receive_maximum", _U16, frozenset({_P.CONNECT, _P.CONNACK})),
    0x22: ("topic_alias_maximum", _U16, frozenset({_P.CONNECT, _P.CONNACK})),
    0x23: ("topic_alias", _U16, frozenset({_P.PUBLISH})),
    0x24: ("maximum_qos", _BYTE, frozenset({_P.CONNACK})),
    0x25: ("retain_available", _BYTE, frozenset({_P.CONNACK})),
    0x26: ("user_property", _PAIR, frozenset(set(PacketType) | {_WILL})),
    0x27: ("maximum_packet_size", _U32, frozenset({_P.CONNECT, _P.CONNACK})),
    0x28: ("wildcard_subscription_available", _BYTE, frozenset({_P.CONNACK})),
    0x29: ("subscription_identifier_available", _BYTE, frozenset({_P.CONNACK})),
    0x2A: ("shared_subscription_available", _BYTE, frozenset({_P.CONNACK})),
}
_PROP_IDS = {name: (pid, typ) for pid, (name, typ, _) in _PROPS.items()}
# properties whose value must be 0 or 1
_BOOL_PROPS = frozenset({0x01, 0x17, 0x19, 0x24, 0x25, 0x28, 0x29, 0x2A})


@dataclass(frozen=True, slots=True)
class Properties:
    """MQTT 5.0 properties. ``None`` means absent; repeatable ones are tuples."""

    payload_format_indicator: int | None = None
    message_expiry_interval: int | None = None
    content_type: str | None = None
    response_topic: str | None = None
    correlation_data: bytes | None = None
    subscription_identifier: tuple[int, ...] = ()
    session_expiry_interval: int | None = None
    assigned_client_identifier: str | None = None
    server_keep_alive: int | None = None
    authentication_method: str | None = None
    authentication_data: bytes | None = None
    request_problem_information: int | None = None
    will_delay_interval: int | None = None
    request_response_information: int | None = None
    response_information: str | None = None
    server_reference: str | None = None
    reason_string: str | None = None
    receive_maximum: int | None = None
    topic_alias_maximum: int | None = None
    topic_alias: int | None = None
    maximum_qos: int | None = None
    retain_available: int | None = None
    user_property: tuple[tuple[str, str], ...] = ()
    maximum_packet_size: int | None = None
    wildcard_subscription_available: int | None = None
    subscription_identifier_available: int | None = None
    shared_subscription_available: int | None = None


NO_PROPS = Properties()
_PROP_FIELDS = tuple(f.name for f in fields(Properties))


# --------------------------------------------------------------------------- packets


@dataclass(frozen=True, slots=True)
class Will:
    topic: str
    payload: bytes = b""
    qos: int = 0
    retain: bool = False
    properties: Properties = NO_PROPS


@dataclass(frozen=True, slots=True)
class Connect:
    client_id: str = ""
    protocol_level: int = MQTT_311
    clean_start: bool = True
    keep_alive: int = 60
    username: str | None = None
    password: bytes | None = None
    will: Will | None = None
    properties: Properties = NO_PROPS
    protocol_name: str = "MQTT"
    type = PacketType.CONNECT


@dataclass(frozen=True, slots=True)
class Connack:
    session_present: bool = False
    reason_code: int = 0
    properties: Properties = NO_PROPS
    type = PacketType.CONNACK


@dataclass(frozen=True, slots=True)
class Publish:
    topic: str
    payload: bytes = b""
    qos: int = 0
    retain: bool = False
    dup: bool = False
    packet_id: int | None = None
    properties: Properties = NO_PROPS
    type = PacketType.PUBLISH


@dataclass(frozen=True, slots=True)
class _Ack:
    """The four publish acknowledgements share one shape (equality still needs the same
    class: ``Puback(1) != Pubrec(1)``)."""

    packet_id: int
    reason_code: int = 0
    properties: Properties = NO_PROPS
    type: ClassVar[PacketType]


class Puback(_Ack):
    __slots__ = ()
    type = PacketType.PUBACK


class Pubrec(_Ack):
    __slots__ = ()
    type = PacketType.PUBREC


class Pubrel(_Ack):
    __slots__ = ()
    type = PacketType.PUBREL


class Pubcomp(_Ack):
    __slots__ = ()
    type = PacketType.PUBCOMP


@dataclass(frozen=True, slots=True)
class Subscription:
    topic_filter: str
    qos: int = 0
    no_local: bool = False
    retain_as_published: bool = False
    retain_handling: int = 0


@dataclass(frozen=True, slots=True)
class Subscribe:
    packet_id: int
    subscriptions: tuple[Subscription, ...]
    properties: Properties = NO_PROPS
    type = PacketType.SUBSCRIBE


@dataclass(frozen=True, slots=True)
class Suback:
    packet_id: int
    reason_codes: tuple[int, ...]
    properties: Properties = NO_PROPS
    type = PacketType.SUBACK


@dataclass(frozen=True, slots=True)
class Unsubscribe:
    packet_id: int
    topic_filters: tuple[str, ...]
    properties: Properties = NO_PROPS
    type = PacketType.UNSUBSCRIBE


@dataclass(frozen=True, slots=True)
class Unsuback:
    packet_id: int
    reason_codes: tuple[int, ...] = ()  # MQTT 5 only
    properties: Properties = NO_PROPS
    type = PacketType.UNSUBACK


@dataclass(frozen=True, slots=True)
class Pingreq:
    type = PacketType.PINGREQ


@dataclass(frozen=True, slots=True)
class Pingresp:
    type = PacketType.PINGRESP


@dataclass(frozen=True, slots=True)
class Disconnect:
    reason_code: int = 0
    properties: Properties = NO_PROPS
    type = PacketType.DISCONNECT


@dataclass(frozen=True, slots=True)
class Auth:
    reason_code: int = 0
    properties: Properties = NO_PROPS
    type = PacketType.AUTH


Packet = (
    Connect
    | Connack
    | Publish
    | Puback
    | Pubrec
    | Pubrel
    | Pubcomp
    | Subscribe
    | Suback
    | Unsubscribe
    | Unsuback
    | Pingreq
    | Pingresp
    | Disconnect
    | Auth
)

# --------------------------------------------------------------------------- primitives


def encode_varint(n: int) -> bytes:
    if n < 0 or n > MAX_VARINT:
        raise ValueError(f"variable byte integer out of range: {n}")
    if n < 128:
        return bytes((n,))
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def _enc_str(s: str) -> bytes:
    try:
        b = s.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ValueError(f"string is not encodable as UTF-8: {s!r}") from exc
    if "\x00" in s:
        raise ValueError("MQTT strings must not contain U+0000")
    if len(b) > 0xFFFF:
        raise ValueError("string longer than 65535 bytes")
    return struct.pack("!H", len(b)) + b


def _enc_bin(b: bytes) -> bytes:
    if len(b) > 0xFFFF:
        raise ValueError("binary data longer than 65535 bytes")
    return struct.pack("!H", len(b)) + b


def encode_properties(props: Properties) -> bytes:
    if props is NO_PROPS:
        return b"\x00"
    out = bytearray()
    for name in _PROP_FIELDS:
        value = getattr(props, name)
        if value is None or value == ():
            continue
        pid, typ = _PROP_IDS[name]
        if typ == _PAIR:
            for k, v in value:
                out.append(pid)
                out += _enc_str(k) + _enc_str(v)
        elif name == "subscription_identifier":
            for v in value:
                out.append(pid)
                out += encode_varint(v)
        else:
            out.append(pid)
            if typ == _BYTE:
                out.append(value)
            elif typ == _U16:
                out += struct.pack("!H", value)
            elif typ == _U32:
                out += struct.pack("!I", value)
            elif typ == _VARINT:
                out += encode_varint(value)
            elif typ == _STR:
                out += _enc_str(value)
            else:
                out += _enc_bin(value)
    return encode_varint(len(out)) + bytes(out)


class _Reader:
    """Cursor over one packet's variable header + payload."""

    __slots__ = ("buf", "end", "pos")

    def __init__(self, buf: bytes | memoryview, pos: int = 0, end: int | None = None) -> None:
        self.buf = buf
        self.pos = pos
        self.end = len(buf) if end is None else end

    def remaining(self) -> int:
        return self.end - self.pos

    def need(self, n: int) -> None:
        if self.pos + n > self.end:
            raise _malformed("packet shorter than its contents")

    def u8(self) -> int:
        self.need(1)
        v = self.buf[self.pos]
        self.pos += 1
        return v

    def u16(self) -> int:
        self.need(2)
        v = (self.buf[self.pos] << 8) | self.buf[self.pos + 1]
        self.pos += 2
        return v

    def u32(self) -> int:
        self.need(4)
        v: int = struct.unpack_from("!I", self.buf, self.pos)[0]
        self.pos += 4
        return v

    def varint(self) -> int:
        mult = 1
        value = 0
        for _ in range(4):
            b = self.u8()
            value += (b & 0x7F) * mult
            if not b & 0x80:
                return value
            mult <<= 7
        raise _malformed("variable byte integer longer than 4 bytes")

    def binary(self) -> bytes:
        n = self.u16()
        self.need(n)
        v = bytes(self.buf[self.pos : self.pos + n])
        self.pos += n
        return v

    def string(self) -> str:
        return decode_utf8(self.binary())

    def rest(self) -> bytes:
        v = bytes(self.buf[self.pos : self.end])
        self.pos = self.end
        return v


def decode_utf8(raw: bytes) -> str:
    """Decode an MQTT UTF-8 string: well formed, no surrogates, no U+0000."""
    try:
        s = raw.decode("utf-8")  # strict: rejects encoded surrogates and overlongs
    except UnicodeDecodeError as exc:
        raise _malformed(f"invalid UTF-8: {exc.reason}") from None
    if "\x00" in s:
        raise _malformed("UTF-8 string contains U+0000")
    return s


def _read_properties(r: _Reader, ptype: int) -> Properties:
    length = r.varint()
    r.need(length)
    end = r.pos + length
    if length == 0:
        return NO_PROPS
    values: dict[str, Any] = {}
    users: list[tuple[str, str]] = []
    subids: list[int] = []
    sub = _Reader(r.buf, r.pos, end)
    while sub.pos < end:
        pid = sub.varint()
        spec = _PROPS.get(pid)
        if spec is None:
            raise _malformed(f"unknown property identifier 0x{pid:02x}")
        name, typ, allowed = spec
        if ptype not in allowed:
            raise _malformed(f"property {name} not allowed in packet type {ptype}")
        if typ == _BYTE:
            v: Any = sub.u8()
        elif typ == _U16:
            v = sub.u16()
        elif typ == _U32:
            v = sub.u32()
        elif typ == _VARINT:
            v = sub.varint()
        elif typ == _STR:
            v = sub.string()
        elif typ == _BIN:
            v = sub.binary()
        else:
            v = (sub.string(), sub.string())
        if pid in _BOOL_PROPS and v not in (0, 1):
            raise _protocol(f"property {name} must be 0 or 1")
        if pid == 0x26:
            users.append(v)
            continue
        if pid == 0x0B:
            if v == 0:
                raise _protocol("subscription identifier 0")
            if ptype == PacketType.SUBSCRIBE and subids:
                raise _protocol("duplicate subscription identifier")
            subids.append(v)
            continue
        if name in values:
            raise _protocol(f"duplicate property {name}")
        if pid in (0x21, 0x27) and v == 0:
            raise _protocol(f"property {name} must not be 0")
        if pid == 0x23 and v == 0:
            raise ProtocolError("topic alias 0", ReasonCode.TOPIC_ALIAS_INVALID)
        values[name] = v
    if sub.pos != end:
        raise _malformed("property length mismatch")
    r.pos = end
    if users:
        values["user_property"] = tuple(users)
    if subids:
        values["subscription_identifier"] = tuple(subids)
    return Properties(**values)


# --------------------------------------------------------------------------- encode


def _fixed(first: int, body: bytes | bytearray) -> bytes:
    return bytes((first,)) + encode_varint(len(body)) + bytes(body)


def _ack_body(packet_id: int, rc: int, props: Properties, version: int) -> bytes:
    body = struct.pack("!H", packet_id)
    if version >= MQTT_5 and (rc != 0 or props is not NO_PROPS):
        body += bytes((rc,))
        if props is not NO_PROPS:
            body += encode_properties(props)
    return body


def _check_pid(pid: int | None) -> int:
    if pid is None or not 0 < pid <= 0xFFFF:
        raise ValueError(f"invalid packet identifier {pid}")
    return pid


def encode_publish(
    topic: str,
    payload: bytes,
    qos: int = 0,
    retain: bool = False,
    dup: bool = False,
    packet_id: int | None = None,
    properties: Properties = NO_PROPS,
    version: int = MQTT_311,
) -> bytes:
    """One PUBLISH, without building a :class:`Publish` first (the broker's per-message path)."""
    if qos not in (0, 1, 2):
        raise ValueError("qos must be 0, 1 or 2")
    head = _enc_str(topic)
    if qos:
        head += _check_pid(packet_id).to_bytes(2, "big")
    if version >= MQTT_5:
        head += encode_properties(properties)
    first = 0x30 | (dup << 3) | (qos << 1) | int(retain)
    n = len(head) + len(payload)
    size = bytes((first, n)) if n < 128 else bytes((first,)) + encode_varint(n)
    return b"".join((size, head, payload))


def encode(p: Packet, version: int = MQTT_311) -> bytes:
    """Encode a packet for the given protocol level (3, 4 or 5)."""
    v5 = version >= MQTT_5
    if isinstance(p, Publish):
        return encode_publish(
            p.topic, p.payload, p.qos, p.retain, p.dup, p.packet_id, p.properties, version
        )
    if isinstance(p, _Ack):  # PUBREL's fixed header flags are 0b0010
        first = (p.type << 4) | (2 if p.type == PacketType.PUBREL else 0)
        return _fixed(
            first, _ack_body(_check_pid(p.packet_id), p.reason_code, p.properties, version)
        )
    if isinstance(p, Pingreq):
        return b"\xc0\x00"
    if isinstance(p, Pingresp):
        return b"\xd0\x00"
    if isinstance(p, Connect):
        level = p.protocol_level
        name = p.protocol_name if level != 3 else "MQIsdp"
        flags = 0
        if p.clean_start:
            flags |= 0x02
        if p.will is not None:
            flags |= 0x04 | (p.will.qos << 3) | (int(p.will.retain) << 5)
        if p.password is not None:
            flags |= 0x40
        if p.username is not None:
            flags |= 0x80
        body = bytearray(_enc_str(name))
        body.append(level)
        body.append(flags)
        body += struct.pack("!H", p.keep_alive)
        if level >= MQTT_5:
            body += encode_properties(p.properties)
        body += _enc_str(p.client_id)
        if p.will is not None:
            if level >= MQTT_5:
                body += encode_properties(p.will.properties)
            body += _enc_str(p.will.topic) + _enc_bin(p.will.payload)
        if p.username is not None:
            body += _enc_str(p.username)
        if p.password is not None:
            body += _enc_bin(p.password)
        return _fixed(0x10, body)
    if isinstance(p, Connack):
        body = bytearray((int(p.session_present), p.reason_code))
        if v5:
            body += encode_properties(p.properties)
        return _fixed(0x20, body)
    if isinstance(p, Subscribe):
        body = bytearray(struct.pack("!H", _check_pid(p.packet_id)))
        if v5:
            body += encode_properties(p.properties)
        for s in p.subscriptions:
            opts = s.qos
            if v5:
                opts |= (s.no_local << 2) | (s.retain_as_published << 3) | (s.retain_handling << 4)
            body += _enc_str(s.topic_filter)
            body.append(opts)
        return _fixed(0x82, body)
    if isinstance(p, Suback):
        body = bytearray(struct.pack("!H", _check_pid(p.packet_id)))
        if v5:
            body += encode_properties(p.properties)
        body += bytes(p.reason_codes)
        return _fixed(0x90, body)
    if isinstance(p, Unsubscribe):
        body = bytearray(struct.pack("!H", _check_pid(p.packet_id)))
        if v5:
            body += encode_properties(p.properties)
        for t in p.topic_filters:
            body += _enc_str(t)
        return _fixed(0xA2, body)
    if isinstance(p, Unsuback):
        body = bytearray(struct.pack("!H", _check_pid(p.packet_id)))
        if v5:
            body += encode_properties(p.properties)
            body += bytes(p.reason_codes)
        return _fixed(0xB0, body)
    if isinstance(p, Disconnect):
        if not v5:
            return b"\xe0\x00"
        if p.reason_code == 0 and p.properties is NO_PROPS:
            return b"\xe0\x00"
        dbody = bytearray((p.reason_code,))
        if p.properties is not NO_PROPS:
            dbody += encode_properties(p.properties)
        return _fixed(0xE0, dbody)
    if isinstance(p, Auth):
        if p.reason_code == 0 and p.properties is NO_PROPS:
            return b"\xf0\x00"
        return _fixed(0xF0, bytes((p.reason_code,)) + encode_properties(p.properties))
    raise TypeError(f"not an MQTT packet: {p!r}")


# --------------------------------------------------------------------------- decode

_FIXED_FLAGS: dict[int, int] = {
    PacketType.CONNECT: 0,
    PacketType.CONNACK: 0,
    PacketType.PUBACK: 0,
    PacketType.PUBREC: 0,
    PacketType.PUBREL: 2,
    PacketType.PUBCOMP: 0,
    PacketType.SUBSCRIBE: 2,
    PacketType.SUBACK: 0,
    PacketType.UNSUBSCRIBE: 2,
    PacketType.UNSUBACK: 0,
    PacketType.PINGREQ: 0,
    PacketType.PINGRESP: 0,
    PacketType.DISCONNECT: 0,
    PacketType.AUTH: 0,
}


_ACKS: dict[int, type[Puback | Pubrec | Pubrel | Pubcomp]] = {
    4: Puback,
    5: Pubrec,
    6: Pubrel,
    7: Pubcomp,
}


def _pid(r: _Reader) -> int:
    pid = r.u16()
    if pid == 0:
        raise _malformed("packet identifier 0")
    return pid


def _decode_ack(r: _Reader, ptype: int, version: int) -> tuple[int, int, Properties]:
    pid = _pid(r)
    rc = 0
    props = NO_PROPS
    if version >= MQTT_5 and r.remaining():
        rc = r.u8()
        allowed = _PUBREL_RCS if ptype in (PacketType.PUBREL, PacketType.PUBCOMP) else _PUBACK_RCS
        if rc not in allowed:
            raise _malformed(f"invalid reason code 0x{rc:02x}")
        if r.remaining():
            props = _read_properties(r, ptype)
    return pid, rc, props


def decode_connect(r: _Reader) -> Connect:
    name = r.string()
    level = r.u8()
    if name == "MQIsdp" and level == 3:
        pass
    elif name != "MQTT":
        raise ProtocolError(
            f"unknown protocol name {name!r}", ReasonCode.UNSUPPORTED_PROTOCOL_VERSION
        )
    elif level not in (4, 5):
        raise ProtocolError(
            f"unsupported protocol level {level}", ReasonCode.UNSUPPORTED_PROTOCOL_VERSION
        )
    flags = r.u8()
    if flags & 0x01:
        raise _malformed("CONNECT reserved flag set")
    keep_alive = r.u16()
    props = _read_properties(r, PacketType.CONNECT) if level >= MQTT_5 else NO_PROPS
    client_id = r.string()
    will = None
    will_qos = (flags >> 3) & 0x03
    will_retain = bool(flags & 0x20)
    if flags & 0x04:
        if will_qos == 3:
            raise _malformed("will QoS 3")
        wprops = _read_properties(r, _WILL) if level >= MQTT_5 else NO_PROPS
        wtopic = r.string()
        if not wtopic or "+" in wtopic or "#" in wtopic:
            raise ProtocolError("invalid will topic", ReasonCode.TOPIC_NAME_INVALID)
        wpayload = r.binary()
        will = Will(wtopic, wpayload, will_qos, will_retain, wprops)
    elif will_qos or will_retain:
        raise _malformed("will QoS/retain set without will flag")
    username = r.string() if flags & 0x80 else None
    password = r.binary() if flags & 0x40 else None
    if password is not None and username is None and level < MQTT_5:
        raise _malformed("password flag without user name flag")
    if r.remaining():
        raise _malformed("trailing bytes after CONNECT")
    return Connect(
        client_id=client_id,
        protocol_level=level,
        clean_start=bool(flags & 0x02),
        keep_alive=keep_alive,
        username=username,
        password=password,
        will=will,
        properties=props,
        protocol_name=name,
    )


def _check_topic_name(topic: str) -> None:
    if "+" in topic or "#" in topic:
        raise ProtocolError("wildcard in topic name", ReasonCode.TOPIC_NAME_INVALID)


def decode_body(ptype: int, flags: int, r: _Reader, version: int) -> Packet:
    """Decode one packet's body; ``r`` spans exactly its remaining length."""
    if ptype == PacketType.PUBLISH:
        qos = (flags >> 1) & 0x03
        if qos == 3:
            raise _malformed("PUBLISH with QoS 3")
        dup = bool(flags & 0x08)
        if dup and qos == 0:
            raise _malformed("DUP set on a QoS 0 PUBLISH")
        topic = r.string()
        _check_topic_name(topic)
        pid = _pid(r) if qos else None
        props = _read_properties(r, ptype) if version >= MQTT_5 else NO_PROPS
        if not topic and (version < MQTT_5 or props.topic_alias is None):
            code = (
                ReasonCode.TOPIC_NAME_INVALID if version >= MQTT_5 else ReasonCode.MALFORMED_PACKET
            )
            raise ProtocolError("empty topic name", code)
        return Publish(topic, r.rest(), qos, bool(flags & 0x01), dup, pid, props)
    expected = _FIXED_FLAGS.get(ptype)
    if expected is None:
        raise _malformed("reserved packet type 0")
    if flags != expected:
        raise _malformed(f"invalid fixed header flags for packet type {ptype}")
    if ptype in (PacketType.PUBACK, PacketType.PUBREC, PacketType.PUBREL, PacketType.PUBCOMP):
        pid, rc, props = _decode_ack(r, ptype, version)
        cls: type[Puback | Pubrec | Pubrel | Pubcomp] = _ACKS[ptype]
        pkt: Packet = cls(pid, rc, props)
    elif ptype == PacketType.PINGREQ:
        pkt = Pingreq()
    elif ptype == PacketType.PINGRESP:
        pkt = Pingresp()
    elif ptype == PacketType.SUBSCRIBE:
        pid = _pid(r)
        props = _read_properties(r, ptype) if version >= MQTT_5 else NO_PROPS
        subs = []
        while r.remaining():
            tf = r.string()
            opts = r.u8()
            qos = opts & 0x03
            if qos == 3:
                raise _malformed("subscription QoS 3")
            if version >= MQTT_5:
                if opts & 0xC0:
                    raise _malformed("subscription options reserved bits set")
                rh = (opts >> 4) & 0x03
                if rh == 3:
                    raise _malformed("retain handling 3")
                subs.append(Subscription(tf, qos, bool(opts & 0x04), bool(opts & 0x08), rh))
            else:
                if opts & 0xFC:
                    raise _malformed("subscription options reserved bits set")
                subs.append(Subscription(tf, qos))
        if not subs:
            raise _protocol("SUBSCRIBE without subscriptions")
        pkt = Subscribe(pid, tuple(subs), props)
    elif ptype == PacketType.UNSUBSCRIBE:
        pid = _pid(r)
        props = _read_properties(r, ptype) if version >= MQTT_5 else NO_PROPS
        tfs = []
        while r.remaining():
            tfs.append(r.string())
        if not tfs:
            raise _protocol("UNSUBSCRIBE without topic filters")
        pkt = Unsubscribe(pid, tuple(tfs), props)
    elif ptype == PacketType.CONNECT:
        pkt = decode_connect(r)
    elif ptype == PacketType.CONNACK:
        ack_flags = r.u8()
        if ack_flags & 0xFE:
            raise _malformed("CONNACK reserved flags set")
        rc = r.u8()
        props = NO_PROPS
        if version >= MQTT_5:
            if rc not in _CONNACK_RCS:
                raise _malformed(f"invalid CONNACK reason code 0x{rc:02x}")
            props = _read_properties(r, ptype)
        elif rc > 5:
            raise _malformed(f"invalid CONNACK return code {rc}")
        pkt = Connack(bool(ack_flags & 1), rc, props)
    elif ptype == PacketType.SUBACK:
        pid = _pid(r)
        props = _read_properties(r, ptype) if version >= MQTT_5 else NO_PROPS
        rcs = tuple(r.rest())
        allowed = _SUBACK_RCS if version >= MQTT_5 else frozenset({0, 1, 2, 0x80})
        if not rcs or any(c not in allowed for c in rcs):
            raise _malformed("invalid SUBACK reason codes")
        pkt = Suback(pid, rcs, props)
    elif ptype == PacketType.UNSUBACK:
        pid = _pid(r)
        if version >= MQTT_5:
            props = _read_properties(r, ptype)
            rcs = tuple(r.rest())
            if not rcs or any(c not in _UNSUBACK_RCS for c in rcs):
                raise _malformed("invalid UNSUBACK reason codes")
            pkt = Unsuback(pid, rcs, props)
        else:
            pkt = Unsuback(pid)
    elif ptype == PacketType.DISCONNECT:
        rc = 0
        props = NO_PROPS
        if version >= MQTT_5 and r.remaining():
            rc = r.u8()
            if rc not in _DISCONNECT_RCS:
                raise _malformed(f"invalid DISCONNECT reason code 0x{rc:02x}")
            if r.remaining():
                props = _read_properties(r, ptype)
        pkt = Disconnect(rc, props)
    else:  # AUTH
        if version < MQTT_5:
            raise _malformed("AUTH packet in MQTT 3.1.1")
        rc = 0
        props = NO_PROPS
        if r.remaining():
            rc = r.u8()
            if rc not in _AUTH_RCS:
                raise _malformed(f"invalid AUTH reason code 0x{rc:02x}")
            props = _read_properties(r, ptype)
        pkt = Auth(rc, props)
    if r.remaining():
        raise _malformed("trailing bytes in packet")
    return pkt


@dataclass
class Decoder:
    """Incremental decoder: ``feed`` bytes, then iterate :meth:`packets`.

    ``version`` is the negotiated protocol level; a server-side decoder may start with
    ``None`` and learns it from the CONNECT packet (which must come first).
    ``max_packet_size`` bounds the whole packet (fixed header included).
    """

    version: int | None = None
    max_packet_size: int = MAX_REMAINING_LENGTH + 5
    _buf: bytearray = field(default_factory=bytearray)
    _topics: dict[bytes, str] = field(default_factory=dict)  # raw topic -> validated name

    def feed(self, data: bytes | bytearray) -> None:
        self._buf += data

    @property
    def buffered(self) -> int:
        return len(self._buf)

    def next_packet(self) -> Packet | None:
        buf = self._buf
        n = len(buf)
        if n < 2:
            return None
        first = buf[0]
        ptype = first >> 4
        if ptype == 0:
            raise _malformed("reserved packet type 0")
        # remaining length
        mult = 1
        length = 0
        i = 1
        while True:
            if i >= n:
                if i > 4:
                    raise _malformed("remaining length longer than 4 bytes")
                return None
            b = buf[i]
            length += (b & 0x7F) * mult
            i += 1
            if not b & 0x80:
                break
            if i > 4:
                raise _malformed("remaining length longer than 4 bytes")
            mult <<= 7
        total = i + length
        if total > self.max_packet_size:
            raise ProtocolError(
                f"packet of {total} bytes exceeds maximum {self.max_packet_size}",
                ReasonCode.PACKET_TOO_LARGE,
            )
        if n < total:
            return None
        version = self.version
        if version is None:
            if ptype != PacketType.CONNECT:
                raise _protocol("first packet is not CONNECT")
            version = MQTT_311
        view = memoryview(buf)
        try:
            pkt = decode_body(ptype, first & 0x0F, _Reader(view, i, total), version)
        finally:
            view.release()
        del buf[:total]
        if isinstance(pkt, Connect) and self.version is None:
            self.version = pkt.protocol_level
        return pkt

    def next_batch(self) -> tuple[list[Any], ProtocolError | None]:
        """Every complete packet buffered, in order, and the error that stopped the batch
        (the packets before a malformed one are still returned, so they can be handled).

        The hot packets skip the dataclasses: a PUBLISH with QoS 0 or 1, no DUP flag, a
        non-empty topic and (MQTT 5) no properties comes as a tuple ``(topic, payload, qos,
        retain, packet_id, frame)`` (packet_id 0 for QoS 0; ``frame``, for QoS 0 without
        retain, is the whole packet: what a subscriber of the same version gets at QoS 0, so
        the broker need not encode it again; else None); a PUBACK without a reason code as its
        packet identifier (an ``int``). Everything else, and anything these checks do not
        accept, goes through :meth:`next_packet` (same validation, same errors). Topic names
        are decoded and validated once per distinct name (a small cache)."""
        out: list[Any] = []
        buf = self._buf
        version = self.version
        if version is None:  # before CONNECT: the general path only
            try:
                while (pkt := self.next_packet()) is not None:
                    out.append(pkt)
            except ProtocolError as exc:
                return out, exc
            return out, None
        append = out.append
        topics = self._topics
        v5 = version >= MQTT_5
        limit = self.max_packet_size
        pos = 0
        n = len(buf)
        err: ProtocolError | None = None
        while n - pos >= 2:
            first = buf[pos]
            if 0x30 <= first <= 0x33:  # PUBLISH, QoS 0/1, no DUP
                length = buf[pos + 1]
                start = pos + 2
                if length & 0x80:  # multi-byte remaining length
                    length &= 0x7F
                    shift = 7
                    while True:
                        if start >= n or start - pos > 4:
                            length = -1
                            break
                        b = buf[start]
                        start += 1
                        length |= (b & 0x7F) << shift
                        if not b & 0x80:
                            break
                        shift += 7
                end = start + length
                if length >= 2 and end <= n and end - pos <= limit:
                    tl = (buf[start] << 8) | buf[start + 1]
                    p = start + 2 + tl
                    qos = (first >> 1) & 1
                    head = p + (2 if qos else 0) + (1 if v5 else 0)
                    if tl and head <= end and (not v5 or buf[head - 1] == 0):
                        raw = bytes(buf[start + 2 : p])
                        topic = topics.get(raw)
                        if topic is None:
                            try:
                                topic = decode_utf8(raw)
                            except ProtocolError:
                                topic = None
                            if topic is not None and ("+" in topic or "#" in topic):
                                topic = None
                            if topic is not None:
                                if len(topics) >= 1024:
                                    topics.clear()
                                topics[raw] = topic
                        pid = (buf[p] << 8) | buf[p + 1] if qos else 0
                        if topic is not None and (pid or not qos):
                            payload = bytes(buf[head:end])
                            frame = bytes(buf[pos:end]) if first == 0x30 else None
                            append((topic, payload, qos, bool(first & 1), pid, frame))
                            pos = end
                            continue
            elif first == 0x40 and buf[pos + 1] == 2 and n - pos >= 4:  # PUBACK, no code
                pid = (buf[pos + 2] << 8) | buf[pos + 3]
                if pid:
                    append(pid)
                    pos += 4
                    continue
            # anything else: one packet the general way (or an incomplete one: stop)
            if pos:
                del buf[:pos]
                pos = 0
            try:
                pkt = self.next_packet()
            except ProtocolError as exc:
                err = exc
                break
            if pkt is None:
                break
            append(pkt)
            n = len(buf)
        if pos:
            del buf[:pos]
        return out, err

    def packets(self) -> Iterator[Packet]:
        while True:
            p = self.next_packet()
            if p is None:
                return
            yield p


def decode_all(data: bytes, version: int | None = MQTT_311) -> list[Packet]:
    """Decode a complete byte string into packets (raises if bytes are left over)."""
    d = Decoder(version)
    d.feed(data)
    out = list(d.packets())
    if d.buffered:
        raise _malformed("truncated packet")
    return out
