"""One suite, both backends (the ``registry`` fixture is parametrised over SQLite and PostgreSQL)."""

from __future__ import annotations

import threading
from typing import Any

import pytest

from twin.errors import ConflictError, NotFoundError, RegistryError
from twin.registry import Registry, spec_hash
from twin.registry._sql import SQLRegistry, unpack_specs
from twin.registry.base import DeviceKey, MetricSample, Session, User

from .conftest import Opener
from .docs import demo_specs, device, group, model, specset


def test_is_a_registry(registry: SQLRegistry) -> None:
    assert isinstance(registry, Registry)
    assert registry.head() is None
    assert registry.specs() == {}
    assert registry.specs(0) == {}
    assert registry.history() == []
    assert registry.device_rows() == []


# -- apply and revisions -------------------------------------------------------------------


def test_first_apply_records_revision(registry: SQLRegistry) -> None:
    specs = demo_specs(3)
    rev = registry.apply(specs, base=0, author="alice", message="first")
    assert rev is not None
    assert (rev.number, rev.author, rev.message, rev.source) == (1, "alice", "first", "cli")
    assert (rev.created, rev.updated, rev.deleted) == (6, 0, 0)
    assert rev.hash == spec_hash(specs)
    assert registry.head() == rev
    assert registry.revision(1) == rev
    assert registry.history() == [rev]
    assert registry.specs() == specs
    assert registry.specs(1) == specs
    assert registry.last_changed("Device", "temp_sensor_01") == 1
    assert registry.last_changed("Device", "nope") is None


def test_reapply_same_is_noop(registry: SQLRegistry) -> None:
    specs = demo_specs(3)
    registry.apply(specs, base=0, author="a")
    assert registry.apply(dict(reversed(list(specs.items()))), base=1, author="a") is None
    assert [r.number for r in registry.history()] == [1]


def test_apply_empty_on_empty_is_noop(registry: SQLRegistry) -> None:
    assert registry.apply({}, base=0, author="a") is None
    assert registry.head() is None


def test_update_delete_and_counts(registry: SQLRegistry) -> None:
    specs = demo_specs(3)
    registry.apply(specs, base=0, author="a")
    new = dict(specs)
    new[("Device", "temp_sensor_02")] = device("temp_sensor_02", tags=["hvac", "critical"])
    del new[("Device", "temp_sensor_03")]
    new[("Device", "fan_01")] = device("fan_01", type="actuator", binding={"mqtt": {"topic": "x"}})
    rev = registry.apply(new, base=1, author="b", message="m", source="api")
    assert rev is not None
    assert (rev.number, rev.created, rev.updated, rev.deleted, rev.source) == (2, 1, 1, 1, "api")
    assert registry.specs() == new
    assert registry.specs(1) == specs
    assert registry.last_changed("Device", "temp_sensor_01") == 1
    assert registry.last_changed("Device", "temp_sensor_02") == 2
    assert registry.last_changed("Device", "fan_01") == 2
    assert registry.last_changed("Device", "temp_sensor_03") is None
    assert [r.number for r in registry.history()] == [2, 1]
    assert [r.number for r in registry.history(limit=1)] == [2]
    names = [r["id"] for r in registry.device_rows()]
    assert names == ["fan_01", "temp_sensor_01", "temp_sensor_02"]


def test_rollback_style_reapply_of_old_revision(registry: SQLRegistry) -> None:
    v1 = demo_specs(3)
    registry.apply(v1, base=0, author="a")
    v2 = demo_specs(5)
    v2[("Device", "temp_sensor_01")] = device("temp_sensor_01", labels={"floor": "3"})
    registry.apply(v2, base=1, author="a")
    old = registry.specs(1)
    rev = registry.apply(old, base=2, author="a", message="rollback to 1", source="rollback")
    assert rev is not None
    assert (rev.number, rev.created, rev.updated, rev.deleted) == (3, 0, 1, 2)
    assert rev.hash == registry.revision(1).hash
    assert registry.specs() == v1
    rows = {r["id"]: r for r in registry.device_rows()}
    assert set(rows) == {"temp_sensor_01", "temp_sensor_02", "temp_sensor_03"}
    assert rows["temp_sensor_01"]["metadata"] == {"floor": "2"}
    assert rows["temp_sensor_01"]["revision"] == 3


