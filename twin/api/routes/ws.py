"""``/api/v1/ws``: the live feed of readings, status changes, alarms and revisions, filtered
by site, group, device and kind (a scoped user only ever sees their sites)."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import trio
from fastapi import APIRouter, WebSocket
from starlette.websockets import WebSocketDisconnect

from twin import policy
from twin.api import auth
from twin.api.deps import PREFIX, api_state, bearer
from twin.errors import AuthError
from twin.runtime.bus import KINDS, Filter
from twin.spec.inputlimits import InputRefused, dumps, loads

log = logging.getLogger(__name__)

# open feeds re-check their credentials this often (revoked: closed within 10 s, as MQTT)
REVALIDATE_INTERVAL = 5.0

router = APIRouter(prefix=PREFIX)

MAX_MESSAGE = 64 << 10
"""Bytes of one incoming message (auth, subscribe): hypercorn refuses larger frames."""


async def receive_json(websocket: WebSocket) -> Any:
    """The next message, parsed strictly (:func:`twin.spec.inputlimits.loads`: no NaN or
    Infinity, no lone surrogates, bounded nesting); ``ValueError`` with one line otherwise."""
    message = await websocket.receive()
    if message["type"] == "websocket.disconnect":
        raise WebSocketDisconnect(message.get("code", 1000), message.get("reason"))
    raw = message.get("text")
    if raw is None:
        raw = message.get("bytes") or b""
    try:
        return loads(raw)
    except InputRefused:
        raise
    except ValueError as exc:  # JSONDecodeError, UnicodeDecodeError
        raise ValueError(f"not a JSON message: {str(exc)[:100]}") from None


def _encode(event: Any) -> str | None:
    """An event as JSON, or None (logged) if it holds a NaN/Infinity: the client never gets
    invalid JSON, and one bad event does not end the feed."""
    try:
        return dumps(event, default=str)
    except ValueError:
        log.warning("ws: an event with a non-finite number was not sent: %.200r", event)
        return None


def parse_filter(p: auth.Principal, params: Mapping[str, Any]) -> Filter:
    def items(key: str) -> list[str] | None:
        raw = params.get(key)
        if raw is None:
            return None
        vals = raw if isinstance(raw, list) else str(raw).split(",")
        return [str(v).strip() for v in vals if str(v).strip()]

    kinds = items("kinds")
    if kinds is not None and not set(kinds) <= set(KINDS):
        raise ValueError(f"kinds must be among {', '.join(KINDS)}")
    return Filter.of(
        sites=policy.visible_sites(p, items("sites")),
        groups=items("groups"),
        devices=items("devices"),
        kinds=kinds,
    )


@router.websocket("/ws")
async def ws(websocket: WebSocket) -> None:
    """Live feed. The access token, in order of preference:

    1. ``Sec-WebSocket-Protocol: bearer, <token>`` (browsers can set this one: the server
       answers with the ``bearer`` subprotocol and the token stays out of URLs and logs);
    2. ``Authorization: Bearer <token>`` (non-browser clients);
    3. a first message ``{"type": "auth", "token": "<token>"}`` within 10 s of connecting
       (when the connection carries no token at all);
    4. ``?token=`` in the URL: kept for old clients and tools that can set neither headers
       nor subprotocols; it ends up in proxy logs and history, so prefer 1-3.

    ``?batch=N`` (opt-in, 2..1000): every frame is a JSON array of up to N events, all
    those already waiting (one frame per event costs more than the event itself at a few
    thousand readings/s). Without it each frame is one event object.

    A reading event carries ``"logged": true`` when the reading is in the engine's
    write-ahead log (it was acknowledged to its device as durable: HTTP ingest, MQTT QoS >= 1).
    """
    st = api_state(websocket)
    engine = st.engine
    protocols = [
        v.strip()
        for v in websocket.headers.get("sec-websocket-protocol", "").split(",")
        if v.strip()
    ]
    subprotocol = None
    token = None
    if len(protocols) >= 2 and protocols[0].lower() == "bearer":
        subprotocol, token = protocols[0], protocols[1]
    token = token or bearer(websocket.headers) or websocket.query_params.get("token")
    try:
        flt: Filter | None = None
        if token is not None:
            p = await st.authenticate(token)
            flt = parse_filter(p, dict(websocket.query_params))
    except AuthError as exc:
        await websocket.close(code=1008, reason=str(exc)[:100])
        return
    except ValueError as exc:
        await websocket.close(code=1003, reason=str(exc)[:100])
        return
    await websocket.accept(subprotocol=subprotocol)
    if flt is None:  # authenticate with the first message
        try:
            with trio.fail_after(10):
                first = await receive_json(websocket)
            if not (isinstance(first, dict) and first.get("type") == "auth"):
                raise AuthError('first message must be {"type": "auth", "token": ...}')
            p = await st.authenticate(str(first.get("token") or ""))
            flt = parse_filter(p, dict(websocket.query_params))
        except (AuthError, trio.TooSlowError) as exc:
            reason = str(exc) or "no auth message within 10 s"
            await websocket.close(code=1008, reason=reason[:100])
            return
        except ValueError as exc:
            await websocket.close(code=1003, reason=str(exc)[:100])
            return
        except WebSocketDisconnect:
            return
    try:
        batch = min(1000, max(1, int(websocket.query_params.get("batch") or 1)))
    except ValueError:
        batch = 1
    sub = engine.bus.open(flt, buffer=st.settings.ws_buffer, name=f"ws:{p.subject}")
    engine.prom.ws_clients.inc()

    async def reader(cancel: trio.CancelScope) -> None:
        try:
            while True:
                try:
                    msg = await receive_json(websocket)
                    if isinstance(msg, dict) and isinstance(msg.get("subscribe"), dict):
                        sub.filter = parse_filter(p, msg["subscribe"])
                        await websocket.send_text(dumps({"kind": "subscribed", **msg["subscribe"]}))
                except ValueError as exc:  # a bad message is answered, the feed goes on
                    await websocket.send_text(dumps({"kind": "error", "detail": str(exc)[:300]}))
        except WebSocketDisconnect:
            pass
        cancel.cancel()

    async def watch_credentials(cancel: trio.CancelScope) -> None:
        # revoked while connected (token, session, user disabled/deleted/re-created, role or
        # sites changed): closed like an MQTT connection, within 10 s
        while True:
            await trio.sleep(REVALIDATE_INTERVAL)
            if not await st.still_valid(p):
                await websocket.close(code=1008, reason="credentials revoked")
                cancel.cancel()
                return

    try:
        await websocket.send_json(
            {"kind": "hello", "user": p.subject, "revision": engine.revision_number}
        )
        async with trio.open_nursery() as nursery:
            nursery.start_soon(reader, nursery.cancel_scope)
            nursery.start_soon(watch_credentials, nursery.cancel_scope)
            if batch > 1:
                async for event in sub.receive:
                    events = [event]
                    while len(events) < batch:
                        try:
                            events.append(sub.receive.receive_nowait())
                        except (trio.WouldBlock, trio.EndOfChannel):
                            break
                    text = _encode(events)
                    if text is not None:
                        await websocket.send_text(text)
            else:
                async for event in sub.receive:
                    text = _encode(event)
                    if text is not None:
                        await websocket.send_text(text)
            if sub.dropped:
                engine.prom.ws_dropped.inc()
                await websocket.close(code=1013, reason="too slow: events were dropped")
            nursery.cancel_scope.cancel()
    except WebSocketDisconnect:
        pass
    finally:
        engine.bus.close(sub)
        engine.prom.ws_clients.dec()
