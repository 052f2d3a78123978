"""The write-ahead log inside a real engine: HTTP ingest is logged before its 2xx and stored
once, replay at start skips what the store already has, a full disk answers 507 and raises
an alarm, a store that falls behind makes ingest answer 503 with Retry-After."""

from __future__ import annotations

import logging
import os
import secrets
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio

from runtime.helpers import apply, eventually, fast_config, model, sim_device, site
from twin.api import auth
from twin.api.app import ApiSettings
from twin.api.ratelimit import Rate
from twin.api.server import ApiService
from twin.registry.base import DeviceKey, Registry
from twin.runtime.engine import Engine
from twin.runtime.timeseries_service import STORAGE_DEVICE, WAL_ALARM, TimeSeriesService
from twin.timeseries.base import Selector
from twin.timeseries.factory import open_store
from twin.timeseries.wal import WriteAheadLog

T0 = 1_700_000_000.0


def push_device(name: str = "p1") -> dict[str, Any]:
    return sim_device(name, binding={"http": {}}, heartbeat={"interval": "5s", "timeout": "60s"})


def device_key(registry: Registry, device: str) -> str:
    kid, secret = secrets.token_hex(6), secrets.token_urlsafe(24)
    registry.add_device_key(
        DeviceKey(kid, device, auth.DEVICE_KEY_HASHER.hash(secret), time.time())
    )
    return f"{auth.KEY_PREFIX}{kid}_{secret}"


def stored(service: TimeSeriesService, device: str = "p1") -> list[tuple[str, float]]:
    assert service.store is not None
    t = service.store.read_raw(Selector.of(devices=device), 0, 2e9)
    ts = [x.timestamp() for x in t.column("ts").to_pylist()]
    return sorted(zip(t.column("metric").to_pylist(), ts, strict=True))


@asynccontextmanager
async def engine_with_api(
    registry: Registry, state: Path, service: TimeSeriesService
) -> AsyncIterator[tuple[Engine, str]]:
    big = Rate(10_000, 10_000)
    settings = ApiSettings(
        state_dir=state, rate_per_token=big, rate_per_client=big, rate_ingest_per_device=big
    )
    engine = Engine(
        registry, fast_config(state_dir=state), [service, ApiService("127.0.0.1", 0, settings)]
    )
    async with trio.open_nursery() as nursery:
        await nursery.start(engine.run)
        await eventually(lambda: engine.hub.running("p1"))
        yield engine, engine.service_info["api"]["url"]
        nursery.cancel_scope.cancel()


async def test_ingest_is_logged_before_the_ack_and_stored_once(
    registry: Registry, tmp_path: Path
) -> None:
    apply(registry, site(), model(), push_device())
    key = device_key(registry, "p1")
    state = tmp_path / "state"
    service = TimeSeriesService(flush_interval=0.1)
    async with engine_with_api(registry, state, service) as (engine, url):
        assert service.wal is not None
        async with httpx.AsyncClient(base_url=url, headers={"X-Device-Key": key}) as dev:
            for i in range(20):
                body = {"readings": [{"point": "temperature", "value": i, "ts": T0 + i}]}
                r = await dev.post("/api/v1/ingest/p1", json=body)
                assert r.status_code == 200, r.text
                # acknowledged: the reading is in the log, on disk
                assert service.wal.durable_lsn >= i + 1
        await eventually(lambda: len(stored(service)) >= 20)
        await eventually(lambda: service.wal is not None and service.wal.checkpointed >= 20)
        await trio.sleep(0.3)  # more flushes: nothing arrives a second time from the bus
        assert stored(service) == [("temperature", T0 + i) for i in range(20)]
        twin = engine.twin("p1")
        assert twin is not None and twin.reported["temperature"].value == 19
        report = await service.refresh_stats()
        assert report["wal"]["checkpoint"] >= 20 and report["wal"]["backlog"] == 0


async def test_replay_at_start_skips_readings_the_store_already_has(
    registry: Registry, tmp_path: Path
) -> None:
    apply(registry, site(), model(), push_device())
    state = tmp_path / "state"
    state.mkdir(exist_ok=True)
    # a crash after the store had readings 0-4 but before the checkpoint said so
    wal = WriteAheadLog(state / "wal")
    wal.open()
    async with trio.open_nursery() as nursery:
        await nursery.start(wal.run)
        for i in range(10):
            await wal.log([("p1", "temperature", float(i), T0 + i, "good")])
        nursery.cancel_scope.cancel()
    store = open_store(None, state)
    store.write_records(
        [("p1", "temperature", float(i), T0 + i, 0, "plant-a", "", ",") for i in range(5)]
    )
    store.close()
    service = TimeSeriesService(flush_interval=0.1)
    async with engine_with_api(registry, state, service):
        # replayed and checkpointed before the service reported ready (before devices ran)
        assert service.replayed == 5
        assert service.wal is not None and service.wal.checkpointed == 10
        assert stored(service) == [("temperature", T0 + i) for i in range(10)]
        assert [p.name for p in service.wal.segment_files()] == []