def test_unknown_revision(registry: SQLRegistry) -> None:
    with pytest.raises(NotFoundError):
        registry.revision(7)
    registry.apply(demo_specs(1), base=0, author="a")
    with pytest.raises(NotFoundError):
        registry.specs(7)


def test_conflict_when_head_moved(registry: SQLRegistry) -> None:
    registry.apply(demo_specs(1), base=0, author="a")
    with pytest.raises(ConflictError) as info:
        registry.apply(demo_specs(2), base=0, author="b")
    assert info.value.hint
    assert registry.head() is not None and registry.head().number == 1  # type: ignore[union-attr]
    with pytest.raises(ConflictError):
        registry.apply(demo_specs(2), base=5, author="b")


def test_materialised_devices_and_groups(registry: SQLRegistry) -> None:
    specs = specset(
        group("plant", description="the plant"),
        group("line-1", parent="plant"),
        model("th-sensor-v2"),
        device(
            "temp_sensor_01",
            tags=["hvac", "critical"],
            labels={"floor": "2", "room": "a"},
            binding={"modbus": {"host": "10.0.0.7"}},
        ),
        device("cam_01", group=None, type="camera", model="cam", binding={}),
    )
    registry.apply(specs, base=0, author="a")
    rows = {r["id"]: r for r in registry.device_rows()}
    t = rows["temp_sensor_01"]
    assert t["name"] == "temp_sensor_01"
    assert t["device_type"] == "sensor"
    assert t["protocol"] == "modbus"
    assert t["status"] == "offline"
    assert t["metadata"] == {"floor": "2", "room": "a"}
    assert t["tags"] == ["hvac", "critical"]
    assert t["group_id"] == "line-1"
    assert t["site"] == "plant-a"
    assert t["model"] == "th-sensor-v2"
    assert t["revision"] == 1
    assert isinstance(t["created_at"], float) and t["updated_at"] >= t["created_at"]
    c = rows["cam_01"]
    assert (c["group_id"], c["protocol"], c["device_type"]) == (None, "none", "camera")
    assert registry.device_rows(["cam_01", "missing"]) == [c]
    assert registry.device_rows([]) == []
    with registry._tx(write=False) as conn:
        groups = registry._all(
            conn, "SELECT id, name, description, parent_id, site FROM device_groups ORDER BY id"
        )
    assert [tuple(g) for g in groups] == [
        ("line-1", "line-1", "group line-1", "plant", "plant-a"),
        ("plant", "plant", "the plant", None, "plant-a"),
    ]


def test_group_order_does_not_matter(registry: SQLRegistry) -> None:
    # children before parents, devices before groups: FKs are deferred
    docs = [device("d1", group="cell-1"), group("cell-1", parent="line-1")]
    docs += [group("line-1", parent="plant"), group("plant")]
    registry.apply(specset(*docs), base=0, author="a")
    # delete everything at once, in any order
    rev = registry.apply({}, base=1, author="a")
    assert rev is not None and rev.deleted == 4
    assert registry.device_rows() == []


def test_dangling_group_reference_fails_atomically(registry: SQLRegistry) -> None:
    with pytest.raises(RegistryError):
        registry.apply(specset(device("d1", group="nowhere")), base=0, author="a")
    assert registry.head() is None
    assert registry.specs() == {}
    assert registry.device_rows() == []


def test_status_survives_spec_update(registry: SQLRegistry) -> None:
    specs = demo_specs(2)
    registry.apply(specs, base=0, author="a")
    registry.set_device_status("temp_sensor_01", "online", 100.0)
    new = dict(specs)
    new[("Device", "temp_sensor_01")] = device("temp_sensor_01", tags=["x"])
    new[("Device", "temp_sensor_09")] = device("temp_sensor_09")
    registry.apply(new, base=1, author="a")
    rows = {r["id"]: r for r in registry.device_rows()}
    assert rows["temp_sensor_01"]["status"] == "online"
    assert rows["temp_sensor_01"]["tags"] == ["x"]
    assert rows["temp_sensor_09"]["status"] == "offline"


