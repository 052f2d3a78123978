"""The plugin host: batched Wasm and Starlark calls, limits, failure accounting, hot swap —
and the hostile suite: every attack contained within its declared limits, never raised."""

from __future__ import annotations

import struct
from collections.abc import Iterator
from typing import Any

import pytest

from tests.plugins.modules import (
    DERIVE_STAR,
    FS_IMPORT,
    HOSTILE_STARLARK,
    HOSTILE_WASM,
    NETWORK_IMPORT,
    SLOW_LOOP,
    WASI_IMPORT,
    acme_wasm,
    codec_wat,
    plugin,
    wat,
)
from twin.plugins.abi import pack_readings, unpack_readings
from twin.plugins.host import PluginHost


@pytest.fixture
def host() -> Iterator[PluginHost]:
    h = PluginHost()
    yield h
    h.close()


def load(host: PluginHost, *docs: dict[str, Any]) -> dict[str, str]:
    return host.sync({("Plugin", d["metadata"]["name"]): d for d in docs})


def frame(t: float, rh: float, mv: int) -> bytes:
    return b"\xa5\x01" + struct.pack(">hHH", round(t * 100), round(rh * 100), mv)


def test_wasm_codec_decodes_a_batch(host: PluginHost) -> None:
    assert load(host, plugin("acme", acme_wasm())) == {}
    out = host.decode("acme", [frame(21.5, 45.12, 3011), b"junk", frame(-5.25, 99.99, 2900)])
    assert out == [
        (0, "temperature", 21.5, 0.0, True), (0, "humidity", 45.12, 0.0, True),
        (0, "battery", 3.011, 0.0, True),
        (1, "payload", None, 0.0, False),
        (2, "temperature", -5.25, 0.0, True), (2, "humidity", 99.99, 0.0, True),
        (2, "battery", 2.9, 0.0, True),
    ]
    stats = host.stats["acme"]
    assert stats.calls == 1 and stats.items == 3 and stats.fuel > 0 and not stats.failures


def test_batches_are_split_at_the_declared_size(host: PluginHost) -> None:
    load(host, plugin("acme", acme_wasm(), limits={"batch": 100}))
    out = host.decode("acme", [frame(float(i % 50), 50.0, 3000) for i in range(250)])
    assert [r[0] for r in out if r[1] == "temperature"] == list(range(250))
    assert host.stats["acme"].calls == 3


def test_starlark_transform_derives_a_metric(host: PluginHost) -> None:
    load(host, plugin("derive", DERIVE_STAR.read_bytes(), "transform", starlark=True,
                      config={"fahrenheit": True}))
    out = host.transform("derive", [("temperature", 21.5, 100.0), ("humidity", 45.0, 100.0)])
    assert out is not None
    by_point = {p: v for _, p, v, _, _ in out}
    assert by_point == {"temperature": 21.5, "temperature_f": 70.7, "humidity": 45.0,
                        "dew_point": 10.5}
    assert host.stats["derive"].calls == 1  # steps are counted in thousands (the callback)


def test_starlark_codec_roundtrip_and_commands(host: PluginHost) -> None:
    src = (b"def decode(payloads, config):\n"
           b"    return [{'level': p[0] * 256 + p[1]} if len(p) == 2 else None for p in payloads]\n"
           b"def encode(commands, config):\n"
           b"    return [[c['params']['level'] // 256, c['params']['level'] % 256] for c in commands]\n")
    load(host, plugin("lvl", src, starlark=True))
    frames = host.encode("lvl", [{"name": "set", "params": {"level": 1000}}])
    assert frames == [b"\x03\xe8"]
    assert host.decode("lvl", [b"\x03\xe8", b"x"]) == [(0, "level", 1000, 0.0, True),
                                                      (1, "", None, 0.0, False)]


def test_wasm_config_is_handed_to_configure(host: PluginHost) -> None:
    # configure() copies the config JSON's length into a global; decode reports it
    src = codec_wat(
        """(i32.store (i32.const 2048) (i32.const 1))
           (i32.store (i32.const 2052) (i32.const 0))
           (i32.store8 (i32.const 2056) (i32.const 1))
           (i32.store8 (i32.const 2057) (i32.const 1))
           (i32.store8 (i32.const 2058) (i32.const 110))
           (f64.store (i32.const 2059) (f64.const 0))
           (i64.store (i32.const 2067) (i64.extend_i32_u (global.get $cfg)))
           (i64.const 0x000008000000001b)""",
        extra="""(global $cfg (mut i32) (i32.const 0))
                 (func (export "configure") (param $p i32) (param $n i32) (global.set $cfg (local.get $n)))""")
    load(host, plugin("cfg", wat(src), config={"a": 1}))
    assert host.decode("cfg", [b"x"]) == [(0, "n", len('{"a":1}'), 0.0, True)]


