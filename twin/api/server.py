"""Serve the API as an engine service: hypercorn on Trio, behind the front door that answers
ingest itself (twin/api/frontdoor.py).

The listening socket is bound here (not by hypercorn) so that a taken port becomes one clear
:class:`~twin.errors.PortInUseError`, and port 0 picks a free port whose URL is reported through
``task_status`` (and in ``engine.service_info["api"]``).
"""

from __future__ import annotations

import errno
import logging
import socket
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING, Any, cast

import trio
from hypercorn.config import Config
from hypercorn.utils import wrap_app

if TYPE_CHECKING:
    from hypercorn.typing import ASGIFramework

from twin.api.app import ApiSettings, create_app
from twin.api.frontdoor import serve as serve_http
from twin.api.routes import ws
from twin.api.state import ApiState
from twin.errors import PortInUseError, TwinError
from twin.runtime.engine import Engine
from twin.runtime.supervisor import supervise

log = logging.getLogger(__name__)


class _ClosedStream:
    """Stands in for an HTTP/2 stream hypercorn has already answered and closed."""

    idle = True

    async def handle(self, event: Any) -> None:
        return None


class _Streams(dict[int, Any]):
    def __missing__(self, stream_id: int) -> Any:
        return _ClosedStream()


def tolerate_h2_data_after_close() -> None:
    """Work around hypercorn 0.18's HTTP/2: a DATA frame for a stream it already answered
    (any response sent before the whole body arrived: 401, 413 ...) raises KeyError in
    ``H2Protocol._handle_events`` (it catches that for END_STREAM, not for DATA) and ends the
    whole server, so one unauthenticated h2c upload could keep the API down. Late frames of a
    closed stream are dropped instead (their bytes are still acknowledged). Idempotent."""
    from hypercorn.protocol.h2 import H2Protocol

    original = H2Protocol.__init__
    if getattr(original, "_twin_tolerant", False):
        return

    def init(self: Any, *args: Any, **kw: Any) -> None:
        original(self, *args, **kw)
        self.streams = _Streams(self.streams)

    init._twin_tolerant = True  # type: ignore[attr-defined]
    H2Protocol.__init__ = init  # type: ignore[method-assign]


def bind_socket(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        if exc.errno == errno.EADDRINUSE:
            raise PortInUseError(host, port, "api") from None
        if exc.errno in (errno.EADDRNOTAVAIL, errno.EAFNOSUPPORT) or isinstance(
            exc, socket.gaierror
        ):
            raise TwinError(
                f"api: cannot listen on {host}:{port}: {exc.strerror or exc}",
                hint="use an address of this machine, e.g. --listen 127.0.0.1:8080",
            ) from None
        raise
    sock.setblocking(False)
    sock.listen(1024)
    return sock


def parse_listen(text: str) -> tuple[str, int]:
    """``HOST:PORT``, ``:PORT`` or ``PORT`` (IPv6 as ``[::1]:8080``)."""
    host, port = "127.0.0.1", text
    if text.startswith("["):
        h, _, rest = text[1:].partition("]")
        host, port = h, rest.lstrip(":")
    elif ":" in text:
        host, _, port = text.rpartition(":")
        host = host or "0.0.0.0"
    try:
        p = int(port)
        if not 0 <= p <= 65535:
            raise ValueError
    except ValueError:
        raise TwinError(
            f"--listen {text!r}: not HOST:PORT", hint="e.g. --listen 127.0.0.1:8080"
        ) from None
    return host, p


def check_tls(certfile: str | None, keyfile: str | None) -> None:
    """A certificate and key that load together, or a TwinError saying what is wrong."""
    if certfile is None and keyfile is None:
        return
    if not certfile or not keyfile:
        raise TwinError("HTTPS needs both --certfile and --keyfile")
    import ssl

    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    try:
        ctx.load_cert_chain(certfile, keyfile)
    except FileNotFoundError as exc:
        raise TwinError(f"cannot read the TLS certificate or key: {exc}") from None
    except ssl.SSLError as exc:
        raise TwinError(f"the TLS certificate {certfile} and key {keyfile} do not load "
                        f"together: {exc.reason or exc}",
                        hint="is the key the certificate's own (and both PEM)?") from None  # fmt: skip


@dataclass
class ApiService:
    """``Engine(..., services=[ApiService(host, port, settings)])``"""

    host: str = "127.0.0.1"
    port: int = 8080
    settings: ApiSettings | None = None
    name: str = "api"
    sock: socket.socket | None = (
        None  # already bound (see bind_socket): fail early, not in the tree
    )
    certfile: str | None = None
    """HTTPS: the certificate chain (PEM) and its key; checked before the engine starts
    (:func:`check_tls`)."""
    keyfile: str | None = None

    async def __call__(
        self, engine: Engine, *, task_status: trio.TaskStatus[Any] = trio.TASK_STATUS_IGNORED
    ) -> None:
        sock = self.sock if self.sock is not None else bind_socket(self.host, self.port)
        actual = sock.getsockname()[1]
        host = f"[{self.host}]" if ":" in self.host else self.host
        scheme = "https" if self.certfile else "http"
        url = f"{scheme}://{'127.0.0.1' if self.host in ('0.0.0.0', '') else host}:{actual}"
        tolerate_h2_data_after_close()
        settings = self.settings or ApiSettings(state_dir=engine.config.state_dir)
        app = create_app(engine, settings)
        st = cast("ApiState", app.state)  # create_app's Gatekeeper: its ApiState
        config = Config()
        config.accesslog = None
        config.errorlog = logging.getLogger("hypercorn.error")
        config.graceful_timeout = 2.0
        config.keep_alive_timeout = 30.0
        config.websocket_ping_interval = 20.0
        config.websocket_max_message_size = ws.MAX_MESSAGE  # incoming: auth and subscribe only
        if self.certfile:
            config.certfile, config.keyfile = self.certfile, self.keyfile

        async def serve() -> None:
            await serve_http(
                # FastAPI is typed with starlette's Scope/Receive/Send (MutableMappings), hypercorn
                # with its TypedDict events: the same ASGI 3 protocol, a stub gap only
                wrap_app(cast("ASGIFramework", app), config.wsgi_max_body_size, "asgi"),
                config,
                sock,
                st,
                # HTTPS: hypercorn alone (TLS handshake, ALPN, HTTP/2 are its own)
                front_door=settings.front_door and not self.certfile,
                tls=bool(self.certfile),
            )

        # a restart (the engine's supervisor) binds the same port again: the socket handed in
        # is closed with this run
        self.sock, self.port = None, actual
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(serve)
                nursery.start_soon(
                    partial(
                        supervise,
                        st.sweep_keys,
                        kind="api",
                        name="sweep_keys",
                        supervision=engine.supervision,
                        policy=engine.config.restart,
                        restart_on_return=True,
                    )
                )
                info = {
                    "url": url,
                    "openapi": f"{url}/openapi.json",
                    "ws": url.replace("http", "ws", 1) + "/api/v1/ws",
                    "metrics": f"{url}/metrics",
                    "host": self.host,
                    "port": actual,
                    "app": app,
                }
                log.info("api: listening on %s", url)
                task_status.started(info)
        finally:
            with trio.CancelScope(shield=True):
                await st.aclose()  # connections to the cluster's other engines
