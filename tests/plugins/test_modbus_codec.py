"""A codec on Modbus raw frames, against a real pymodbus server (tests/bindings/modbus_peer.py):
the register blocks of a poll go to a Wasm codec (built from WAT) as bytes, a command becomes
register writes through a Starlark codec's encode, a failing codec marks the reading bad and the
poll schedule goes on, and `twin validate` locates a wrong frame declaration."""

from __future__ import annotations

import struct
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import trio

from tests.bindings.test_modbus_binding import (
    by_point,
    free_port,
    peer_on_a_free_port,
    start_peer,
    stop,
)
from tests.plugins.modules import HOSTILE_WASM, acme_wasm, plugin, wat, write_acme_site
from twin.bindings import aio
from twin.bindings.base import Message, Quality, Reading
from twin.bindings.modbus import POOL, ModbusBinding
from twin.errors import CommandError, SpecError
from twin.plugins import registry
from twin.spec import load_site

LEVEL_CODEC = b"""
def decode(payloads, config):
    return [{"level": p[0] * 256 + p[1]} if len(p) >= 2 else None for p in payloads]

def encode(commands, config):
    frames = []
    for c in commands:
        level = c["params"]["level"]
        frames.append([0x4C, len(c["name"])] + [ord(ch) for ch in c["name"].elems()] +
                      [level // 256, level % 256])
    return frames
"""


@pytest.fixture
def peer() -> Iterator[int]:
    with peer_on_a_free_port("1") as port:
        yield port


@pytest.fixture(autouse=True)
def plugins() -> Iterator[None]:
    host = registry.host()
    host.sync({})
    host.stats.clear()  # counts of earlier tests' plugins of the same name
    errors = host.sync({
        ("Plugin", "acme"): plugin("acme", acme_wasm()),
        ("Plugin", "lvl"): plugin("lvl", LEVEL_CODEC, starlark=True),
        ("Plugin", "evil"): plugin("evil", wat(HOSTILE_WASM["infinite_loop"]),
                                   limits={"fuel": 200_000}, failures={"alarm_after": 1000}),
    })
    assert errors == {}
    yield
    host.sync({})
    host.stats.clear()
    assert not POOL.lines, "a line was left open"
    aio.shutdown()


def th8(t: float, rh: float, mv: int) -> list[int]:
    raw = b"\xa5\x01" + struct.pack(">hHH", round(t * 100), round(rh * 100), mv)
    return [int.from_bytes(raw[i:i + 2], "big") for i in range(0, 8, 2)]


def registers(port: int, first: int, count: int) -> ModbusBinding:
    """A plain binding with one uint16 point per holding register (to set and read them)."""
    pts = {f"r{first + i}": {"register": first + i, "type": "uint16", "access": "readwrite"}
           for i in range(count)}
    return ModbusBinding("writer", {"host": "127.0.0.1", "port": port, "unit": 1, "timeout": "500ms",
                                    "points": pts})


async def put(port: int, first: int, values: list[int]) -> None:
    w = registers(port, first, len(values))
    await w.connect()
    try:
        for i, v in enumerate(values):
            await w.write(f"r{first + i}", v)
    finally:
        await w.close()


def codec_device(port: int, codec: str, **extra: Any) -> ModbusBinding:
    opts = {"host": "127.0.0.1", "port": port, "unit": 1, "timeout": "500ms", "retries": 0,
            "codec": codec, "frame": [{"register": 40051, "count": 4}], **extra}
    return ModbusBinding("th8", opts)


async def test_the_frame_of_a_poll_is_decoded_by_a_wasm_codec(peer: int) -> None:
    await put(peer, 40051, th8(21.5, 45.12, 3011))
    b = codec_device(peer, "acme", points={"unit_hr": {"register": 40001}})
    await b.connect()
    try:
        got = by_point(await b.read())
        assert {p: (r.value, r.quality) for p, r in got.items()} == {
            "temperature": (21.5, Quality.GOOD), "humidity": (45.12, Quality.GOOD),
            "battery": (3.011, Quality.GOOD), "unit_hr": (1, Quality.GOOD)}
        # a mapped point alone does not read the frame; a codec point does
        assert set(by_point(await b.read(["unit_hr"]))) == {"unit_hr"}
        assert set(by_point(await b.read(["temperature"]))) == {"temperature"}
        # what the device holds changes: the next poll decodes the new frame
        await put(peer, 40051, th8(-5.25, 99.99, 2900))
        got = by_point(await b.read())
        assert (got["temperature"].value, got["humidity"].value) == (-5.25, 99.99)
        # not a TH-8 frame: the codec says so, the reading is bad
        await put(peer, 40051, [0, 0, 0, 0])
        got = by_point(await b.read())
        assert got["payload"].quality is Quality.BAD and got["payload"].value is None
        assert "temperature" not in got
    finally:
        await b.close()
    assert registry.host().stats["acme"].calls == 4


