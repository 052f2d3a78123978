"""The uplink over TLS with per-edge keys: HTTPS and MQTT over TLS against a CA the test makes
(``cryptography``) — readings stored in the cloud, the revision synced down, a command queued
in the cloud run by the edge and its result back up; a certificate from another CA, a wrong
edge key and a certificate with the wrong key are each one clear error."""

from __future__ import annotations

import datetime
import ipaddress
import ssl
from pathlib import Path
from typing import Any

import pytest
import trio
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from runtime.helpers import fast_config

from twin.api.server import ApiService, check_tls
from twin.control.service import ControlService
from twin.edge.agent import EdgeAgent
from twin.edge.cloud import EdgeCloud, link_device
from twin.errors import TwinError
from twin.registry import open_registry
from twin.registry.credentials import create_device_key
from twin.runtime.engine import Engine
from twin.runtime.mqtt_service import MqttService, MqttServiceConfig
from twin.runtime.timeseries_service import TimeSeriesService
from twin.spec import load_site
from twin.spec.apply import apply_specs

from .harness import until
from .tinymodel import build

pytest.importorskip("onnx")

SITE = """\
apiVersion: flux.iot/v1
kind: Site
metadata: {name: remote}
---
apiVersion: flux.iot/v1
kind: Device
metadata: {name: meter, site: remote}
spec:
  type: sensor
  binding: {sim: {interval: 100ms, points: {level: {wave: random_walk, min: 0, max: 10}}}}
---
apiVersion: flux.iot/v1
kind: DeviceModel
metadata: {name: fan-model}
spec:
  properties: {power: {type: boolean, access: readwrite, default: false}}
  commands:
    set_state:
      params: {type: object, required: [state], properties: {state: {type: boolean}}}
      sets: {power: {param: state}}
---
apiVersion: flux.iot/v1
kind: Device
metadata: {name: fan, site: remote}
spec:
  type: actuator
  model: fan-model
  binding: {sim: {interval: 1s, points: {}}}
---
apiVersion: flux.iot/v1
kind: Model
metadata: {name: brightness}
spec:
  file: MODEL
  input: {shape: [1, 3, 18, 32]}
  labels: [dark, bright]
---
apiVersion: flux.iot/v1
kind: EdgeNode
metadata: {name: gw-s, site: remote}
spec:
  devices: {names: [meter, fan]}
  models: [brightness]
  uplink: {url: "https://127.0.0.1:1", interval: 50ms, timeout: 2s,
           backoff: {initial: 100ms, max: 500ms}, sync: 500ms}
"""


def _key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())  # fmt: skip


def _ca(tmp: Path, name: str) -> tuple[Path, x509.Certificate, ec.EllipticCurvePrivateKey]:
    key = _key()
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder().subject_name(subject).issuer_name(subject)
        .public_key(key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .sign(key, hashes.SHA256())
    )  # fmt: skip
    path = tmp / f"{name}.pem"
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return path, cert, key


def _server_cert(tmp: Path, ca: x509.Certificate, ca_key: ec.EllipticCurvePrivateKey) -> tuple[Path, Path]:
    """A server certificate for 127.0.0.1 and localhost, signed by the CA."""
    key = _key()
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "cloud")]))
        .issuer_name(ca.subject).public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([
            x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False)
        .sign(ca_key, hashes.SHA256())
    )  # fmt: skip
    cert_path, key_path = tmp / "server.pem", tmp / "server.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(_pem_key(key))
    return cert_path, key_path


@pytest.fixture
def pki(tmp_path: Path) -> dict[str, Path]:
    ca_path, ca, ca_key = _ca(tmp_path, "test-ca")
    other, _, _ = _ca(tmp_path, "other-ca")
    cert, key = _server_cert(tmp_path, ca, ca_key)
    stray = tmp_path / "stray.key"
    stray.write_bytes(_pem_key(_key()))
    return {"ca": ca_path, "other": other, "cert": cert, "key": key, "stray": stray}


