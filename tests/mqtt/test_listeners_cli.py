"""WebSocket listener, mutual TLS (device identified by its certificate CN), `twin broker`."""

from __future__ import annotations

import datetime
import os
import queue
import socket
import ssl
import subprocess
import sys
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho
import pytest
import trio
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from paho.mqtt.enums import CallbackAPIVersion

from twin.mqtt.broker import Broker, BrokerConfig
from twin.runtime.mqtt_auth import RegistryAuth

from .conftest import WAIT, interrupt, roundtrip, run_sync

ROOT = Path(__file__).resolve().parents[2]


async def test_websocket_listener(nursery: trio.Nursery) -> None:
    b = Broker(BrokerConfig(sys_interval=0, ws_listen=[("127.0.0.1", 0)]))
    await nursery.start(b.run)
    port = b.ws_addresses[0][1]

    def scenario() -> bytes:
        cl = paho.Client(CallbackAPIVersion.VERSION2, client_id="ws", transport="websockets")
        cl.ws_set_options(path="/mqtt")
        return roundtrip(cl, port, "ws/t")

    assert await run_sync(scenario) == b"hello"


# -- mutual TLS -----------------------------------------------------------------------------
def _key() -> Any:
    return ec.generate_private_key(ec.SECP256R1())


def _cert(cn: str, key: Any, issuer: x509.Name, issuer_key: Any, ca: bool = False) -> Any:
    now = datetime.datetime.now(datetime.UTC)
    b = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)]))
        .issuer_name(issuer)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if not ca:
        b = b.add_extension(x509.SubjectAlternativeName([x509.DNSName(cn)]), critical=False)
    return b.sign(issuer_key, hashes.SHA256())


def _write(path: Path, cert: Any, key: Any) -> tuple[str, str]:
    path.with_suffix(".crt").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    path.with_suffix(".key").write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return str(path.with_suffix(".crt")), str(path.with_suffix(".key"))


async def test_mutual_tls_identifies_the_device(nursery: trio.Nursery, tmp_path: Path) -> None:
    ca_key = _key()
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "flux test ca")])
    ca = _cert("flux test ca", ca_key, ca_name, ca_key, ca=True)
    ca_file, _ = _write(tmp_path / "ca", ca, ca_key)
    skey = _key()
    server = _write(tmp_path / "server", _cert("localhost", skey, ca_name, ca_key), skey)
    dkey = _key()
    client = _write(tmp_path / "d1", _cert("d1", dkey, ca_name, ca_key), dkey)

    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(*server)
    ctx.load_verify_locations(ca_file)
    ctx.verify_mode = ssl.CERT_REQUIRED
    specs = {
        ("Device", "d1"): {
            "kind": "Device",
            "metadata": {"name": "d1", "site": "s"},
            "spec": {"binding": {"mqtt": {}}},
        }
    }
    auth = RegistryAuth(None, lambda: specs)
    b = Broker(
        BrokerConfig(sys_interval=0, listen=[], tls_listen=[("127.0.0.1", 0)], ssl_context=ctx),
        authenticate=auth.authenticate,
        authorize=auth.authorize,
    )
    await nursery.start(b.run)
    port = b.tls_addresses[0][1]

    def tls_client(cid: str) -> paho.Client:
        cl = paho.Client(CallbackAPIVersion.VERSION2, client_id=cid, protocol=paho.MQTTv5)
        cl.tls_set(ca_certs=ca_file, certfile=client[0], keyfile=client[1])
        cl.tls_insecure_set(True)
        return cl

    # the device's own command topic: allowed (it is d1 by its certificate, no password)
    assert await run_sync(_roundtrip_sub, tls_client("d1"), port, "flux/s/d1/command") == [1]
    assert await run_sync(_roundtrip_sub, tls_client("d1b"), port, "flux/s/d2/command") == [0x87]
    assert auth.stats["auth_failed"] == 0


def _roundtrip_sub(cl: paho.Client, port: int, topic: str) -> list[int]:
    acks: queue.Queue[list[int]] = queue.Queue()
    cl.on_connect = lambda c, _u, _f, _rc, _p: c.subscribe(topic, 1)
    cl.on_subscribe = lambda _c, _u, _mid, rcs, _p: acks.put([int(r.value) for r in rcs])
    cl.connect("127.0.0.1", port)
    cl.loop_start()
    try:
        return acks.get(timeout=WAIT)
    finally:
        cl.disconnect()
        cl.loop_stop()


