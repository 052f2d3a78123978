"""The ASGI middleware in front of every route, and the HTTP ingest hot path.

:class:`Gatekeeper` does, in order: per-client rate limiting, authentication (401), per-token
rate limiting (429 + Retry-After), Prometheus accounting, and the audit log of every mutating
call. ``POST /api/v1/ingest/{device}`` never reaches FastAPI: :meth:`Gatekeeper._ingest`
serves it in plain ASGI (device key, per-device rate limit, parse, write-ahead log, hand to the
device task: ``durable_ingest.hand_in``; 2xx only once the readings are on disk), through
:func:`answer_ingest`, which the front door (twin/api/frontdoor.py) calls too for the ingest
requests it answers before hypercorn.
Authorization (403) is the policy's, asked by each route.
"""

from __future__ import annotations

import json
import math
import re
import time
from collections.abc import Iterable, MutableMapping
from typing import Any

import trio
from fastapi.responses import JSONResponse, Response
from starlette.routing import BaseRoute

from twin.api.deps import MUTATING, PREFIX, PUBLIC, SIGNED_PREFIX, bearer
from twin.api.durable_ingest import hand_in
from twin.api.owner import forward_ingest, owner_api
from twin.api.state import ApiState
from twin.bindings import plugins as plugin_edge
from twin.bindings.base import Reading
from twin.bindings.http import DeviceNotRunning, IngestBusy, IngestError, parse_ingest
from twin.errors import AuthError
from twin.timeseries.wal import WalError, WalFull

INGEST_PREFIX = f"{PREFIX}/ingest/"
EDGE_LINK_PREFIX = f"{PREFIX}/edge-link/"
"""Edge uploads: authenticated by the edge's key in the route (twin/api/routes/edge.py), not
audited per request (like ingest)."""
LOGIN = f"{PREFIX}/auth/login"
MAX_INGEST_BODY = 1 << 20


def _json_response(status: int, detail: Any, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"detail": detail}, status_code=status, headers=headers)


async def ingest_core(
    st: ApiState, device: str, key: str | None, raw: bytes, *, forwarded: bool = False
) -> tuple[int, dict[str, Any], dict[str, str] | None]:
    """One ingest call: device key, per-device rate limit, parse, write-ahead log (507 disk
    full / 503 + Retry-After), hand to the device task. Returns (HTTP status, JSON body, extra headers); no I/O once the key is cached."""
    engine = st.engine
    if not key:
        return 401, {"detail": "missing device key (X-Device-Key header)"}, None
    if not await st.check_device_key(device, key):
        engine.prom.child(engine.prom.ingest, "unauthorized").inc()
        return 401, {"detail": "invalid device key"}, None
    wait = st.by_device.hit(device)
    if wait:
        engine.prom.child(engine.prom.ingest, "rate_limited").inc()
        engine.prom.rate_limited.inc()
        retry = {"Retry-After": str(max(1, math.ceil(wait)))}
        return 429, {"detail": "too many requests for this device"}, retry
    now = time.time()
    codec, transform = _plugins_of(engine, device)
    try:
        if codec is not None:  # the body is the device's own payload: its codec plugin decodes it
            decoded = await _off_loop(engine, codec, plugin_edge.decode, codec, device, [raw], now)
            messages: list[Any] = list(decoded[0])
        else:
            messages = parse_ingest(device, json.loads(raw or b"{}"), now)
        if transform is not None:  # before the write-ahead log: what is logged is what is stored
            readings = [m for m in messages if isinstance(m, Reading)]
            if readings:
                rest = [m for m in messages if not isinstance(m, Reading)]
                readings = await _off_loop(engine, transform, plugin_edge.transform, transform,
                                           readings)
                messages = [*readings, *rest]
    except (ValueError, IngestError) as exc:
        engine.prom.child(engine.prom.ingest, "invalid").inc()
        engine.prom.refused(device, "http")
        return 422, {"detail": str(exc)}, None
    except RecursionError:  # json: nesting deeper than the interpreter's recursion limit
        engine.prom.child(engine.prom.ingest, "invalid").inc()
        engine.prom.refused(device, "http")
        return 422, {"detail": "JSON nested too deeply"}, None
    if engine.ownership.active and not forwarded and not engine.ownership.owns("Device", device):
        owner = owner_api(st, device)  # scale-out: the owner logs and acks it
        if owner is not None:
            return await forward_ingest(st, device, key, raw, *owner)
    try:
        reply = await hand_in(engine, device, messages)  # write-ahead log before the 2xx
    except WalError as exc:
        engine.prom.child(engine.prom.ingest, "not_logged").inc()
        status = 507 if isinstance(exc, WalFull) else 503
        detail = f"readings not accepted, retry later: {exc}"
        return status, {"detail": detail}, {"Retry-After": str(exc.retry_after)}
    except DeviceNotRunning:
        engine.prom.child(engine.prom.ingest, "not_running").inc()
        return 409, {"detail": f"device {device!r} is not running with an http push binding"}, None
    except IngestBusy:
        engine.prom.child(engine.prom.ingest, "busy").inc()
        return 429, {"detail": "device queue full"}, {"Retry-After": "1"}
    twin = engine.twin(device)
    if twin is not None:
        twin.metrics.bytes_in += len(raw)
    engine.prom.child(engine.prom.ingest, "ok").inc()
    return 200, reply, None


