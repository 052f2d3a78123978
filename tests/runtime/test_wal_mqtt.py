"""The embedded broker acknowledges telemetry the engine stores only once it is in the
write-ahead log: PUBACK / PUBREC after the group commit, each reading stored once, a full disk
answered with reason code 0x97 (MQTT 5) or a closed connection without PUBACK (3.1.1)."""

from __future__ import annotations

import json
import os
import queue
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import trio

from tests.bindings.test_mqtt_binding import mqtt_device, port, subscribed, topics
from tests.mqtt.conftest import WAIT, Client, run_sync
from tests.runtime.helpers import apply, eventually, fast_config, model, site
from twin.api.auth import create_device_key
from twin.registry.base import Registry
from twin.runtime.engine import Engine
from twin.runtime.mqtt_service import MqttService, MqttServiceConfig
from twin.runtime.timeseries_service import TimeSeriesService
from twin.timeseries.base import Selector


@pytest.fixture
async def engine(
    registry: Registry, nursery: trio.Nursery, tmp_path: Path
) -> AsyncIterator[Engine]:
    apply(registry, site(), model(), mqtt_device("d1"))
    services: list[Any] = [
        TimeSeriesService(flush_interval=0.1),
        MqttService(MqttServiceConfig(listen=[("127.0.0.1", 0)], sys_interval=0)),
    ]
    eng = Engine(registry, fast_config(state_dir=tmp_path / "state"), services)
    await nursery.start(eng.run)
    await subscribed(eng, "d1")
    yield eng


def ts_service(engine: Engine) -> TimeSeriesService:
    svc = engine.service_info["timeseries"]
    assert isinstance(svc, TimeSeriesService) and svc.wal is not None
    return svc


def stored_values(svc: TimeSeriesService) -> list[float]:
    assert svc.store is not None
    t = svc.store.read_raw(Selector.of(devices="d1"), 0, 2e9)
    return sorted(t.column("value").to_pylist())


class Acks:
    """PUBACK / PUBREC reason codes by message id, as paho reports them."""

    def __init__(self, client: Client) -> None:
        self.q: queue.Queue[tuple[int, int]] = queue.Queue()
        client.c.on_publish = lambda _c, _u, mid, rc, _p: self.q.put((mid, int(rc.value)))


@pytest.mark.parametrize("qos", [1, 2])
async def test_ack_comes_after_the_log_and_readings_are_stored_once(
    engine: Engine, registry: Registry, qos: int
) -> None:
    _, key = create_device_key(registry, "d1")
    svc = ts_service(engine)
    wal = svc.wal
    assert wal is not None
    dev = await run_sync(lambda: Client(port(engine), "d1", username="d1", password=key, v5=True))
    t = topics("d1")["telemetry"]
    for i in range(20):
        # each acknowledged publish is on disk by the time its PUBACK / PUBREC arrives
        await run_sync(dev.publish, t, json.dumps({"temperature": i, "ts": 1.7e9 + i}), qos)
        assert wal.durable_lsn >= i + 1
    await eventually(lambda: len(stored_values(svc)) >= 20)
    await eventually(lambda: wal.checkpointed >= 20)
    await trio.sleep(0.3)  # further flushes: nothing comes a second time through the bus
    assert stored_values(svc) == [float(i) for i in range(20)]
    twin = engine.twin("d1")
    assert twin is not None and twin.reported["temperature"].value == 19
    assert twin.reported["temperature"].ts == 1.7e9 + 19
    await run_sync(dev.close)


async def test_full_disk_mqtt5_puback_0x97_and_mqtt311_no_ack(
    engine: Engine, registry: Registry
) -> None:
    _, key = create_device_key(registry, "d1")
    svc = ts_service(engine)
    wal = svc.wal
    assert wal is not None
    t = topics("d1")["telemetry"]
    v5 = await run_sync(lambda: Client(port(engine), "d1", username="d1", password=key, v5=True))
    await run_sync(v5.publish, t, json.dumps({"temperature": 1}), 1)
    # the log's disk is full: writes fail with ENOSPC (/dev/full)
    assert wal._fd is not None
    os.close(wal._fd)
    wal._fd = os.open("/dev/full", os.O_WRONLY)
    acks = Acks(v5)
    info = v5.c.publish(t, json.dumps({"temperature": 2}), 1)
    mid, rc = await run_sync(lambda: acks.q.get(timeout=WAIT))
    assert (mid, rc) == (info.mid, 0x97)  # quota exceeded: not acknowledged as stored
    await run_sync(v5.close)
    # the next write goes to a new segment; make that one fail too for the 3.1.1 client
    v3 = await run_sync(lambda: Client(port(engine), "d1", username="d1", password=key))
    await run_sync(v3.publish, t, json.dumps({"temperature": 3}), 1)
    assert wal._fd is not None
    os.close(wal._fd)
    wal._fd = os.open("/dev/full", os.O_WRONLY)
    v3.c.reconnect_delay_set(60, 60)  # keep it away: the message must not be re-sent here
    info = v3.c.publish(t, json.dumps({"temperature": 4}), 1)
    await run_sync(lambda: v3.disconnects.get(timeout=WAIT))  # closed, without PUBACK
    assert not info.is_published()
    await run_sync(v3.c.loop_stop)
    # what was acknowledged is stored; what was refused is not
    await eventually(lambda: stored_values(svc) == [1.0, 3.0])


async def test_acks_are_held_while_the_store_is_behind_the_log(
    registry: Registry, nursery: trio.Nursery, tmp_path: Path
) -> None:
    """Back-pressure: past ``ack_backlog`` readings logged and not yet stored, a durable
    publish's PUBACK waits for the store (the device's window fills and it slows down);
    the store's next flush and checkpoint release it."""
    apply(registry, site(), model(), mqtt_device("d1"))
    # the writer flushes only when 3 readings are waiting (never by time here)
    svc = TimeSeriesService(batch_size=3, flush_interval=3600, ack_backlog=1, ack_hold_max=3600)
    mqtt = MqttService(MqttServiceConfig(listen=[("127.0.0.1", 0)], sys_interval=0))
    eng = Engine(registry, fast_config(state_dir=tmp_path / "state"), [svc, mqtt])
    await nursery.start(eng.run)
    await subscribed(eng, "d1")
    _, key = create_device_key(registry, "d1")
    dev = await run_sync(lambda: Client(port(eng), "d1", username="d1", password=key, v5=True))
    t = topics("d1")["telemetry"]
    # one reading logged, not more than ack_backlog: acknowledged at once
    await run_sync(dev.publish, t, json.dumps({"temperature": 1, "ts": 1.7e9}), 1)
    assert svc.acks_held == 0
    acks = Acks(dev)
    second = dev.c.publish(t, json.dumps({"temperature": 2, "ts": 1.7e9 + 1}), 1)
    await eventually(lambda: svc.acks_held >= 1)
    assert svc.wal is not None and svc.wal.durable_lsn >= 2  # durable, and still held
    assert acks.q.empty() and not second.is_published()
    # the third reading fills the writer's batch: flush, checkpoint, the backlog is gone
    third = dev.c.publish(t, json.dumps({"temperature": 3, "ts": 1.7e9 + 2}), 1)
    got = {await run_sync(lambda: acks.q.get(timeout=WAIT)) for _ in range(2)}
    assert got == {(second.mid, 0), (third.mid, 0)}
    assert stored_values(svc) == [1.0, 2.0, 3.0]
    await run_sync(dev.close)
