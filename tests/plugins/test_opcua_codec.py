"""A codec on an OPC UA ByteString variable, against a real asyncua server in another process
(twin.sim.opcua_server, its Boiler.Frame blob): each value is decoded by a Wasm codec built
from WAT, in a subscription and in a read; a blob the codec refuses, a codec that fails and a
point that is not a ByteString are bad readings while the other points keep flowing."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.bindings.test_opcua import collect, free_port
from tests.plugins.modules import HOSTILE_WASM, acme_wasm, plugin, wat
from twin.bindings import aio
from twin.bindings.base import Quality, Reading
from twin.bindings.opcua import OpcUaBinding
from twin.errors import SpecError
from twin.plugins import registry
from twin.spec import load_site


@pytest.fixture(scope="module")
def endpoint() -> Iterator[str]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "twin.sim.opcua_server", "--port", str(free_port()), "--interval", "0.1"],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
    )
    assert proc.stdout is not None
    line = proc.stdout.readline()
    assert line.startswith("ready"), line
    yield line.split()[1]
    proc.terminate()
    proc.wait(10)


@pytest.fixture(autouse=True)
def plugins() -> Iterator[None]:
    host = registry.host()
    host.sync({})
    host.stats.clear()  # counts of earlier tests' plugins of the same name
    assert host.sync({
        ("Plugin", "acme"): plugin("acme", acme_wasm()),
        ("Plugin", "evil"): plugin("evil", wat(HOSTILE_WASM["out_of_bounds"]),
                                   failures={"alarm_after": 1000}),
    }) == {}
    yield
    host.sync({})
    host.stats.clear()
    aio.shutdown()


def binding(endpoint: str, **points: Any) -> OpcUaBinding:
    return OpcUaBinding("boiler", {"endpoint": endpoint, "publishing_interval": "100ms",
                                   "heartbeat": "300ms", "points": points})


def only(msgs: list[Any]) -> list[Reading]:
    return [m for m in msgs if isinstance(m, Reading)]


async def test_a_bytestring_is_decoded_by_the_codec(endpoint: str) -> None:
    b = binding(endpoint, frame={"node": "ns=2;s=Boiler.Frame", "codec": "acme"},
                counter={"node": "ns=2;s=Boiler.Counter"})
    await b.connect()
    try:
        got = {r.point: r for r in await b.read()}
        assert set(got) == {"temperature", "humidity", "battery", "counter"}
        assert got["battery"].value == 3.0 and 40.0 <= got["humidity"].value < 60.0
        assert got["temperature"].quality is Quality.GOOD
        assert got["temperature"].ts == got["humidity"].ts  # the value's source timestamp

        def enough(msgs: list[Any]) -> bool:
            return len({r.value for r in only(msgs) if r.point == "humidity"}) >= 3

        msgs = await collect(b, enough)
    finally:
        await b.close()
    temps = [r for r in only(msgs) if r.point == "temperature"]
    assert temps and all(r.quality is Quality.GOOD and isinstance(r.value, float) for r in temps)
    assert any(r.point == "counter" for r in only(msgs))
    stats = registry.host().stats["acme"]
    assert stats.items >= 4 and not stats.failures
    assert b.last_ts.get("frame") is not None  # backfill resumes from the frame's time


async def test_what_the_codec_cannot_decode_is_bad_and_others_flow(endpoint: str) -> None:
    b = binding(endpoint,
                junk={"node": "ns=2;s=Boiler.Junk", "codec": "acme"},      # not a TH-8 frame
                broken={"node": "ns=2;s=Boiler.Frame", "codec": "evil"},   # the codec traps
                status={"node": "ns=2;s=Boiler.Status", "codec": "acme"},  # a String: its bytes
                pressure={"node": "ns=2;s=Boiler.Pressure", "codec": "acme"},  # not bytes
                counter={"node": "ns=2;s=Boiler.Counter"})
    await b.connect()
    try:
        got = await b.read()
        msgs = await collect(b, lambda m: sum(r.point == "counter" for r in only(m)) >= 5)
    finally:
        await b.close()
    by_point: dict[str, list[Reading]] = {}
    for r in [*got, *only(msgs)]:
        by_point.setdefault(r.point, []).append(r)
    # junk, the broken codec and "ok"/"stopped" as bytes: each a bad reading from the codec
    assert all(r.quality is Quality.BAD and r.value is None for r in by_point["payload"])
    assert len(by_point["payload"]) >= 3
    assert [r.quality for r in by_point["pressure"]][:1] == [Quality.BAD]
    assert by_point["pressure"][0].value is None
    assert all(r.quality is Quality.GOOD for r in by_point["counter"])
    assert registry.host().stats["evil"].failures.get("trap", 0) >= 1
    assert b.refused >= 1  # the Double on a codec point, logged and counted


def test_validate_checks_the_codec_of_a_point(tmp_path: Path) -> None:
    (tmp_path / "site.yaml").write_text("""\
apiVersion: flux.iot/v1
kind: Device
metadata: {name: boiler}
spec:
  type: industrial
  binding:
    opcua:
      endpoint: opc.tcp://127.0.0.1:4840/
      points:
        frame: {node: "ns=2;s=Boiler.Frame", codec: nothere}
""")
    with pytest.raises(SpecError) as err:
        load_site(tmp_path)
    text = "\n".join(str(p) for p in err.value.problems)
    assert "site.yaml:10" in text and "unknown Plugin 'nothere'" in text, text
