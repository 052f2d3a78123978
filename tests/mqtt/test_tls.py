from __future__ import annotations

import datetime
import ssl
from pathlib import Path

import paho.mqtt.client as paho
import trio
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from paho.mqtt.enums import CallbackAPIVersion

from twin.mqtt.broker import Broker, BrokerConfig

from .conftest import roundtrip, run_sync


def _self_signed(tmp: Path) -> tuple[Path, Path]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost")]), critical=False)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = tmp / "cert.pem", tmp / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_path, key_path


async def test_tls_listener(nursery: trio.Nursery, tmp_path: Path) -> None:
    cert, key = _self_signed(tmp_path)
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(cert, key)
    b = Broker(BrokerConfig(sys_interval=0, tls_listen=[("127.0.0.1", 0)], ssl_context=ctx))
    await nursery.start(b.run)
    port = b.tls_addresses[0][1]

    def scenario() -> bytes:
        cl = paho.Client(CallbackAPIVersion.VERSION2, client_id="tls")
        cl.tls_set(ca_certs=str(cert))
        cl.tls_insecure_set(True)  # certificate is for "localhost", we dial 127.0.0.1
        return roundtrip(cl, port, "tls/t", b"secure")

    assert await run_sync(scenario) == b"secure"
