"""The sim binding's value generators and fault windows, and the HTTP ingest body parser."""

from __future__ import annotations

import math
import random
from typing import Any

import pytest
import trio

from twin.bindings.base import DeviceEvent, EventType, Message, Quality, Reading
from twin.bindings.http import IngestError, parse_ingest
from twin.bindings.sim import SimBinding, _in_window
from twin.errors import BindingConnectError, CommandError
from twin.sim.generators import WAVES, make_generator


# -- generators ---------------------------------------------------------------------------------
def test_sine_spans_min_max_over_its_period() -> None:
    g = make_generator({"wave": "sine", "min": 10, "max": 20, "period": "100s"})
    assert g.value(0) == pytest.approx(15)
    assert g.value(25) == pytest.approx(20)
    assert g.value(75) == pytest.approx(10)
    assert g.value(100) == pytest.approx(15)


def test_periodic_waves() -> None:
    saw = make_generator({"wave": "sawtooth", "min": 0, "max": 10, "period": "10s"})
    assert [saw.value(t) for t in (0, 5, 10)] == [0, 5, 0]
    sq = make_generator({"wave": "square", "min": 1, "max": 2, "period": "10s"})
    assert [sq.value(t) for t in (0, 4, 5, 9, 10)] == [1, 1, 2, 2, 1]
    step = make_generator({"wave": "step", "values": ["a", "b", "c"], "period": "1m"})
    assert [step.value(t) for t in (0, 60, 120, 180)] == ["a", "b", "c", "a"]
    tog = make_generator({"wave": "toggle", "period": "1s"})
    assert [tog.value(t) for t in (0, 1, 2)] == [False, True, False]
    cnt = make_generator({"wave": "counter", "min": 5, "step": 2, "period": "1s"})
    assert [cnt.value(t) for t in (0, 1.5, 3)] == [5, 7, 11]
    const = make_generator({"wave": "constant", "value": 42})
    assert const.value(0) == const.value(1e6) == 42


def test_random_walk_is_bounded_and_seeded() -> None:
    def walk(seed: int) -> list[float]:
        g = make_generator(
            {"wave": "random_walk", "min": 30, "max": 70, "step": 5}, random.Random(seed)
        )
        return [g.value(t) for t in range(500)]

    a = walk(1)
    assert all(30 <= v <= 70 for v in a)
    assert a == walk(1) and a != walk(2)


def test_types_decimals_noise() -> None:
    g = make_generator({"wave": "sine", "min": 0, "max": 10, "decimals": 1, "noise": 0.3})
    assert all(v == round(v, 1) for v in (g.value(t) for t in range(50)))
    i = make_generator(
        {"wave": "sawtooth", "min": 0, "max": 10, "period": "10s", "type": "integer"}
    )
    assert isinstance(i.value(3.4), int) and i.value(3.4) == 3
    b = make_generator(
        {"wave": "sawtooth", "min": 0, "max": 10, "period": "10s", "type": "boolean"}
    )
    assert (b.value(2), b.value(7)) == (False, True)


def test_every_wave_is_known_and_unknown_is_refused() -> None:
    for wave in WAVES:
        v = make_generator({"wave": wave}).value(1.0)
        assert v is not None and not (isinstance(v, float) and math.isnan(v))
    with pytest.raises(ValueError, match="unknown wave"):
        make_generator({"wave": "zigzag"})


def test_fault_windows() -> None:
    assert not _in_window(5, 0, 10)
    assert [_in_window(t, 20, 5) for t in (0, 14.9, 15, 19.9, 20, 35)] == [
        False,
        False,
        True,
        True,
        False,
        True,
    ]


# -- the sim binding in virtual time ---------------------------------------------------------
async def test_sim_binding_reads_writes_commands_and_faults(autojump_clock: Any) -> None:
    opts = {
        "interval": "1s",
        "seed": 3,
        "points": {"temperature": {"wave": "sine", "min": 18, "max": 32, "period": "10m"}},
        "faults": {"connect_failures": 1, "fault_every": "10s", "fault_for": "3s"},
    }
    sim = SimBinding("s1", opts)
    with pytest.raises(BindingConnectError):
        await sim.connect()
    await sim.connect()
    got: list[Message] = []
    send, receive = trio.open_memory_channel[Message](100)
    async with trio.open_nursery() as n:
        n.start_soon(sim.subscribe, send)
        async for m in receive:
            got.append(m)
            if isinstance(m, DeviceEvent) and m.type is EventType.OK:
                break
        n.cancel_scope.cancel()
    readings = [m for m in got if isinstance(m, Reading)]
    assert readings and all(18 <= r.value <= 32 and r.quality is Quality.GOOD for r in readings)
    events = [m.type for m in got if isinstance(m, DeviceEvent)]
    assert events == [EventType.FAULT, EventType.OK]
    await sim.write("temperature", 99)
    assert [r.value for r in await sim.read(["temperature"])] == [99]
    assert await sim.send_command("reset", {"hard": True}) == {"ok": True}
    assert sim.commands == [("reset", {"hard": True})]
    with pytest.raises(CommandError):
        await sim.send_command("fail", {})


# -- ingest bodies -------------------------------------------------------------------------------
def test_parse_ingest_forms() -> None:
    out = parse_ingest(
        "d",
        {
            "readings": [
                {"point": "t", "value": 21.5, "ts": 100.0, "quality": "uncertain"},
                {"point": "h", "value": 40},
            ],
            "values": {"p": 1},
            "events": [{"type": "fault", "data": {"message": "fan"}}],
            "ts": 50.0,
        },
        now=999.0,
    )
    assert out == [
        Reading("d", "t", 21.5, 100.0, Quality.UNCERTAIN),
        Reading("d", "h", 40, 50.0, Quality.GOOD),
        Reading("d", "p", 1, 50.0, Quality.GOOD),
        DeviceEvent("d", EventType.FAULT, 50.0, {"message": "fan"}),
    ]
    # an empty body is a heartbeat at "now"; heartbeat: true adds one
    assert parse_ingest("d", {}, now=7.0) == [DeviceEvent("d", EventType.HEARTBEAT, 7.0)]
    hb = parse_ingest("d", {"values": {"x": 1}, "heartbeat": True}, now=7.0)
    assert hb[-1] == DeviceEvent("d", EventType.HEARTBEAT, 7.0) and len(hb) == 2


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ([], "body must be a JSON object"),
        ({"bogus": 1}, "unknown field"),
        ({"readings": {}}, "readings must be a list"),
        ({"readings": [{"value": 1}]}, "needs a string 'point'"),
        ({"readings": [{"point": "t"}]}, "needs a string 'point' and a 'value'"),
        ({"readings": [{"point": "t", "value": 1, "quality": "meh"}]}, "quality"),
        ({"readings": [{"point": "t", "value": 1, "ts": "now"}]}, "ts must be a number"),
        ({"ts": float("nan")}, "ts must be a number"),
        ({"ts": True}, "ts must be a number"),
        ({"values": [1]}, "values must be an object"),
        ({"events": {}}, "events must be a list"),
        ({"events": [1]}, r"events\[0\] must be an object"),
        ({"events": [{"type": "explode"}]}, "events.0..type"),
        ({"events": [{"type": "event", "data": []}]}, r"events\[0\].data"),
    ],
)
def test_parse_ingest_errors(body: Any, message: str) -> None:
    with pytest.raises(IngestError, match=message):
        parse_ingest("d", body, now=1.0)
