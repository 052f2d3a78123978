"""Property tests: a codec's decode(encode(x)) == x — the demo's Wasm codec against the
simulator's frame encoder, and a Starlark codec with both directions; the ABI's readings layout
round-trips any acceptable reading."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.plugins.modules import acme_wasm, plugin
from twin.plugins.abi import pack_readings, unpack_readings
from twin.plugins.host import PluginHost
from twin.sim.mqtt_device import binary_frame

FRAME = {"prefix": "a501", "fields": [{"point": "temperature", "type": "h", "scale": 100},
                                      {"point": "humidity", "type": "H", "scale": 100},
                                      {"point": "battery", "type": "H", "scale": 1000}]}

CODEC = b"""
def decode(payloads, config):
    out = []
    for p in payloads:
        if len(p) != 6 or p[0] != 0x42:
            out.append(None)
            continue
        raw = p[1] * 256 + p[2]
        level = raw - 65536 if raw >= 32768 else raw
        out.append({"level": level, "valve": p[3] == 1, "code": p[4] * 256 + p[5]})
    return out

def encode(commands, config):
    frames = []
    for c in commands:
        p = c["params"]
        level = p["level"] + 65536 if p["level"] < 0 else p["level"]
        frames.append([0x42, level // 256, level % 256, 1 if p["valve"] else 0,
                       p["code"] // 256, p["code"] % 256])
    return frames
"""


@pytest.fixture(scope="module")
def host() -> Iterator[PluginHost]:
    h = PluginHost()
    h.sync({("Plugin", "acme"): plugin("acme", acme_wasm()),
            ("Plugin", "lvl"): plugin("lvl", CODEC, starlark=True)})
    yield h
    h.close()


cents = st.integers(-32768, 32767)


@settings(max_examples=200, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.tuples(cents, st.integers(0, 65535), st.integers(0, 65535)), min_size=1, max_size=50))
def test_wasm_codec_decodes_what_the_encoder_made(host: PluginHost, rows: list[tuple[int, int, int]]) -> None:
    values = [{"temperature": t / 100, "humidity": h / 100, "battery": b / 1000} for t, h, b in rows]
    frames = [binary_frame(FRAME, v) for v in values]
    out = host.decode("acme", frames)
    back: list[dict[str, float]] = [{} for _ in frames]
    for index, point, value, ts, good in out:
        assert good and ts == 0.0
        back[index][point] = value
    assert back == values


@settings(max_examples=100, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.fixed_dictionaries({"level": cents, "valve": st.booleans(),
                                       "code": st.integers(0, 65535)}), min_size=1, max_size=20))
def test_starlark_codec_roundtrip(host: PluginHost, params: list[dict[str, object]]) -> None:
    frames = host.encode("lvl", [{"name": "set", "params": p} for p in params])
    assert frames is not None
    out = host.decode("lvl", frames)
    back: list[dict[str, object]] = [{} for _ in params]
    for index, point, value, _, good in out:
        assert good
        back[index][point] = value
    assert back == params


scalars = st.one_of(st.floats(allow_nan=False, allow_infinity=False), st.integers(-(2**63), 2**63 - 1),
                    st.booleans(), st.text(max_size=40), st.none())


@given(st.lists(st.tuples(st.text(min_size=1, max_size=30), scalars,
                          st.floats(0, 4e9, allow_nan=False)), max_size=30))
def test_readings_layout_roundtrip(rows: list[tuple[str, object, float]]) -> None:
    back = unpack_readings(pack_readings(rows), len(rows))
    assert [(i, p, v, ts) for i, p, v, ts, _ in back] == [(i, *r) for i, r in enumerate(rows)]
