"""The engine's CoAP server with real peers: libcoap's coap-client (plain and DTLS-PSK) and
aiocoap's client (CBOR, Observe, block-wise): readings in, commands and desired values out,
device-key auth, malformed packets dropped without affecting others, a taken port."""

from __future__ import annotations

import asyncio
import json
import shutil
import socket
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import trio

from runtime.helpers import apply, fast_config, model, running_engine, site
from twin.bindings import aio
from twin.control.ledger import SET, CommandStatus
from twin.control.service import ControlService
from twin.errors import PortInUseError
from twin.registry import open_registry
from twin.registry.credentials import create_device_key
from twin.runtime.coap_service import CoapService

COAP_CLIENT = shutil.which("coap-client-notls") or shutil.which("coap-client")
COAPS_CLIENT = shutil.which("coap-client-openssl") or shutil.which("coap-client-gnutls")
needs_libcoap = pytest.mark.skipif(COAP_CLIENT is None, reason="libcoap3-bin not installed")


def free_udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def meter(name: str, **coap: Any) -> dict[str, Any]:
    return {
        "apiVersion": "flux.iot/v1",
        "kind": "Device",
        "metadata": {"name": name, "site": "plant-a"},
        "spec": {
            "type": "sensor",
            "model": "meter",
            "binding": {"coap": coap},
            "heartbeat": {"interval": "1s", "timeout": "30s"},
        },
    }


METER = model(
    "meter",
    telemetry={"temperature": {"type": "number"}, "energy": {"type": "number"}},
    properties={"sampling_rate": {"type": "integer", "access": "readwrite"}},
    commands={"reboot": {"timeout": "10s"}, "fail": {}},
)


class Stack:
    def __init__(self, engine: Any, svc: CoapService, control: ControlService, keys: dict[str, str],
                 port: int, dtls_port: int) -> None:
        self.engine, self.svc, self.control, self.keys = engine, svc, control, keys
        self.port, self.dtls_port = port, dtls_port

    def url(self, path: str, device: str | None = "meter_01", key: str | None = None) -> str:
        k = key if key is not None else (self.keys[device] if device else "")
        q = f"?k={k}" if k else ""
        return f"coap://127.0.0.1:{self.port}{path}{q}"

    def reported(self, device: str, point: str) -> Any:
        twin = self.engine.twin(device)
        rv = twin.reported.get(point) if twin is not None else None
        return None if rv is None else rv.value

    async def wait_reported(self, device: str, point: str, value: Any) -> None:
        """The device task handles what the server accepted right after the 2.04."""
        with trio.fail_after(10):
            while self.reported(device, point) != value:  # noqa: ASYNC110
                await trio.sleep(0.01)


