"""The opcua binding against a real asyncua server in another process (twin.sim.opcua_server):
subscriptions with source timestamps and quality, writes, methods as commands, HistoryRead
backfill after an outage, Basic256Sha256 SignAndEncrypt with certificates from secrets and a
username/password login, and a peer that sends garbage."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import trio

from twin.bindings.base import BindingContext, DeviceEvent, Message, Quality, Reading
from twin.bindings.opcua import OpcUaBinding, is_node_id, status_quality, to_json_value
from twin.errors import BindingError, CommandError


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Peer:
    def __init__(self, proc: subprocess.Popen[str], endpoint: str, certs: Path) -> None:
        self.proc, self.endpoint, self.certs = proc, endpoint, certs


def start_server(certs: Path, *extra: str) -> Peer:
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "twin.sim.opcua_server", "--port", str(port), "--interval", "0.1",
         "--secure", str(certs), *extra],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
    )
    assert proc.stdout is not None
    line = proc.stdout.readline()
    assert line.startswith("ready"), line
    return Peer(proc, line.split()[1], certs)


def restart_on(port: str) -> subprocess.Popen[str]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "twin.sim.opcua_server", "--port", port, "--interval", "0.1"],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
    )
    assert proc.stdout is not None and proc.stdout.readline().startswith("ready")
    return proc


@pytest.fixture(scope="module")
def peer(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Peer]:
    p = start_server(tmp_path_factory.mktemp("opcua-certs"), "--user", "op:s3cret")
    yield p
    p.proc.terminate()
    p.proc.wait(10)


@pytest.fixture(scope="module")
def client_cert(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    import asyncio

    from twin.sim.opcua_server import ensure_certificate

    return asyncio.run(ensure_certificate(tmp_path_factory.mktemp("client"), "client"))


@pytest.fixture(autouse=True)
def secrets(monkeypatch: pytest.MonkeyPatch, client_cert: tuple[Path, Path]) -> None:
    monkeypatch.setenv("TWIN_SECRET_PLC_PASSWORD", "s3cret")
    monkeypatch.setenv("TWIN_SECRET_PLC_WRONG", "nope")
    monkeypatch.setenv("TWIN_SECRET_PLC_CERT", str(client_cert[0]))
    monkeypatch.setenv("TWIN_SECRET_PLC_KEY", client_cert[1].read_text())  # PEM content
    monkeypatch.setenv("TWIN_SECRETS_FILE", "/nonexistent/secrets.yaml")


def options(endpoint: str, **extra: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "endpoint": endpoint,
        "username": "op",
        "password": {"secret": "plc/password"},
        "publishing_interval": "100ms",
        "heartbeat": "300ms",
        "points": {
            "temperature": {"node": "ns=2;s=Boiler.Temperature"},
            "counter": {"path": "2:Boiler/2:Counter"},
            "setpoint": {"node": "ns=2;s=Boiler.Setpoint"},
            "running": {"path": "Boiler/Running"},
        },
        "namespace": "urn:flux-iot:sim",
        "methods": {
            "add": {"object": "ns=2;s=Boiler", "method": "2:Add"},
            "reset": {"object": "2:Boiler", "method": "ns=2;s=Boiler.Reset"},
            "set_setpoint": {"object": "Boiler", "method": "SetSetpoint"},
            "fail": {"object": "ns=2;s=Boiler", "method": "2:Fail"},
        },
    }
    base.update(extra)
    return base


async def collect(b: OpcUaBinding, until: Any, limit: float = 10) -> list[Message]:
    got: list[Message] = []
    send, recv = trio.open_memory_channel[Message](1000)
    async with trio.open_nursery() as n:
        n.start_soon(b.subscribe, send)
        with trio.fail_after(limit):
            async for m in recv:
                got.append(m)
                if until(got):
                    break
        n.cancel_scope.cancel()
    return got


def readings(msgs: list[Message], point: str | None = None) -> list[Reading]:
    return [m for m in msgs if isinstance(m, Reading) and (point is None or m.point == point)]


async def test_subscribe_write_and_read_back(peer: Peer) -> None:
    b = OpcUaBinding("boiler", options(peer.endpoint), context=BindingContext())
    await b.connect()
    try:
        msgs = await collect(
            b,
            lambda g: len(readings(g, "counter")) >= 3
            and any(isinstance(m, DeviceEvent) for m in g),
        )
        temps = readings(msgs, "temperature")
        assert temps and all(r.quality is Quality.GOOD for r in temps)
        assert all(isinstance(r.value, float) for r in temps)
        counters = [r.value for r in readings(msgs, "counter")]
        assert counters == sorted(counters) and len(set(counters)) >= 3
        assert abs(temps[-1].ts - time.time()) < 30  # the server's SourceTimestamp
        assert readings(msgs, "running")[0].value is True

        await b.write("setpoint", 55)  # an int for a Double variable: cast to its type
        (r,) = await b.read(["setpoint"])
        assert r.value == 55.0 and isinstance(r.value, float)
        with pytest.raises(BindingError):
            await b.write("nope", 1)
    finally:
        await b.close()


async def test_methods_are_commands(peer: Peer) -> None:
    b = OpcUaBinding("boiler", options(peer.endpoint), context=BindingContext())
    await b.connect()
    try:
        assert await b.send_command("add", {"a": 2, "b": 40}) == 42
        assert await b.send_command("add", {"args": [1, 2]}) == 3
        assert await b.send_command("reset", {}) is True
        assert await b.send_command("set_setpoint", {"value": 61.5}) is True
        (r,) = await b.read(["setpoint"])
        assert r.value == 61.5
        with pytest.raises(CommandError, match="needs parameter 'b'"):
            await b.send_command("add", {"a": 1})
        with pytest.raises(CommandError, match="not an integer"):
            await b.send_command("add", {"a": 1.5, "b": 1})
        with pytest.raises(CommandError, match="Bad"):
            await b.send_command("fail", {})
        with pytest.raises(CommandError, match="no method"):
            await b.send_command("explode", {})
    finally:
        await b.close()


async def test_history_backfills_an_outage(peer: Peer) -> None:
    opts = options(peer.endpoint, points={"temperature": {"node": "ns=2;s=Boiler.Temperature"}})
    b = OpcUaBinding("boiler", opts, context=BindingContext())
    await b.connect()
    msgs = await collect(b, lambda g: len(readings(g)) >= 2)
    await b.close()
    before = readings(msgs)[-1].ts
    await trio.sleep(1.5)  # the outage: the server keeps historizing (a value every 0.1 s)
    await b.connect()
    try:
        msgs = await collect(b, lambda g: len(readings(g)) >= 8)
    finally:
        await b.close()
    got = readings(msgs)
    assert b.backfilled >= 5
    backfill = got[: b.backfilled]
    assert all(r.ts > before for r in backfill)
    assert [r.ts for r in backfill] == sorted(r.ts for r in backfill)
    assert backfill[0].ts - before < 0.5  # no gap: it starts right after the last value


async def test_sign_and_encrypt_with_certificates_from_secrets(peer: Peer) -> None:
    sec = {
        "policy": "Basic256Sha256",
        "mode": "SignAndEncrypt",
        "certificate": {"secret": "plc/cert"},
        "private_key": {"secret": "plc/key"},
    }
    for mode in ("SignAndEncrypt", "Sign"):
        b = OpcUaBinding("boiler", options(peer.endpoint, security={**sec, "mode": mode}))
        await b.connect()
        try:
            (r,) = await b.read(["counter"])
            assert r.quality is Quality.GOOD and isinstance(r.value, int)
            assert b._client.security_policy.Mode.name == mode
        finally:
            await b.close()


async def test_wrong_password_and_missing_secret(peer: Peer) -> None:
    b = OpcUaBinding("boiler", options(peer.endpoint, password={"secret": "plc/wrong"}))
    with pytest.raises(BindingError):
        await b.connect()
    await b.close()
    b = OpcUaBinding("boiler", options(peer.endpoint, password={"secret": "plc/unset"}))
    with pytest.raises(BindingError, match="plc/unset"):
        await b.connect()
    await b.close()


async def test_a_peer_sending_garbage_is_a_temporary_connect_error() -> None:
    listener = await trio.open_tcp_listeners(0, host="127.0.0.1")
    port = listener[0].socket.getsockname()[1]

    async def garbage(stream: trio.SocketStream) -> None:
        with trio.move_on_after(5):
            await stream.receive_some(1024)
            await stream.send_all(b"\xff" * 64 + b"HELxxxx" + os.urandom(200))
            await trio.sleep(3)

    async with trio.open_nursery() as n:
        n.start_soon(trio.serve_listeners, garbage, listener)
        b = OpcUaBinding("junk", {"endpoint": f"opc.tcp://127.0.0.1:{port}/", "timeout": "1s"})
        with pytest.raises(BindingError) as info:
            await b.connect()
        assert info.value.temporary
        await b.close()
        n.cancel_scope.cancel()


def test_value_mapping() -> None:
    import datetime as dt

    from asyncua import ua

    assert status_quality(ua.StatusCode(0)) is Quality.GOOD
    assert status_quality(ua.StatusCode(ua.StatusCodes.UncertainLastUsableValue)) is Quality.STALE
    assert status_quality(ua.StatusCode(ua.StatusCodes.UncertainSensorNotAccurate)) is Quality.UNCERTAIN
    assert status_quality(ua.StatusCode(ua.StatusCodes.BadCommunicationError)) is Quality.BAD
    assert to_json_value(ua.LocalizedText("hi")) == "hi"
    assert to_json_value(b"\x01\x02") == "0102"
    assert to_json_value(dt.datetime(2024, 1, 1)) == "2024-01-01T00:00:00+00:00"
    assert to_json_value([1, ua.Variant(2.5)]) == [1, 2.5]
    assert to_json_value(ua.NodeId(5, 2)) == "ns=2;i=5"
    assert is_node_id("ns=2;s=Boiler.T") and is_node_id("i=85")
    assert not is_node_id("2:Boiler/2:T")


async def test_in_the_engine_commands_and_desired_go_through_the_ledger(
    peer: Peer, tmp_path: Path
) -> None:
    from runtime.helpers import apply, fast_config, model, running_engine, site

    from twin.control.ledger import SET, CommandStatus
    from twin.control.service import ControlService
    from twin.registry import open_registry

    boiler = model(
        "boiler",
        telemetry={"temperature": {"type": "number"}, "counter": {"type": "integer"}},
        properties={"setpoint": {"type": "number", "access": "readwrite"}},
        commands={
            "add": {"params": {"type": "object", "required": ["a", "b"],
                               "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}}}},
            "fail": {},
        },
    )
    opts = options(peer.endpoint)
    opts["points"] = {k: v for k, v in opts["points"].items() if k != "running"}
    device = {
        "apiVersion": "flux.iot/v1",
        "kind": "Device",
        "metadata": {"name": "boiler_01", "site": "plant-a"},
        "spec": {"type": "industrial", "model": "boiler", "binding": {"opcua": opts},
                 "heartbeat": {"interval": "1s", "timeout": "5s"}},
    }
    reg = open_registry(None, tmp_path / "state")
    apply(reg, site(), boiler, device)
    control = ControlService(reconcile_interval=0.1)
    async with running_engine(reg, fast_config(state_dir=tmp_path), [control]) as engine:
        with trio.fail_after(20):
            while True:
                twin = engine.twin("boiler_01")
                if twin is not None and {"temperature", "counter", "setpoint"} <= set(twin.reported):
                    break
                await trio.sleep(0.05)
        assert str(twin.status) == "online"
        cmd = await control.ledger.submit("boiler_01", "add", {"a": 40, "b": 2}, source="test")
        done = await control.ledger.wait(cmd.id)
        assert done.status is CommandStatus.SUCCESS and done.result == 42, done
        cmd = await control.ledger.submit("boiler_01", "fail", {}, source="test")
        done = await control.ledger.wait(cmd.id)
        assert done.status is CommandStatus.FAILED
        cmd = await control.ledger.submit(
            "boiler_01", SET, {"property": "setpoint", "value": 66.5}, source="test"
        )
        done = await control.ledger.wait(cmd.id)
        assert done.status is CommandStatus.SUCCESS, done
        with trio.fail_after(10):  # the subscription reports the written value back
            while engine.twin("boiler_01").reported["setpoint"].value != 66.5:  # type: ignore[union-attr]  # noqa: ASYNC110
                await trio.sleep(0.05)
    reg.close()


SITE = """\
apiVersion: flux.iot/v1
kind: Site
metadata: {name: plant-x}
spec: {timezone: UTC}
---
apiVersion: flux.iot/v1
kind: Device
metadata: {name: plc_01, site: plant-x}
spec:
  type: industrial
  binding:
    opcua:
      endpoint: opc.tcp://127.0.0.1:4840/
      security: {policy: Basic256Sha256, mode: None}
      points:
        t: {node: "ns=2;x=oops"}
        p: {}
        ok: {path: "2:Boiler/2:Temperature", deadband: 0.5, deadband_type: percent}
      methods:
        reset: {object: "ns=2;s=Boiler"}
