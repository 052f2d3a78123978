"""Credential lifecycles in the registry (both backends): user identity and generation, API
tokens, disabling, revoking everything of a user, device keys revoked with their device, and
the migration of a schema-2 registry."""

from __future__ import annotations

import pytest

from twin.errors import NotFoundError
from twin.registry import migrations
from twin.registry._sql import SQLRegistry
from twin.registry.base import ApiToken, DeviceKey, Session, User

from .conftest import Opener
from .docs import demo_specs


def test_a_user_recreated_under_the_same_name_is_another_user(registry: SQLRegistry) -> None:
    old = User("alice", "h", "admin")
    registry.put_user(old)
    got = registry.get_user("alice")
    assert got is not None and got.id == old.id and got.generation == 1
    registry.delete_user("alice")
    registry.put_user(User("alice", "h", "admin"))
    again = registry.get_user("alice")
    assert again is not None and again.id != old.id


def test_revoke_user_credentials_bumps_generation_and_revokes_everything(
    registry: SQLRegistry,
) -> None:
    alice = User("alice", "h", "operator")
    registry.put_user(alice)
    registry.put_user(User("bob", "h", "viewer"))
    registry.create_session(Session("s1", "alice", "th", 1.0, 100.0, user_id=alice.id))
    registry.create_session(Session("s2", "bob", "th", 1.0, 100.0))
    registry.add_api_token(ApiToken("t1", "alice", alice.id, 1.0, 1e12))
    registry.add_api_token(ApiToken("t2", "bob", "x", 1.0, 1e12))
    assert registry.revoke_user_credentials("alice", 7.0) == 2
    assert registry.revoke_user_credentials("alice", 8.0) == 3
    got = registry.get_user("alice")
    assert got is not None and got.generation == 3 and got.id == alice.id
    s1 = registry.get_session("s1")
    assert s1 is not None and s1.revoked_at == 7.0 and s1.user_id == alice.id
    t1 = registry.get_api_token("t1")
    assert t1 is not None and t1.revoked_at == 7.0
    # bob is untouched
    assert registry.get_session("s2").revoked_at is None  # type: ignore[union-attr]
    assert registry.get_api_token("t2").revoked_at is None  # type: ignore[union-attr]
    assert registry.get_user("bob").generation == 1  # type: ignore[union-attr]
    assert registry.revoke_user_credentials("nobody", 1.0) is None


def test_disable_and_enable(registry: SQLRegistry) -> None:
    registry.put_user(User("alice", "h", "admin"))
    assert registry.set_user_disabled("alice", True)
    assert registry.get_user("alice").disabled  # type: ignore[union-attr]
    assert registry.set_user_disabled("alice", False)
    assert not registry.get_user("alice").disabled  # type: ignore[union-attr]
    assert not registry.set_user_disabled("nobody", True)


def test_api_tokens(registry: SQLRegistry) -> None:
    alice = User("alice", "h", "admin")
    registry.put_user(alice)
    registry.put_user(User("bob", "h", "viewer"))
    t1 = ApiToken("t1", "alice", alice.id, 1.0, 100.0, note="grafana")
    t2 = ApiToken("t2", "bob", "b", 2.0, 100.0)
    registry.add_api_token(t1)
    registry.add_api_token(t2)
    assert registry.get_api_token("t1") == t1
    assert registry.get_api_token("nope") is None
    assert registry.api_tokens() == [t1, t2]
    assert registry.api_tokens("bob") == [t2]
    assert registry.revoke_api_token("t1", 5.0)
    assert registry.revoke_api_token("t1", 6.0)  # the first revocation time stays
    assert registry.get_api_token("t1").revoked_at == 5.0  # type: ignore[union-attr]
    assert not registry.revoke_api_token("nope", 5.0)
    with pytest.raises(NotFoundError):
        registry.add_api_token(ApiToken("t3", "ghost", "g", 1.0, 2.0))
    registry.delete_user("bob")
    assert registry.api_tokens("bob") == [] and registry.get_api_token("t2") is None


def test_deleting_a_device_revokes_its_keys(registry: SQLRegistry) -> None:
    specs = demo_specs(2)
    rev = registry.apply(specs, base=0, author="a")
    assert rev is not None
    registry.add_device_key(DeviceKey("k1", "temp_sensor_01", "h1", 1.0))
    registry.add_device_key(DeviceKey("k2", "temp_sensor_02", "h2", 1.0))
    pruned = {k: v for k, v in specs.items() if k != ("Device", "temp_sensor_01")}
    rev2 = registry.apply(pruned, base=rev.number, author="a")
    assert rev2 is not None
    (k1,) = registry.device_keys("temp_sensor_01")
    assert k1.revoked_at is not None
    assert registry.device_keys("temp_sensor_02")[0].revoked_at is None
    assert "k1" in registry.revoked_device_keys(k1.revoked_at)
    # the device comes back (same name): its old key stays revoked
    registry.apply(specs, base=rev2.number, author="a")
    assert registry.device_keys("temp_sensor_01")[0].revoked_at == k1.revoked_at


def test_a_schema_2_registry_migrates(open_reg: Opener, monkeypatch: pytest.MonkeyPatch) -> None:
    with monkeypatch.context() as m:
        m.setattr(migrations, "SCHEMA_VERSION", 2)
        old = open_reg()
        with old._tx(write=True) as conn:
            for name in ("alice", "bob"):
                old._exec(
                    conn,
                    "INSERT INTO users (name, password_hash, role, sites, created_at, disabled) "
                    "VALUES (?, 'h', 'admin', ?, 1.0, ?)",
                    (name, old._tags_in([]), False),
                )
            old._exec(
                conn,
                "INSERT INTO sessions (id, user_name, token_hash, created_at, expires_at) "
                "VALUES ('s1', 'alice', 'th', 1.0, 100.0)",
            )
        old.close()
    new = open_reg()
    assert new.schema_version() == migrations.SCHEMA_VERSION  # type: ignore[attr-defined]
    alice, bob = new.users()
    assert alice.id and bob.id and alice.id != bob.id
    assert alice.generation == bob.generation == 1
    s1 = new.get_session("s1")
    assert s1 is not None and s1.user_id == ""  # opened before user ids: never valid again
    assert new.api_tokens() == []


def test_key_cache_entries_expire_without_a_sweep(registry: SQLRegistry) -> None:
    """Nobody sweeps (as on `twin broker` before): a key revoked elsewhere is still refused once
    its cache entry is ``ttl`` old, and a valid one is re-confirmed without argon2."""
    from twin.registry.credentials import DeviceKeyVerifier, create_device_key

    now = [1000.0]
    v = DeviceKeyVerifier(registry, ttl=10.0, clock=lambda: now[0])
    rec, key = create_device_key(registry, "d1")
    _, other = create_device_key(registry, "d1")
    assert v.verify("d1", key) and v.verify("d1", other)
    assert v.argon2_checks == 2
    registry.revoke_device_key(rec.id, 1.0)  # by another process: no invalidate() here
    now[0] += 5.0
    assert v.cached("d1", key) is True  # within the TTL memory answers
    now[0] += 5.0
    assert v.cached("d1", key) is None  # stale: must be checked again
    assert not v.verify("d1", key)
    assert v.verify("d1", other) and v.argon2_checks == 2  # re-confirmed by its record
    assert v.cached("d1", key) is None and v.cached("d1", other) is True