def test_deleted_device_history_cascades(registry: SQLRegistry) -> None:
    specs = demo_specs(2)
    registry.apply(specs, base=0, author="a")
    registry.set_device_status("temp_sensor_02", "online", 1.0)
    registry.record_metrics([MetricSample("temp_sensor_02", "t", 1.0, 1.0)])
    new = dict(specs)
    del new[("Device", "temp_sensor_02")]
    registry.apply(new, base=1, author="a")
    assert registry.status_history("temp_sensor_02") == []
    assert registry.metrics("temp_sensor_02") == []
    # re-created: starts offline again
    registry.apply(specs, base=2, author="a")
    assert registry.device_rows(["temp_sensor_02"])[0]["status"] == "offline"


def test_apply_failing_midway_leaves_nothing(
    registry: SQLRegistry, monkeypatch: pytest.MonkeyPatch
) -> None:
    registry.apply(demo_specs(2), base=0, author="a")
    before = (registry.specs(), registry.device_rows(), registry.history())

    def boom(*args: Any, **kwargs: Any) -> None:
        raise RuntimeError("injected")

    # objects are written, then materialisation fails
    monkeypatch.setattr(registry, "_materialise", boom)
    new = demo_specs(4)
    new[("Device", "temp_sensor_01")] = device("temp_sensor_01", tags=["changed"])
    with pytest.raises(RuntimeError, match="injected"):
        registry.apply(new, base=1, author="a")
    assert (registry.specs(), registry.device_rows(), registry.history()) == before
    monkeypatch.undo()
    # and the registry still works: same base succeeds now
    rev = registry.apply(new, base=1, author="a")
    assert rev is not None and rev.number == 2


def test_concurrent_applies_threads(open_reg: Opener) -> None:
    regs = [open_reg(), open_reg()]
    regs[0].apply(demo_specs(1), base=0, author="seed")
    barrier = threading.Barrier(2)
    results: list[Any] = [None, None]

    def worker(i: int) -> None:
        barrier.wait()
        try:
            results[i] = regs[i].apply(demo_specs(50 + i * 10), base=1, author=f"w{i}")
        except ConflictError as exc:
            results[i] = exc

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    wins = [r for r in results if not isinstance(r, ConflictError)]
    losses = [r for r in results if isinstance(r, ConflictError)]
    assert len(wins) == 1 and len(losses) == 1, results
    winner = wins[0]
    assert winner is not None and winner.number == 2
    check = open_reg()
    assert check.head() == winner
    assert spec_hash(check.specs()) == winner.hash
    assert len(check.device_rows()) == winner.created + 1


def test_concurrent_applies_many_threads_one_registry(registry: SQLRegistry) -> None:
    """Threads sharing one registry object (a connection per thread)."""
    barrier = threading.Barrier(4)
    outcomes: list[str] = []
    lock = threading.Lock()

    def worker(i: int) -> None:
        barrier.wait()
        try:
            registry.apply(demo_specs(i + 1), base=0, author=f"w{i}")
            out = "win"
        except ConflictError:
            out = "conflict"
        with lock:
            outcomes.append(out)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert sorted(outcomes) == ["conflict"] * 3 + ["win"]
    head = registry.head()
    assert head is not None and head.number == 1
    assert spec_hash(registry.specs()) == head.hash


def test_revision_blob_roundtrip(registry: SQLRegistry) -> None:
    specs = demo_specs(3)
    registry.apply(specs, base=0, author="a")
    with registry._tx(write=False) as conn:
        (blob,) = registry._one(conn, "SELECT specs FROM revisions WHERE number = 1")
    assert unpack_specs(blob) == specs


# -- reopen and migrations -----------------------------------------------------------------