async def _scenario(tmp_path: Path, pki: dict[str, Path], mqtt: bool) -> None:
    folder = tmp_path / "site"
    folder.mkdir()
    model = build(tmp_path / "m.onnx")
    (folder / "site.yaml").write_text(SITE.replace("MODEL", str(model)))
    loaded = load_site(folder)
    creg, ereg = open_registry(None, tmp_path / "cloud"), open_registry(None, tmp_path / "edge")
    try:
        for reg in (creg, ereg):
            apply_specs(reg, loaded, author="test")
        _, key = create_device_key(creg, link_device("gw-s"))
        cloud_edge = EdgeCloud(offline_after=2.0, check_interval=0.2)
        cloud_control = ControlService()
        services: list[Any] = [cloud_control, TimeSeriesService(), cloud_edge]
        if mqtt:
            ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            ctx.load_cert_chain(pki["cert"], pki["key"])
            services.append(MqttService(MqttServiceConfig(
                listen=[("127.0.0.1", 0)], tls_listen=[("127.0.0.1", 0)], ssl_context=ctx,
                sys_interval=0)))  # fmt: skip
        else:
            services.append(ApiService("127.0.0.1", 0, certfile=str(pki["cert"]),
                                       keyfile=str(pki["key"])))  # fmt: skip
        cloud = Engine(creg, fast_config(state_dir=tmp_path / "cloud"), services)
        async with trio.open_nursery() as n:
            await n.start(cloud.run)
            if mqtt:
                url = "mqtts://" + cloud.service_info["mqtt"]["tls"][0]
            else:
                url = cloud.service_info["api"]["url"]
                assert url.startswith("https://")

            # a certificate from another CA, a wrong key: clear errors, nothing sent
            wrong_ca = EdgeAgent("gw-s", url, key, verify=str(pki["other"]))
            wrong_key = EdgeAgent("gw-s", url, "dk_abcdefgh_" + "x" * 32, verify=str(pki["ca"]))
            for agent, state in ((wrong_ca, "e1"), (wrong_key, "e2")):
                edge = Engine(ereg, fast_config(state_dir=tmp_path / state, edge="gw-s"),
                              [ControlService(), TimeSeriesService(), agent])  # fmt: skip
                async with trio.open_nursery() as en:
                    await en.start(edge.run)

                    def failed(agent: EdgeAgent = agent) -> bool:
                        up = agent.uplink
                        return up is not None and up.failures > 0 and up.last_error is not None

                    await until(failed, "the uplink to fail")
                    assert agent.uplink is not None and not agent.uplink.online
                    error = agent.uplink.last_error or ""
                    if agent is wrong_ca:
                        assert "CERTIFICATE_VERIFY_FAILED" in error, error
                    elif mqtt:
                        assert "Bad user name or password" in error, error  # the broker checked it
                    else:
                        assert "401" in error and "invalid edge key" in error, error
                    en.cancel_scope.cancel()
            assert cloud_edge.link("gw-s").uploads == 0

            # the right CA and key: the edge's readings reach the cloud's store
            agent = EdgeAgent("gw-s", url, key, verify=str(pki["ca"]))
            edge = Engine(ereg, fast_config(state_dir=tmp_path / "edge", edge="gw-s"),
                          [ControlService(), TimeSeriesService(), agent])  # fmt: skip
            async with trio.open_nursery() as en:
                await en.start(edge.run)

                def stored() -> bool:
                    return cloud_edge.link("gw-s").received.get("telemetry", 0) >= 5

                await until(stored, "readings over TLS")
                await until(lambda: cloud_edge.link("gw-s").revision == 1, "the spec sync")
                cmd = await cloud_control.ledger.submit("fan", "set_state", {"state": True},
                                                        command_timeout=60)  # fmt: skip
                done: list[str] = []

                async def poll() -> None:
                    while True:
                        row = await cloud.rio.call(creg.get_command, cmd.id)
                        done[:] = [str(row.status) if row else ""]
                        await trio.sleep(0.2)

                async with trio.open_nursery() as pn:
                    pn.start_soon(poll)
                    await until(lambda: done == ["success"], "the command down and its result up")
                    pn.cancel_scope.cancel()
                # a Model's file comes down the same link (base64 in the MQTT reply)
                assert agent.transport is not None
                reply = await agent.transport.request("models/brightness", limit=10)
                assert reply.status == 200 and reply.body == model.read_bytes()
                reply = await agent.transport.request("models/other", limit=10)
                assert reply.status == 404
                assert agent.uplink is not None and agent.uplink.online
                assert cloud_edge.link("gw-s").refused == 0
                en.cancel_scope.cancel()
            n.cancel_scope.cancel()
    finally:
        creg.close()
        ereg.close()


async def test_https_uplink_with_own_ca(tmp_path: Path, pki: dict[str, Path]) -> None:
    await _scenario(tmp_path, pki, mqtt=False)


async def test_mqtt_tls_uplink_with_own_ca(tmp_path: Path, pki: dict[str, Path]) -> None:
    await _scenario(tmp_path, pki, mqtt=True)


def test_certificate_with_the_wrong_key_is_one_clear_error(pki: dict[str, Path]) -> None:
    check_tls(str(pki["cert"]), str(pki["key"]))
    with pytest.raises(TwinError) as info:
        check_tls(str(pki["cert"]), str(pki["stray"]))
    assert "do not load together" in str(info.value)
    with pytest.raises(TwinError, match="both --certfile and --keyfile"):
        check_tls(str(pki["cert"]), None)
