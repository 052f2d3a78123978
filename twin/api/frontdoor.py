"""The API's HTTP/1.1 front door: ``POST /api/v1/ingest/{device}`` answered straight from the
socket, every other request handed to hypercorn.

Why: one single-reading ingest request cost ~0.5 ms of the engine's core through hypercorn
(h11 events, a task and a lock per request, an idle-timer task restarted per request, two
socket writes per response) although the route itself (:func:`~twin.api.gatekeeper.
answer_ingest`: key, rate limit, parse, write-ahead log) takes a fraction of that. Figures in
benchmarks/README.md (issue 20).

Each accepted connection starts here. While its requests are plain ingest calls — HTTP/1.1, a
``Content-Length`` body within :data:`~twin.api.gatekeeper.MAX_INGEST_BODY`, one ``Host``, no
``Transfer-Encoding``/``Expect``/``Upgrade``, a device name of URL-unreserved characters, well-
formed header lines — the door parses them and answers through
:func:`~twin.api.gatekeeper.answer_ingest`, the one implementation of the route that the
gatekeeper's ASGI path calls too (device key, per-device rate limit, validation, owner
forwarding, write-ahead log before the 2xx, ``/metrics``). The response carries the headers
hypercorn would send (``date``, ``server``, ``Connection: close`` when the client asked).
Keep-alive and pipelining: requests are answered one after the other, in order.

**Slow and too many clients.** A request head must be complete within
``request_head_timeout`` of its first byte and its body within ``request_body_timeout`` of the
head (ApiSettings): otherwise the door answers ``408`` with ``Connection: close`` (a client that
sends half a request — slowloris — holds its connection no longer than that; an idle keep-alive
connection is closed after hypercorn's ``keep_alive_timeout``). Above ``max_connections``
open connections (the door's and those it handed to hypercorn) a new connection is answered
``503`` with ``Retry-After`` and closed before anything of it is read (while a flood keeps an
eighth of ``max_connections`` of them lingering, the next ones are closed unanswered: the
descriptors stay bounded). After such an answer the
door stops writing, reads what the client still sends for up to :data:`LINGER` seconds (so
closing does not reset the connection before the client read the answer) and closes it.

At the first request that is anything else (another route, a WebSocket, HTTP/2 or HTTP/1.0, an
oversized, chunked or malformed request) the connection — with the bytes already read — goes
to hypercorn's own connection handler and stays there; so every other answer, the 400s of
malformed requests included, is hypercorn's, and the route still lives in FastAPI's OpenAPI.
"""

from __future__ import annotations

import json
import logging
import math
import re
import time
from collections.abc import Awaitable, Callable
from typing import Any
from wsgiref.handlers import format_date_time

import trio
from hypercorn.config import Config
from hypercorn.trio.lifespan import Lifespan
from hypercorn.trio.tcp_server import TCPServer
from hypercorn.trio.worker_context import WorkerContext
from hypercorn.typing import ConnectionState

from twin.api.gatekeeper import INGEST_PREFIX, MAX_INGEST_BODY, answer_ingest
from twin.api.state import ApiState

log = logging.getLogger(__name__)

RECV = 65536
MAX_HEAD = 16 * 1024  # hypercorn's h11_max_incomplete_size: a longer head goes to it (431/400)
LINGER = 2.0  # after a 408/503: how long the door drains the client's bytes before closing

_START = b"POST " + INGEST_PREFIX.encode()
_REQUEST_LINE = re.compile(
    rb"POST " + re.escape(INGEST_PREFIX.encode()) + rb"([A-Za-z0-9._~-]+) HTTP/1\.1"
)
# RFC 9110 token ':' OWS visible-ASCII value OWS; anything else (obs-fold, controls, non-ASCII)
# is hypercorn's to judge
_FIELD = re.compile(
    rb"([!#$%&'*+.^_`|~0-9A-Za-z-]+):[ \t]*((?:[\x21-\x7e]+(?:[ \t]+[\x21-\x7e]+)*)?)[ \t]*"
)
_NOT_HERE = frozenset((b"transfer-encoding", b"expect", b"upgrade"))
_KEEP = frozenset((b"close", b"keep-alive"))


def parse_head(
    head: bytes,
) -> tuple[str, list[tuple[bytes, bytes]], int, bool] | None:
    """(device, headers with lower-case names, body length, close after) of an ingest request
    head the door serves itself (without its final CRLF CRLF); None: hypercorn's."""
    lines = head.split(b"\r\n")
    m = _REQUEST_LINE.fullmatch(lines[0])
    if m is None:
        return None
    headers: list[tuple[bytes, bytes]] = []
    length = -1
    hosts = 0
    close = False
    for line in lines[1:]:
        f = _FIELD.fullmatch(line)
        if f is None:
            return None
        name, value = f[1].lower(), f[2]
        if name == b"content-length":
            if length >= 0 or not value.isdigit():
                return None
            length = int(value)
        elif name == b"host":
            hosts += 1
        elif name == b"connection":
            tokens = {t.strip().lower() for t in value.split(b",")}
            if not tokens <= _KEEP:
                return None
            close = b"close" in tokens
        elif name in _NOT_HERE:
            return None
        headers.append((name, value))
    if hosts != 1 or not 0 <= length <= MAX_INGEST_BODY:
        return None
    return m[1].decode("ascii"), headers, length, close


