"""The engine as an OPC UA server: a plain asyncua client (another process's view: its own
asyncio loop in a thread) logs in with an engine user, browses the twins, reads and
subscribes to live values, and calls a method that becomes a ledger command, allowed or
refused by the policy."""

from __future__ import annotations

import asyncio
import socket
import threading
from pathlib import Path
from typing import Any

import pytest
import trio

from runtime.helpers import apply, fast_config, model, running_engine, sim_device, site
from twin.control.service import ControlService
from twin.registry import open_registry
from twin.registry.base import User
from twin.registry.credentials import hash_secret
from twin.runtime.opcua_service import OpcUaServerService


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def in_asyncio(coro_fn: Any) -> Any:
    """Run an asyncua client in a thread with its own loop (like a SCADA in another process)."""
    out: dict[str, Any] = {}

    def go() -> None:
        try:
            out["value"] = asyncio.run(coro_fn())
        except BaseException as exc:  # handed back to the test
            out["error"] = exc

    t = threading.Thread(target=go)
    t.start()
    return t, out


async def join(t: threading.Thread, out: dict[str, Any]) -> Any:
    await trio.to_thread.run_sync(t.join, 60)
    if "error" in out:
        raise out["error"]
    return out["value"]


async def test_scada_reads_subscribes_and_calls(tmp_path: Path) -> None:
    from asyncua import Client, ua

    reg = open_registry(None, tmp_path / "state")
    fan = model(
        "fan",
        telemetry={"current": {"type": "number"}},
        properties={"power": {"type": "boolean", "access": "readwrite"}},
        commands={"set_state": {"params": {"type": "object", "required": ["state"],
                                           "properties": {"state": {"type": "boolean"}}}}},
    )
    apply(reg, site(), site("plant-b"), fan,
          sim_device("fan_01", model_="fan", type_="actuator", interval="100ms",
                     points={"current": {"wave": "constant", "value": 1.5}}),
          sim_device("fan_02", site_="plant-b", model_="fan", type_="actuator",
                     interval="100ms", points={"current": {"wave": "constant", "value": 2}}))
    reg.put_user(User("op", hash_secret("pw-op"), "operator", ("plant-a",)))
    reg.put_user(User("viewer", hash_secret("pw-v"), "viewer"))
    port = free_port()
    svc = OpcUaServerService(("127.0.0.1", port), policies=["None"])  # None: declared
    control = ControlService(reconcile_interval=0.1)
    url = f"opc.tcp://127.0.0.1:{port}/flux/"
    async with running_engine(reg, fast_config(state_dir=tmp_path), [control, svc]) as engine:
        assert engine.service_info["opcua-server"]["endpoint"] == url

        async def scada() -> dict[str, Any]:
            res: dict[str, Any] = {}
            c = Client(url)
            c.set_user("op")
            c.set_password("pw-op")
            async with c:
                fan1 = await c.nodes.objects.get_child(["2:Sites", "2:plant-a", "2:fan_01"])
                cur = await fan1.get_child("2:current")
                for _ in range(50):  # the first reading arrives within a few ticks
                    dv = await cur.read_data_value(raise_on_bad_status=False)
                    if dv.StatusCode.is_good():
                        break
                    await asyncio.sleep(0.1)
                res["current"] = dv.Value.Value
                res["ts"] = dv.SourceTimestamp
                status = await fan1.get_child("2:_status")
                for _ in range(50):  # statuses are published every half second
                    res["status"] = await status.read_value()
                    if res["status"] == "online":
                        break
                    await asyncio.sleep(0.1)
                got: list[Any] = []

                class H:
                    def datachange_notification(self, node: Any, val: Any, data: Any) -> None:
                        got.append(val)

                sub = await c.create_subscription(100, H())
                await sub.subscribe_data_change(cur)
                for _ in range(50):
                    if got:
                        break
                    await asyncio.sleep(0.1)
                res["notified"] = list(got)
                res["call"] = await fan1.call_method("2:set_state", ua.Variant(True))
                fan2 = c.get_node("ns=2;s=fan_02")  # another site: refused by the policy
                try:
                    await fan2.call_method("2:set_state", ua.Variant(True))
                except ua.UaStatusCodeError as exc:
                    res["other_site"] = type(exc).__name__
                try:
                    await cur.write_value(9.9)
                except ua.UaStatusCodeError as exc:
                    res["write"] = type(exc).__name__
            return res

        t, out = in_asyncio(scada)
        res = await join(t, out)
        assert res["current"] == 1.5 and res["ts"] is not None
        assert res["status"] == "online"
        assert 1.5 in res["notified"]
        assert res["call"] == '{"ok": true}'  # the command's result (JSON)
        assert res["other_site"] == "BadUserAccessDenied"
        assert res["write"] == "BadUserAccessDenied"
        ledger = control.ledger
        assert ledger is not None
        cmds = [c for c in ledger.commands.values() if c.source == "opcua:op"]
        assert [(c.device, c.type, c.params, str(c.status)) for c in cmds] == [
            ("fan_01", "set_state", {"state": True}, "success")]

        async def wrong_password() -> str:
            c = Client(url)
            c.set_user("op")
            c.set_password("nope")
            try:
                async with c:
                    return "connected"
            except Exception as exc:
                return type(exc).__name__

        async def anonymous() -> str:
            try:
                async with Client(url):
                    return "connected"
            except Exception as exc:
                return type(exc).__name__

        for fn in (wrong_password, anonymous):
            t, out = in_asyncio(fn)
            assert await join(t, out) != "connected"

        # a new revision without fan_02 and with fan_03: the address space follows
        apply(reg, site(), site("plant-b"), fan,
              sim_device("fan_01", model_="fan", type_="actuator", interval="100ms",
                         points={"current": {"wave": "constant", "value": 1.5}}),
              sim_device("fan_03", model_="fan", type_="actuator", interval="100ms",
                         points={"current": {"wave": "constant", "value": 3}}))

        async def browse() -> list[str]:
            c = Client(url)
            c.set_user("op")
            c.set_password("pw-op")
            async with c:
                names = []
                for folder in await (await c.nodes.objects.get_child("2:Sites")).get_children():
                    for dev in await folder.get_children():
                        names.append((await dev.read_browse_name()).Name)
                return sorted(names)

        with trio.fail_after(20):
            while True:
                t, out = in_asyncio(browse)
                if await join(t, out) == ["fan_01", "fan_03"]:
                    break
                await trio.sleep(0.2)
    reg.close()