def test_abi_readings_roundtrip() -> None:
    rows = [("a", 1.5, 10.0), ("b", -7, 11.0), ("c", True, 0.0), ("d", "text", 0.0),
            ("e", None, 1.0), ("f", {"x": [1, 2]}, 2.0)]
    back = unpack_readings(pack_readings(rows), len(rows))
    assert [(p, v, ts) for _, p, v, ts, _ in back] == rows
    assert [g for *_, g in back] == [True, True, True, True, False, True]


# -- the hostile suite ---------------------------------------------------------------------------
HOSTILE_KIND = {
    "infinite_loop": "fuel",
    "memory_bomb": "fuel",
    "out_of_bounds": "trap",
    "deep_recursion": "trap",
    "huge_output": "output",
    "big_output": "output",
    "garbage_output": "abi",
}


@pytest.mark.parametrize("name", sorted(HOSTILE_WASM))
def test_hostile_wasm_is_contained(host: PluginHost, name: str) -> None:
    limits = {"fuel": 100_000, "memory": "1MiB", "output": "1KiB", "time": "2s"}
    load(host, plugin(name, wat(HOSTILE_WASM[name]), limits=limits,
                      failures={"alarm_after": 3, "suspend_for": "60s"}),
         plugin("acme", acme_wasm()))
    alarms: list[str] = []
    host.on_alarm = lambda n, msg: alarms.append(n)
    for _ in range(3):  # every payload of a failed batch is one bad reading
        assert host.decode(name, [b"a", b"b"]) == [(0, "", None, 0.0, False), (1, "", None, 0.0, False)]
    stats = host.stats[name]
    assert stats.failures == {HOSTILE_KIND[name]: 3}
    assert alarms == [name]  # after alarm_after failures in a row
    # suspended: not called again (no more fuel burnt), its items are bad at once
    fuel = stats.fuel
    assert host.decode(name, [b"a"]) == [(0, "", None, 0.0, False)]
    assert stats.failures["suspended"] == 1 and stats.fuel == fuel
    # the other plugin is unharmed
    assert host.decode("acme", [frame(20.0, 50.0, 3000)])[0] == (0, "temperature", 20.0, 0.0, True)


def test_memory_cap_bounds_growth(host: PluginHost) -> None:
    # grows by 1 page until refused, then returns the page count it reached as a reading
    src = codec_wat(
        """(block $b (loop $l (br_if $b (i32.eq (memory.grow (i32.const 1)) (i32.const -1))) (br $l)))
           (i32.store (i32.const 2048) (i32.const 1))
           (i32.store (i32.const 2052) (i32.const 0))
           (i32.store8 (i32.const 2056) (i32.const 1))
           (i32.store8 (i32.const 2057) (i32.const 1))
           (i32.store8 (i32.const 2058) (i32.const 112))
           (f64.store (i32.const 2059) (f64.const 0))
           (i64.store (i32.const 2067) (i64.extend_i32_u (memory.size)))
           (i64.const 0x000008000000001b)""")
    load(host, plugin("grow", wat(src), limits={"memory": "1MiB"}))
    assert host.decode("grow", [b"x"]) == [(0, "p", 16, 0.0, True)]  # 16 x 64 KiB = the cap


def test_initial_memory_over_the_cap_does_not_load(host: PluginHost) -> None:
    errors = load(host, plugin("fat", wat(codec_wat("(i64.const 0)", memory=100)),
                               limits={"memory": "1MiB"}))
    assert "fat" in errors and "fat" not in host.plugins


def test_wall_time_limit_stops_a_module_with_fuel_to_spare(host: PluginHost) -> None:
    load(host, plugin("slow", wat(SLOW_LOOP), limits={"fuel": 10_000_000_000, "time": "50ms"}))
    assert host.decode("slow", [b"x"]) == [(0, "", None, 0.0, False)]
    assert host.stats["slow"].failures == {"timeout": 1}


