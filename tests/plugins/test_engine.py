"""Plugins inside a running engine (embedded MQTT broker, write-ahead log, time-series store):
a Wasm codec decodes a vendor's binary frames, a Starlark transform derives a metric before
storage, hostile plugins on other devices are contained while the good device's readings keep
being stored (counted), and a new module is hot-swapped by applying a revision."""

from __future__ import annotations

import struct
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import trio

from tests.bindings.test_mqtt_binding import mqtt_device, port, subscribed, topics
from tests.mqtt.conftest import Client, run_sync
from tests.plugins.modules import (
    DERIVE_STAR,
    HOSTILE_STARLARK,
    HOSTILE_WASM,
    acme_wasm,
    plugin,
    wat,
)
from tests.runtime.helpers import apply, eventually, fast_config, site
from twin.api.auth import create_device_key
from twin.bindings.base import Quality
from twin.registry.base import Registry
from twin.runtime.engine import Engine
from twin.runtime.mqtt_service import MqttService, MqttServiceConfig
from twin.runtime.supervisor import ENGINE_DEVICE
from twin.runtime.timeseries_service import TimeSeriesService
from twin.timeseries.base import Selector

N = 40  # frames per device


def th8_model() -> dict[str, Any]:
    return {
        "apiVersion": "flux.iot/v1", "kind": "DeviceModel", "metadata": {"name": "acme-th8"},
        "spec": {"transform": "derive",
                 "telemetry": {"temperature": {"type": "number"}, "humidity": {"type": "number"}}},
    }


def docs(acme: bytes | None = None) -> list[dict[str, Any]]:
    good = mqtt_device("good", codec="acme")
    evil_codec = mqtt_device("evil_codec", codec="evil")
    evil_transform = mqtt_device("evil_transform", codec="acme")
    evil_transform["spec"]["transform"] = "evil-star"  # the device's own wins over its model's
    for d in (good, evil_codec, evil_transform):
        d["spec"]["model"] = "acme-th8"
    fails = {"alarm_after": 3, "suspend_for": "2s"}
    return [
        site(), th8_model(), good, evil_codec, evil_transform,
        plugin("acme", acme or acme_wasm()),
        plugin("derive", DERIVE_STAR.read_bytes(), "transform", starlark=True),
        plugin("evil", wat(HOSTILE_WASM["infinite_loop"]), limits={"fuel": 1_000_000},
               failures=fails),
        plugin("evil-star", HOSTILE_STARLARK["star_loop"].encode(), "transform", starlark=True,
               limits={"steps": 100_000, "time": "1s"}, failures=fails),
    ]


@pytest.fixture
async def engine(registry: Registry, nursery: trio.Nursery, tmp_path: Path) -> AsyncIterator[Engine]:
    apply(registry, *docs())
    services: list[Any] = [
        TimeSeriesService(flush_interval=0.1),
        MqttService(MqttServiceConfig(listen=[("127.0.0.1", 0)], sys_interval=0)),
    ]
    eng = Engine(registry, fast_config(state_dir=tmp_path / "state"), services)
    await nursery.start(eng.run)
    for name in ("good", "evil_codec", "evil_transform"):
        await subscribed(eng, name)
    yield eng


def frame(i: int) -> bytes:
    return b"\xa5\x01" + struct.pack(">hHH", 2000 + i, 5000, 3000)


def stored(engine: Engine, device: str) -> list[tuple[str, float | None, int]]:
    svc = engine.service_info["timeseries"]
    assert isinstance(svc, TimeSeriesService) and svc.store is not None
    t = svc.store.read_raw(Selector.of(devices=device), 0, 2e9)
    return list(zip(t.column("metric").to_pylist(), t.column("value").to_pylist(),
                    t.column("quality").to_pylist(), strict=True))


def count(rows: list[tuple[str, float | None, int]], metric: str, quality: int = 0) -> int:
    return sum(1 for m, _, q in rows if m == metric and q == quality)


