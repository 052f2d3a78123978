"""A codec on CoAP payloads with real peers: binary frames POSTed by aiocoap to the engine's CoAP
server (push), and read / observed from an aiocoap device server (client modes), decoded by a
Wasm codec built from WAT; the push path runs the device's transform before the write-ahead
log; a codec that fails marks the reading bad and the binding goes on."""

from __future__ import annotations

import struct
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import trio

from tests.plugins.modules import (
    DERIVE_STAR,
    HOSTILE_WASM,
    acme_wasm,
    plugin,
    wat,
    write_acme_site,
)
from tests.runtime.helpers import apply, eventually, fast_config, running_engine, site
from tests.runtime.test_coap_service import aiocoap_request, device_server, free_udp_port
from twin.bindings import aio
from twin.bindings.base import Message, Quality, Reading
from twin.bindings.coap import CoapBinding
from twin.errors import SpecError
from twin.plugins import registry
from twin.registry import open_registry
from twin.registry.credentials import create_device_key
from twin.runtime.coap_service import CoapService
from twin.spec import load_site

__all__ = ["device_server"]  # the fixture, used here

LEVEL_CODEC = b"""
def decode(payloads, config):
    return [None for p in payloads]

def encode(commands, config):
    return [[0x4C, c["params"]["level"] // 256, c["params"]["level"] % 256] for c in commands]
"""


def frame(t: float, rh: float, mv: int) -> bytes:
    return b"\xa5\x01" + struct.pack(">hHH", round(t * 100), round(rh * 100), mv)


def th8(name: str, codec: str) -> dict[str, Any]:
    return {"apiVersion": "flux.iot/v1", "kind": "Device", "metadata": {"name": name, "site": "plant-a"},
            "spec": {"type": "sensor", "model": "acme-th8", "binding": {"coap": {"codec": codec}}}}


MODEL = {"apiVersion": "flux.iot/v1", "kind": "DeviceModel", "metadata": {"name": "acme-th8"},
         "spec": {"transform": "derive",
                  "telemetry": {"temperature": {"type": "number"}, "humidity": {"type": "number"}}}}


async def test_push_bodies_are_decoded_by_the_codec_then_transformed(tmp_path: Path) -> None:
    registry.host().stats.clear()  # counts of earlier tests' plugins of the same name
    reg = open_registry(None, tmp_path / "state")
    apply(reg, site(), MODEL, th8("th8", "acme"), th8("evil_th8", "evil"),
          plugin("acme", acme_wasm()),
          plugin("derive", DERIVE_STAR.read_bytes(), "transform", starlark=True),
          plugin("evil", wat(HOSTILE_WASM["infinite_loop"]), limits={"fuel": 200_000},
                 failures={"alarm_after": 1000}))
    keys = {d: create_device_key(reg, d)[1] for d in ("th8", "evil_th8")}
    port = free_udp_port()
    svc = CoapService(("127.0.0.1", port))

    def url(device: str) -> str:
        return f"coap://127.0.0.1:{port}/d/{device}?k={keys[device]}"

    try:
        async with running_engine(reg, fast_config(state_dir=tmp_path), [svc]) as engine:
            await eventually(lambda: svc.hub.running("th8") and svc.hub.running("evil_th8"), within=20)
            code, body, _ = await aiocoap_request("POST", url("th8"), frame(21.5, 45.0, 3011), ct=42)
            assert code.startswith("2.04"), (code, body)
            # the codec's three readings and the transform's dew point (before the log)
            assert body == b'{"accepted":4}'

            def reported(point: str) -> Any:
                rv = engine.twin("th8").reported.get(point)
                return None if rv is None else rv.value

            await eventually(lambda: reported("dew_point") == 10.5, within=10)
            assert (reported("temperature"), reported("humidity"), reported("battery")) == (21.5, 45.0, 3.011)
            # not a TH-8 frame: taken (2.04), the reading is bad; nothing else changed
            code, _, _ = await aiocoap_request("POST", url("th8"), b"junk", ct=42)
            assert code.startswith("2.04")
            # a codec that runs out of fuel on every call: answered, bad, nothing stalls
            for _ in range(3):
                code, _, _ = await aiocoap_request("POST", url("evil_th8"), frame(1.0, 2.0, 3), ct=0)
                assert code.startswith("2.04")
            code, _, _ = await aiocoap_request("POST", url("th8"), frame(-3.5, 80.0, 2950), ct=60)
            assert code.startswith("2.04")  # any Content-Format: the codec decides
            await eventually(lambda: reported("temperature") == -3.5, within=10)
            stats = registry.host().stats
            assert stats["acme"].items == 3 and not stats["acme"].failures
            assert stats["evil"].failures.get("fuel") == 3
            assert engine.twin("evil_th8").reported.get("temperature") is None
    finally:
        reg.close()


@pytest.fixture
def plugins() -> Iterator[None]:
    host = registry.host()
    host.sync({})
    host.stats.clear()  # counts of earlier tests' plugins of the same name
    assert host.sync({("Plugin", "acme"): plugin("acme", acme_wasm()),
                      ("Plugin", "lvl"): plugin("lvl", LEVEL_CODEC, starlark=True)}) == {}
    yield
    host.sync({})
    host.stats.clear()
    aio.shutdown()


async def test_client_modes_poll_observe_and_command_through_the_codec(device_server: str,
                                                                       plugins: None) -> None:
    b = CoapBinding("th8", {"mode": "poll", "url": f"{device_server}/th8", "codec": "acme",
                            "timeout": "2s"})
    await b.connect()
    try:
        got = {r.point: r for r in await b.read()}
        assert set(got) == {"temperature", "humidity", "battery"}
        assert got["humidity"].value == 40.0 and got["battery"].value == 3.0
        assert got["temperature"].quality is Quality.GOOD
    finally:
        await b.close()
    junk = CoapBinding("th8", {"mode": "poll", "url": f"{device_server}/th8/junk", "codec": "acme",
                               "timeout": "2s"})
    await junk.connect()
    try:
        (bad,) = await junk.read()
        assert bad.point == "payload" and bad.quality is Quality.BAD and bad.value is None
    finally:
        await junk.close()
    # observe: every notification decoded, temperatures rising
    b = CoapBinding("th8", {"mode": "observe", "url": f"{device_server}/th8", "codec": "acme",
                            "timeout": "2s"})
    await b.connect()
    temps: list[float] = []
    send, recv = trio.open_memory_channel[Message](100)
    async with trio.open_nursery() as n:
        n.start_soon(b.subscribe, send)
        with trio.fail_after(10):
            async for m in recv:
                if isinstance(m, Reading) and m.point == "temperature":
                    temps.append(m.value)
                    if len(temps) >= 4:
                        break
        n.cancel_scope.cancel()
    await b.close()
    assert temps == sorted(temps) and len(set(temps)) >= 3
    # a command: the codec's frame is POSTed as it is; the device's binary answer comes back hex
    b = CoapBinding("th8", {"mode": "poll", "url": f"{device_server}/th8", "codec": "lvl",
                            "command_url": f"{device_server}/th8/cmd", "timeout": "2s"})
    await b.connect()
    try:
        assert await b.send_command("fill", {"level": 1000}) == {"payload": "e8034c"}
    finally:
        await b.close()


def test_validate_refuses_codec_with_format(tmp_path: Path) -> None:
    write_acme_site(tmp_path, "    coap: {codec: acme, format: cbor}\n")
    with pytest.raises(SpecError) as err:
        load_site(tmp_path)
    text = "\n".join(str(p) for p in err.value.problems)
    assert "site.yaml:12" in text and "codec replaces format and points" in text, text