@pytest.mark.parametrize("src", [WASI_IMPORT, NETWORK_IMPORT, FS_IMPORT], ids=["wasi", "network", "fs"])
def test_imports_without_a_grant_are_refused(host: PluginHost, src: str) -> None:
    errors = load(host, plugin("imp", wat(src)))
    assert "not granted" in errors["imp"]
    assert "imp" not in host.plugins
    # the call path answers with bad readings, never an exception
    assert host.decode("imp", [b"x"]) == [(0, "", None, 0.0, False)]


def test_wasi_with_a_grant_loads_with_no_files(host: PluginHost) -> None:
    assert load(host, plugin("w", wat(WASI_IMPORT), capabilities=["wasi"])) == {}
    assert "w" in host.plugins
    # path_open is linked but there is no preopened directory: nothing to open


STAR_KIND = {"star_loop": "steps", "star_alloc": "memory", "star_big_string": "memory",
             "star_recursion": "trap"}


@pytest.mark.parametrize("name", sorted(HOSTILE_STARLARK))
def test_hostile_starlark_is_contained(host: PluginHost, name: str) -> None:
    load(host, plugin(name, HOSTILE_STARLARK[name].encode(), "transform", starlark=True,
                      limits={"steps": 100_000, "memory": "64MiB", "time": "5s"}),
         plugin("derive", DERIVE_STAR.read_bytes(), "transform", starlark=True))
    assert host.transform(name, [("t", 1.0, 5.0)]) is None
    stats = host.stats[name]
    assert list(stats.failures) == [STAR_KIND[name]], stats.last_error
    # the worker is started again for the next call; the other script is unharmed
    assert host.transform(name, [("t", 1.0, 5.0)]) is None
    assert sum(stats.failures.values()) == 2
    out = host.transform("derive", [("temperature", 20.0, 1.0)])
    assert out == [(0, "temperature", 20.0, 1.0, True)]


def test_starlark_wall_time(host: PluginHost) -> None:
    load(host, plugin("slow", HOSTILE_STARLARK["star_loop"].encode(), "transform", starlark=True,
                      limits={"steps": 10_000_000_000, "time": "100ms"}))
    assert host.transform("slow", [("t", 1.0, 5.0)]) is None
    assert host.stats["slow"].failures == {"timeout": 1}


def test_hot_swap_and_a_refused_module_keeps_the_old(host: PluginHost) -> None:
    load(host, plugin("acme", acme_wasm()))
    old = host.plugins["acme"]
    # a broken new version is refused: the old one keeps running
    errors = load(host, plugin("acme", b"\x00asm\x01\x00\x00\x00garbage"))
    assert "acme" in errors and host.plugins["acme"] is old
    assert host.decode("acme", [frame(1.0, 2.0, 3)])[0][2] == 1.0
    # a new good version (decoding to a different point) is swapped in
    new_src = acme_wasm().replace(b"temperature", b"temperaturX")
    assert load(host, plugin("acme", new_src)) == {}
    assert host.plugins["acme"] is not old
    assert host.decode("acme", [frame(1.0, 2.0, 3)])[0][1] == "temperaturX"
    # removed from the spec set: unloaded
    host.sync({})
    assert "acme" not in host.plugins


def test_dense_layout_is_checked() -> None:
    import struct as st

    from twin.plugins.abi import AbiError

    head = st.pack("<IIH", 0xFFFFFFFF, 1, 1) + b"\x01x"
    ok = head + st.pack("<IHdd", 0, 0, 0.0, 2.5)
    assert unpack_readings(ok, 1) == [(0, "x", 2.5, 0.0, True)]
    assert unpack_readings(head + st.pack("<IHdd", 0, 0, 0.0, float("nan")), 1) == [(0, "x", None, 0.0, False)]
    for bad in (head + st.pack("<IHdd", 5, 0, 0.0, 1.0),       # input index past the batch
                head + st.pack("<IHdd", 0, 9, 0.0, 1.0),       # point not in the table
                head + st.pack("<IHdd", 0, 0, -1.0, 1.0),      # not unix seconds
                head + b"\x00" * 5):                           # cut short
        with pytest.raises(AbiError):
            unpack_readings(bad, 1)