async def test_codec_transform_and_hostile_plugins_contained(engine: Engine, registry: Registry) -> None:
    clients = {}
    for name in ("good", "evil_codec", "evil_transform"):
        _, key = create_device_key(registry, name)
        clients[name] = await run_sync(lambda n=name, k=key: Client(port(engine), n, username=n, password=k))
    # the attack and the good device's traffic interleaved, every frame acknowledged (QoS 1)
    for i in range(N):
        for name, dev in clients.items():
            await run_sync(dev.publish, topics(name)["telemetry"], frame(i), 1)
    await eventually(lambda: count(stored(engine, "good"), "dew_point") == N)
    good = stored(engine, "good")
    # every good frame decoded by the Wasm codec, the Starlark transform added dew_point
    assert count(good, "temperature") == N and count(good, "humidity") == N
    assert count(good, "battery") == N and count(good, "dew_point") == N
    assert sorted(v for m, v, _ in good if m == "temperature") == [20 + i / 100 for i in range(N)]
    assert {round(v or 0, 2) for m, v, _ in good if m == "dew_point"} == {
        round(10 + i / 100, 2) for i in range(N)}
    # the hostile codec: every frame is one bad reading, never a crash or a stall
    # (a reading without a value is not stored: the twin shows it, and it is counted)
    evil = engine.twin("evil_codec")
    assert evil is not None
    await eventually(lambda: evil.metrics.messages_in >= N)
    assert evil.reported["payload"].quality == Quality.BAD and evil.reported["payload"].value is None
    assert stored(engine, "evil_codec") == []
    # the hostile transform: the decoded readings are stored marked bad, values kept
    await eventually(lambda: count(stored(engine, "evil_transform"), "temperature", 2) == N)
    evil_t = stored(engine, "evil_transform")
    assert count(evil_t, "temperature", 0) == 0 and count(evil_t, "dew_point", 0) == 0
    # counted per plugin, alarmed after 3 failures in a row, then suspended (not called)
    stats = engine.plugins.stats
    assert stats["evil"].failures["fuel"] >= 3
    assert stats["evil-star"].failures["steps"] >= 3
    assert stats["evil"].failures.get("suspended", 0) > 0
    assert stats["acme"].items >= 2 * N and not stats["acme"].failures
    active = engine.monitor.active
    assert (ENGINE_DEVICE, "plugin_failure:evil") in active
    assert (ENGINE_DEVICE, "plugin_failure:evil-star") in active
    text = engine.prom.render().decode()
    assert 'twin_plugin_failures_total{kind="fuel",plugin="evil"}' in text
    twin = engine.twin("good")
    assert twin is not None and round(twin.reported["dew_point"].value, 2) == round(10 + (N - 1) / 100, 2)
    for dev in clients.values():
        await run_sync(dev.close)


async def test_a_new_module_is_hot_swapped_and_a_broken_one_refused(engine: Engine, registry: Registry) -> None:
    _, key = create_device_key(registry, "good")
    dev = await run_sync(lambda: Client(port(engine), "good", username="good", password=key))
    t = topics("good")["telemetry"]
    await run_sync(dev.publish, t, frame(1), 1)
    await eventually(lambda: count(stored(engine, "good"), "temperature") == 1)
    # a new version of the codec (it names the point differently): applied, swapped in
    rev = apply(registry, *docs(acme_wasm().replace(b"temperature", b"temperaturX")))
    await engine.wait_revision(rev.number)
    await run_sync(dev.publish, t, frame(2), 1)
    await eventually(lambda: count(stored(engine, "good"), "temperaturX") == 1)
    # a revision whose module does not load (only possible by going around `twin validate`):
    # refused at load, the running module stays
    before = engine.plugins.plugins["acme"]
    rev = apply(registry, *docs(b"\x00asm\x01\x00\x00\x00broken"))
    await engine.wait_revision(rev.number)
    assert engine.plugins.plugins["acme"] is before and "acme" in engine.plugins.load_errors
    await run_sync(dev.publish, t, frame(3), 1)
    await eventually(lambda: count(stored(engine, "good"), "temperaturX") == 2)
    await run_sync(dev.close)