@asynccontextmanager
async def coap_stack(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[Stack]:
    monkeypatch.setenv("TWIN_SECRET_METER_PSK", "sesame-1234")
    monkeypatch.setenv("TWIN_SECRETS_FILE", str(tmp_path / "none.yaml"))
    reg = open_registry(None, tmp_path / "state")
    apply(reg, site(), METER, meter("meter_01"), meter("meter_02"),
          meter("meter_03", psk={"secret": "meter/psk"}))
    keys = {d: create_device_key(reg, d)[1] for d in ("meter_01", "meter_02")}
    port, dtls_port = free_udp_port(), free_udp_port()
    svc = CoapService(("127.0.0.1", port), ("127.0.0.1", dtls_port))
    control = ControlService(reconcile_interval=0.1)
    async with running_engine(reg, fast_config(state_dir=tmp_path), [control, svc]) as engine:
        with trio.fail_after(10):
            while not all(svc.hub.running(d) for d in ("meter_01", "meter_02", "meter_03")):  # noqa: ASYNC110
                await trio.sleep(0.02)
        yield Stack(engine, svc, control, keys, port, dtls_port)
    reg.close()


async def coap_client(*args: str, tool: str | None = None) -> tuple[str, str]:
    exe = tool or COAP_CLIENT
    assert exe is not None
    with trio.fail_after(20):
        r = await trio.run_process([exe, *args], capture_stdout=True, capture_stderr=True,
                                   check=False)
    return r.stdout.decode().strip(), r.stderr.decode().strip()


async def aiocoap_request(method: str, uri: str, payload: bytes = b"", ct: int | None = None,
                          accept: int | None = None) -> tuple[str, bytes, int | None]:
    async def go() -> tuple[str, bytes, int | None]:
        from aiocoap import Code, Context, Message

        ctx = await Context.create_client_context()
        try:
            msg = Message(code=getattr(Code, method), uri=uri, payload=payload)
            if ct is not None:
                msg.opt.content_format = ct
            if accept is not None:
                msg.opt.accept = accept
            resp = await asyncio.wait_for(ctx.request(msg).response, 10)
            return str(resp.code), resp.payload, resp.opt.content_format
        finally:
            await ctx.shutdown()

    return await aio.run(go)


@needs_libcoap
async def test_readings_in_with_coap_client_and_discovery(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with coap_stack(tmp_path, monkeypatch) as s:
        out, err = await coap_client("-m", "post", "-t", "50", "-e",
                                     '{"temperature": 21.5, "energy": 10}', s.url("/d/meter_01"))
        assert json.loads(out) == {"accepted": 2}, err
        await s.wait_reported("meter_01", "temperature", 21.5)
        # the full ingest body, with an explicit timestamp, by PUT
        body = '{"readings": [{"point": "energy", "value": 11.5, "ts": 1700000000}]}'
        out, _ = await coap_client("-m", "put", "-e", body, s.url("/d/meter_01"))
        assert json.loads(out) == {"accepted": 1}
        await s.wait_reported("meter_01", "energy", 11.5)
        twin = s.engine.twin("meter_01")
        assert twin.reported["energy"].ts == 1700000000.0
        # discovery lists each running push device's resources
        out, _ = await coap_client("-m", "get", s.url("/.well-known/core", device=None))
        assert '</d/meter_01>;rt="flux.readings"' in out
        assert '</d/meter_03/cmd>;rt="flux.commands";ct="50 60";obs' in out
        # a wrong key, another device's key, no key: 4.01, nothing taken
        for url in (s.url("/d/meter_01", key="dk_nope_nope"),
                    s.url("/d/meter_01", key=s.keys["meter_02"]),
                    f"coap://127.0.0.1:{s.port}/d/meter_01"):
            out, err = await coap_client("-m", "post", "-e", '{"temperature": 99}', url)
            assert err.startswith("4.01"), (out, err)
        await s.wait_reported("meter_01", "temperature", 21.5)
        assert s.svc.stats.unauthorized == 3
        metrics = s.engine.prom.render().decode()
        assert 'twin_protocol_requests_total{binding="coap"}' in metrics
        assert 'twin_protocol_request_seconds_count{binding="coap"}' in metrics


@needs_libcoap
async def test_malformed_payloads_are_refused_and_others_keep_working(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with coap_stack(tmp_path, monkeypatch) as s:
        bad = [
            ("50", "{not json", "4.00"),
            ("50", '{"temperature": 1e400}', "4.00"),  # not finite: refused at the edge
            ("50", '{"temperature": "' + "x" * 20000 + '"}', "4.00"),
            ("50", '{"bad point!": 1}', "4.00"),
            ("42", "raw bytes", "4.15"),
        ]
        for ct, body, code in bad:
            _, err = await coap_client("-m", "post", "-t", ct, "-b", "512", "-e", body,
                                       s.url("/d/meter_01"))
            assert err.startswith(code), (body[:40], err)
        assert s.svc.stats.malformed == 4 + 1
        # a datagram that is not CoAP at all, then a valid request: answered
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            sock.sendto(b"\xff\x00garbage" * 10, ("127.0.0.1", s.port))
            sock.sendto(b"", ("127.0.0.1", s.port))
        out, _ = await coap_client("-m", "post", "-e", '{"temperature": 20}', s.url("/d/meter_02",
                                   device="meter_02"))
        assert json.loads(out) == {"accepted": 1}
        await s.wait_reported("meter_02", "temperature", 20)
        assert s.reported("meter_01", "temperature") is None
        # unknown resources and methods
        _, err = await coap_client("-m", "get", s.url("/d/meter_01"))
        assert err.startswith("4.05")
        _, err = await coap_client("-m", "get", s.url("/nothing", device=None))
        assert err.startswith("4.04")


@needs_libcoap
async def test_blockwise_upload_and_cbor(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import cbor2

    async with coap_stack(tmp_path, monkeypatch) as s:
        readings = [{"point": "energy", "value": float(i), "ts": 1700000000 + i} for i in range(60)]
        body = json.dumps({"readings": readings})
        assert len(body) > 3000
        out, err = await coap_client("-m", "post", "-b", "64", "-e", body, s.url("/d/meter_01"))
        assert json.loads(out) == {"accepted": 60}, err
        await s.wait_reported("meter_01", "energy", 59.0)
        # CBOR in, CBOR out (aiocoap's client)
        code, payload, ct = await aiocoap_request(
            "POST", s.url("/d/meter_01"), cbor2.dumps({"temperature": 19.25}), ct=60
        )
        assert code.startswith("2.04") and ct == 60 and cbor2.loads(payload) == {"accepted": 1}
        await s.wait_reported("meter_01", "temperature", 19.25)
        code, payload, _ = await aiocoap_request("POST", s.url("/d/meter_01"), b"\xa1\x01", 60)
        assert code.startswith("4.00")


async def test_observe_commands_and_desired(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A device observes its /cmd resource (aiocoap client), answers a command submitted to
    the ledger, and reports a desired value; long state arrives block-wise."""
    async with coap_stack(tmp_path, monkeypatch) as s:
        ledger = s.control.ledger
        assert ledger is not None
        url = s.url("/d/meter_01/cmd")
        push, notes = aio.channel(64)

        async def observe() -> None:
            from aiocoap import Code, Context, Message

            ctx = await Context.create_client_context()
            try:
                req = ctx.request(Message(code=Code.GET, uri=url, observe=0))
                first = await req.response
                push(json.loads(first.payload))
                async for resp in req.observation:
                    push(json.loads(resp.payload))
            finally:
                await ctx.shutdown()

        async with trio.open_nursery() as n:
            n.start_soon(aio.run, observe)
            with trio.fail_after(10):
                assert await notes.receive() == {"desired": {}, "commands": []}
            cmd = await ledger.submit("meter_01", "reboot", {}, source="test")
            with trio.fail_after(10):
                while True:
                    state = await notes.receive()
                    if state["commands"]:
                        break
            (pending,) = state["commands"]
            assert pending["name"] == "reboot" and pending["id"] == cmd.id
            answer = json.dumps({"id": cmd.id, "status": "success", "result": {"up": True}})
            code, _, _ = await aiocoap_request("POST", url, answer.encode(), 50)
            assert code.startswith("2.04")
            done = await ledger.wait(cmd.id)
            assert done.status is CommandStatus.SUCCESS and done.result == {"up": True}
            # a failing answer fails the command; an answer to nothing is 4.04
            cmd = await ledger.submit("meter_01", "fail", {}, source="test")
            with trio.fail_after(10):
                while not (await notes.receive())["commands"]:
                    pass
            answer = json.dumps({"id": cmd.id, "status": "failure", "error": "no"})
            await aiocoap_request("POST", url, answer.encode(), 50)
            assert (await ledger.wait(cmd.id)).status is CommandStatus.FAILED
            code, _, _ = await aiocoap_request("POST", url, b'{"id": "zzz"}', 50)
            assert code.startswith("4.04")
            # desired state: a set through the ledger shows up, and goes when reported
            cmd = await ledger.submit("meter_01", SET, {"property": "sampling_rate", "value": 7},
                                      source="test")
            assert (await ledger.wait(cmd.id)).status is CommandStatus.SUCCESS
            with trio.fail_after(10):
                while (await notes.receive())["desired"] != {"sampling_rate": 7}:
                    pass
            code, _, _ = await aiocoap_request("POST", s.url("/d/meter_01"),
                                               b'{"sampling_rate": 7}', 50)
            with trio.fail_after(10):
                while (await notes.receive())["desired"] != {}:
                    pass
            n.cancel_scope.cancel()
        # block2: a state longer than one block (a big command parameter) is fetched whole
        hub = s.svc.hub
        async with trio.open_nursery() as n:
            n.start_soon(hub.command, "meter_02", "reboot", {"note": "z" * 3000}, 5.0)
            await trio.sleep(0.1)
            if COAP_CLIENT:
                out, err = await coap_client("-m", "get", "-b", "64",
                                             s.url("/d/meter_02/cmd", device="meter_02"))
                assert json.loads(out)["commands"][0]["params"]["note"] == "z" * 3000, err
            code, payload, _ = await aiocoap_request(
                "GET", s.url("/d/meter_02/cmd", device="meter_02"))
            assert json.loads(payload)["commands"][0]["params"]["note"] == "z" * 3000
            n.cancel_scope.cancel()


@pytest.mark.skipif(COAPS_CLIENT is None, reason="libcoap3-bin (DTLS clients) not installed")
async def test_dtls_psk(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    async with coap_stack(tmp_path, monkeypatch) as s:
        url = f"coaps://127.0.0.1:{s.dtls_port}/d/meter_03"
        out, err = await coap_client("-m", "post", "-u", "meter_03", "-k", "sesame-1234", "-e",
                                     '{"temperature": 22.5}', url, tool=COAPS_CLIENT)
        assert json.loads(out) == {"accepted": 1}, err
        await s.wait_reported("meter_03", "temperature", 22.5)
        # the PSK session is meter_03's: it does not authenticate another device
        url = f"coaps://127.0.0.1:{s.dtls_port}/d/meter_01"
        out, err = await coap_client("-m", "post", "-u", "meter_03", "-k", "sesame-1234", "-e",
                                     '{"temperature": 1}', url, tool=COAPS_CLIENT)
        assert "4.01" in out + err
        # a wrong key: no session, nothing taken
        out, err = await coap_client("-m", "post", "-B", "3", "-u", "meter_03", "-k", "wrong",
                                     "-e", '{"temperature": 2}', url, tool=COAPS_CLIENT)
        assert "accepted" not in out
        await s.wait_reported("meter_03", "temperature", 22.5)


async def test_a_taken_port_is_one_clear_error() -> None:
    with socket.socket(socket.AF_INET6, socket.SOCK_DGRAM) as sock:
        sock.bind(("::", 0))
        port = sock.getsockname()[1]
        svc = CoapService(("127.0.0.1", port))

        class _Eng:
            runtime = type("R", (), {"binding_context": object()})()
            registry = None

        with pytest.raises(PortInUseError, match=f"127.0.0.1:{port} is already in use"):
            await svc(_Eng())  # type: ignore[arg-type]


def test_twin_up_with_a_taken_coap_port_says_so(tmp_path: Path) -> None:
    import subprocess
    import sys

    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
        r = subprocess.run(
            [sys.executable, "-m", "twin.cli.main", "--state-dir", str(tmp_path / "st"), "up",
             "--listen", "127.0.0.1:0", "--mqtt-listen", "127.0.0.1:0",
             "--coap-listen", f"127.0.0.1:{port}"],
            capture_output=True, text=True, timeout=60, check=False,
        )
    assert r.returncode == 1
    lines = r.stderr.strip().splitlines()
    assert lines == [
        f"error: coap: address 127.0.0.1:{port} is already in use",
        "hint: pick another with --coap-listen HOST:PORT (port 0 picks a free one)",
    ]


# -- the coap binding's client modes: the device is a CoAP server -------------------------------
@pytest.fixture
def device_server() -> Any:
    import subprocess
    import sys

    port = free_udp_port()
    proc = subprocess.Popen(
        [sys.executable, str(Path(__file__).with_name("coap_device_server.py")), str(port)],
        stdout=subprocess.PIPE, text=True,
    )
    assert proc.stdout is not None and proc.stdout.readline().startswith("ready")
    yield f"coap://127.0.0.1:{port}"
    proc.terminate()
    proc.wait(10)


async def test_client_modes_poll_observe_write_command(device_server: str) -> None:
    from twin.bindings.base import Message, Reading
    from twin.bindings.coap import CoapBinding
    from twin.errors import BindingError, CommandError

    base = device_server
    opts = {"mode": "poll", "url": f"{base}/sensors", "interval": "100ms",
            "points": {"temperature": {"path": "t"}, "humidity": {"path": "rh"},
                       "missing": {"path": "nope"}},
            "write_url": f"{base}/config", "command_url": f"{base}/cmd", "timeout": "2s"}
    b = CoapBinding("dev", opts)
    await b.connect()
    try:
        readings = {r.point: r for r in await b.read()}
        assert readings["humidity"].value == 40
        assert isinstance(readings["temperature"].value, float)
        assert readings["missing"].value is None and str(readings["missing"].quality) == "bad"
        await b.write("mode", "eco")
        assert await b.send_command("reboot", {}) == {"done": "reboot"}
        with pytest.raises(CommandError, match=r"4\.00"):
            await b.send_command("fail", {})
    finally:
        await b.close()
    # read quality when polling: a value older than 3 poll intervals is stale; a poll that
    # fails re-reports the last good values as stale, then ends the session
    from twin.bindings.base import BindingContext, Quality

    late = CoapBinding("dev", {**opts, "points": {"temperature": {"path": "t"}}},
                       BindingContext(clock=lambda: time.time() + 10))
    await late.connect()
    try:
        (old,) = await late.read()
        assert old.quality is Quality.STALE and isinstance(old.value, float)
    finally:
        await late.close()
    b = CoapBinding("dev", {**opts, "points": {"humidity": {"path": "rh"}}, "timeout": "300ms"})
    await b.connect()
    sent: list[Message] = []
    try:
        (good,) = await b.read()
        assert good.quality is Quality.GOOD and good.value == 40
        b.url = f"coap://127.0.0.1:{free_udp_port()}/sensors"  # nobody answers there
        send, recv = trio.open_memory_channel[Message](100)
        with pytest.raises(BindingError, match=r"GET .*sensors"):  # unreachable or timed out
            await b.subscribe(send)
        send.close()
        sent = [m async for m in recv]
    finally:
        await b.close()
    assert [(r.point, r.value, r.quality) for r in sent if isinstance(r, Reading)] == [
        ("humidity", 40, Quality.STALE)]
    # observe: notifications pushed by the device, values rising
    b = CoapBinding("dev", {**opts, "mode": "observe", "points": {"temperature": {"path": "t"},
                                                                  "mode": {"path": "mode"}}})
    await b.connect()
    got: list[Reading] = []
    send, recv = trio.open_memory_channel[Message](100)
    async with trio.open_nursery() as n:
        n.start_soon(b.subscribe, send)
        with trio.fail_after(10):
            async for m in recv:
                if isinstance(m, Reading) and m.point == "temperature":
                    got.append(m)
                    if len(got) >= 4:
                        break
        n.cancel_scope.cancel()
    await b.close()
    temps = [r.value for r in got]
    assert temps == sorted(temps) and len(set(temps)) >= 3
    # a malformed answer is an error of that read, not a crash
    b = CoapBinding("dev", {"mode": "poll", "url": f"{base}/junk", "timeout": "2s"})
    await b.connect()
    try:
        with pytest.raises(BindingError, match="not JSON"):
            await b.read()
        assert b.refused == 1
    finally:
        await b.close()


def test_validate_locates_coap_mistakes(tmp_path: Path) -> None:
    from twin.errors import SpecError
    from twin.spec import load_site

    (tmp_path / "site.yaml").write_text("""\
apiVersion: flux.iot/v1
kind: Site
metadata: {name: plant-x}
spec: {timezone: UTC}
---
apiVersion: flux.iot/v1
kind: Device
metadata: {name: m1, site: plant-x}
spec: {type: sensor, binding: {coap: {mode: poll}}}
---
apiVersion: flux.iot/v1
kind: Device
metadata: {name: m2, site: plant-x}
spec: {type: sensor, binding: {coap: {url: "coap://10.0.0.5/s", psk: "inline"}}}
---
apiVersion: flux.iot/v1
kind: Device
metadata: {name: m3, site: plant-x}
spec: {type: sensor, binding: {coap: {mode: observe, url: "http://x/"}}}
---
apiVersion: flux.iot/v1
kind: Device
metadata: {name: ok, site: plant-x}
spec: {type: sensor, binding: {coap: {mode: observe, url: "coap://10.0.0.5/s", format: cbor,
       points: {t: {path: a.b}}}}}
""")
    with pytest.raises(SpecError) as info:
        load_site(tmp_path)
    text = "\n".join(str(p) for p in info.value.problems)
    assert "site.yaml:9:" in text and "Device m1: spec.binding.coap" in text and "'url'" in text
    assert "Device m2: spec.binding.coap.psk" in text  # a secret reference, never inline
    assert "Device m3: spec.binding.coap.url" in text and "coap:// URL" in text
    assert "Device ok" not in text
