"""Security of the engine's OPC UA server (:mod:`twin.runtime.opcua_service`): which security
policies its endpoint offers, and its application certificate.

``twin up --opcua-listen HOST:PORT`` offers **Basic256Sha256 SignAndEncrypt and Sign** by
default; ``--opcua-security`` lists the policies to offer (``Basic256Sha256_SignAndEncrypt``,
``Basic256Sha256_Sign``, ``None``). ``None`` (no signing, no encryption: passwords in clear on the
wire) is offered **only when listed**.

The certificate and its private key come from secrets (``--opcua-certificate NAME``,
``--opcua-private-key NAME``: PEM text; ``export TWIN_SECRET_<NAME>=...`` or the secrets file,
like every ``{secret: ...}``). Without them the engine makes a self-signed certificate once,
``STATE_DIR/opcua/server-cert.der`` and ``server-key.pem`` (0600), and reuses it, so that clients
that pinned it keep trusting it. Its application URI is ``urn:flux-iot:engine``.

Client application certificates: with ``--opcua-trust DIR`` only the certificates in ``DIR``
(``*.pem``/``*.der``, read at start) complete a secure channel, checked for validity dates and
application URI too; without it any client certificate does. Either way every session must
log in as an engine user (username/password, anonymous refused).
"""

from __future__ import annotations

import datetime as dt
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from twin.errors import TwinError

APPLICATION_URI = "urn:flux-iot:engine"
POLICIES = ("Basic256Sha256_SignAndEncrypt", "Basic256Sha256_Sign", "None")
DEFAULT_POLICIES = ("Basic256Sha256_SignAndEncrypt", "Basic256Sha256_Sign")


@dataclass(frozen=True)
class ServerSecurity:
    """What the OPC UA server offers: ``policies`` (names of :data:`POLICIES`) and, when one of
    them is secure, the certificate (DER) and private key (DER, PKCS#8)."""

    policies: tuple[str, ...] = DEFAULT_POLICIES
    certificate: bytes | None = None
    private_key: bytes | None = None
    trust_dir: Path | None = None  # trusted client certificates; None: any

    @property
    def secure(self) -> bool:
        return any(p != "None" for p in self.policies)

    def policy_types(self) -> list[object]:
        from asyncua import ua

        return [ua.SecurityPolicyType.NoSecurity if p == "None" else getattr(ua.SecurityPolicyType, p)
                for p in self.policies]


def parse_policies(text: str | Iterable[str]) -> tuple[str, ...]:
    """``"Basic256Sha256_SignAndEncrypt,None"`` -> the names, checked; TwinError otherwise."""
    names = [n.strip() for n in (text.split(",") if isinstance(text, str) else text) if n.strip()]
    unknown = [n for n in names if n not in POLICIES]
    if unknown or not names:
        raise TwinError(f"opcua server: unknown security policy {', '.join(unknown) or '(none)'}",
                        hint=f"one or more of {', '.join(POLICIES)}")
    return tuple(dict.fromkeys(names))


def _der(cert_pem: bytes, key_pem: bytes) -> tuple[bytes, bytes]:
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    try:
        cert = (x509.load_pem_x509_certificate(cert_pem) if b"-----BEGIN" in cert_pem
                else x509.load_der_x509_certificate(cert_pem))
        key = (serialization.load_pem_private_key(key_pem, password=None) if b"-----BEGIN" in key_pem
               else serialization.load_der_private_key(key_pem, password=None))
    except ValueError as exc:
        raise TwinError(f"opcua server: certificate or private key unreadable: {exc}") from exc
    return (cert.public_bytes(serialization.Encoding.DER),
            key.private_bytes(serialization.Encoding.DER, serialization.PrivateFormat.PKCS8,
                              serialization.NoEncryption()))


def self_signed(hostnames: Sequence[str] = ("localhost",)) -> tuple[bytes, bytes]:
    """A new RSA-2048 self-signed application certificate (DER) and key (PEM) for the server."""
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import rsa
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "FLUX IoT engine"),
                      x509.NameAttribute(NameOID.ORGANIZATION_NAME, "FLUX IoT")])
    alt: list[x509.GeneralName] = [x509.UniformResourceIdentifier(APPLICATION_URI)]
    for h in hostnames:
        try:
            alt.append(x509.IPAddress(ipaddress.ip_address(h)))
        except ValueError:
            alt.append(x509.DNSName(h))
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(days=1)).not_valid_after(now + dt.timedelta(days=3650))
        .add_extension(x509.SubjectAlternativeName(alt), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=True,
                                     key_encipherment=True, data_encipherment=True,
                                     key_agreement=False, key_cert_sign=False, crl_sign=False,
                                     encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH,
                                              ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
        .sign(key, hashes.SHA256())
    )
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption())
    return cert.public_bytes(serialization.Encoding.DER), pem


def server_security(
    policies: Sequence[str] = DEFAULT_POLICIES,
    *,
    certificate_secret: str | None = None,
    key_secret: str | None = None,
    state_dir: Path | None = None,
    hostname: str = "localhost",
    trust_dir: Path | None = None,
) -> ServerSecurity:
    """Resolve the server's security (blocking: file and secret reads, maybe an RSA key)."""
    import dataclasses

    names = parse_policies(policies)
    if trust_dir is not None and not trust_dir.is_dir():
        raise TwinError(f"opcua server: trusted client certificates: {trust_dir} is not a directory")
    sec = _resolve(names, certificate_secret, key_secret, state_dir, hostname)
    return dataclasses.replace(sec, trust_dir=trust_dir)


def _resolve(names: tuple[str, ...], certificate_secret: str | None, key_secret: str | None,
             state_dir: Path | None, hostname: str) -> ServerSecurity:
    from twin.files import private_dir
    from twin.spec.secrets import Secrets, env_name

    sec = ServerSecurity(names)
    if not sec.secure:
        return sec
    if (certificate_secret is None) != (key_secret is None):
        raise TwinError("opcua server: a certificate needs its private key (and the other way)",
                        hint="give both --opcua-certificate and --opcua-private-key, or neither")
    if certificate_secret is not None and key_secret is not None:
        secrets = Secrets()
        values = {}
        for ref in (certificate_secret, key_secret):
            value = secrets.get(ref)
            if value is None:
                raise TwinError(f"opcua server: secret {ref!r} is not set",
                                hint=f"export {env_name(ref)}=... (PEM) or add it to the secrets file")
            values[ref] = value.encode()
        cert, key = _der(values[certificate_secret], values[key_secret])
        return ServerSecurity(names, cert, key)
    if state_dir is None:
        raise TwinError("opcua server: a secure policy needs a certificate",
                        hint="--opcua-certificate/--opcua-private-key, or list only None")
    folder = private_dir(state_dir / "opcua")
    cert_path, key_path = folder / "server-cert.der", folder / "server-key.pem"
    if not (cert_path.exists() and key_path.exists()):
        cert_der, key_pem = self_signed(list(dict.fromkeys(["localhost", hostname])))
        fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(key_pem)
        cert_path.write_bytes(cert_der)
    cert, key = _der(cert_path.read_bytes(), key_path.read_bytes())
    return ServerSecurity(names, cert, key)