async def test_replay_keeps_the_good_readings_of_a_record_with_a_bad_one(
    registry: Registry, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    apply(registry, site(), model(), push_device())
    state = tmp_path / "state"
    state.mkdir(exist_ok=True)
    wal = WriteAheadLog(state / "wal")
    wal.open()
    async with trio.open_nursery() as nursery:
        await nursery.start(wal.run)
        bad: list[Any] = [
            ("p1", "temperature", 2.5, "not a time", "good"),
            ("p1", "pressure", 3.5),  # too short
        ]
        await wal.log([
            ("p1", "temperature", 1.5, T0, "good"),
            ("p1", "humidity", 40, int(T0) + 1, "uncertain"),  # an int value and timestamp
            *bad,
            ("p1", "label", "ok", T0 + 3, "good"),
        ])  # fmt: skip
        nursery.cancel_scope.cancel()
    service = TimeSeriesService(flush_interval=0.1)
    with caplog.at_level(logging.WARNING, logger="twin.runtime.timeseries_service"):
        async with engine_with_api(registry, state, service):
            assert service.replayed == 3
            assert stored(service) == [
                ("humidity", T0 + 1), ("label", T0 + 3), ("temperature", T0)
            ]  # fmt: skip
            assert service.store is not None
            t = service.store.read_raw(Selector.of(devices="p1"), 0, 2e9)
            rows = {(m, q) for m, q in zip(
                t.column("metric").to_pylist(), t.column("quality").to_pylist(), strict=True
            )}  # fmt: skip
            assert ("humidity", 1) in rows  # uncertain
    assert caplog.text.count("bad WAL reading") == 2


async def test_disk_full_answers_507_with_an_alarm_then_recovers(
    registry: Registry, tmp_path: Path
) -> None:
    apply(registry, site(), model(), push_device())
    key = device_key(registry, "p1")
    service = TimeSeriesService(flush_interval=0.1)
    async with engine_with_api(registry, tmp_path / "state", service) as (_engine, url):
        wal = service.wal
        assert wal is not None
        async with httpx.AsyncClient(base_url=url, headers={"X-Device-Key": key}) as dev:
            body = {"values": {"temperature": 1}}
            assert (await dev.post("/api/v1/ingest/p1", json=body)).status_code == 200
            # the log's disk is full: writes fail with ENOSPC (/dev/full)
            assert wal._fd is not None
            os.close(wal._fd)
            wal._fd = os.open("/dev/full", os.O_WRONLY)
            r = await dev.post("/api/v1/ingest/p1", json={"values": {"temperature": 2}})
            assert r.status_code == 507, r.text
            assert int(r.headers["Retry-After"]) > 0
            await eventually(lambda: bool(registry.alarms(device=STORAGE_DEVICE)))
            (alarm,) = registry.alarms(device=STORAGE_DEVICE)
            assert alarm.type == WAL_ALARM and alarm.state == "active"
            # space is back (a new segment): acknowledged again, the alarm clears
            r = await dev.post("/api/v1/ingest/p1", json={"values": {"temperature": 3}})
            assert r.status_code == 200
            await eventually(
                lambda: all(a.state == "cleared" for a in registry.alarms(device=STORAGE_DEVICE))
            )
        await eventually(lambda: len(stored(service)) == 2)
        assert [v for v in _values(service)] == [1.0, 3.0]


def _values(service: TimeSeriesService) -> list[float]:
    assert service.store is not None
    t = service.store.read_raw(Selector.of(devices="p1"), 0, 2e9)
    return sorted(t.column("value").to_pylist())


async def test_backlog_limit_answers_503_retry_after(registry: Registry, tmp_path: Path) -> None:
    apply(registry, site(), model(), push_device())
    key = device_key(registry, "p1")
    # the store "falls behind": nothing is flushed for a minute, so nothing is checkpointed
    service = TimeSeriesService(flush_interval=60, wal_max_backlog=4)
    async with (
        engine_with_api(registry, tmp_path / "state", service) as (_engine, url),
        httpx.AsyncClient(base_url=url, headers={"X-Device-Key": key}) as dev,
    ):
        two = {"values": {"a": 1, "b": 2}}
        for _ in range(2):
            assert (await dev.post("/api/v1/ingest/p1", json=two)).status_code == 200
        r = await dev.post("/api/v1/ingest/p1", json=two)
        assert r.status_code == 503 and r.headers["Retry-After"] == "1", r.text
        # heartbeats and events carry no readings: still accepted
        r = await dev.post("/api/v1/ingest/p1", json={"heartbeat": True})
        assert r.status_code == 200