# -- twin broker ----------------------------------------------------------------------------
def _twin(tmp_path: Path, *args: str) -> subprocess.Popen[str]:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.Popen(
        [sys.executable, "-m", "twin.cli", "--state-dir", str(tmp_path / "st"), *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        cwd=str(tmp_path),
    )


def test_twin_broker_cli(tmp_path: Path) -> None:
    proc = _twin(tmp_path, "broker", "--listen", "127.0.0.1:0", "--no-auth", "--sys-interval", "0")
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline().strip()
        assert line.startswith("mqtt 127.0.0.1:"), line
        port = int(line.rsplit(":", 1)[1])
        cl = paho.Client(CallbackAPIVersion.VERSION2, client_id="cli")
        assert roundtrip(cl, port, "cli/t") == b"hello"
        # a second broker on the same port: one line and a hint, exit code 1
        with socket.create_connection(("127.0.0.1", port)):
            pass
        taken = _twin(tmp_path, "broker", "--listen", f"127.0.0.1:{port}", "--no-auth")
        _, err = taken.communicate(timeout=60)
        assert taken.returncode == 1
        lines = err.strip().splitlines()
        assert lines[0] == f"error: mqtt: address 127.0.0.1:{port} is already in use", err
        assert lines[1].startswith("hint: ") and "--listen" in lines[1]
    finally:
        interrupt(proc)


@pytest.mark.parametrize("bad", ["nonsense:port"])
def test_bad_listen_address(tmp_path: Path, bad: str) -> None:
    p = _twin(tmp_path, "broker", "--listen", bad, "--no-auth")
    _, err = p.communicate(timeout=60)
    assert p.returncode == 1 and err.startswith("error: bad address"), err


def test_twin_up_reports_a_taken_mqtt_port(tmp_path: Path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        taken = s.getsockname()[1]
        p = _twin(tmp_path, "up", "--listen", "127.0.0.1:0", "--mqtt-listen", f"127.0.0.1:{taken}")
        _, err = p.communicate(timeout=60)
    assert p.returncode == 1
    lines = err.strip().splitlines()
    assert lines[0] == f"error: mqtt: address 127.0.0.1:{taken} is already in use", err
    assert "--mqtt-listen" in lines[1] and "port 0" in lines[1]


def _server_cert(tmp_path: Path) -> tuple[str, str, str]:
    ca_key = _key()
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "flux test ca")])
    ca_file, _ = _write(tmp_path / "ca", _cert("flux test ca", ca_key, ca_name, ca_key, ca=True), ca_key)
    skey = _key()
    cert, key = _write(tmp_path / "server", _cert("localhost", skey, ca_name, ca_key), skey)
    return ca_file, cert, key


def _wss_connack(port: int, ca_file: str, username: str | None = None,
                 password: str | None = None) -> tuple[Any, Any]:
    """CONNACK (reason code, properties) of a paho MQTT 5 client over wss, keep-alive 60 s."""
    acks: queue.Queue[tuple[Any, Any]] = queue.Queue()
    cl = paho.Client(CallbackAPIVersion.VERSION2, client_id=username or "wss",
                     transport="websockets", protocol=paho.MQTTv5)
    cl.tls_set(ca_certs=ca_file)
    cl.tls_insecure_set(True)
    if username:
        cl.username_pw_set(username, password)
    cl.on_connect = lambda _c, _u, _f, rc, p: acks.put((rc, p))
    cl.connect("127.0.0.1", port, keepalive=60)
    cl.loop_start()
    try:
        return acks.get(timeout=WAIT)
    finally:
        cl.disconnect()
        cl.loop_stop()


def test_twin_broker_wss_and_max_keep_alive(tmp_path: Path) -> None:
    ca_file, cert, key = _server_cert(tmp_path)
    proc = _twin(tmp_path, "broker", "--listen", "127.0.0.1:0", "--wss-listen", "127.0.0.1:0",
                 "--certfile", cert, "--keyfile", key, "--max-keep-alive", "7", "--no-auth",
                 "--sys-interval", "0")
    try:
        assert proc.stdout is not None
        lines = [proc.stdout.readline().strip() for _ in range(2)]
        assert lines[0].startswith("mqtt 127.0.0.1:") and lines[1].startswith("wss 127.0.0.1:"), lines
        rc, props = _wss_connack(int(lines[1].rsplit(":", 1)[1]), ca_file)
        assert not rc.is_failure and props.ServerKeepAlive == 7
    finally:
        interrupt(proc)
    # wss without a certificate: one line, before anything starts
    p = _twin(tmp_path, "broker", "--wss-listen", "127.0.0.1:0", "--no-auth")
    _, err = p.communicate(timeout=60)
    assert p.returncode == 1 and "--certfile and --keyfile" in err.splitlines()[0], err
