"""Modbus point maps and the codec: every type in every byte order round-trips, the four
float orders agree with an independent encoding (the test peer's), coalescing."""

from __future__ import annotations

import math
import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tests.bindings.modbus_peer import f32_orders
from twin.bindings.modbus_codec import EncodeError, decode, encode, plan
from twin.spec.modbus import ORDERS, Point, PointError, overlaps, parse_point, parse_register


def pt(**kw) -> Point:
    return parse_point(kw.pop("name", "p"), kw)


def test_modicon_notation() -> None:
    assert parse_register("40001") == (3, 0, None)
    assert parse_register(40010) == (3, 9, None)
    assert parse_register("30001") == (4, 0, None)
    assert parse_register("10005") == (2, 4, None)
    assert parse_register("00001") == (1, 0, None)
    assert parse_register("40001.3") == (3, 0, 3)
    assert parse_register("465536") == (3, 65535, None)
    for bad in ("40000", "50001", "4001", "x", "40001.x"):
        with pytest.raises(PointError):
            parse_register(bad)


def test_four_float_orders_match_an_independent_encoding() -> None:
    v = 12345.678
    regs = f32_orders(v)
    for i, order in enumerate(ORDERS):
        p = pt(register=30001 + 2 * i, type="float32", order=order)
        assert decode(p, regs[2 * i : 2 * i + 2]) == pytest.approx(v, rel=1e-6)
        assert encode(p, v) == regs[2 * i : 2 * i + 2]


INT_RANGES = {"int16": 15, "uint16": 16, "int32": 31, "uint32": 32, "int64": 63, "uint64": 64}


@given(st.sampled_from(list(INT_RANGES)), st.sampled_from(ORDERS), st.data())
def test_integers_round_trip(typ: str, order: str, data: st.DataObject) -> None:
    bits = INT_RANGES[typ]
    lo = 0 if typ.startswith("u") else -(2**bits)
    hi = 2**bits - 1
    value = data.draw(st.integers(lo, hi))
    p = pt(register=40001, type=typ, order=order)
    regs = encode(p, value)
    assert len(regs) == p.count and all(0 <= r <= 0xFFFF for r in regs)
    assert decode(p, regs) == value


@given(st.sampled_from(["float32", "float64"]), st.sampled_from(ORDERS),
       st.floats(allow_nan=False, allow_infinity=False, width=32))
def test_floats_round_trip(typ: str, order: str, value: float) -> None:
    p = pt(register=40001, type=typ, order=order)
    assert decode(p, encode(p, value)) == value


@given(st.text(st.characters(min_codepoint=32, max_codepoint=126), max_size=16), st.sampled_from(ORDERS))
def test_strings_round_trip(text: str, order: str) -> None:
    p = pt(register=40001, type="string", count=8, order=order)
    assert decode(p, encode(p, text)) == text.rstrip("\0")


def test_scale_offset_and_bits() -> None:
    p = pt(register=40001, type="int16", scale=0.1, offset=-40)
    assert encode(p, 21.5) == [615]
    assert decode(p, [615]) == pytest.approx(21.5)
    b = pt(register="40001.3")
    assert b.type == "bool" and b.bit == 3
    assert decode(b, [0b1000]) is True and decode(b, [0b0111]) is False
    with pytest.raises(EncodeError):
        encode(pt(register=40001, type="int16"), 40000)
    with pytest.raises(EncodeError):
        encode(pt(register=40001, type="float32"), 1e39)
    with pytest.raises(EncodeError):
        encode(pt(register=40001, type="float32"), math.inf)


def test_point_errors() -> None:
    cases = [
        ({"register": 30001, "type": "float32", "count": 1}, "count 1 does not fit float32"),
        ({"register": 30001, "access": "readwrite"}, "read-only"),
        ({"register": 10001, "type": "int16"}, "single bits"),
        ({"register": 40001, "type": "string"}, "needs count"),
        ({"register": 40001, "type": "float32", "write_fc": 6, "access": "readwrite"}, "writes one register"),
        ({"register": 40001, "write_fc": 5, "access": "readwrite"}, "does not write holding registers"),
        ({"register": 465535, "type": "float64"}, "runs past 65535"),
        ({"register": "40001.16"}, "out of range 0-15"),
        ({"register": 40001, "type": "bool", "scale": 2}, "do not apply"),
    ]
    for spec, message in cases:
        with pytest.raises(PointError, match=message):
            parse_point("p", spec)


def test_overlaps() -> None:
    a = pt(name="a", register=40001, type="float32")
    b = pt(name="b", register=40002)
    c = pt(name="c", register="40001.3")
    d = pt(name="d", register="40001.3")
    e = pt(name="e", register=30002)  # another table
    pairs = [(x.name, y.name) for x, y in overlaps([a, b, c, d, e])]
    assert pairs == [("b", "a"), ("d", "c")]


def test_coalescing_respects_gap_and_limit() -> None:
    points = [pt(name=f"r{i}", register=40001 + i * 3) for i in range(10)]  # gaps of 2
    assert [(b.fc, b.start, b.count) for b in plan(points, max_gap=2)] == [(3, 0, 28)]
    assert len(plan(points, max_gap=1)) == 10
    assert [b.count for b in plan(points, max_gap=2, max_count=10)] == [10, 10, 4]
    mixed = [pt(name="h", register=40001), pt(name="i", register=30001), pt(name="c", register=1)]
    assert sorted(b.fc for b in plan(mixed)) == [1, 3, 4]
    assert struct.calcsize(">f") == 4
