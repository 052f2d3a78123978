"""Scene webhooks go only where the engine's configuration allows (issue 11 §3, SSRF): the
allow-list's syntax, the decision on resolved addresses, and a real HTTP peer on loopback that
a scene reaches only once its address is listed."""

from __future__ import annotations

import ipaddress
import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest

from twin.control.webhooks import WebhookPolicy, WebhookRefused
from twin.errors import TwinError


class Peer:
    def __init__(self) -> None:
        self.requests: list[tuple[str, str, str, Any]] = []
        peer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                size = int(self.headers.get("content-length") or 0)
                body = json.loads(self.rfile.read(size) or b"null")
                peer.requests.append(("POST", self.path, self.headers.get("host", ""), body))
                self.send_response(204)
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def peer() -> Iterator[Peer]:
    p = Peer()
    try:
        yield p
    finally:
        p.close()


def test_allow_list_syntax() -> None:
    pol = WebhookPolicy.parse("hooks.example.com, *.corp.example 10.1.2.0/24,[fd00::1]")
    assert pol.hosts == ("hooks.example.com", "*.corp.example")
    assert [str(n) for n in pol.networks] == ["10.1.2.0/24", "fd00::1/128"]
    assert pol.name_listed("HOOKS.example.com.") and pol.name_listed("a.b.corp.example")
    assert not pol.name_listed("corp.example") and not pol.name_listed("evil-hooks.example.com")
    with pytest.raises(TwinError, match="neither a host name nor an IP network"):
        WebhookPolicy.parse("http://x/y")
    assert WebhookPolicy.parse(None) == WebhookPolicy() == WebhookPolicy.parse("")


@pytest.mark.parametrize(
    ("address", "listed", "allowed"),
    [
        ("93.184.216.34", True, True),  # public, name listed
        ("93.184.216.34", False, False),  # public, name not listed
        ("127.0.0.1", True, False),  # loopback behind a listed name
        ("169.254.169.254", True, False),  # link-local: cloud metadata
        ("10.0.0.5", True, False),
        ("192.168.1.1", True, False),
        ("100.64.0.1", True, False),  # shared address space
        ("::1", True, False),
        ("fe80::1", True, False),
        ("0.0.0.0", True, False),
        ("224.0.0.1", True, False),
        ("10.1.2.3", False, True),  # inside a listed network
    ],
)
def test_address_decision(address: str, listed: bool, allowed: bool) -> None:
    pol = WebhookPolicy.parse("hooks.example.com,10.1.2.0/24")
    addr = ipaddress.ip_address(address)
    assert pol.address_allowed(addr, name_listed=listed) is allowed


async def test_nothing_is_sent_unless_the_resolved_address_is_allowed(peer: Peer) -> None:
    url = f"http://127.0.0.1:{peer.port}/hook"
    for config in ("", "127.0.0.2", "localhost", "example.com"):
        with pytest.raises(WebhookRefused):
            await WebhookPolicy.parse(config).send("POST", url, {"a": 1}, {}, 5)
    # a listed name that resolves to loopback is still refused: the address decides
    with pytest.raises(WebhookRefused, match="non-public"):
        await WebhookPolicy.parse("localhost").send(
            "POST", f"http://localhost:{peer.port}/hook", {}, {}, 5
        )
    for bad in ("file:///etc/passwd", "gopher://127.0.0.1/", "http:///x"):
        with pytest.raises(WebhookRefused):
            await WebhookPolicy.parse("127.0.0.0/8").send("POST", bad, {}, {}, 5)
    assert peer.requests == []
    # listing the address (or its network) allows it; the name is kept in the Host header
    status = await WebhookPolicy.parse("127.0.0.1/32").send(
        "POST", url, {"a": 1}, {"Host": "evil"}, 5
    )
    assert status == 204
    assert peer.requests == [("POST", "/hook", f"127.0.0.1:{peer.port}", {"a": 1})]