class _Replay(trio.abc.HalfCloseableStream):
    """A connection handed to hypercorn: the bytes the door already read come first."""

    def __init__(self, stream: trio.SocketStream, data: bytes) -> None:
        self.stream = stream
        self.socket = stream.socket  # hypercorn reads the addresses from it
        self._data = data

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        if self._data:
            data, self._data = self._data, b""
            await trio.lowlevel.checkpoint()
            return data
        return await self.stream.receive_some(max_bytes)

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        await self.stream.send_all(data)

    async def wait_send_all_might_not_block(self) -> None:
        await self.stream.wait_send_all_might_not_block()

    async def send_eof(self) -> None:
        await self.stream.send_eof()

    async def aclose(self) -> None:
        await self.stream.aclose()


class FrontDoor:
    """The connection handler: ``await door(stream)`` per accepted connection."""

    def __init__(
        self,
        state: ApiState,
        hand_off: Callable[[trio.abc.HalfCloseableStream], Awaitable[None]],
        config: Config,
    ) -> None:
        self.state = state
        self.hand_off = hand_off
        self.keep_alive = config.keep_alive_timeout
        self.head_timeout = state.settings.request_head_timeout
        self.body_timeout = state.settings.request_body_timeout
        self.max_connections = state.settings.max_connections
        self.server = (
            b"server: hypercorn-h11\r\n" if config.include_server_header else b""
        )  # what hypercorn's HTTP/1.1 answers carry: the same to the client
        self.dated = config.include_date_header
        self._second = -1
        self._tail = b""
        self.served = 0  # requests answered here (tests, benchmarks)
        self.handed = 0  # connections handed to hypercorn
        self.connections = 0  # open now (the door's and the handed ones)
        self.refused = 0  # connections refused: max_connections were open
        self.refusing = 0  # refused connections being answered 503 now (each up to LINGER s)
        self.max_refusing = max(16, self.max_connections // 8)  # more: closed unanswered
        self.timed_out = 0  # requests answered 408: head or body too slow

    def _date_server(self) -> bytes:
        now = int(time.time())
        if now != self._second:
            date = b"date: %s\r\n" % format_date_time(now).encode() if self.dated else b""
            self._second, self._tail = now, date + self.server
        return self._tail

    def _answer(
        self,
        status: int,
        out: list[tuple[bytes, bytes]],
        payload: bytes,
        close: bool,
    ) -> bytes:
        parts = [b"HTTP/1.1 %d \r\n" % status]
        parts += [b"%s: %s\r\n" % kv for kv in out]
        parts.append(self._date_server())
        if close:
            parts.append(b"Connection: close\r\n")
        parts += (b"\r\n", payload)
        return b"".join(parts)

    def _error(self, status: int, detail: str, *extra: tuple[bytes, bytes]) -> bytes:
        """A closing JSON error answer of the door's own (408, 503)."""
        payload = json.dumps({"detail": detail}, separators=(",", ":")).encode()
        out = [
            (b"content-type", b"application/json"),
            (b"content-length", b"%d" % len(payload)),
            *extra,
        ]
        return self._answer(status, out, payload, close=True)

    async def __call__(self, stream: trio.SocketStream) -> None:
        if self.connections >= self.max_connections:
            self.refused += 1
            try:
                if self.refusing < self.max_refusing:  # a flood: close the rest at once
                    self.refusing += 1
                    try:
                        await self._last_word(
                            stream,
                            self._error(
                                503,
                                f"too many open connections (limit {self.max_connections}); "
                                "try again",
                                (b"retry-after", b"1"),
                            ),
                        )
                    finally:
                        self.refusing -= 1
            finally:
                with trio.CancelScope(shield=True):
                    await stream.aclose()
            return
        self.connections += 1
        handed = False
        try:
            handed = await self._serve(stream)
        except (OSError, trio.BrokenResourceError, trio.ClosedResourceError):
            pass  # the peer went away
        except Exception:  # never the server's end: one connection's
            log.exception("api: front door failed on a connection")
        finally:
            self.connections -= 1
            if not handed:
                with trio.CancelScope(shield=True):
                    await stream.aclose()

    async def _last_word(self, stream: trio.SocketStream, data: bytes) -> None:
        """Send a closing answer, stop writing, drain the client's bytes for up to LINGER s
        (closing with unread bytes would reset the connection, and the client could lose the
        answer); the caller closes."""
        with trio.move_on_after(LINGER):
            try:
                await stream.send_all(data)
                await stream.send_eof()
                while await stream.receive_some(RECV):
                    pass
            except (OSError, trio.BrokenResourceError, trio.ClosedResourceError):
                pass

    async def _too_slow(self, stream: trio.SocketStream, what: str, seconds: float) -> bool:
        self.timed_out += 1
        await self._last_word(
            stream, self._error(408, f"request {what} not received within {seconds:g} s")
        )
        return False

    async def _serve(self, stream: trio.SocketStream) -> bool:
        """Answer ingest requests until the peer closes (False) or hypercorn takes the
        connection (True, after it is done with it)."""
        sock = stream.socket
        buf = bytearray()
        st = self.state
        while True:
            end = buf.find(b"\r\n\r\n")
            # a head (already begun, e.g. pipelined) must be complete within head_timeout
            deadline = trio.current_time() + self.head_timeout if buf else math.inf
            while end < 0:
                if (
                    len(buf) > MAX_HEAD
                    or not _START.startswith(buf[: len(_START)])  # another route, TLS, HTTP/2
                    or buf.count(b"\n") != buf.count(b"\r\n")  # bare LF line ends (h11 takes them)
                ):
                    # hypercorn answers what is not an ingest request as soon as it can tell
                    return await self._hand_off(stream, buf)
                if buf:
                    with trio.move_on_at(deadline) as late:
                        data = await sock.recv(RECV)
                    if late.cancelled_caught:
                        return await self._too_slow(stream, "head", self.head_timeout)
                else:
                    data = b""
                    with trio.move_on_after(self.keep_alive):
                        data = await sock.recv(RECV)
                    deadline = trio.current_time() + self.head_timeout
                if not data:
                    # idle (keep-alive timeout) or closed; a half-sent request: hypercorn's
                    return bool(buf) and await self._hand_off(stream, buf)
                buf += data
                end = buf.find(b"\r\n\r\n")
            request = parse_head(bytes(buf[:end]))
            if request is None:
                return await self._hand_off(stream, buf)
            device, headers, length, close = request
            stop = end + 4 + length
            deadline = trio.current_time() + self.body_timeout
            while len(buf) < stop:
                with trio.move_on_at(deadline) as late:
                    data = await sock.recv(max(RECV, stop - len(buf)))
                if late.cancelled_caught:
                    return await self._too_slow(stream, "body", self.body_timeout)
                if not data:
                    return await self._hand_off(stream, buf)
                buf += data
            started = time.perf_counter()
            raw = bytes(buf[end + 4 : stop])
            del buf[:stop]
            status, out, payload = await answer_ingest(st, device, headers, raw, started)
            data = self._answer(status, out, payload, close)
            self.served += 1
            while data:
                sent = await sock.send(data)
                data = data[sent:]
            if close:
                return False

    async def _hand_off(self, stream: trio.SocketStream, buf: bytearray) -> bool:
        self.handed += 1
        await self.hand_off(_Replay(stream, bytes(buf)))
        return True


async def serve(
    app: Any,
    config: Config,
    sock: Any,
    state: ApiState,
    *,
    front_door: bool = True,
    tls: bool = False,
) -> None:
    """hypercorn's ``worker_serve`` for one socket (lifespan, graceful shutdown), with the
    front door on each connection first (``front_door=False``: hypercorn alone). ``tls``: the
    socket speaks HTTPS with ``config``'s certificate, hypercorn alone (the door reads plain
    TCP only)."""
    assert not (tls and front_door), "the front door reads plain TCP only"
    lifespan_state: dict[str, Any] = {}
    lifespan = Lifespan(app, config, lifespan_state)
    context = WorkerContext(None)
    async with trio.open_nursery() as lifespan_nursery:
        await lifespan_nursery.start(lifespan.handle_lifespan)
        await lifespan.wait_for_startup()
        async with trio.open_nursery() as server_nursery:
            listener: Any = trio.SocketListener(trio.socket.from_stdlib_socket(sock))
            if tls:
                ctx = config.create_ssl_context()
                assert ctx is not None, "tls without config.certfile/keyfile"
                listener = trio.SSLListener(listener, ctx, https_compatible=True)

            async def hypercorn(stream: trio.abc.HalfCloseableStream) -> None:
                conn = ConnectionState(lifespan_state.copy())
                await TCPServer(app, config, context, conn, stream)  # type: ignore[arg-type]

            handler: Any = FrontDoor(state, hypercorn, config) if front_door else hypercorn
            state.front_door = handler if front_door else None
            try:
                await trio.serve_listeners(handler, [listener], handler_nursery=server_nursery)
            finally:
                await context.terminated.set()
                server_nursery.cancel_scope.deadline = trio.current_time() + config.graceful_timeout
        await lifespan.wait_for_shutdown()
        lifespan_nursery.cancel_scope.cancel()
