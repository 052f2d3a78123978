"""How an edge talks to the cloud: one request → one reply, over HTTPS or MQTT.

The uplink (``twin/edge/uplink.py``) and the spec sync (``twin/edge/agent.py``) speak in
*operations*, the same over both transports:

==================  =================================  =====================================
operation           HTTPS (``http[s]://HOST:PORT``)    body → reply
==================  =================================  =====================================
``batch``           ``POST /api/v1/edge-link/E/batch``  an upload (``protocol.py``) → the ack
``specs``           ``GET  .../E/specs``               → the documents the edge runs
``commands``        ``GET  .../E/commands``            → ``{"items": [...]}``
``models/NAME``     ``GET  .../E/models/NAME``         → the ONNX file (bytes)
==================  =================================  =====================================

Over MQTT (``mqtt://`` or ``mqtts://HOST:PORT``, :mod:`twin.edge.mqtt_link`) the same
operations are requests on ``flux/_edge/E/req`` answered on ``flux/_edge/E/resp``.

A reply has an HTTP-like ``status`` (200, 401 bad key, 404 unknown edge, 422 malformed,
503 not stored — retry after ``retry_after`` s). A transport raises :class:`LinkDown` when it
got no reply (refused, reset, timed out: a blackholed link, a broker that is not connected).
"""

from __future__ import annotations

import ssl
from dataclasses import dataclass
from typing import Any, Protocol

import httpx
import trio


class LinkDown(Exception):
    """No reply from the cloud (the link is down)."""


@dataclass
class Reply:
    status: int
    body: Any = None
    """Parsed JSON (a dict) or, for ``models/NAME``, bytes."""
    retry_after: float = 0.0

    @property
    def detail(self) -> str:
        if isinstance(self.body, dict):
            return str(self.body.get("detail", self.body))
        if isinstance(self.body, bytes):
            return self.body[:200].decode("utf-8", "replace")
        return str(self.body)


class Transport(Protocol):
    description: str

    async def run(self, *, task_status: trio.TaskStatus[Any] = trio.TASK_STATUS_IGNORED) -> None:
        """Keep the connection (until cancelled)."""
        ...

    async def request(self, op: str, body: bytes | None = None, *, limit: float) -> Reply: ...


class HttpTransport:
    """The cloud's API over HTTP(S); the edge's key as ``Authorization: Bearer``."""

    def __init__(self, url: str, edge: str, key: str, *, verify: Any = True) -> None:
        self.base = f"{url.rstrip('/')}/api/v1/edge-link/{edge}"
        self.description = url
        self.key = key
        self.verify = verify
        self.client: httpx.AsyncClient | None = None

    async def run(self, *, task_status: trio.TaskStatus[Any] = trio.TASK_STATUS_IGNORED) -> None:
        headers = {"Authorization": f"Bearer {self.key}"}
        verify = client_tls(self.verify)
        async with httpx.AsyncClient(headers=headers, verify=verify) as client:
            self.client = client
            task_status.started(self)
            try:
                await trio.sleep_forever()
            finally:
                self.client = None

    async def request(self, op: str, body: bytes | None = None, *, limit: float) -> Reply:
        client = self.client
        if client is None:
            raise LinkDown("the HTTP client is not running")
        url = f"{self.base}/{op}"
        t = httpx.Timeout(limit, connect=min(limit, 5.0))
        try:
            with trio.fail_after(limit * 2):  # a blackholed link: no RST, no answer
                if body is None:
                    resp = await client.get(url, timeout=t)
                else:
                    resp = await client.post(url, content=body, timeout=t,
                                             headers={"Content-Type": "application/json"})  # fmt: skip
        except trio.TooSlowError:
            raise LinkDown(f"no answer from {self.description} in {limit * 2:.0f}s") from None
        except (httpx.HTTPError, OSError) as exc:
            raise LinkDown(describe(exc)) from exc
        retry = float(resp.headers.get("retry-after") or 0)
        if op.startswith("models/") and resp.status_code == 200:
            return Reply(200, resp.content)
        try:
            data = resp.json()
        except ValueError:
            data = {"detail": resp.text[:200]}
        return Reply(resp.status_code, data, retry)


def describe(exc: BaseException) -> str:
    """An exception and what caused it, e.g. ``ConnectError: [SSL:
    CERTIFICATE_VERIFY_FAILED] certificate verify failed: unable to get local issuer
    certificate`` (httpx's own message for a failed TLS handshake is empty)."""
    parts: list[str] = []
    seen: set[int] = set()
    e: BaseException | None = exc
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        text = str(e)
        if text and not any(text in p or p in text for p in parts):
            parts.append(text)
        e = e.__cause__ or e.__context__
    return f"{type(exc).__name__}: {' — '.join(parts)}" if parts else type(exc).__name__


def client_tls(verify: Any) -> ssl.SSLContext:
    """The client's TLS context: ``verify`` True (system CAs), a CA bundle path, or False
    (no verification)."""
    if verify is False:
        ctx = ssl.create_default_context()
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
        return ctx
    if verify is True:
        return ssl.create_default_context()
    if isinstance(verify, ssl.SSLContext):
        return verify
    return ssl.create_default_context(cafile=str(verify))


__all__ = ["HttpTransport", "LinkDown", "Reply", "Transport", "client_tls", "describe"]