def _plugins_of(engine: Any, device: str) -> tuple[str | None, str | None]:
    """(codec, transform) plugins of an HTTP push device (``binding.http.codec``; its own or
    its model's ``transform``)."""
    doc: dict[str, Any] = engine.device_doc(device) or {}
    spec: dict[str, Any] = doc.get("spec") or {}
    binding: Any = spec.get("binding")
    opts: Any = binding.get("http") if isinstance(binding, dict) else None
    codec = opts.get("codec") if isinstance(opts, dict) and isinstance(opts.get("codec"), str) else None
    mname = spec.get("model")
    mdoc = engine.specs.get(("DeviceModel", mname)) if isinstance(mname, str) else None
    return codec, plugin_edge.transform_of(doc, (mdoc or {}).get("spec"))


async def _off_loop(engine: Any, plugin: str, fn: Any, *args: Any) -> Any:
    """Call a plugin edge function; a Starlark plugin's worker round trip leaves the loop."""
    if engine.plugins.uses_thread(plugin):
        return await trio.to_thread.run_sync(fn, *args)
    return fn(*args)


class Gatekeeper:
    """Pure ASGI middleware: rate limits, authentication, metrics, audit."""

    def __init__(self, app: Any, state: ApiState, routes: Iterable[BaseRoute] = ()) -> None:
        self.app = app
        self.state = state
        # route templates, for the label of requests answered before routing (401, 413 ...)
        self.templates: list[tuple[re.Pattern[str], str]] = []
        for r in routes:
            regex, template = getattr(r, "path_regex", None), getattr(r, "path", None)
            if isinstance(regex, re.Pattern) and isinstance(template, str):
                self.templates.append((regex, template))

    def route_template(self, scope: dict[str, Any]) -> str:
        """The ``/metrics`` label of a request: its route's template (``/devices/{device}``),
        never the raw path (anyone could create series with made-up URLs), else "unmatched"."""
        route = scope.get("route")
        if isinstance(getattr(route, "path", None), str):
            return str(route.path)  # type: ignore[union-attr]
        path = scope["path"]
        for regex, template in self.templates:
            if regex.match(path):
                return template
        return "unmatched"

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path0: str = scope["path"]
        if (
            scope["method"] == "POST"
            and path0.startswith(INGEST_PREFIX)
            and "/" not in path0[len(INGEST_PREFIX) :]
        ):
            await self._ingest(scope, receive, send)
            return
        st = self.state
        prom = st.engine.prom
        path: str = scope["path"]
        method: str = scope["method"]
        started = time.perf_counter()
        scope.setdefault("state", {})
        status_box = [500]

        async def send_wrapper(message: MutableMapping[str, Any]) -> None:
            if message["type"] == "http.response.start":
                status_box[0] = message["status"]
            await send(message)

        ingest = path.startswith(f"{PREFIX}/ingest/") or path.startswith(EDGE_LINK_PREFIX)
        client = (scope.get("client") or ("?", 0))[0]
        response: Response | None = None
        if not ingest and path != f"{PREFIX}/health":
            wait = st.by_client.hit(client)
            if wait:
                response = _json_response(
                    429,
                    "too many requests from this address",
                    {"Retry-After": str(max(1, math.ceil(wait)))},
                )
        public = (
            path in PUBLIC or ingest or path in ("/openapi.json", "/docs", "/docs/oauth2-redirect")
            or path.startswith(SIGNED_PREFIX)  # a signed video link: the route checks it
        )
        if response is None and not public:
            headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope["headers"]}
            try:
                principal = await st.authenticate(bearer(headers))
                scope["state"]["principal"] = principal
                scope["state"]["actor"] = principal.subject
                wait = st.by_token.hit(principal.subject)
                if wait:
                    response = _json_response(
                        429,
                        "rate limit exceeded for this token",
                        {"Retry-After": str(max(1, math.ceil(wait)))},
                    )
            except AuthError as exc:
                response = _json_response(401, str(exc), {"WWW-Authenticate": "Bearer"})
        if response is not None:
            if response.status_code == 429:
                prom.rate_limited.inc()
            await response(scope, receive, send_wrapper)
        else:
            await self.app(scope, receive, send_wrapper)
        status = status_box[0]
        route_path = self.route_template(scope)
        prom.child(prom.api_requests, method, route_path, str(status)).inc()
        prom.child(prom.api_latency, method, route_path).observe(time.perf_counter() - started)
        if path == LOGIN and status in (401, 429):
            # a flood of failed logins: one audit row per user/address/window, not one each
            st.login_audit.failed(scope["state"].get("actor", "anonymous"), client, status)
        elif method in MUTATING and not ingest:
            actor = scope["state"].get("actor", "anonymous")
            action = f"{method} {path}"
            target = str(
                (scope.get("path_params") or {}).get("device")
                or (scope.get("path_params") or {}).get("name")
                or path
            )
            detail = scope["state"].get("audit_detail") or {}
            now = time.time()
            st.engine.writer.put(lambda r: r.audit(actor, action, target, str(status), now, detail))

    async def _ingest(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        """The hot path, in plain ASGI (no routing, dependencies or response classes); the
        front door (twin/api/frontdoor.py) answers the same requests through
        :func:`answer_ingest` without ASGI."""
        started = time.perf_counter()
        chunks: list[bytes] = []
        size = 0
        more = True
        raw: bytes | None = None
        while more:
            message = await receive()
            if message["type"] != "http.request":
                return  # client went away
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > MAX_INGEST_BODY:
                break
            chunks.append(chunk)
            more = message.get("more_body", False)
        else:
            raw = b"".join(chunks)
        device = scope["path"][len(INGEST_PREFIX) :]
        status, raw_headers, payload = await answer_ingest(
            self.state, device, scope["headers"], raw, started
        )
        await send({"type": "http.response.start", "status": status, "headers": raw_headers})
        await send({"type": "http.response.body", "body": payload})


_INGEST_ROUTE = f"{PREFIX}/ingest/{{device}}"


async def answer_ingest(
    st: ApiState,
    device: str,
    headers: Iterable[tuple[bytes, bytes]],
    raw: bytes | None,
    started: float,
) -> tuple[int, list[tuple[bytes, bytes]], bytes]:
    """``POST /api/v1/ingest/{device}`` from its request headers (ASGI: lower-case names) and
    body (None: larger than :data:`MAX_INGEST_BODY`, 413): :func:`ingest_core`, then the
    response's status, headers and JSON body, counted in ``/metrics``. The one implementation
    of the route, for the gatekeeper's ASGI path and the front door alike."""
    key = None
    forwarded = False
    for name, value in headers:
        if name == b"x-twin-forwarded":
            forwarded = True
        elif name == b"x-device-key":
            key = value.decode("latin-1")
        elif name == b"authorization" and key is None:
            key = bearer({"authorization": value.decode("latin-1")})
    if raw is None:
        status, body, extra = 413, {"detail": "body too large"}, None
    else:
        status, body, extra = await ingest_core(st, device, key, raw, forwarded=forwarded)
    payload = json.dumps(body, separators=(",", ":"), default=str).encode()
    raw_headers = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(payload)).encode()),
    ]
    if status == 401:
        raw_headers.append((b"www-authenticate", b"DeviceKey"))
    for k, v in (extra or {}).items():
        raw_headers.append((k.lower().encode(), v.encode()))
    prom = st.engine.prom
    prom.child(prom.api_requests, "POST", _INGEST_ROUTE, str(status)).inc()
    prom.child(prom.api_latency, "POST", _INGEST_ROUTE).observe(time.perf_counter() - started)
    return status, raw_headers, payload
