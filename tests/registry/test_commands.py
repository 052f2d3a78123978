"""Command ledger rows and scene traces (twin/control), on both backends."""

from __future__ import annotations

from dataclasses import replace

from twin.registry._sql import SQLRegistry
from twin.registry.base import CommandRecord, SceneTrace

TERMINAL = ("success", "failed", "timeout", "cancelled")


def _cmd(i: int, device: str = "fan_01", key: str | None = None, **kw: object) -> CommandRecord:
    base = CommandRecord(
        id=f"c{i}",
        seq=i,
        device=device,
        type="set_state",
        params={"state": True},
        status="pending",
        timeout=30.0,
        deadline=1000.0 + i,
        created_at=100.0 + i,
        updated_at=100.0 + i,
        transitions=(("pending", 100.0 + i),),
        idempotency_key=key,
        source="api",
    )
    return replace(base, **kw)  # type: ignore[arg-type]


def test_insert_get_and_idempotency(registry: SQLRegistry) -> None:
    c, created = registry.insert_command(_cmd(1, key="k1"))
    assert created
    again, created = registry.insert_command(_cmd(2, key="k1"))
    assert not created and again.id == "c1"
    other, created = registry.insert_command(_cmd(3, device="fan_02", key="k1"))
    assert created and other.id == "c3"
    got = registry.get_command("c1")
    assert got == c
    assert registry.get_command("nope") is None
    assert registry.max_command_seq() == 3


def test_save_updates_and_queries(registry: SQLRegistry) -> None:
    for i in range(1, 6):
        registry.insert_command(_cmd(i, batch="b1" if i % 2 else None))
    done = _cmd(
        2,
        status="failed",
        error="boom",
        result={"code": 7},
        attempts=2,
        cancel_requested=True,
        transitions=(("pending", 102.0), ("sent", 103.0), ("failed", 104.5)),
    )
    registry.save_commands([done, _cmd(6)])
    got = registry.get_command("c2")
    assert got == done
    assert [c.id for c in registry.commands(device="fan_01")] == [
        "c6",
        "c5",
        "c4",
        "c3",
        "c2",
        "c1",
    ]
    assert [c.id for c in registry.commands(statuses=["failed"])] == ["c2"]
    assert [c.id for c in registry.commands(batch="b1")] == ["c5", "c3", "c1"]
    assert registry.commands(statuses=[]) == []
    assert [c.id for c in registry.open_commands(TERMINAL)] == ["c1", "c3", "c4", "c5", "c6"]


def test_scene_traces(registry: SQLRegistry) -> None:
    registry.save_scene_trace(SceneTrace("r1", "fan", 10.0, None, "running", {"steps": []}))
    registry.save_scene_trace(SceneTrace("r1", "fan", 10.0, 11.5, "success", {"steps": [1]}))
    registry.save_scene_trace(SceneTrace("r2", "other", 12.0, 12.0, "failed", {}))
    assert registry.scene_trace("r1") == SceneTrace(
        "r1", "fan", 10.0, 11.5, "success", {"steps": [1]}
    )
    assert [t.run_id for t in registry.scene_traces()] == ["r2", "r1"]
    assert [t.run_id for t in registry.scene_traces("fan")] == ["r1"]
    assert registry.scene_trace("zz") is None