async def test_http_push_device_with_codec_and_transform(tmp_path: Path) -> None:
    """POST /api/v1/ingest/{device}: the body is the device's binary payload, decoded by the
    binding's codec; the model's transform runs before the write-ahead log."""
    from tests.api.conftest import start_api
    from tests.runtime.helpers import sim_device

    push = sim_device("push_th8", binding={"http": {"codec": "acme"}},
                      heartbeat={"interval": "5s", "timeout": "60s"}, model_="acme-th8")
    evil = sim_device("push_evil", binding={"http": {"codec": "evil"}},
                      heartbeat={"interval": "5s", "timeout": "60s"}, model_="acme-th8")
    docs_ = [site(), th8_model(), push, evil, *[d for d in docs() if d["kind"] == "Plugin"]]
    async with trio.open_nursery() as nursery:
        api = await start_api(nursery, tmp_path / "state", docs=docs_,
                              services=[TimeSeriesService(flush_interval=0.1)])
        keys = {}
        async with api.client("admin") as c:
            for name in ("push_th8", "push_evil"):
                r = await c.post(f"/api/v1/devices/{name}/keys")
                assert r.status_code == 201
                keys[name] = r.json()["key"]
        await eventually(lambda: api.engine.hub.running("push_th8") and api.engine.hub.running("push_evil"))
        async with api.client(None) as dev:
            for i in range(5):
                r = await dev.post("/api/v1/ingest/push_th8", content=frame(i),
                                   headers={"X-Device-Key": keys["push_th8"],
                                            "Content-Type": "application/octet-stream"})
                assert r.status_code == 200, r.text
                r = await dev.post("/api/v1/ingest/push_evil", content=frame(i),
                                   headers={"X-Device-Key": keys["push_evil"]})
                assert r.status_code == 200, r.text  # accepted, marked bad: never an error
        await eventually(lambda: count(stored(api.engine, "push_th8"), "dew_point") == 5)
        rows = stored(api.engine, "push_th8")
        assert count(rows, "temperature") == 5 and count(rows, "battery") == 5
        twin = api.engine.twin("push_evil")
        assert twin is not None
        await eventually(lambda: "payload" in twin.reported)
        assert twin.reported["payload"].quality == Quality.BAD
        async with api.client("viewer") as c:  # status per plugin
            rows = {r["name"]: r for r in (await c.get("/api/v1/plugins")).json()}
        assert rows["acme"]["kind"] == "wasm" and rows["acme"]["items"] >= 5
        assert rows["evil"]["failures"]["fuel"] >= 1 and rows["evil"]["last_error"]
        assert rows["derive"]["kind"] == "starlark" and rows["derive"]["calls"] >= 1
        # writing a Plugin through the API (twin apply --server) takes an admin: it is code
        current = [d for d in docs_]
        newer = plugin("acme", acme_wasm().replace(b"temperature", b"temperaturX"))
        body = {"documents": [newer if d["metadata"]["name"] == "acme" else d for d in current]}
        async with api.client("oper") as c:
            assert (await c.post("/api/v1/apply", json=body)).status_code == 403
        async with api.client("admin") as c:
            r = await c.post("/api/v1/apply", json=body)
            assert r.status_code == 200, r.text
        broken = plugin("acme", b"\x00asm\x01\x00\x00\x00junk")
        async with api.client("admin") as c:  # a module that does not compile: refused, 422
            r = await c.post("/api/v1/apply", json={"documents": [
                broken if d["metadata"]["name"] == "acme" else d for d in current]})
            assert r.status_code == 422 and "not a valid WebAssembly module" in r.text
        nursery.cancel_scope.cancel()
    api.registry.close()


def _mqtt_str(s: str) -> bytes:
    return struct.pack("!H", len(s.encode())) + s.encode()


def _mqtt_frame(kind: int, body: bytes) -> bytes:
    n, out = len(body), bytearray()
    while True:
        b, n = n % 128, n // 128
        out.append(b | (0x80 if n else 0))
        if not n:
            return bytes([kind]) + bytes(out) + body


async def test_what_arrives_together_is_decoded_in_one_codec_call(engine: Engine, registry: Registry) -> None:
    """A device writes 300 QoS 1 publishes in one go: the codec is called for what each socket
    read holds (before the write-ahead log), not once per message; every frame is acknowledged,
    decoded and stored; a lone publish afterwards goes through alone. (QoS 0 and delivery-side
    batching: tests/plugins/test_mqtt_batch.py.)"""
    _, key = create_device_key(registry, "good")
    t = topics("good")["telemetry"]
    stats = engine.plugins.stats["acme"]
    calls0, items0 = stats.calls, stats.items

    def burst() -> int:
        import socket

        s = socket.create_connection(("127.0.0.1", port(engine)))
        try:
            connect = _mqtt_str("MQTT") + bytes([4, 0xC2]) + struct.pack("!H", 60) + \
                _mqtt_str("burst") + _mqtt_str("good") + _mqtt_str(key)
            s.sendall(_mqtt_frame(0x10, connect))
            assert s.recv(4) == b"\x20\x02\x00\x00"
            s.sendall(b"".join(_mqtt_frame(0x32, _mqtt_str(t) + struct.pack("!H", i + 1) + frame(i))
                               for i in range(300)))
            acks = b""
            while len(acks) < 300 * 4:  # every publish acknowledged (after the WAL)
                chunk = s.recv(65536)
                assert chunk, "the broker closed the connection"
                acks += chunk
            assert acks == b"".join(b"\x40\x02" + struct.pack("!H", i + 1) for i in range(300))
            s.sendall(b"\xe0\x00")  # DISCONNECT
            return len(acks)
        finally:
            s.close()

    await run_sync(burst)
    await eventually(lambda: count(stored(engine, "good"), "temperature") == 300)
    temps = [v for m, v, _ in stored(engine, "good") if m == "temperature"]
    assert sorted(temps) == [(2000 + i) / 100 for i in range(300)]
    assert stats.items - items0 == 300 and not stats.failures
    assert stats.calls - calls0 <= 300 // 4, (stats.calls - calls0)  # not one per message
    # a lone message: decoded and stored by itself, nothing waits for company
    dev = await run_sync(lambda: Client(port(engine), "good", username="good", password=key))
    await run_sync(dev.publish, t, frame(300), 1)
    await eventually(lambda: count(stored(engine, "good"), "temperature") == 301)
    assert stats.items - items0 == 301
    await run_sync(dev.close)
