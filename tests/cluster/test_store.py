"""The cluster tables (twin/registry/cluster.py) on a real PostgreSQL: leases, fencing by
epoch, ownership claims, exactly-once keys and job leases."""

from __future__ import annotations

import os
import time
import uuid
from collections import Counter
from collections.abc import Iterator

import pytest

from cluster.harness import PG_URL, pg_unavailable, with_schema
from twin.errors import RegistryError
from twin.registry import open_registry
from twin.registry.cluster import ClusterStore, rendezvous

pytestmark = pytest.mark.postgres


@pytest.fixture
def store() -> Iterator[ClusterStore]:
    why = pg_unavailable()
    if why:
        if os.environ.get("TWIN_REQUIRE_POSTGRES"):
            pytest.fail(why)
        pytest.skip(why)
    schema = "cs_" + uuid.uuid4().hex[:10]
    reg = open_registry(with_schema(PG_URL, schema))
    s = ClusterStore(reg)
    s.ensure()
    s.ensure()  # idempotent
    try:
        yield s
    finally:
        reg.close()
        import psycopg

        with psycopg.connect(PG_URL, autocommit=True) as conn:
            conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')


def test_sqlite_registry_is_refused(tmp_path) -> None:  # type: ignore[no-untyped-def]
    reg = open_registry(f"sqlite:///{tmp_path}/r.db")
    with pytest.raises(RegistryError, match="PostgreSQL"):
        ClusterStore(reg)
    reg.close()


def test_register_heartbeat_and_lease_expiry(store: ClusterStore) -> None:
    e1, _ = store.register("a", "A", "h", 1, "", 0.5)
    e2, _ = store.register("b", "B", "h", 2, "", 30)
    assert e1 != e2
    assert {m.id for m in store.members()} == {"a", "b"}
    assert store.heartbeat("a", e1, 0.5, {"devices": 1})
    time.sleep(0.7)
    assert {m.id for m in store.members()} == {"b"}
    assert not store.heartbeat("a", e1, 0.5, {})  # passed: it must register anew
    e3, _ = store.register("a", "A", "h", 1, "", 30)
    assert e3 > e2
    assert not store.heartbeat("a", e1, 30, {})  # the old epoch stays dead
    assert store.heartbeat("a", e3, 30, {})


def test_claims_are_exclusive_and_fenced(store: ClusterStore) -> None:
    keys = [("Device", f"d{i}") for i in range(10)]
    ea, _ = store.register("a", "A", "h", 1, "", 0.6)
    eb, _ = store.register("b", "B", "h", 2, "", 30)
    assert store.claim("a", ea, keys) == set(keys)
    assert store.claim("b", eb, keys) == set()  # held by a live owner
    store.release("a", ea, keys[:3])
    assert store.claim("b", eb, keys) == set(keys[:3])
    time.sleep(0.8)  # a's lease passes: its rows are free for b, and a can claim nothing
    assert store.claim("a", ea, keys) == set()
    assert store.claim("b", eb, keys) == set(keys)
    assert set(store.owners().values()) == {("b", eb)}


def test_scene_runs_and_commands_once_across_engines(store: ClusterStore) -> None:
    ea, _ = store.register("a", "A", "h", 1, "", 30)
    eb, _ = store.register("b", "B", "h", 2, "", 30)
    assert store.scene_run("a", ea, "k1", "s")
    assert not store.scene_run("b", eb, "k1", "s")
    assert not store.scene_run("a", ea, "k1", "s")
    assert store.claim_command("b", eb, "cmd1")
    assert store.claim_command("b", eb, "cmd1")  # a retry by the same incarnation
    assert not store.claim_command("a", ea, "cmd1")
    assert not store.scene_run("zombie", 999, "k2", "s")  # no live incarnation: fenced
    assert not store.claim_command("zombie", 999, "cmd2")


def test_job_lease_one_engine_at_a_time(store: ClusterStore) -> None:
    ea, _ = store.register("a", "A", "h", 1, "", 30)
    eb, _ = store.register("b", "B", "h", 2, "", 30)
    assert store.job("a", ea, "retention", 0.5)
    assert store.job("a", ea, "retention", 0.5)  # renewal
    assert not store.job("b", eb, "retention", 0.5)
    time.sleep(0.7)
    assert store.job("b", eb, "retention", 30)
    assert not store.job("a", ea, "retention", 30)


def test_leave_frees_everything_at_once(store: ClusterStore) -> None:
    ea, _ = store.register("a", "A", "h", 1, "", 30)
    eb, _ = store.register("b", "B", "h", 2, "", 30)
    keys = [("Scene", "s1"), ("Device", "d1")]
    assert store.claim("a", ea, keys) == set(keys)
    store.leave("a", ea)
    assert store.claim("b", eb, keys) == set(keys)
    assert [m.id for m in store.members()] == ["b"]


def test_rendezvous_spreads_and_moves_little() -> None:
    keys = [f"Device/d{i}" for i in range(3000)]
    three = {k: rendezvous(k, ["a", "b", "c"]) for k in keys}
    shares = Counter(three.values())
    assert all(800 < n < 1200 for n in shares.values()), shares
    four = {k: rendezvous(k, ["a", "b", "c", "d"]) for k in keys}
    moved = [k for k in keys if three[k] != four[k]]
    assert all(four[k] == "d" for k in moved)  # a join takes keys only to the newcomer
    assert 550 < len(moved) < 950
    assert rendezvous("x", []) is None


def test_an_unsent_command_claim_can_be_given_back(store: ClusterStore) -> None:
    ea, _ = store.register("a", "A", "h", 1, "", 30)
    eb, _ = store.register("b", "B", "h", 2, "", 30)
    assert store.claim_command("a", ea, "cmd1")
    store.unclaim_command("b", eb, "cmd1")  # only its claimer can give it back
    assert not store.claim_command("b", eb, "cmd1")
    store.unclaim_command("a", ea, "cmd1")  # a: the device was not connected here
    assert store.claim_command("b", eb, "cmd1")
