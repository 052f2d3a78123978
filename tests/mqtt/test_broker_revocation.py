"""`twin broker` (the standalone broker) enforces revocations like `twin up`: a revoked device
key, a deleted device, a deleted, disabled or revoked user — made by another process, as the CLI
would — is disconnected (0x87) and refused on the next CONNECT, within the documented 10 s.
Real paho-mqtt clients against the real `twin broker` process."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.runtime.helpers import apply, model, site
from twin.api.auth import create_device_key, make_user
from twin.bindings.mqtt import device_topics
from twin.registry import open_registry
from twin.registry.base import Registry

from .conftest import Client, interrupt

ROOT = Path(__file__).resolve().parents[2]
PASSWORD = "password123"
DISCONNECT_WAIT = 60.0  # a bound for the test to fail, not the promise (that is 10 s)


def mqtt_device(name: str) -> dict[str, Any]:
    return {
        "apiVersion": "flux.iot/v1",
        "kind": "Device",
        "metadata": {"name": name, "site": "plant-a"},
        "spec": {"type": "sensor", "model": "th-sensor", "binding": {"mqtt": {}}},
    }


@pytest.fixture
def registry(tmp_path: Path) -> Iterator[Registry]:
    reg = open_registry(None, tmp_path / "st")
    try:
        yield reg
    finally:
        reg.close()


DOCS = [site(), model(), mqtt_device("d1"), mqtt_device("d2"), mqtt_device("d3")]
USERS = ("gone", "off", "revoked", "stays")


@pytest.fixture
def keys(registry: Registry) -> dict[str, str]:
    apply(registry, *DOCS)
    for name in USERS:
        registry.put_user(make_user(name, PASSWORD, "viewer"))
    return {d: create_device_key(registry, d)[1] for d in ("d1", "d2", "d3")}


@pytest.fixture
def port(tmp_path: Path, keys: dict[str, str]) -> Iterator[int]:
    """`twin broker` on a free port, over the registry the fixtures filled."""
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.Popen(
        [sys.executable, "-m", "twin.cli", "--state-dir", str(tmp_path / "st"), "broker",
         "--listen", "127.0.0.1:0", "--sys-interval", "0", "--log-level", "info"],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        env=env,
        cwd=str(tmp_path),
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline().strip()
        assert line.startswith("mqtt 127.0.0.1:"), line
        yield int(line.rsplit(":", 1)[1])
    finally:
        interrupt(proc)


def reason(cl: Client) -> int:
    rc, _props = cl.disconnects.get(timeout=DISCONNECT_WAIT)
    return int(getattr(rc, "value", rc))


def refused(port: int, username: str, password: str) -> bool:
    cl = Client(port, "", username=username, password=password, v5=True)
    try:
        assert cl.connack is not None
        return bool(cl.connack[1].is_failure)
    finally:
        cl.close()


def test_twin_broker_disconnects_and_refuses_revoked_credentials(
    registry: Registry, keys: dict[str, str], port: int
) -> None:
    key1, key2, key3 = keys["d1"], keys["d2"], keys["d3"]
    d1 = Client(port, "d1", username="d1", password=key1, v5=True)
    d2 = Client(port, "d2", username="d2", password=key2, v5=True)
    d3 = Client(port, "d3", username="d3", password=key3, v5=True)
    users = {n: Client(port, n, username=n, password=PASSWORD, v5=True) for n in USERS}
    for cl in (d1, d2, d3, *users.values()):
        assert cl.connack is not None and not cl.connack[1].is_failure
    rcs = users["stays"].subscribe("flux/plant-a/#", 1)
    assert [int(getattr(rc, "value", rc)) for rc in rcs] == [1]
    try:
        # revocations made by another process, all at once
        started = time.monotonic()
        (k1,) = registry.device_keys("d1")
        registry.revoke_device_key(k1.id, time.time())
        head = registry.head()
        assert head is not None
        specs = {k: v for k, v in registry.specs().items() if k != ("Device", "d2")}
        registry.apply(specs, base=head.number, author="test")  # prune d2
        registry.delete_user("gone")
        registry.set_user_disabled("off", True)
        registry.revoke_user_credentials("revoked", time.time())
        for cl in (d1, d2, users["gone"], users["off"], users["revoked"]):
            assert reason(cl) == 0x87
        elapsed = time.monotonic() - started
        print(f"revocations took effect after {elapsed:.1f} s")
        # ... and the same credentials are refused on a new connection
        assert refused(port, "d1", key1)
        assert refused(port, "off", PASSWORD)
        assert refused(port, "gone", PASSWORD)
        # d2 comes back under the same name: its old key died with the old d2
        apply(registry, *DOCS)
        _, new_key = create_device_key(registry, "d2")
        deadline = time.monotonic() + DISCONNECT_WAIT
        while refused(port, "d2", new_key):  # until the broker has read the new head
            assert time.monotonic() < deadline, "the re-created d2 never got in"
            time.sleep(0.2)
        assert refused(port, "d2", key2)
        # the others were left alone and still work
        assert d3.disconnects.empty() and users["stays"].disconnects.empty()
        d3.publish(device_topics("d3", "plant-a", {})["telemetry"], b'{"temperature": 1}', 1)
        assert users["stays"].get().topic == device_topics("d3", "plant-a", {})["telemetry"]
    finally:
        for cl in (d1, d2, d3, *users.values()):
            cl.close()
