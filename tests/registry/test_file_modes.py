"""The state directory and the registry's files are private: 0700 and 0600, whatever the umask,
and an older world-readable state directory is tightened when opened."""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest

from twin.api.auth import load_secret
from twin.mqtt.store import Store
from twin.registry import open_registry
from twin.registry.base import User


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.fixture
def open_umask() -> Iterator[None]:
    old = os.umask(0o022)  # the usual default: files 0644, directories 0755
    try:
        yield
    finally:
        os.umask(old)


def test_state_dir_registry_and_secret_are_private(tmp_path: Path, open_umask: None) -> None:
    state = tmp_path / "state"
    reg = open_registry(None, state)
    reg.put_user(User("alice", "h", "admin"))  # writes: the -wal and -shm exist now
    load_secret(state)
    assert mode(state) == 0o700
    names = {p.name for p in state.iterdir()}
    assert {"registry.db", "registry.db-wal", "registry.db-shm", "jwt.secret"} <= names, names
    for p in state.iterdir():
        assert mode(p) == 0o600, (p.name, oct(mode(p)))
    reg.close()


def test_an_old_world_readable_state_dir_is_tightened(tmp_path: Path, open_umask: None) -> None:
    state = tmp_path / "state"
    state.mkdir(mode=0o755)
    (state / "registry.db").touch(mode=0o644)
    (state / "jwt.secret").write_text("00" * 32)
    os.chmod(state / "jwt.secret", 0o644)
    open_registry(None, state).close()
    load_secret(state)
    assert mode(state) == 0o700
    assert mode(state / "registry.db") == 0o600
    assert mode(state / "jwt.secret") == 0o600


def test_broker_persistence_is_private(tmp_path: Path, open_umask: None) -> None:
    store = Store(tmp_path / "mqtt")
    store.load()
    store.close()
    assert mode(tmp_path / "mqtt") == 0o700
    for p in (tmp_path / "mqtt").iterdir():
        assert mode(p) == 0o600, (p.name, oct(mode(p)))


def test_time_series_dir_is_private(tmp_path: Path, open_umask: None) -> None:
    from twin.timeseries.lance import LanceStore

    LanceStore(tmp_path / "timeseries")
    assert mode(tmp_path / "timeseries") == 0o700