def make_cert(tmp: Path, name: str, uri: str) -> tuple[Path, Path]:
    """A self-signed RSA-2048 application certificate and key (PEM files), made with
    cryptography as any OPC UA client vendor's tool would."""
    import datetime as dt

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import rsa
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder().subject_name(subject).issuer_name(subject)
        .public_key(key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(hours=1)).not_valid_after(now + dt.timedelta(days=30))
        .add_extension(x509.SubjectAlternativeName([x509.UniformResourceIdentifier(uri),
                                                    x509.DNSName("localhost")]), critical=False)
        .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=True,
                                     key_encipherment=True, data_encipherment=True,
                                     key_agreement=False, key_cert_sign=False, crl_sign=False,
                                     encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH,
                                              ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = tmp / f"{name}.pem", tmp / f"{name}-key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                           serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return cert_path, key_path


async def test_basic256sha256_with_certificates_from_secrets(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The server's certificate and key come from secrets; it offers Basic256Sha256 Sign and
    SignAndEncrypt only (None not declared). A client whose certificate is in the trust
    directory connects in both modes and logs in as an engine user; a client with another
    certificate, and a client without security, are refused."""
    import shutil

    from asyncua import Client, ua
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    srv_cert, srv_key = make_cert(tmp_path, "engine", "urn:flux-iot:engine")
    cli_cert, cli_key = make_cert(tmp_path, "scada", "urn:example:scada")
    bad_cert, bad_key = make_cert(tmp_path, "intruder", "urn:example:scada")
    trust = tmp_path / "trusted"
    trust.mkdir()
    shutil.copy(cli_cert, trust / "scada.pem")
    monkeypatch.setenv("TWIN_SECRET_OPCUA_CERT", srv_cert.read_text())
    monkeypatch.setenv("TWIN_SECRET_OPCUA_KEY", srv_key.read_text())
    reg = open_registry(None, tmp_path / "state")
    apply(reg, site(), model(), sim_device("t_01", interval="100ms",
                                           points={"temperature": {"wave": "constant", "value": 4.5}}))
    reg.put_user(User("op", hash_secret("pw-op"), "operator", ("plant-a",)))
    port = free_port()
    url = f"opc.tcp://127.0.0.1:{port}/flux/"
    svc = OpcUaServerService(("127.0.0.1", port), certificate_secret="opcua/cert",
                             key_secret="opcua/key", trust_dir=trust)
    async with running_engine(reg, fast_config(state_dir=tmp_path), [svc]) as engine:
        assert engine.service_info["opcua-server"]["security"] == [
            "Basic256Sha256_SignAndEncrypt", "Basic256Sha256_Sign"]

        async def endpoints() -> list[tuple[str, int, bytes]]:
            c = Client(url)
            eps = await c.connect_and_get_server_endpoints()
            return [(e.SecurityPolicyUri.rsplit("#", 1)[-1], int(e.SecurityMode),
                     bytes(e.ServerCertificate)) for e in eps]

        def secure(mode: str, cert: Path = cli_cert, key: Path = cli_key) -> Any:
            async def read() -> Any:
                c = Client(url)
                c.application_uri = "urn:example:scada"
                await c.set_security_string(f"Basic256Sha256,{mode},{cert},{key}")
                c.set_user("op")
                c.set_password("pw-op")
                async with c:
                    node = c.get_node("ns=2;s=t_01.temperature")
                    for _ in range(50):
                        dv = await node.read_data_value(raise_on_bad_status=False)
                        if dv.StatusCode.is_good():
                            return dv.Value.Value
                        await asyncio.sleep(0.1)
                    return None
            return read

        async def plain() -> str:
            c = Client(url)
            c.set_user("op")
            c.set_password("pw-op")
            try:
                async with c:
                    return "connected"
            except Exception as exc:
                return type(exc).__name__

        t, out = in_asyncio(endpoints)
        eps = await join(t, out)
        der = x509.load_pem_x509_certificate(srv_cert.read_bytes()).public_bytes(
            serialization.Encoding.DER)
        assert {(p, m) for p, m, _ in eps} == {
            ("Basic256Sha256", int(ua.MessageSecurityMode.Sign)),
            ("Basic256Sha256", int(ua.MessageSecurityMode.SignAndEncrypt))}
        assert {c for _, _, c in eps} == {der}  # the certificate from the secret
        for mode in ("SignAndEncrypt", "Sign"):
            t, out = in_asyncio(secure(mode))
            assert await join(t, out) == 4.5
        t, out = in_asyncio(plain)
        assert await join(t, out) != "connected"
        t, out = in_asyncio(secure("SignAndEncrypt", bad_cert, bad_key))
        with pytest.raises(Exception) as refused:  # asyncua refuses it in its own words
            await join(t, out)
        assert "Untrusted" in repr(refused.value) or "SecurityChecks" in repr(refused.value), (
            refused.value)
    reg.close()


def test_security_settings(tmp_path: Path) -> None:
    """Without certificate secrets a self-signed certificate is made once in the state
    directory (key 0600) and reused; None is offered only when listed; typos are refused."""
    import stat

    from twin.errors import TwinError
    from twin.runtime.opcua_security import server_security

    a = server_security(state_dir=tmp_path)
    b = server_security(state_dir=tmp_path)
    assert a.secure and a.certificate and a.certificate == b.certificate
    assert "None" not in a.policies
    key = tmp_path / "opcua" / "server-key.pem"
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    assert server_security(["None"]).certificate is None
    with pytest.raises(TwinError, match="unknown security policy"):
        server_security(["Basic256"], state_dir=tmp_path)
    with pytest.raises(TwinError, match="needs its private key"):
        server_security(certificate_secret="x", state_dir=tmp_path)


@pytest.mark.parametrize("dummy", [0])
def test_describe(dummy: int) -> None:
    from twin.runtime.opcua_service import describe

    assert describe(None) is None
    assert "opc.tcp://h:1/flux/" in str(describe({"endpoint": "opc.tcp://h:1/flux/"}))
