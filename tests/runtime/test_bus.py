from __future__ import annotations

import trio

from twin.runtime.bus import Bus, Filter


def ev(i: int, device: str = "d1", kind: str = "reading") -> dict[str, object]:
    return {"kind": kind, "device": device, "site": "plant-a", "groups": ("line-1",), "i": i}


async def test_slow_subscriber_is_dropped_fast_one_keeps_everything() -> None:
    bus = Bus()
    slow = bus.open(buffer=3, name="slow")
    fast = bus.open(buffer=100, name="fast")
    got: list[object] = []
    for i in range(10):
        bus.publish(ev(i))
        got.append((await fast.receive.receive())["i"])
    assert got == list(range(10))
    assert slow.dropped and len(bus) == 1
    # the slow one still gets what was buffered, then end-of-stream
    buffered = [e["i"] async for e in slow.receive]
    assert buffered == [0, 1, 2]


async def test_filters() -> None:
    bus = Bus()
    with (
        bus.subscribe(Filter.of(devices=["d2"], kinds=["status"])) as sub,
        bus.subscribe(Filter.of(groups=["line-1"], sites=["plant-a"])) as by_group,
        bus.subscribe(Filter.of(sites=["other"])) as other,
    ):
        bus.publish(ev(1, "d1", "status"))
        bus.publish(ev(2, "d2", "reading"))
        bus.publish(ev(3, "d2", "status"))
        assert sub.receive.receive_nowait()["i"] == 3
        assert [by_group.receive.receive_nowait()["i"] for _ in range(3)] == [1, 2, 3]
        try:
            other.receive.receive_nowait()
            raise AssertionError("filtered event delivered")
        except trio.WouldBlock:
            pass
    assert len(bus) == 0


async def test_unlogged_filter_skips_readings_already_in_the_write_ahead_log() -> None:
    bus = Bus()
    with (
        bus.subscribe(Filter.of(kinds=["reading"], unlogged=True)) as store_pump,
        bus.subscribe(Filter.of(kinds=["reading"])) as everyone,
    ):
        bus.publish(ev(1))
        bus.publish({**ev(2), "logged": True})
        bus.publish(ev(3))
        got = []
        while True:
            try:
                got.append(store_pump.receive.receive_nowait()["i"])
            except trio.WouldBlock:
                break
        assert got == [1, 3]
        assert [everyone.receive.receive_nowait()["i"] for _ in range(3)] == [1, 2, 3]