"""


def test_validate_locates_opcua_mistakes(tmp_path: Path) -> None:
    from twin.errors import SpecError
    from twin.spec import load_site

    (tmp_path / "site.yaml").write_text(SITE)
    with pytest.raises(SpecError) as info:
        load_site(tmp_path)
    text = "\n".join(str(p) for p in info.value.problems)
    for expected in (
        "site.yaml:14:17: Device plc_01: spec.binding.opcua.security: missing required field "
        "'certificate'",
        "site.yaml:14:48: Device plc_01: spec.binding.opcua.security.mode",
        "site.yaml:16:19: Device plc_01: spec.binding.opcua.points.t.node: \"ns=2;x=oops\" must "
        "be a NodeId",
        "site.yaml:17:12: Device plc_01: spec.binding.opcua.points.p: {} needs exactly one of node",
        "spec.binding.opcua.methods.reset: missing required field 'method'",
    ):
        assert expected in text, text
    assert "points.ok" not in text


def test_discover_writes_valid_device_and_model_yaml(peer: Peer, tmp_path: Path) -> None:
    import yaml

    from twin.spec import load_site

    out = tmp_path / "site" / "boiler.yaml"
    out.parent.mkdir()
    env = {**os.environ, "TWIN_SECRET_PLC_PASSWORD": "s3cret"}
    r = subprocess.run(
        [sys.executable, "-m", "twin.cli.main", "discover",  # the spelling
         peer.endpoint.replace("opc.tcp://", "opcua://"), "--username", "op",
         "--password-secret", "plc/password", "--site", "plant-x", "-o", str(out)],
        capture_output=True, text=True, timeout=60, env=env, check=False,
    )
    assert r.returncode == 0, r.stderr
    assert "wrote 1 device(s)" in r.stderr
    docs = list(yaml.safe_load_all(out.read_text()))
    model, device = docs
    assert model["spec"]["telemetry"]["temperature"] == {"type": "number"}
    assert model["spec"]["properties"]["setpoint"] == {"type": "number", "access": "readwrite"}
    assert model["spec"]["commands"]["add"]["params"]["properties"] == {
        "a": {"type": "integer"}, "b": {"type": "integer"}}
    binding = device["spec"]["binding"]["opcua"]
    assert binding["points"]["counter"] == {"node": "ns=2;s=Boiler.Counter"}
    assert binding["password"] == {"secret": "plc/password"}  # the reference, never the value
    assert "s3cret" not in out.read_text()
    from twin.cli.discover_opcua import url_shorthand

    assert url_shorthand(["discover", "opc.tcp://h:1/"]) == ["discover", "opcua", "opc.tcp://h:1/"]
    assert url_shorthand(["discover", "onvif"]) == ["discover", "onvif"]
    (out.parent / "site.yaml").write_text(
        "apiVersion: flux.iot/v1\nkind: Site\nmetadata: {name: plant-x}\nspec: {timezone: UTC}\n")
    loaded = load_site(out.parent)  # valid as written: no SpecError
    assert ("Device", "boiler") in loaded.documents


@pytest.mark.slow  # two server starts: ~20 s
async def test_a_server_that_dies_is_noticed_and_reconnected(tmp_path: Path) -> None:
    """The subscription ends with a temporary error within a few heartbeats of the server's
    death (the device task then reconnects with backoff), after re-reporting the last good
    value as stale; a new server on the same port is connected to again."""
    p = start_server(tmp_path / "certs")
    endpoint = p.endpoint
    opts = {"endpoint": endpoint, "heartbeat": "300ms", "timeout": "1s",
            "publishing_interval": "100ms",
            "points": {"counter": {"node": "ns=2;s=Boiler.Counter"}}}
    b = OpcUaBinding("boiler", opts)
    await b.connect()
    send, recv = trio.open_memory_channel[Message](1000)
    after: list[Reading] = []
    try:
        with pytest.raises(BaseExceptionGroup) as info:
            async with trio.open_nursery() as n:
                n.start_soon(b.subscribe, send)
                with trio.fail_after(10):
                    async for m in recv:
                        if isinstance(m, Reading):
                            after.append(m)
                            break
                p.proc.kill()
                p.proc.wait(10)
                with trio.fail_after(15):
                    async for m in recv:  # drained until subscribe raises
                        if isinstance(m, Reading):
                            after.append(m)
        exc: BaseException = info.value
        while isinstance(exc, BaseExceptionGroup) and len(exc.exceptions) == 1:
            exc = exc.exceptions[0]  # as the device task unwraps it
        assert isinstance(exc, BindingError) and exc.temporary, exc
        good = [r for r in after if r.quality is Quality.GOOD]
        assert after[-1].quality is Quality.STALE and after[-1].point == "counter"
        assert good and after[-1].value == good[-1].value  # the last good value again
    finally:
        await b.close()
        if p.proc.poll() is None:
            p.proc.kill()
    port = endpoint.rsplit(":", 1)[1].split("/")[0]
    proc = restart_on(port)
    try:
        await b.connect()
        (r,) = await b.read(["counter"])
        assert r.quality is Quality.GOOD
        await b.close()
    finally:
        proc.terminate()
        proc.wait(10)


async def test_backfill_after_an_engine_restart_starts_at_the_last_stored_value(
    peer: Peer, tmp_path: Path
) -> None:
    from runtime.helpers import apply, fast_config, running_engine, site

    from twin.registry import open_registry
    from twin.runtime.timeseries_service import TimeSeriesService
    from twin.timeseries.base import Selector

    opts = options(peer.endpoint, points={"temperature": {"node": "ns=2;s=Boiler.Temperature"}})
    device = {
        "apiVersion": "flux.iot/v1", "kind": "Device",
        "metadata": {"name": "boiler_01", "site": "plant-a"},
        "spec": {"type": "industrial", "binding": {"opcua": opts},
                 "heartbeat": {"interval": "1s", "timeout": "5s"}},
    }
    reg = open_registry(None, tmp_path / "state")
    apply(reg, site(), device)

    def stored(svc: TimeSeriesService | None) -> list[float]:
        from twin.timeseries.factory import open_store

        store = svc.store if svc is not None else open_store(None, tmp_path)
        assert store is not None
        try:
            t = store.read_raw(Selector.of(devices=["boiler_01"]), 0, time.time() + 10)
        finally:
            if svc is None:
                store.close()
        return sorted(x.timestamp() for x in t.column("ts").to_pylist())

    svc = TimeSeriesService(flush_interval=0.1)
    async with running_engine(reg, fast_config(state_dir=tmp_path), [svc]):
        with trio.fail_after(20):
            while len(await trio.to_thread.run_sync(stored, svc)) < 5:  # noqa: ASYNC110
                await trio.sleep(0.2)
    last = (await trio.to_thread.run_sync(stored, None))[-1]  # what the first engine stored
    await trio.sleep(1.5)  # the engine is down; the server keeps historizing (every 0.1 s)
    svc = TimeSeriesService(flush_interval=0.1)
    async with running_engine(reg, fast_config(state_dir=tmp_path), [svc]) as engine:
        with trio.fail_after(20):
            while True:
                task = engine.controller.tasks.get("boiler_01")
                b = task.binding if task is not None else None
                if isinstance(b, OpcUaBinding) and b.backfilled >= 5:
                    break
                await trio.sleep(0.1)
        with trio.fail_after(20):
            while True:
                ts = await trio.to_thread.run_sync(stored, svc)
                gap = [t for t in ts if last < t < last + 1.4]
                if len(gap) >= 5:
                    break
                await trio.sleep(0.2)
        assert min(t for t in ts if t > last) - last < 0.5  # no hole after the last stored value
    reg.close()


async def test_deadband_filters_small_changes(peer: Peer) -> None:
    """An absolute deadband wider than the variable's swing: the server sends the first value
    only, while a point without deadband keeps changing."""
    opts = options(peer.endpoint, points={
        "temperature": {"node": "ns=2;s=Boiler.Temperature", "deadband": 1000},
        "counter": {"node": "ns=2;s=Boiler.Counter"},
    })
    b = OpcUaBinding("boiler", opts)
    await b.connect()
    try:
        msgs = await collect(b, lambda g: len(readings(g, "counter")) >= 10)
    finally:
        await b.close()
    assert len(readings(msgs, "temperature")) == 1