def test_persistence_across_reopen(open_reg: Opener) -> None:
    reg = open_reg()
    specs = demo_specs(3)
    rev = reg.apply(specs, base=0, author="a")
    reg.set_device_status("temp_sensor_01", "online", 5.0)
    reg.put_user(User("root", "h", "admin"))
    reg.close()
    again = open_reg()
    assert again.head() == rev
    assert again.specs() == specs
    assert again.device_rows(["temp_sensor_01"])[0]["status"] == "online"
    assert again.get_user("root") is not None


def test_migrations_idempotent_on_reopen(open_reg: Opener) -> None:
    from twin.registry import migrations

    a = open_reg()
    b = open_reg()  # re-open: nothing to do
    assert a.schema_version() == b.schema_version() == migrations.SCHEMA_VERSION  # type: ignore[attr-defined]
    with b._tx(write=False) as conn:
        (n,) = b._one(conn, "SELECT COUNT(*) FROM schema_version")
    assert n == migrations.SCHEMA_VERSION


def test_concurrent_open_of_fresh_registry(open_reg: Opener) -> None:
    errors: list[Exception] = []
    barrier = threading.Barrier(3)

    def worker() -> None:
        barrier.wait()
        try:
            open_reg()
        except Exception as exc:  # collected for the assert
            errors.append(exc)

    threads = [threading.Thread(target=worker) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert errors == []
    assert open_reg().head() is None


def test_closed_registry_refuses(open_reg: Opener) -> None:
    reg = open_reg()
    reg.close()
    with pytest.raises(RegistryError, match="closed"):
        reg.head()


# -- runtime: status and metrics -----------------------------------------------------------


def test_status_history(registry: SQLRegistry) -> None:
    registry.apply(demo_specs(2), base=0, author="a")
    registry.set_device_status("temp_sensor_01", "online", 10.0, {"reason": "connected"})
    registry.set_device_status("temp_sensor_01", "offline", 20.0)
    registry.set_device_status("temp_sensor_01", "online", 30.0)
    registry.set_device_status("temp_sensor_02", "error", 15.0)
    hist = registry.status_history("temp_sensor_01")
    assert [(h.status, h.timestamp) for h in hist] == [
        ("online", 30.0),
        ("offline", 20.0),
        ("online", 10.0),
    ]
    assert hist[2].metadata == {"reason": "connected"}
    assert hist[0].device == "temp_sensor_01"
    assert len(registry.status_history("temp_sensor_01", since=20.0)) == 2
    assert len(registry.status_history("temp_sensor_01", limit=1)) == 1
    row = registry.device_rows(["temp_sensor_01"])[0]
    assert row["status"] == "online" and row["updated_at"] == 30.0
    with pytest.raises(NotFoundError):
        registry.set_device_status("ghost", "online", 1.0)


def test_metrics(registry: SQLRegistry) -> None:
    registry.apply(demo_specs(2), base=0, author="a")
    registry.record_metrics([])
    registry.record_metrics(
        [
            MetricSample("temp_sensor_01", "temperature", 21.5, 1.0),
            MetricSample("temp_sensor_01", "humidity", 40, 1.0),
            MetricSample("temp_sensor_01", "temperature", 22.0, 2.0),
            MetricSample("temp_sensor_02", "temperature", 19.0, 2.0),
        ]
    )
    got = registry.metrics("temp_sensor_01")
    assert (got[0].name, got[0].value, got[0].timestamp) == ("temperature", 22.0, 2.0)
    assert len(got) == 3
    assert isinstance(got[1].value, float)
    temps = registry.metrics("temp_sensor_01", names=["temperature"])
    assert [m.value for m in temps] == [22.0, 21.5]
    assert registry.metrics("temp_sensor_01", names=[]) == []
    assert len(registry.metrics("temp_sensor_01", since=2.0)) == 1
    assert len(registry.metrics("temp_sensor_01", limit=2)) == 2
    with pytest.raises(RegistryError):
        registry.record_metrics([MetricSample("ghost", "t", 1.0, 1.0)])


# -- alarms --------------------------------------------------------------------------------


def test_alarm_lifecycle(registry: SQLRegistry) -> None:
    a, created = registry.raise_alarm("d1", "offline", "major", "d1 went offline", 10.0)
    assert created and a.state == "active" and a.raised_at == 10.0
    b, created = registry.raise_alarm("d1", "offline", "major", "again", 11.0)
    assert not created and b == a
    acked = registry.ack_alarm(a.id, "bob", 12.0)
    assert (acked.state, acked.acked_by, acked.acked_at) == ("acknowledged", "bob", 12.0)
    c, created = registry.raise_alarm("d1", "offline", "major", "still", 13.0)
    assert not created and c.id == a.id  # acknowledged still blocks a duplicate
    cleared = registry.clear_alarm(a.id, "bob", 14.0)
    assert (cleared.state, cleared.cleared_by, cleared.cleared_at) == ("cleared", "bob", 14.0)
    assert registry.clear_alarm(a.id, "eve", 99.0) == cleared  # idempotent
    assert registry.ack_alarm(a.id, "eve", 99.0) == cleared
    d, created = registry.raise_alarm("d1", "offline", "major", "once more", 15.0)
    assert created and d.id != a.id
    with pytest.raises(NotFoundError):
        registry.ack_alarm(12345, "x", 1.0)
    with pytest.raises(NotFoundError):
        registry.clear_alarm(12345, "x", 1.0)


def test_alarm_auto_clear_and_listing(registry: SQLRegistry) -> None:
    a, _ = registry.raise_alarm("d1", "offline", "major", "m", 1.0)
    b, _ = registry.raise_alarm("d1", "fault", "critical", "m", 2.0)
    c, _ = registry.raise_alarm("d2", "offline", "minor", "m", 3.0)
    registry.ack_alarm(a.id, "bob", 4.0)
    cleared = registry.clear_alarms("d1", "offline", "auto", 5.0)
    assert [x.id for x in cleared] == [a.id]
    assert cleared[0].state == "cleared" and cleared[0].cleared_by == "auto"
    assert registry.clear_alarms("d1", "offline", "auto", 6.0) == []
    assert [x.id for x in registry.alarms()] == [c.id, b.id, a.id]
    assert [x.id for x in registry.alarms(device="d1")] == [b.id, a.id]
    assert [x.id for x in registry.alarms(states=["active", "acknowledged"])] == [c.id, b.id]
    assert [x.id for x in registry.alarms(states=["cleared"])] == [a.id]
    assert registry.alarms(states=[]) == []
    assert len(registry.alarms(limit=1)) == 1


def test_alarm_raise_race(open_reg: Opener) -> None:
    regs = [open_reg() for _ in range(4)]
    barrier = threading.Barrier(4)
    created: list[bool] = []

    def worker(i: int) -> None:
        barrier.wait()
        created.append(regs[i].raise_alarm("d1", "offline", "major", "m", float(i))[1])

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert sorted(created) == [False, False, False, True]
    assert len(regs[0].alarms()) == 1


# -- users, sessions, device keys, audit ---------------------------------------------------


def test_users(registry: SQLRegistry) -> None:
    assert registry.get_user("alice") is None
    alice = User("alice", "argon2$x", "admin", ("plant-a", "plant-b"), 1.0)
    bob = User("bob", "argon2$y", "viewer", (), 2.0, disabled=True)
    registry.put_user(alice)
    registry.put_user(bob)
    assert registry.get_user("alice") == alice
    assert registry.get_user("bob") == bob
    assert registry.users() == [alice, bob]
    alice2 = User("alice", "argon2$z", "operator", (), 1.0)
    registry.put_user(alice2)
    assert registry.get_user("alice") == alice2
    registry.delete_user("bob")
    registry.delete_user("nobody")
    assert registry.users() == [alice2]


def test_sessions(registry: SQLRegistry) -> None:
    registry.put_user(User("alice", "h", "admin"))
    registry.put_user(User("bob", "h", "viewer"))
    s1 = Session("s1", "alice", "th1", 1.0, 100.0, client="cli")
    s2 = Session("s2", "bob", "th2", 2.0, 100.0)
    registry.create_session(s1)
    registry.create_session(s2)
    assert registry.get_session("s1") == s1
    assert registry.get_session("nope") is None
    assert registry.sessions() == [s1, s2]
    assert registry.sessions("bob") == [s2]
    registry.revoke_session("s1", 50.0)
    registry.revoke_session("s1", 60.0)  # first revocation time stays
    got = registry.get_session("s1")
    assert got is not None and got.revoked_at == 50.0
    with pytest.raises(NotFoundError):
        registry.create_session(Session("s3", "ghost", "t", 1.0, 2.0))
    registry.delete_user("bob")
    assert registry.sessions("bob") == []
    assert registry.get_session("s2") is None


def test_device_keys(registry: SQLRegistry) -> None:
    k1 = DeviceKey("k1", "d1", "hash1", 1.0)
    k2 = DeviceKey("k2", "d1", "hash2", 2.0)
    registry.add_device_key(k1)
    registry.add_device_key(k2)
    registry.add_device_key(DeviceKey("k3", "d2", "hash3", 3.0))
    assert registry.device_keys("d1") == [k1, k2]
    registry.revoke_device_key("k1", 5.0)
    registry.revoke_device_key("k1", 6.0)
    assert registry.device_keys("d1")[0].revoked_at == 5.0
    assert registry.device_keys("ghost") == []
    with pytest.raises(RegistryError):
        registry.add_device_key(k1)  # duplicate id


def test_audit_log(registry: SQLRegistry) -> None:
    registry.audit("alice", "PUT /api/v1/devices/fan_01", "fan_01", "200", 1.0, {"n": 1})
    registry.audit("bob", "DELETE /api/v1/users/x", "x", "403", 2.0)
    registry.audit("alice", "POST /api/v1/apply", "demo", "201", 3.0)
    log = registry.audit_log()
    assert [(e.actor, e.timestamp) for e in log] == [("alice", 3.0), ("bob", 2.0), ("alice", 1.0)]
    assert log[2].detail == {"n": 1} and log[1].detail == {}
    assert log[2].action == "PUT /api/v1/devices/fan_01"
    assert (log[2].target, log[2].result) == ("fan_01", "200")
    assert [e.timestamp for e in registry.audit_log(actor="alice")] == [3.0, 1.0]
    assert len(registry.audit_log(limit=1)) == 1


def test_hash_specs_matches_base() -> None:
    from twin.registry import doc_hash
    from twin.registry._sql import hash_specs, pack_specs

    specs = demo_specs(3)
    specs[("Device", "ünïcode")] = device("ünïcode", labels={"x": 1.5, "y": None})
    total, hashes, _ = hash_specs(specs)
    assert total == spec_hash(specs)
    assert hashes == {k: doc_hash(d) for k, d in specs.items()}
    assert unpack_specs(pack_specs(specs)) == specs


# -- connection pool -------------------------------------------------------------------------


def test_threads_that_come_and_go_do_not_leak_connections(registry: SQLRegistry) -> None:
    registry.apply(demo_specs(1), base=0, author="a")
    barrier = threading.Barrier(8)

    def worker() -> None:
        barrier.wait()
        for _ in range(5):
            assert registry.head() is not None

    for _ in range(3):
        threads = [threading.Thread(target=worker) for _ in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
    assert 1 <= len(registry._idle) <= registry.max_idle


async def test_from_trio_worker_threads(registry: SQLRegistry) -> None:
    import trio

    registry.apply(demo_specs(3), base=0, author="a")
    seen: list[int] = []

    async def one(i: int) -> None:
        await trio.to_thread.run_sync(
            registry.set_device_status, "temp_sensor_01", f"s{i}", float(i)
        )
        rows = await trio.to_thread.run_sync(registry.device_rows)
        seen.append(len(rows))

    async with trio.open_nursery() as nursery:
        for i in range(20):
            nursery.start_soon(one, i)
    assert seen == [3] * 20
    assert len(registry.status_history("temp_sensor_01", limit=100)) == 20