async def test_blocks_are_concatenated_in_order(peer: int) -> None:
    regs = th8(12.0, 50.0, 3300)
    await put(peer, 40061, regs[:2])  # the magic and the temperature
    await put(peer, 40081, regs[2:])  # humidity and battery, somewhere else
    b = codec_device(peer, "acme", frame=[{"register": 40061, "count": 2},
                                          {"register": 40081, "count": 2}])
    await b.connect()
    try:
        got = by_point(await b.read())
    finally:
        await b.close()
    assert {p: r.value for p, r in got.items()} == {"temperature": 12.0, "humidity": 50.0,
                                                      "battery": 3.3}


async def test_a_command_is_encoded_into_register_writes(peer: int) -> None:
    await put(peer, 40051, [0x0102, 0, 0, 0])
    b = codec_device(peer, "lvl", command={"register": 40101})
    await b.connect()
    try:
        got = by_point(await b.read())  # Starlark: the worker round trip leaves the event loop
        assert got["level"].value == 0x0102
        result = await b.send_command("fill", {"level": 1000})
        assert result == {"ok": True, "registers": 4, "address": 100}
        r = registers(peer, 40101, 4)
        await r.connect()
        try:
            written = by_point(await r.read())
        finally:
            await r.close()
        # 4C 04 'f' 'i' 'l' 'l' 03 E8 as four big-endian registers
        assert [written[f"r{40101 + i}"].value for i in range(4)] == [0x4C04, 0x6669, 0x6C6C, 0x03E8]
        with pytest.raises(CommandError, match="could not encode"):
            await b.send_command("fill", {"volume": 3})  # the script fails: no write
    finally:
        await b.close()


async def test_a_failing_codec_marks_readings_bad_and_the_schedule_goes_on(peer: int) -> None:
    """A codec that runs out of fuel on every call: each poll still reports (a bad reading)
    and the plain point next to it keeps its good values, on schedule."""
    await put(peer, 40051, th8(21.5, 45.12, 3011))
    b = codec_device(peer, "evil", poll="50ms", points={"unit_hr": {"register": 40001}})
    send, receive = trio.open_memory_channel[Message](1000)
    got: list[Reading] = []
    await b.connect()
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(b.subscribe, send)
            async for m in receive:
                assert isinstance(m, Reading)
                got.append(m)
                if sum(r.point == "unit_hr" for r in got) >= 6:
                    nursery.cancel_scope.cancel()
    finally:
        await b.close()
    bad = [r for r in got if r.point == "payload"]
    assert len(bad) >= 5 and all(r.quality is Quality.BAD and r.value is None for r in bad)
    assert all(r.quality is Quality.GOOD and r.value == 1 for r in got if r.point == "unit_hr")
    assert registry.host().stats["evil"].failures.get("fuel", 0) >= 5
    assert b.decode_failures >= 5


def test_validate_locates_frame_problems(tmp_path: Path) -> None:
    write_acme_site(tmp_path, """\
    modbus:
      host: 127.0.0.1
      codec: acme
      frame:
        - {register: 40051, count: 4}
        - {register: 10001, count: 2}
      command: {register: 30001}
---
apiVersion: flux.iot/v1
kind: Device
metadata: {name: nocodec}
spec:
  type: sensor
  binding:
    modbus:
      host: 127.0.0.2
      codec: nothere
""")
    with pytest.raises(SpecError) as err:
        load_site(tmp_path)
    problems = err.value.problems
    text = "\n".join(f"{p.location}: {p.message}" for p in problems)
    assert "site.yaml:17" in text and "discrete inputs are bits" in text, text
    assert "site.yaml:18" in text and "holding registers (4xxxx" in text, text
    assert "site.yaml:28" in text and "a codec needs frame" in text, text
    assert "unknown Plugin 'nothere'" in text, text
    assert len(problems) == 4, text


async def test_a_silent_unit_re_reports_the_decoded_readings_stale_a_refused_frame_is_bad() -> None:
    import signal

    port = free_port()
    proc = start_peer("--port", str(port), "--units", "1")
    try:
        await put(port, 40051, th8(21.5, 45.12, 3011))
        b = codec_device(port, "acme")
        refused = codec_device(port, "acme", frame=[{"register": 49001, "count": 4}])
        await b.connect()
        await refused.connect()
        try:
            good = by_point(await b.read())
            bad = await refused.read()
            proc.send_signal(signal.SIGSTOP)
            try:
                stale = by_point(await b.read())
            finally:
                proc.send_signal(signal.SIGCONT)
        finally:
            await refused.close()
            await b.close()
    finally:
        stop(proc)
    assert {r.quality for r in good.values()} == {Quality.GOOD}
    assert {p: (r.value, r.quality) for p, r in stale.items()} == {
        "temperature": (21.5, Quality.STALE), "humidity": (45.12, Quality.STALE),
        "battery": (3.011, Quality.STALE)}
    assert [(r.point, r.value, r.quality) for r in bad] == [("payload", None, Quality.BAD)]
