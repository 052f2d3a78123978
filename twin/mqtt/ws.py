"""MQTT over WebSocket (trio-websocket): subprotocol ``mqtt``, binary frames, any path.

Each WebSocket connection is adapted to a ``trio.abc.Stream`` and served by the ordinary
broker :class:`~twin.mqtt.broker.Connection`, so everything (auth, ACLs, sessions, limits)
is identical to TCP. MQTT packets may span frames and frames may hold several packets (the
decoder does not care). TLS (``wss``) uses the broker's ``ssl_context``.
"""

from __future__ import annotations

from typing import Any

import trio
from trio_websocket import ConnectionClosed, WebSocketConnection, WebSocketRequest, WebSocketServer


class WsStream(trio.abc.Stream):
    def __init__(self, ws: WebSocketConnection, peer: str) -> None:
        self.ws = ws
        self.peer = peer
        self._buf = b""

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        if not self._buf:
            try:
                msg = await self.ws.get_message()
            except ConnectionClosed:
                return b""
            self._buf = msg.encode() if isinstance(msg, str) else bytes(msg)
        n = max_bytes or len(self._buf)
        data, self._buf = self._buf[:n], self._buf[n:]
        return data

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        try:
            await self.ws.send_message(bytes(data))
        except ConnectionClosed as exc:
            raise trio.BrokenResourceError("websocket closed") from exc

    async def wait_send_all_might_not_block(self) -> None:
        await trio.lowlevel.checkpoint()

    async def aclose(self) -> None:
        await self.ws.aclose()

    def getpeercert(self) -> Any:
        return None


def ws_handler(serve: Any) -> Any:
    """A trio-websocket request handler that hands the connection to ``serve(stream, peer)``."""

    async def handler(request: WebSocketRequest) -> None:
        protos = request.proposed_subprotocols
        proto = "mqtt" if "mqtt" in protos else ("mqttv3.1" if "mqttv3.1" in protos else None)
        ws = await request.accept(subprotocol=proto)
        remote = ws.remote
        peer = str(getattr(remote, "address", remote))
        await serve(WsStream(ws, peer), peer)

    return handler


def ws_server(serve: Any, listeners: list[Any], nursery: trio.Nursery) -> WebSocketServer:
    return WebSocketServer(
        ws_handler(serve),
        listeners,
        handler_nursery=nursery,
        max_message_size=16 * 1024 * 1024 + 16,
        message_queue_size=4,
    )
