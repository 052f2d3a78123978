"""Real peers for delivery tests: an aiosmtpd SMTP server that requires STARTTLS and AUTH, and
an HTTP receiver for webhooks (each in its own thread, on free loopback ports)."""

from __future__ import annotations

import http.server
import json
import socket
import ssl
import subprocess
import threading
import time
from dataclasses import dataclass, field
from email import message_from_bytes
from email.message import Message
from pathlib import Path
from typing import Any

from twin.reports.channels import SIGNATURE, TIMESTAMP, verify

USER, PASSWORD = "reports", "s3cret-pass"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def self_signed(folder: Path) -> tuple[Path, Path]:
    cert, key = folder / "cert.pem", folder / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
         "-keyout", str(key), "-out", str(cert), "-subj", "/CN=localhost",
         "-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost"],
        check=True, capture_output=True,
    )
    return cert, key


@dataclass
class Smtp:
    port: int
    cert: Path
    messages: list[Message] = field(default_factory=list)
    logins: list[str] = field(default_factory=list)
    controller: Any = None

    def stop(self) -> None:
        if self.controller is not None:
            self.controller.stop()


def start_smtp(folder: Path) -> Smtp:
    from aiosmtpd.controller import Controller
    from aiosmtpd.smtp import AuthResult, LoginPassword

    cert, key = self_signed(folder)
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(cert, key)
    smtp = Smtp(free_port(), cert)

    class Handler:
        async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
            smtp.messages.append(message_from_bytes(envelope.original_content))
            return "250 OK"

    def authenticator(server: Any, session: Any, envelope: Any, mechanism: str,
                      data: Any) -> AuthResult:
        ok = isinstance(data, LoginPassword) and data.login.decode() == USER and \
            data.password.decode() == PASSWORD
        if ok:
            smtp.logins.append(data.login.decode())
        return AuthResult(success=ok, handled=False)  # aiosmtpd answers 235 or 535

    smtp.controller = Controller(
        Handler(), hostname="127.0.0.1", port=smtp.port, tls_context=ctx,
        require_starttls=True, authenticator=authenticator, auth_required=True,
        auth_require_tls=True,
    )
    smtp.controller.start()
    return smtp


@dataclass
class Receiver:
    port: int
    secret: str
    bodies: list[dict[str, Any]] = field(default_factory=list)
    times: list[float] = field(default_factory=list)
    bad_signatures: int = 0
    fail_first: int = 0  # answer 503 to this many requests first
    server: Any = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/hook"

    def stop(self) -> None:
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()


def start_receiver(secret: str = "hook-secret", fail_first: int = 0) -> Receiver:
    rec = Receiver(free_port(), secret, fail_first=fail_first)

    class H(http.server.BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
            if rec.fail_first > 0:
                rec.fail_first -= 1
                self.send_response(503)
                self.end_headers()
                return
            sig, stamp = self.headers.get(SIGNATURE, ""), self.headers.get(TIMESTAMP, "")
            if not verify(rec.secret, stamp, body, sig):
                rec.bad_signatures += 1
                self.send_response(401)
                self.end_headers()
                return
            rec.times.append(time.time())
            rec.bodies.append(json.loads(body))
            self.send_response(204)
            self.end_headers()

        def log_message(self, *args: Any) -> None:
            pass

    rec.server = http.server.ThreadingHTTPServer(("127.0.0.1", rec.port), H)
    threading.Thread(target=rec.server.serve_forever, daemon=True).start()
    return rec
